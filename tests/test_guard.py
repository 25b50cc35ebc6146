"""engine.guard under a real `mpiexec -n 2`, run as a subprocess with a bounded timeout:
an exception on one rank ends the job, a stuck collective is reported with the late rank,
differing configurations are refused, a healthy run is left alone, and (mpi tier)
on_every_rank turns one rank's failure into one error on every rank."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine import guard

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"

PRELUDE = """
import sys, time
import numpy as np
from engine import guard
from engine.backend import get_backend
from engine.comm import create_communicator
guard.install()
comm = create_communicator(get_backend("cpu"))
x = np.random.default_rng().standard_normal(1000).astype(np.float32)
"""


# Both ranks' stdout reach mpiexec through one pipe, interleaved at the grain of each
# write: the jobs print every line in a single write (print("a", b) makes several), so a
# line the test looks for is never cut by the other rank's output.
def run_job(tmp_path, body, timeout=90):
    script = tmp_path / "job.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCALRANKID", "HYDRA"))}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(script)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    return res.returncode, res.stdout + res.stderr


@pytest.fixture(autouse=True)
def _need_mpiexec():
    assert MPIEXEC.exists(), f"{MPIEXEC} is missing: install the mpich wheel (make venv)"


# Jobs that must end with a non-zero exit: (job body, lines the report must contain, a line
# that the job prints only if it got past the failure).
FAILING_JOBS = [
    pytest.param("""
        comm.barrier()
        if comm.rank == 1:
            raise ValueError("boom on purpose")
        comm.allreduce(x)              # rank 0 would wait here forever
        sys.stdout.write(f"rank {comm.rank} got past the collective\\n")
    """, ["[rank 1/2", "ValueError: boom on purpose"], "got past the collective",
        id="exception_on_one_rank_ends_the_whole_job"),
    pytest.param("""
        dog = guard.Watchdog(comm, timeout=1.0, interval=0.1).start()
        comm.allreduce(x)
        if comm.rank == 1:
            time.sleep(120)            # rank 1 never reaches collective #1 in time
        comm.allreduce(x)
        print("finished")
    """, ["collective #1 has waited", "on rank(s) [0]", "late rank(s): [1]",
          "rank 1: has started only 1 collectives"], "finished",
        id="stuck_collective_is_reported_with_the_late_rank"),
    pytest.param("""
        from engine.reducer import check_same_config
        check_same_config(comm, {"arch": "resnet18", "batch": 32 if comm.rank == 0 else 64})
        print("started")
    """, ["StartupError", "rank 1: batch=64 (rank 0: 32)"], "started",
        id="differing_configuration_is_refused_naming_the_rank"),
]


@pytest.mark.parametrize("body, reported, after_failure", FAILING_JOBS)
def test_failing_job_ends_with_a_report(tmp_path, body, reported, after_failure):
    code, out = run_job(tmp_path, body)
    assert code != 0, out
    for line in reported:
        assert line in out, out
    assert after_failure not in out, out


def test_healthy_job_with_long_compute_between_collectives_is_left_alone(tmp_path):
    code, out = run_job(tmp_path, """
        dog = guard.Watchdog(comm, timeout=0.5, interval=0.05).start()
        for step in range(3):
            comm.allreduce(x)
            time.sleep(0.8)            # longer than the timeout, but no collective is waiting
        total = comm.allreduce(np.full(4, comm.rank + 1.0, np.float32))
        dog.stop()
        comm.close()
        sys.stdout.write(f"rank {comm.rank} sum {total[0]}\\n")
    """)
    assert code == 0, out
    assert "rank 0 sum 3.0" in out and "rank 1 sum 3.0" in out, out
    assert "aborting" not in out


@pytest.mark.mpi
def test_on_every_rank_turns_one_ranks_failure_into_one_collective_error(comm):
    from engine.data import DataError

    def fails_on(ranks, why):
        def fn():
            if comm.rank in ranks:
                raise DataError(why if isinstance(why, str) else why[comm.rank])
            return comm.rank * 10
        return fn
    assert guard.on_every_rank(comm, fails_on((), "never"), DataError) == comm.rank * 10
    with pytest.raises(DataError) as raised:
        guard.on_every_rank(comm, fails_on((1,), "no data"), DataError)
    assert raised.value.collective and str(raised.value) == "no data (rank 1 of 2)"
    with pytest.raises(DataError) as raised:        # two reasons: each named once, with its rank
        guard.on_every_rank(comm, fails_on((0, 1), ("disk", "net")), DataError)
    assert str(raised.value) == "disk (rank 0 of 2)\n  net (rank 1 of 2)"
    with pytest.raises(KeyError):                   # other errors are not gathered
        guard.on_every_rank(comm, lambda: {}["missing"], DataError)
