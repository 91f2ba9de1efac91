"""ZeRO stages 1-3 take the same steps as the unsharded data-parallel step (1 to 4 ranks), for
an MLP and for a small convnet with synchronised batch norm and residual blocks."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.comm.ring import chunk_bounds
from mpifed.nn.layers import (
    BatchNorm2d,
    Conv2d,
    GlobalAvgPool,
    Linear,
    ReLU,
    Residual,
)
from mpifed.nn.models import ModelSpec, init_params
from mpifed.nn.sequential import Sequential
from mpifed.optim import SGD, Adam
from mpifed.train.sharded_step import STEPS, part_bounds
from mpifed.train.step import DataParallelStep

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs


def convnet() -> Sequential:
    """335 parameters (+2 slots = 337, prime); on 4 ranks a chunk (85) is smaller than the
    second residual block (128). Batch norm is synchronised and keeps running statistics. It
    follows the ReLU: a bias right before batch norm has a zero gradient, whose rounding noise
    Adam would blow up into steps that depend on the order of the sums."""
    return Sequential([
        Conv2d(3, 3, padding=1), ReLU(), BatchNorm2d(sync=True),
        Residual([Conv2d(3, 3, padding=1), ReLU(), BatchNorm2d(sync=True)]),
        Residual([Conv2d(4, 3, stride=2, padding=1), ReLU()]),  # a 1x1 projection joins it
        GlobalAvgPool(), Linear(3)], (3, 5, 5), 3)


# 7 -> 6 -> 3 -> 3: 81 parameters (+2 slots = 83, prime: never divisible by the rank count);
# on 4 ranks a chunk (21) is smaller than the first layer (48).
MODELS = {"mlp": ModelSpec("mlp", 7, (6, 3), 3), "convnet": convnet()}
SPEC = MODELS["mlp"]
OPTIMIZERS = {
    "sgd-momentum": lambda: SGD(momentum=0.9),
    "sgd-nesterov-wd": lambda: SGD(momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda: Adam(weight_decay=1e-3),
}
# (model, algorithm, overlap): every algorithm and both paths, few enough to stay quick.
CASES = [("mlp", "ring", False), ("mlp", "hierarchical", True), ("convnet", "ring", True),
         ("convnet", "mpi", False)]


def global_batches(spec, steps: int, per_rank: int, seed: int = 0):
    """Yield this rank's rows of the same global batches on every rank."""
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((per_rank * comm.size, *spec.input_shape))
        y = rng.integers(0, spec.num_classes, per_rank * comm.size)
        rows = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
        yield x[rows], y[rows]


def train(spec, step_fn, optimizer, steps=50):
    losses = [step_fn(x, y, optimizer, 0.05, i + 1) for i, (x, y) in
              enumerate(global_batches(spec, steps, 5))]
    step_fn.close()
    return losses


_REFERENCE = {}


def unsharded(model: str, optimizer: str):
    """The losses and final parameters of shard = "none" (computed once per case)."""
    if (model, optimizer) not in _REFERENCE:
        spec = MODELS[model]
        params = init_params(spec, 3, np, "float64")
        base = DataParallelStep(spec, params, MPI.COMM_WORLD, "mpi", np, False, stall_timeout=0)
        losses = train(spec, base, OPTIMIZERS[optimizer]())
        base.free()
        _REFERENCE[model, optimizer] = losses, params
    return _REFERENCE[model, optimizer]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("stage", ["optimizer", "gradients", "parameters"])
def test_every_stage_equals_unsharded(stage, optimizer, case):
    model, algorithm, overlap = case
    spec, comm = MODELS[model], MPI.COMM_WORLD
    want, reference = unsharded(model, optimizer)
    spec.seed = 3
    start = None if stage == "parameters" else init_params(spec, 3, np, "float64")
    sharded = STEPS[stage](spec, start, comm, algorithm, np, overlap, stall_timeout=0,
                           dtype="float64")
    local = OPTIMIZERS[optimizer]()
    got = train(spec, sharded, local)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(sharded.gather_params(), reference, rtol=1e-6, atol=1e-9)
    # The optimiser's state covers this rank's chunk only.
    lo, hi = chunk_bounds(reference.size + 2, comm.size)[comm.rank]
    for value in local.state().values():
        if np.ndim(value):
            assert value.size == max(0, min(hi, reference.size) - lo)


def test_running_statistics_move_and_are_not_trained():
    """Batch norm's running statistics change with training, equal to the unsharded ones."""
    spec = MODELS["convnet"]
    _, reference = unsharded("convnet", "adam")
    start = init_params(spec, 3, np, "float64")
    for lo, hi in spec.buffer_ranges("float64"):
        assert not np.allclose(reference[lo:hi], start[lo:hi])


def test_stop_request_reaches_every_rank():
    comm = MPI.COMM_WORLD
    step_fn = STEPS["parameters"](SPEC, init_params(SPEC, 0, np, "float64"), comm, "ring", np,
                                  False, stall_timeout=0)
    x, y = next(global_batches(SPEC, 1, 4))
    step_fn(x, y, SGD(), 0.1, 1, stop=1.0 if comm.rank == comm.size - 1 else 0.0)
    assert step_fn.stop_agreed
    step_fn(x, y, SGD(), 0.1, 2)
    assert not step_fn.stop_agreed


def test_part_bounds_cut_a_layer_by_owner():
    bounds = chunk_bounds(83, 4)  # (0, 21), (21, 42), (42, 63), (63, 83)
    assert part_bounds(42, 81, bounds) == [(0, 0), (0, 0), (0, 21), (21, 39)]
    assert part_bounds(0, 48, bounds) == [(0, 21), (21, 42), (42, 48), (48, 48)]
    assert [SPEC.layer_range(i, "float64") for i in (1, 3, 5)] == [(0, 48), (48, 69), (69, 81)]


@pytest.mark.parametrize("stage", ["optimizer", "parameters"])
def test_sharded_checkpoint_loads_on_another_rank_count(tmp_path_factory, stage):
    """Written on all ranks, read back on all but the last: the same parameters and state."""
    from mpifed.config import resolve
    from mpifed.train.sharded_checkpoint import choose_sharded, read_sharded, save_sharded

    world = MPI.COMM_WORLD
    folder = world.bcast(str(tmp_path_factory.mktemp("ckpt")) if world.rank == 0 else None)
    cfg = resolve({"run": {"out": folder, "keep_checkpoints": 2, "resume": "auto"},
                   "data": {"train": f"{folder}/absent.h5"},  # no fingerprint
                   "comm": {"shard": stage}})
    step_fn = STEPS[stage](SPEC, init_params(SPEC, 3, np, "float64"), world, "ring", np, False,
                           stall_timeout=0)
    local = Adam()
    train(SPEC, step_fn, local, steps=7)
    whole = step_fn.gather_params().copy()
    m = np.zeros(whole.size + 2)
    lo = step_fn.lo
    m[lo:lo + step_fn.n_own] = local.m
    world.Allreduce(MPI.IN_PLACE, m)
    save_sharded(cfg, world, step_fn, local, 7, {"step": 7})
    fewer = world.Split(0 if world.rank < max(1, world.size - 1) else MPI.UNDEFINED, world.rank)
    if fewer != MPI.COMM_NULL:
        manifest = choose_sharded(cfg)
        assert manifest["ranks"] == world.size and manifest["counters"]["step"] == 7
        other = STEPS[stage](SPEC, np.zeros_like(whole), fewer, "ring", np, False, stall_timeout=0)
        values, state = read_sharded(manifest, other, np)
        other.load_shard(values)
        np.testing.assert_array_equal(other.gather_params(), whole)
        a = other.lo
        np.testing.assert_array_equal(state["m"], m[a:a + other.n_own])
        assert state["t"] == 7
        fewer.Free()
    world.Barrier()


def _datasets(path: str) -> dict:
    """{name: array} of every dataset in an HDF5 file."""
    import h5py

    found = {}
    with h5py.File(path) as fh:
        fh.visititems(lambda k, v: found.update({k: v[...]} if isinstance(v, h5py.Dataset)
                                                else {}))
    return found


class _Rows:
    """A test shard of `n` rows held in memory (what `evaluate` reads: len and rows)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def rows(self, index):
        return self.x[index], self.y[index]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_layer_by_layer_evaluation_and_model_file_equal_the_whole_model(tmp_path_factory,
                                                                         monkeypatch, model):
    """ZeRO-3's model, gathered per layer: evaluation over shards of unequal batch counts
    (ranks out of rows still take part in the gathers) and model.h5 written by rank 0 as the
    layers arrive equal the same with the whole parameters."""
    from mpifed.nn.io import save_model
    from mpifed.train import evaluate as evaluation
    from mpifed.train.data_parallel import write_model

    spec, comm = MODELS[model], MPI.COMM_WORLD
    spec.seed = 3
    whole = init_params(spec, 3, np, "float64")
    sharded = STEPS["parameters"](spec, None, comm, "ring", np, False, stall_timeout=0,
                                  dtype="float64")
    monkeypatch.setattr(evaluation, "EVAL_BATCH", 4)
    rng = np.random.default_rng(comm.rank)
    rows = 2 + 5 * comm.rank  # rank 0: one batch, rank 3: five
    test = _Rows(rng.standard_normal((rows, *spec.input_shape)),
                 rng.integers(0, spec.num_classes, rows))
    got = evaluation.evaluate(spec, sharded.model_source(), test, comm, np)
    want = evaluation.evaluate(spec, whole, test, comm, np)
    assert got["samples"] == want["samples"] and got["accuracy"] == want["accuracy"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-12)
    folder = comm.bcast(str(tmp_path_factory.mktemp("model")) if comm.rank == 0 else None)
    write_model(f"{folder}/gathered.h5", spec, sharded.model_source(), comm)
    if comm.rank == 0:
        save_model(f"{folder}/whole.h5", spec, whole)
        arrays = [_datasets(f"{folder}/{name}.h5") for name in ("gathered", "whole")]
        assert arrays[0].keys() == arrays[1].keys() and arrays[0]
        for key in arrays[0]:
            assert np.array_equal(arrays[0][key], arrays[1][key]), key
    comm.Barrier()
