"""ZeRO on CuPy: chunked optimisers, every stage against shard = "none", ZeRO-3's gather to
the leader and scatter back (federations), per-layer evaluation and model.h5. A device check,
not collected by pytest; on a GPU machine (with the wheels as tests/gpu/run.sh installs them):

    for n in 1 2; do mpiexec -n $n python3 tests/gpu/zero3_check.py; done

Falls back to NumPy without CuPy (so it also runs on CPUs). Prints PASS/FAIL lines, then
ALL PASS (or SOME FAILED).
"""

import tempfile

import numpy as np
from mpi4py import MPI

from mpifed.nn.io import save_model
from mpifed.nn.models import ModelSpec, init_params
from mpifed.optim import SGD, Adam
from mpifed.optim.optimizers import CHUNK
from mpifed.train import evaluate as evaluation
from mpifed.train.data_parallel import write_model
from mpifed.train.sharded_step import STEPS
from mpifed.train.step import DataParallelStep

try:
    import cupy as cp
except ImportError:
    cp = np

COMM = MPI.COMM_WORLD
SPEC = ModelSpec("mlp", 7, (6, 3), 3)  # 81 parameters: chunks smaller than a layer on 2 ranks
RESULTS = []


def check(name: str, passed) -> None:
    RESULTS.append(bool(passed))
    if COMM.rank == 0:
        print(("PASS " if passed else "FAIL ") + name, flush=True)


def optimisers() -> None:
    """The chunked updates equal the whole-array expressions on the device."""
    n, rng = 2 * CHUNK + 17, np.random.default_rng(0)
    w0 = cp.asarray(rng.standard_normal(n).astype(np.float32))
    grads = [cp.asarray(rng.standard_normal(n).astype(np.float32)) for _ in range(3)]
    w, ref = w0.copy(), w0.copy()
    m, v = cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
    adam = Adam(weight_decay=0.01)
    for t, g in enumerate(grads, 1):
        adam.step(w, g.copy(), 0.01)
        g = g + 0.01 * ref
        m *= 0.9
        m += 0.1 * g
        v *= 0.999
        v += (1 - 0.999) * g * g
        scale = 0.01 * (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t)
        ref -= np.float32(scale) * m / (cp.sqrt(v) + 1e-8)
    check(f"Adam in chunks == expressions (bitwise: {bool((w == ref).all())})",
          float(cp.abs(w - ref).max()) <= 1e-6)
    w = w0.copy()
    sgd = SGD(0.9, True, 0.01)
    for g in grads:
        sgd.step(w, g.copy(), 0.01)
    check("SGD (Nesterov, weight decay) in chunks: finite", bool(cp.isfinite(w).all()))


def batches(steps: int = 10, per: int = 5):
    rng = np.random.default_rng(1)
    for _ in range(steps):
        x = rng.standard_normal((per * COMM.size, 7))
        y = rng.integers(0, 3, per * COMM.size)
        rows = slice(COMM.rank * per, (COMM.rank + 1) * per)
        yield cp.asarray(x[rows]), cp.asarray(y[rows])


def train(step_fn) -> None:
    optimizer = Adam(weight_decay=1e-3)
    for i, (x, y) in enumerate(batches()):
        step_fn(x, y, optimizer, 0.05, i + 1)
    step_fn.close()


class Rows:
    """A test shard in memory: `rows` rows on this rank."""

    def __init__(self, rows: int):
        rng = np.random.default_rng(COMM.rank)
        self.x, self.y = rng.standard_normal((rows, 7)), rng.integers(0, 3, rows)

    def __len__(self):
        return len(self.y)

    def rows(self, index):
        return self.x[index], self.y[index]


def zero3_model(step_fn, want) -> None:
    """Leader gather / scatter back, per-layer evaluation, model.h5 from per-layer gathers."""
    out = cp.zeros(step_fn.n, dtype=cp.float64)
    step_fn.gather_to_leader(out)
    if COMM.rank == 0:
        check("parameters: gather_to_leader", bool((out == want).all()))
    step_fn.scatter_from_leader(want * 2 if COMM.rank == 0 else None)
    back = step_fn.gather_params()
    check("parameters: scatter_from_leader", bool((back == want * 2).all()))
    evaluation.EVAL_BATCH = 4
    test = Rows(2 + 5 * COMM.rank)  # unequal batch counts: the ranks out of rows still gather
    got = evaluation.evaluate(SPEC, step_fn.model_source(), test, COMM, cp)
    whole = evaluation.evaluate(SPEC, back, test, COMM, cp)
    check("parameters: per-layer evaluation", got["accuracy"] == whole["accuracy"]
          and abs(got["loss"] - whole["loss"]) < 1e-9)
    folder = COMM.bcast(tempfile.mkdtemp() if COMM.rank == 0 else None)
    write_model(f"{folder}/gathered.h5", SPEC, step_fn.model_source(), COMM)
    if COMM.rank == 0:
        import h5py

        save_model(f"{folder}/whole.h5", SPEC, back)
        with h5py.File(f"{folder}/gathered.h5") as a, h5py.File(f"{folder}/whole.h5") as b:
            names = []
            a.visititems(lambda k, v: names.append(k) if isinstance(v, h5py.Dataset) else None)
            same = bool(names) and all(np.array_equal(a[k][...], b[k][...]) for k in names)
        check("parameters: model.h5 gathered per layer", same)
    COMM.Barrier()


def main() -> int:
    optimisers()
    SPEC.seed = 3
    want = init_params(SPEC, 3, cp, "float64")
    base = DataParallelStep(SPEC, want, COMM, "mpi", cp, False, stall_timeout=0)
    train(base)
    base.free()
    for stage in ("optimizer", "gradients", "parameters"):
        start = None if stage == "parameters" else init_params(SPEC, 3, cp, "float64")
        step_fn = STEPS[stage](SPEC, start, COMM, "auto", cp, stage != "optimizer",
                               stall_timeout=0, dtype="float64")
        train(step_fn)
        check(f"{stage} == none", bool(cp.allclose(step_fn.gather_params(), want, rtol=1e-6,
                                                   atol=1e-9)))
        if stage == "parameters":
            zero3_model(step_fn, want)
    passed = COMM.allreduce(int(all(RESULTS)), op=MPI.MIN)
    if COMM.rank == 0:
        print(f"{'ALL PASS' if passed else 'SOME FAILED'} on {COMM.size} ranks, {cp.__name__}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
