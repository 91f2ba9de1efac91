"""The GPU path's logic on several ranks without a GPU (the fake cupy): ranks sharing a GPU are
warned and refused NCCL, one GPU per rank is not sharing, overlap orders by events."""

from __future__ import annotations

import numpy as np
import pytest
from fake_cupy import FakeCupy
from mpi4py import MPI

import mpifed.comm.backend as backend
import mpifed.comm.nccl as nccl
import mpifed.xp as xpmod
from mpifed.comm.collectives import choose_algorithm
from mpifed.config import OptimConfig


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


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_ranks_on_one_gpu_are_warned_and_nccl_refused(fake, monkeypatch):
    if MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).size < 2:  # make test-multinode's 3 x 1
        pytest.skip("one rank per node: no GPU is shared")
    comm = MPI.COMM_WORLD.Dup()
    fake.devices = 1  # every rank of the node lands on the one GPU
    monkeypatch.setattr(nccl, "nccl_library", lambda: object())
    try:
        with pytest.warns(RuntimeWarning, match="share 1 GPU") if _node_rank(comm) == 0 \
                else _no_warning():
            assert backend.select_device(comm) == 0
        assert fake.cuda.Device().id == 0
        reason = nccl.nccl_unavailable(comm)
        assert "share 1 GPU(s)" in reason and "one rank per GPU" in reason
        assert choose_algorithm(1 << 20, comm.size, device=True,
                                nccl=reason is None) == "mpi"
    finally:
        comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_one_visible_gpu_per_rank_is_not_sharing(fake, monkeypatch):
    """SLURM's --gpus-per-task=1: each rank sees its own GPU as device 0."""
    comm = MPI.COMM_WORLD.Dup()
    fake.devices, fake.pci_ids = 1, [f"0000:{comm.rank + 1:02x}:00.0"]
    monkeypatch.setattr(nccl, "nccl_library", lambda: object())
    try:
        assert backend.select_device(comm) == 0
        assert nccl.nccl_unavailable(comm) is None
    finally:
        comm.Free()


def _node_rank(comm):
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    rank = node.rank
    node.Free()
    return rank


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_overlap_reduces_on_the_ranks_device_ordered_by_events(fake):
    """Item 1 and 5 together: the comm thread binds the rank's GPU (not device 0), waits on the
    gradient's event before reducing it, and compute waits on the reduction's event."""
    from mpifed.nn.models import ModelSpec, init_params
    from mpifed.optim import make_optimizer
    from mpifed.train.step import DataParallelStep

    comm = MPI.COMM_WORLD.Dup()
    try:
        device = backend.select_device(comm)
        spec = ModelSpec("mlp", 5, (4, 4), 3)
        rng = np.random.default_rng(comm.rank)
        x, y = rng.standard_normal((6, 5)), rng.integers(0, 3, 6)
        opt = OptimConfig(name="sgd")
        results = []
        for xp, overlap in ((np, False), (fake, True)):
            params = init_params(spec, 0, xp, "float64")
            step = DataParallelStep(spec, params, comm, "mpi", xp, overlap, stall_timeout=0)
            try:
                loss = step(xp.asarray(x), xp.asarray(y), make_optimizer(opt), 0.1, 1)
            finally:
                step.close()
            results.append((loss, np.asarray(params).copy()))
        assert results[1][0] == pytest.approx(results[0][0], rel=1e-12)
        np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-12, atol=1e-14)
        on_comm_thread = [c for c in fake.calls if c[1].startswith("mpifed-comm")]
        assert on_comm_thread and {c[2] for c in on_comm_thread} == {device}
        recorded_by = {c[3]: c[1] for c in fake.of("record")}
        waits = fake.of("wait_event")
        assert any(w[1].startswith("mpifed-comm") and recorded_by[w[4]] == "MainThread"
                   for w in waits)  # a layer's gradient is final before it is reduced
        assert any(w[1] == "MainThread" and recorded_by[w[4]].startswith("mpifed-comm")
                   for w in waits)  # the reduced gradient is there before the update
    finally:
        comm.Free()
