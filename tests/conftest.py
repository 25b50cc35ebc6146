"""Test tiers: plain, `mpi` (run by make test under mpiexec -n 2), `gpu`, `slow`.

Under mpiexec every rank runs the same tests. A failing test on one rank would leave the
other waiting in a collective forever, so a failure under MPI aborts the whole job.
"""
import os

import pytest

from engine.backend import gpu_count
from engine.guard import abort_job


def _world():
    if not any(v in os.environ for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")):
        return None
    from mpi4py import MPI
    return MPI.COMM_WORLD


WORLD = _world()


def pytest_collection_modifyitems(config, items):
    under_mpi = WORLD is not None and WORLD.size > 1
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run make gpu-check where there is one)")
    skip_mpi = pytest.mark.skip(reason="mpi test: run under mpiexec -n 2 (make test does)")
    have_gpu = gpu_count() > 0
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(skip_gpu)
        if "mpi" in item.keywords and not under_mpi:
            item.add_marker(skip_mpi)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if WORLD is not None and WORLD.size > 1 and report.failed:
        abort_job(f"{item.nodeid} failed:\n{report.longreprtext}", 1, WORLD)


@pytest.fixture
def comm():
    """The world communicator of an mpi test."""
    assert WORLD is not None, "mpi tests run under mpiexec"
    return WORLD
