"""Runs pytest on every rank of an MPI job: `mpiexec -n 2 python tests/mpi_pytest.py ARGS`.

Rank 0 reports; the other ranks run the same tests silently (a failure on any rank is
printed to stderr and aborts the job, see conftest.py). A tier with no tests selected is
not an error, so tiers can be empty while the suite grows. A world of one rank is: the
ranks did not join one MPI job (mpi4py built against another MPI than the launcher's), and
every mpi test would skip and the tier pass.
"""
import os
import sys

import pytest
from mpi4py import MPI

NO_TESTS_COLLECTED = 5

if __name__ == "__main__":
    if MPI.COMM_WORLD.size < 2:
        sys.exit(f"mpi_pytest.py: this process is alone in its MPI world ({MPI.Get_library_version().splitlines()[0]}): "
                 "the ranks did not initialise one MPI job; is mpiexec from the MPI that mpi4py loads?")
    rank = MPI.COMM_WORLD.rank
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    code = pytest.main(["-p", "no:cacheprovider", *sys.argv[1:]])
    if code == NO_TESTS_COLLECTED:
        code = 0
    # Every rank ends its tests before any leaves: a rank that exits early looks like a crash.
    MPI.COMM_WORLD.Barrier()
    sys.exit(int(code))
