"""The GPU path's logic without a GPU: a fake cupy (tests/fake_cupy.py) records which device and
stream each thread works on, which stream waits on which event, and every transfer.

Each test states the CUDA rule at stake; the real device checks are in test_gpu.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fake_cupy import FakeCupy
from mpi4py import MPI

import mpifed.comm.backend as backend
import mpifed.comm.nccl as nccl
import mpifed.xp as xpmod
from mpifed.comm.collectives import choose_algorithm
from mpifed.config import CommConfig, OptimConfig
from mpifed.errors import UserError


@pytest.fixture
def fake(monkeypatch):
    """A fake cupy that every module of mpifed finds as the cupy module."""
    cp = FakeCupy(devices=2)
    for module in (xpmod, backend, nccl):
        monkeypatch.setattr(module, "cupy_module", lambda: cp)
    monkeypatch.delenv("MPIFED_CUDA_AWARE", raising=False)
    backend.cuda_aware.cache_clear()
    yield cp
    backend.cuda_aware.cache_clear()


# -- 1. threads and devices -------------------------------------------------------------------

def test_a_plain_thread_starts_on_device_0_and_the_pool_thread_on_the_callers(fake):
    fake.cuda.Device(1).use()
    with ThreadPoolExecutor(1) as plain:
        assert plain.submit(lambda: fake.cuda.Device().id).result() == 0  # the fault
    pool = xpmod.device_thread_pool(fake, "t")
    try:
        device, stream = pool.submit(lambda: (fake.cuda.Device().id,
                                              fake.cuda.get_current_stream())).result()
    finally:
        pool.shutdown()
    assert device == 1
    assert stream.non_blocking and stream is not fake.cuda.get_current_stream()


def test_synchronize_waits_on_the_arrays_device_not_the_threads(fake):
    fake.cuda.Device(1).use()
    array = fake.zeros(4)
    fake.cuda.Device(0).use()
    xpmod.synchronize(array)
    (sync,) = fake.of("stream_sync")
    assert sync[3].endswith("dev1")


# -- 3. NCCL may be absent; 2. ranks sharing a GPU --------------------------------------------

def test_nccl_missing_names_the_install_step(fake, monkeypatch):
    monkeypatch.setattr(nccl, "nccl_library", lambda: None)
    comm = MPI.COMM_SELF.Dup()
    try:
        reason = nccl.nccl_unavailable(comm)
        assert "pip install nvidia-nccl-cu12" in reason and "module load nccl" in reason
        with pytest.raises(ValueError, match="nvidia-nccl-cu12"):
            nccl.nccl_allreduce(fake.zeros(3), comm)
    finally:
        comm.Free()


def test_the_install_hint_follows_cupys_cuda_version(monkeypatch):
    monkeypatch.setattr(nccl, "cupy_module", lambda: FakeCupy(cuda_version=13000))
    assert "nvidia-nccl-cu13" in nccl.install_hint()


def test_the_reason_names_shared_gpus_and_the_way_out():
    reports = [(0, 2, 2), (nccl._SHARED_GPU, 4, 1), (nccl._NO_LIBRARY, 1, 1)]
    reason = nccl._reason(reports)
    assert "4 ranks share 1 GPU(s)" in reason and "rank 1" in reason
    assert 'comm.allreduce = "mpi"' in reason
    assert nccl._reason([(0, 1, 1), (0, 1, 1)]) == ""


# -- 4. auto for device buffers ----------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [8, 64 << 10, 64 << 20])
@pytest.mark.parametrize("per_node", [1, 4])
def test_auto_never_sends_device_buffers_through_the_host(nbytes, per_node):
    assert choose_algorithm(nbytes, 8, per_node, device=True, nccl=True) == "nccl"
    assert choose_algorithm(nbytes, 8, per_node, device=True, nccl=False) == "mpi"
    assert choose_algorithm(nbytes, 1, per_node, device=True, nccl=True) == "mpi"


def test_auto_for_host_buffers_is_unchanged():
    assert choose_algorithm(64 << 10, 4, 2) == "hierarchical"
    assert choose_algorithm(64 << 20, 4, 1) == "ring"


# -- 5. streams: the prefetch copy and the staging buffer --------------------------------------

def test_the_copier_copies_on_its_stream_and_the_consumer_waits_on_its_events(fake):
    fake.cuda.Device(1).use()
    copy = xpmod.device_copier(fake)
    host = np.arange(12.0).reshape(3, 4)
    with ThreadPoolExecutor(1, thread_name_prefix="loader") as loader:
        out = loader.submit(copy, host).result()
    np.testing.assert_array_equal(out, host)
    assert out.device_id == 1  # on the rank's device, though the loader thread started on 0
    (h2d,) = fake.of("h2d")
    (record,) = [r for r in fake.of("record") if r[1].startswith("loader")]
    assert h2d[1].startswith("loader") and h2d[4] == record[4]  # copy and event: one stream
    assert not record[4].startswith("default")  # a dedicated stream, not a default one
    copy.wait()
    (wait,) = fake.of("wait_event")
    assert wait[1] == "MainThread" and wait[3] == fake.cuda.get_current_stream().name
    assert wait[4] == record[3]
    copy.wait()
    assert len(fake.of("wait_event")) == 1  # each event is waited on once


def test_a_staging_buffer_is_reused_or_grown_only_after_its_copy_finished(fake):
    copy = xpmod.device_copier(fake)
    small, large = np.ones(4), np.ones(1000)
    for _ in range(copy.SLOTS):
        copy(small)
    events = [r[3] for r in fake.of("record")]
    fake.calls.clear()
    copy(small)  # slot 0 again: its first copy must be done before the buffer is written
    assert fake.calls[0][:4] == ("event_sync", "MainThread", 0, events[0])
    assert not fake.of("alloc_pinned")
    fake.calls.clear()
    copy(large)  # slot 1 grows: its copy must be done before the old buffer goes
    kinds = [c[0] for c in fake.calls]
    assert kinds.index("event_sync") < kinds.index("alloc_pinned")
    assert fake.of("event_sync")[0][3] == events[1]


def test_the_prefetcher_makes_compute_wait_for_each_batch(fake):
    from mpifed.data.stream import BatchStream, Prefetcher

    class Shard:
        def rows(self, index):
            return np.asarray(index, dtype=float)[:, None], np.asarray(index)

    loader = Prefetcher(Shard(), BatchStream(8, 2, 4, 0, 0, False), xpmod.device_copier(fake))
    try:
        for _ in range(3):
            _, x, y = loader.get()
            waited = {c[4] for c in fake.of("wait_event")}
            copied = {c[3] for c in fake.of("record") if c[1].startswith("mpifed-load")}
            assert len(copied - waited) <= 2  # only the batch being loaded now is not waited on
    finally:
        loader.close()
    np.testing.assert_array_equal(x[:, 0], [4.0, 5.0])


def test_staging_for_mpi_waits_for_the_last_copy_back(fake):
    comm = MPI.COMM_SELF.Dup()
    try:
        buf = fake.zeros(8)
        host, copy_back = backend._staged(buf, comm)
        host[...] = 3.0
        copy_back()
        (copied,) = [r for r in fake.of("record")]
        fake.calls.clear()
        backend._staged(fake.zeros(16), comm)  # grows: the copy back must have read the old one
        kinds = [c[0] for c in fake.calls]
        assert fake.calls[0][:4] == ("event_sync", "MainThread", 0, copied[3])
        assert kinds.index("event_sync") < kinds.index("alloc_pinned")
        np.testing.assert_array_equal(buf, 3.0)
    finally:
        comm.Free()


# -- 6. honest timings, one transfer per step ---------------------------------------------------

def test_device_time_marks_are_events_read_after_the_end(fake):
    start = xpmod.mark(fake)
    end = xpmod.mark(fake)
    fake.calls.clear()
    assert xpmod.seconds_between(start, end) == (end.time - start.time) / 1000.0
    assert fake.of("event_sync")[0][3] == end.name
    first = xpmod.mark(np)
    assert isinstance(first, float) and xpmod.seconds_between(first, xpmod.mark(np)) >= 0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_step_reads_loss_and_stop_back_in_one_transfer(fake, overlap):
    from mpifed.nn.models import ModelSpec, init_params, loss_and_grad
    from mpifed.optim import make_optimizer
    from mpifed.train.step import DataParallelStep

    spec = ModelSpec("mlp", 5, (4,), 3)
    params = init_params(spec, 0, fake, "float64")
    rng = np.random.default_rng(0)
    x, y = fake.asarray(rng.standard_normal((6, 5))), fake.asarray(rng.integers(0, 3, 6))
    step = DataParallelStep(spec, params, MPI.COMM_SELF, "mpi", fake, overlap, stall_timeout=0)
    try:
        host_params = np.asarray(params).copy()
        want = loss_and_grad(spec, host_params, np.asarray(x), np.asarray(y),
                             np.zeros_like(host_params))
        fake.calls.clear()
        opt = make_optimizer(OptimConfig(name="sgd"))
        loss = step(x, y, opt, 0.1, 1, stop=1.0)
    finally:
        step.close()
    assert len(fake.of("d2h")) == 1
    assert loss == pytest.approx(float(want)) and step.stop_agreed


# -- 8. MPIFED_CUDA_AWARE=1 is checked --------------------------------------------------------

class _NotCudaAware:
    """A two-rank communicator whose MPI reads device buffers as garbage (rank 0's view)."""

    rank, size = 0, 2

    def Allreduce(self, sendbuf, recvbuf, op=None):
        pass  # the device bytes were never read (and no other rank's verdict arrives)


def test_a_forced_cuda_aware_mpi_that_is_not_is_caught(fake, monkeypatch, capsys):
    monkeypatch.setenv("MPIFED_CUDA_AWARE", "1")
    backend.cuda_aware.cache_clear()
    with pytest.raises(UserError, match="not CUDA-aware; unset MPIFED_CUDA_AWARE"):
        backend.check_cuda_aware(_NotCudaAware())
    assert "a crash here means this MPI is not CUDA-aware" in capsys.readouterr().err
    backend.check_cuda_aware(MPI.COMM_SELF)  # a correct sum passes


def test_without_the_override_nothing_is_tried(fake):
    backend.check_cuda_aware(_NotCudaAware())
    assert not fake.calls


def test_training_refuses_nccl_with_the_reason_on_every_rank(fake, monkeypatch):
    from mpifed.train import setup

    cfg = CommConfig(backend="numpy", allreduce="nccl")
    with pytest.raises(UserError, match='comm.allreduce = "nccl" needs GPU arrays'):
        setup.array_backend(cfg, MPI.COMM_SELF)
    monkeypatch.setattr(setup, "backend_module", lambda name: fake)
    monkeypatch.setattr(nccl, "nccl_library", lambda: None)
    cfg = CommConfig(backend="cupy", allreduce="nccl")
    comm = MPI.COMM_SELF.Dup()
    try:
        with pytest.raises(UserError, match="nvidia-nccl-cu12"):
            setup.array_backend(cfg, comm)
    finally:
        comm.Free()


def test_the_nccl_id_travels_as_ints_and_nothing_is_unpickled(monkeypatch):
    """NCCL's unique id (128 signed chars) reaches NcclCommunicator unchanged, with every
    unpickling refused (the node and world may span institutions)."""
    import pickle

    made = []

    class FakeNccl:
        @staticmethod
        def get_unique_id():
            return tuple(range(-64, 64))

        def NcclCommunicator(self, size, uid, rank):  # noqa: N802 (cupy's name)
            made.append((size, uid, rank))
            return object()

    monkeypatch.setattr(nccl, "nccl_library", lambda: FakeNccl())
    monkeypatch.setattr(nccl, "_local_problems", lambda comm: (0, 1, 1))

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    comm = MPI.COMM_SELF.Dup()
    MPI.pickle.__init__(pickle.dumps, refuse)
    try:
        nccl.nccl_communicator(comm)
    finally:
        MPI.pickle.__init__(pickle.dumps, pickle.loads)
        comm.Free()
    assert made == [(1, tuple(range(-64, 64)), 0)]
