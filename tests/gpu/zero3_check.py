"""ZeRO on CuPy: chunked optimisers, every stage against shard = "none", ZeRO-3's gather to
the leader / scatter back (federations), per-layer evaluation and model.h5. A device check, not
collected by pytest; on a GPU machine (with the wheels as tests/gpu/run.sh installs them):

    for n in 1 2; do mpiexec -n $n python3 tests/gpu/zero3_check.py; done

Falls back to NumPy without CuPy (so it also runs here). Prints PASS/FAIL lines, then ALL PASS.
"""
import os, sys, tempfile
import numpy as np
try:
    import cupy as cp
except ImportError:
    cp = np
from mpi4py import MPI
from mpifed.nn.models import ModelSpec, init_params
from mpifed.optim import SGD, Adam
from mpifed.optim.optimizers import CHUNK
from mpifed.train.sharded_step import ShardedStep
from mpifed.train.step import DataParallelStep
from mpifed.train import evaluate as evaluation
from mpifed.train.data_parallel import write_model
from mpifed.nn.io import save_model
import h5py

comm = MPI.COMM_WORLD
ok = []
def check(name, cond):
    ok.append(bool(cond))
    if comm.rank == 0:
        print(("PASS " if cond else "FAIL ") + name, flush=True)

# 1. chunked optimisers on CuPy == whole-array expressions on CuPy
n = 2 * CHUNK + 17
rng = np.random.default_rng(0)
w0 = cp.asarray(rng.standard_normal(n).astype(np.float32)); gs = [cp.asarray(rng.standard_normal(n).astype(np.float32)) for _ in range(3)]
w, ref, m, v = w0.copy(), w0.copy(), cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
opt = Adam(weight_decay=0.01)
for t, g in enumerate(gs, 1):
    opt.step(w, g.copy(), 0.01)
    gg = g + 0.01 * ref
    m *= 0.9; m += 0.1 * gg; v *= 0.999; v += (1 - 0.999) * gg * gg
    scale = 0.01 * (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t)
    ref -= np.float32(scale) * m / (cp.sqrt(v) + 1e-8)
check("Adam in chunks on CuPy: max |diff| %.3g (bitwise %s)" % (float(cp.abs(w - ref).max()), bool((w == ref).all())),
      float(cp.abs(w - ref).max()) <= 1e-6)
w = w0.copy(); s = SGD(0.9, True, 0.01)
for g in gs: s.step(w, g.copy(), 0.01)
check("SGD nesterov in chunks on CuPy runs, finite", bool(cp.isfinite(w).all()))

# 2. every stage on CuPy == "none" on CuPy (float64, Adam, 10 steps)
spec = ModelSpec("mlp", 7, (6, 3), 3); spec.seed = 3
def batches(steps=10, per=5):
    r = np.random.default_rng(1)
    for _ in range(steps):
        x = r.standard_normal((per * comm.size, 7)); y = r.integers(0, 3, per * comm.size)
        rows = slice(comm.rank * per, (comm.rank + 1) * per)
        yield cp.asarray(x[rows]), cp.asarray(y[rows])
base_params = init_params(spec, 3, cp, "float64")
base = DataParallelStep(spec, base_params, comm, "mpi", cp)
bo = Adam(weight_decay=1e-3)
for i, (x, y) in enumerate(batches()): base(x, y, bo, 0.05, i + 1)
base.close(); base.free()
for stage in ("optimizer", "gradients", "parameters"):
    start = None if stage == "parameters" else init_params(spec, 3, cp, "float64")
    st = ShardedStep(spec, start, comm, "auto", cp, stage != "optimizer", stage, dtype="float64")
    o = Adam(weight_decay=1e-3)
    for i, (x, y) in enumerate(batches()): st(x, y, o, 0.05, i + 1)
    st.close()
    got = st.gather_params()
    check(f"{stage} on CuPy equals none", cp.allclose(got, base_params, rtol=1e-6, atol=1e-9))
    # gather to leader / scatter back
    out = cp.zeros(st.n, dtype=cp.float64)
    st.gather_to_leader(out)
    if comm.rank == 0:
        check(f"{stage} gather_to_leader on CuPy", stage != "parameters" or bool((out == got).all()))
    new = base_params * 2 if comm.rank == 0 else None
    if stage == "parameters":
        st.scatter_from_leader(new)
        back = st.gather_params()
        check("scatter_from_leader on CuPy", bool((back == base_params * 2).all()))
        # evaluation layer by layer and model.h5
        evaluation.EVAL_BATCH = 4
        rows = 2 + 5 * comm.rank
        r = np.random.default_rng(comm.rank)
        class Rows:
            def __len__(s): return rows
            def rows(s, idx): return xs[idx], ys[idx]
        xs, ys = r.standard_normal((rows, 7)), r.integers(0, 3, rows)
        a = evaluation.evaluate(spec, st.model_source(), Rows(), comm, cp)
        b = evaluation.evaluate(spec, back, Rows(), comm, cp)
        check("layer-by-layer evaluation on CuPy", a["accuracy"] == b["accuracy"] and abs(a["loss"] - b["loss"]) < 1e-9)
        folder = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
        write_model(f"{folder}/g.h5", spec, st.model_source(), comm)
        if comm.rank == 0:
            save_model(f"{folder}/w.h5", spec, back)
            same = True
            with h5py.File(f"{folder}/g.h5") as f, h5py.File(f"{folder}/w.h5") as g:
                def cmp(name, item):
                    global same
                    if isinstance(item, h5py.Dataset):
                        same = same and np.array_equal(item[...], g[name][...])
                f.visititems(cmp)
            check("model.h5 gathered per layer on CuPy", same)
        comm.Barrier()
flag = comm.allreduce(int(all(ok)), op=MPI.MIN)
if comm.rank == 0:
    print("ALL PASS" if flag else "SOME FAILED", comm.size, "ranks")
