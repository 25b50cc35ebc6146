"""The MPI communicator under mpiexec -n 2: sums and averages against float64 references,
FP16 within its tolerance, in-order asynchronous collectives that progress without wait()."""
import numpy as np
import pytest

from engine.backend import get_backend
from engine.comm import CommError, MpiCommunicator, create_communicator

pytestmark = pytest.mark.mpi


@pytest.fixture(params=[None, 0.0], ids=["polling", "blocking"])
def mpi_comm(comm, request):
    c = create_communicator(get_backend("cpu"), comm, poll_s=request.param)
    yield c
    c.close()


def _rank_data(comm, n, seed):
    """This rank's random data and every rank's, for the reference (seed varies per run)."""
    seed = comm.bcast(seed if comm.rank == 0 else None, root=0)
    rng = np.random.default_rng([seed, comm.rank])
    mine = rng.standard_normal(n)
    return mine, np.stack(comm.allgather(mine))


def test_create_communicator_on_cpu_is_mpi(mpi_comm, comm):
    assert isinstance(mpi_comm, MpiCommunicator)
    assert (mpi_comm.rank, mpi_comm.size) == (comm.rank, comm.size) and comm.size >= 2


@pytest.mark.parametrize("n", [1, 5, 4099])
def test_fp16_allreduce_of_any_length_is_identical_on_every_rank(mpi_comm, comm, n):
    mine, every = _rank_data(comm, n, np.random.SeedSequence().entropy % 2**32)
    buf = mine.astype(np.float16)
    mpi_comm.allreduce(buf, "avg")
    ref = every.astype(np.float16).astype(np.float32).sum(0) / comm.size
    np.testing.assert_allclose(buf.astype(np.float64), ref, rtol=2.0 ** -10, atol=2.0 ** -24)
    assert len({b.tobytes() for b in comm.allgather(buf)}) == 1


@pytest.mark.parametrize("op", ["sum", "avg"])
def test_allreduce_fp32_matches_float64(mpi_comm, comm, op):
    mine, every = _rank_data(comm, 10_007, np.random.SeedSequence().entropy % 2**32)
    buf = mine.astype(np.float32)
    mpi_comm.allreduce(buf, op)
    ref = every.sum(0) / (comm.size if op == "avg" else 1)
    rel = np.abs(buf - ref).max() / np.abs(ref).max()
    assert rel < 1e-6, rel


def test_allreduce_fp16_within_half_precision(mpi_comm, comm):
    mine, every = _rank_data(comm, 4099, np.random.SeedSequence().entropy % 2**32)
    buf = mine.astype(np.float16)
    mpi_comm.allreduce(buf, "sum")
    ref = every.astype(np.float16).astype(np.float64).sum(0)
    # each rank's input is exact in fp16; the float32 sum of the N is rounded once
    err = np.abs(buf.astype(np.float64) - ref)
    assert np.all(err <= 2.0 ** -11 * np.abs(ref) * (1 + 1e-6) + 2.0 ** -25), err.max()
    assert not np.array_equal(buf.astype(np.float64), mine)     # it really was reduced


def test_async_collectives_complete_in_order_with_the_right_results(mpi_comm, comm):
    mine, every = _rank_data(comm, 3000, np.random.SeedSequence().entropy % 2**32)
    bufs = [mine[i * 300:(i + 1) * 300].astype(np.float32) for i in range(10)]
    works = [mpi_comm.allreduce_async(b) for b in bufs]
    for w in reversed(works):          # waiting out of order is fine
        w.wait()
    assert [w.seq for w in works] == sorted(w.seq for w in works)
    finished = [w.finished_at for w in works]
    assert finished == sorted(finished), "collectives ran out of issue order"
    ref = every.sum(0)
    np.testing.assert_allclose(np.concatenate(bufs), ref, rtol=1e-5, atol=1e-6)
    started, done, oldest = mpi_comm.progress()
    assert started == done and oldest is None


def test_collective_progresses_while_the_main_thread_does_not_wait(mpi_comm, comm):
    """Rank 1 will not call wait() until rank 0's all-reduce is complete: this can only end
    if rank 1's communication thread drives the collective on its own."""
    buf = np.random.default_rng().standard_normal(1 << 16).astype(np.float32)
    expected = np.sum(comm.allgather(buf.astype(np.float64)), axis=0)
    work = mpi_comm.allreduce_async(buf)
    token = np.zeros(1, np.int64)
    if comm.rank == 0:
        work.wait()
        token[0] = 1
        for peer in range(1, comm.size):
            comm.Send(token, dest=peer, tag=77)
    else:
        comm.Recv(token, source=0, tag=77)
        assert token[0] == 1
        work.wait()
    np.testing.assert_allclose(buf, expected, rtol=1e-5, atol=1e-5)


def test_bcast_and_barrier(mpi_comm, comm):
    seed = comm.bcast(int(np.random.SeedSequence().entropy % 2**32), root=0)
    root_data = np.random.default_rng(seed).standard_normal(777).astype(np.float32)
    buf = root_data.copy() if comm.rank == comm.size - 1 else np.zeros(777, np.float32)
    mpi_comm.bcast(buf, root=comm.size - 1)
    np.testing.assert_array_equal(buf, root_data)
    mpi_comm.barrier()


def test_bad_buffers_and_ops_are_refused(mpi_comm):
    with pytest.raises(CommError, match="float32 or float16"):
        mpi_comm.allreduce_async(np.zeros(8))
    with pytest.raises(CommError, match="contiguous"):
        mpi_comm.allreduce_async(np.zeros(8, np.float32)[::2])
    with pytest.raises(CommError, match="op"):
        mpi_comm.allreduce_async(np.zeros(8, np.float32), op="max")
    with pytest.raises(CommError, match="root"):
        mpi_comm.bcast(np.zeros(8, np.float32), root=mpi_comm.size)
