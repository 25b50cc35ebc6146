"""The MPI tier really exchanges data between two processes."""
import numpy as np
import pytest

pytestmark = pytest.mark.mpi


def test_two_ranks_exchange_random_arrays(comm):
    from mpi4py import MPI
    assert comm.size == 2, "this test needs exactly 2 ranks"
    rng = np.random.default_rng(1234 + comm.rank)
    mine = rng.standard_normal(1000)
    theirs = np.empty_like(mine)
    peer = 1 - comm.rank
    comm.Sendrecv(mine, dest=peer, recvbuf=theirs, source=peer)
    expected = np.random.default_rng(1234 + peer).standard_normal(1000)
    np.testing.assert_array_equal(theirs, expected)
    total = np.empty_like(mine)
    comm.Allreduce(mine, total, op=MPI.SUM)
    np.testing.assert_allclose(total, mine + theirs, rtol=1e-15)
