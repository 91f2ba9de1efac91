"""The CuPy path on a real GPU: training on the device equals training on the host (overlap,
Adam, a test set, a resume, federated rounds), NCCL and every collective equal MPI, and each rank
works on the GPU of its node-local rank, its threads too. Skipped without CuPy and a GPU; the
logic is also tested without one, against a fake cupy (test_gpu_logic.py).

GPU tests have their own timeout (GPU_TIMEOUT), longer than the session's: a cold start compiles
kernels and sets up cuBLAS and NCCL. Each subprocess times out first, so a hang reports its output.
"""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import mpiexec, run_mpi

from mpifed.xp import cupy_module

GPU_TIMEOUT = 420  # per test
RUN_TIMEOUT = 180  # per subprocess

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(GPU_TIMEOUT), pytest.mark.skipif(
    cupy_module() is None, reason="CuPy or a CUDA device is missing: GPU tests run on a GPU")]


def gpu_count() -> int:
    return cupy_module().cuda.runtime.getDeviceCount() if cupy_module() is not None else 0


def nccl_reason(ranks: int) -> str | None:
    """Why NCCL cannot run on `ranks` ranks of this machine, or None."""
    from mpifed.comm.nccl import nccl_library

    if nccl_library() is None:
        from mpifed.comm.nccl import install_hint

        return f"NCCL is not installed: {install_hint()}"
    if gpu_count() < ranks:
        return f"{ranks} ranks but {gpu_count()} GPU(s): NCCL needs one GPU per rank"
    return None


def skip_nccl_unless_it_runs(algorithm: str, ranks: int) -> None:
    reason = nccl_reason(ranks) if algorithm == "nccl" else None
    if reason:
        pytest.skip(reason)


def run_script(tmp_path, ranks: int, script: str):
    (tmp_path / "check.py").write_text(script)
    done = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, "check.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0 and done.stdout.count("ok") == ranks, done.stdout + done.stderr
    return done


# -- devices ------------------------------------------------------------------------------------

DEVICES = """
import numpy as np, cupy as cp
from mpi4py import MPI
from mpifed.comm import select_device
from mpifed.xp import device_copier, device_thread_pool
comm = MPI.COMM_WORLD
device = select_device(comm)
assert cp.cuda.Device().id == device, (cp.cuda.Device().id, device)
buf = cp.zeros(10)
assert buf.device.id == device
pool = device_thread_pool(cp, "t")  # the overlap thread
assert pool.submit(lambda: cp.cuda.Device().id).result() == device
copy = device_copier(cp)
loader = __import__("concurrent.futures").futures.ThreadPoolExecutor(1)
moved = loader.submit(copy, np.arange(5.0)).result()
copy.wait()
assert moved.device.id == device and (moved.get() == np.arange(5.0)).all()
node = comm.Split_type(MPI.COMM_TYPE_SHARED)
ids = node.allgather(cp.cuda.Device().pci_bus_id)
if cp.cuda.runtime.getDeviceCount() >= node.size:
    assert len(set(ids)) == node.size, ids  # one GPU per rank
print("ok", comm.rank, device, ids[node.rank])
"""


@pytest.mark.parametrize("ranks", [1, 2])
def test_each_rank_and_its_threads_work_on_its_own_gpu(tmp_path, ranks):
    run_script(tmp_path, ranks, DEVICES)


# -- collectives --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64"])
def test_nccl_on_one_rank_for_every_dtype(dtype):
    from mpi4py import MPI

    from mpifed.comm.nccl import nccl_allreduce

    skip_nccl_unless_it_runs("nccl", 1)
    cp = cupy_module()
    host = (np.arange(1001) % 7).astype(dtype)
    buf = cp.asarray(host)
    assert nccl_allreduce(buf, MPI.COMM_SELF) is buf
    np.testing.assert_array_equal(buf.get(), host)


COLLECTIVES = """
import numpy as np, cupy as cp
from mpi4py import MPI
from mpifed.comm import select_device, allreduce
comm = MPI.COMM_WORLD
select_device(comm)
for dtype in ("float32", "float64", "int64"):
    host = (np.random.default_rng(comm.rank).standard_normal(100_003) * 100).astype(dtype)
    ref = host.copy(); comm.Allreduce(MPI.IN_PLACE, ref)
    for algo in {algorithms}:
        buf = cp.asarray(host)
        allreduce(buf, comm, algorithm=algo)
        tol = 1e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(buf.get(), ref, rtol=tol, atol=tol, err_msg=algo + dtype)
print("ok", comm.rank)
"""


@pytest.mark.parametrize("ranks", [1, 2])
def test_every_collective_on_device_buffers_equals_mpi_allreduce(tmp_path, ranks):
    algorithms = ["ring", "mpi", "hierarchical", "auto"]
    if nccl_reason(ranks) is None:
        algorithms.append("nccl")
    run_script(tmp_path, ranks, COLLECTIVES.format(algorithms=tuple(algorithms)))


# -- training: the device run equals the host run -----------------------------------------------

CONFIG = """
[data]
train = "d.h5"
test = "{test}"
[model]
kind = "mlp"
hidden = [32, 16]
dtype = "float64"
[optim]
name = "{optim}"
lr = 0.05
momentum = 0.9
batch_size = 16
steps = {steps}
[comm]
backend = "{backend}"
allreduce = "{algorithm}"
overlap = {overlap}
[run]
out = "{out}"
eval_every = {eval_every}
checkpoint_every = 7
progress = "none"
"""


def write_data(path, seed, samples=500):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, samples)
    with h5py.File(path, "w") as fh:
        fh["x"] = rng.standard_normal((samples, 12)) + 0.5 * y[:, None]
        fh["y"] = y
        fh.attrs["num_classes"] = 3


def params_of(path):
    with h5py.File(path) as fh:
        return [fh[f"layers/{i}/{k}"][...] for i in range(len(fh["layers"])) for k in "Wb"]


def evals_of(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["accuracy"]) for r in lines if r.get("event") == "eval"]


def train(tmp_path, ranks, name, *, extra=(), **settings):
    values = dict(test="", optim="sgd", steps=30, backend="cupy", algorithm="auto",
                  overlap="false", eval_every=0, out=name)
    values.update(settings)
    (tmp_path / f"{name}.toml").write_text(CONFIG.format(**values))
    done = run_mpi(ranks, ["train", f"{name}.toml", *extra], cwd=tmp_path, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def assert_same_model(a, b):
    for got, want in zip(params_of(a / "model.h5"), params_of(b / "model.h5")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


CASES = {  # name: (ranks, config settings)
    "sgd": (2, {}),
    "overlap": (2, {"overlap": "true"}),
    "overlap-nccl": (2, {"overlap": "true", "algorithm": "nccl"}),
    "nccl": (2, {"algorithm": "nccl"}),
    "ring": (2, {"algorithm": "ring"}),
    "adam": (2, {"optim": "adam"}),
    "test-set": (2, {"test": "t.h5", "eval_every": 10}),
    "one-rank": (1, {"overlap": "true"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_device_training_equals_host_training(tmp_path, case):
    ranks, settings = CASES[case]
    skip_nccl_unless_it_runs(settings.get("algorithm", "auto"), ranks)
    write_data(tmp_path / "d.h5", 0)
    write_data(tmp_path / "t.h5", 1, samples=200)
    host = {**settings, "backend": "numpy", "algorithm": "mpi"}
    train(tmp_path, ranks, "host", **host)
    train(tmp_path, ranks, "device", **settings)
    assert_same_model(tmp_path / "device", tmp_path / "host")
    if settings.get("test"):
        host_evals, device_evals = evals_of(tmp_path / "host"), evals_of(tmp_path / "device")
        assert [e[0] for e in device_evals] == [10, 20, 30, 30]
        np.testing.assert_allclose(np.array(device_evals)[:, 1:], np.array(host_evals)[:, 1:],
                                   rtol=1e-5, atol=1e-8)


def test_a_resumed_device_run_equals_the_host_run(tmp_path):
    write_data(tmp_path / "d.h5", 0)
    train(tmp_path, 2, "host", backend="numpy", algorithm="mpi")
    train(tmp_path, 2, "device", steps=20)  # checkpoints at 7 and 14
    train(tmp_path, 2, "device", extra=["--set", "optim.steps=30"], steps=20)
    records = [json.loads(line) for line in (tmp_path / "device" / "metrics.jsonl").open()]
    assert any(r.get("event") == "resumed" and r.get("step") == 14 for r in records)
    assert_same_model(tmp_path / "device", tmp_path / "host")


FEDERATED = """
[data]
train = "site-{{institution}}.h5"
[model]
kind = "mlp"
hidden = [16]
dtype = "float64"
[optim]
lr = 0.05
momentum = 0.9
batch_size = 8
[federated]
institution_sizes = [1, 1]
rounds = 2
local_steps = 7
strategy = "fedavg"
[comm]
backend = "{backend}"
[run]
out = "{backend}"
progress = "none"
"""


def test_two_federated_rounds_on_the_device_equal_the_host(tmp_path):
    for site in range(2):
        write_data(tmp_path / f"site-{site}.h5", 10 + site, samples=200)
    for backend in ("numpy", "cupy"):
        (tmp_path / f"{backend}.toml").write_text(FEDERATED.format(backend=backend))
        done = run_mpi(2, ["train", f"{backend}.toml"], cwd=tmp_path, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stdout + done.stderr
    assert_same_model(tmp_path / "cupy", tmp_path / "numpy")


CONVNET = [{"type": "conv2d", "out": 4, "kernel": 3, "padding": 1},
           {"type": "batchnorm2d", "sync": True}, {"type": "relu"},
           {"type": "residual", "layers": [{"type": "conv2d", "out": 4, "kernel": 3,
                                            "padding": 1}, {"type": "relu"}]},
           {"type": "maxpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "linear", "out": 3}]


@pytest.mark.parametrize("shard", ["none", "optimizer", "gradients", "parameters"])
def test_a_device_convnet_equals_the_host_convnet(tmp_path, shard):
    """The layer library (conv, sync batch norm, residual, pooling) and the ZeRO stages on CuPy
    give the NumPy run's model, running statistics included (float64, 2 ranks)."""
    from helpers import model_arrays, write_config

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    with h5py.File(tmp_path / "img.h5", "w") as fh:
        fh["x"] = rng.standard_normal((400, 1, 8, 8)) + 0.5 * y[:, None, None, None]
        fh["y"] = y
    for name, backend, algorithm in (("host", "numpy", "mpi"), ("device", "cupy", "auto")):
        write_config(tmp_path / f"{name}.toml", {
            "data": {"train": "img.h5"},
            "model": {"kind": "sequential", "layers": CONVNET, "dtype": "float64"},
            "optim": {"lr": 0.05, "momentum": 0.9, "batch_size": 16, "steps": 20},
            "comm": {"backend": backend, "allreduce": algorithm, "shard": shard},
            "run": {"out": name, "progress": "none"}})
        done = run_mpi(2, ["train", f"{name}.toml"], cwd=tmp_path, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stdout + done.stderr
    got, want = model_arrays(tmp_path / "device/model.h5"), model_arrays(tmp_path / "host/model.h5")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_mixed_precision_step_on_the_device_equals_the_hosts(precision):
    """ResNet-8's half-precision gradients on CuPy against the host's half step and the fp32
    step: within the half's rounding of both (the kernels differ, the math does not); the
    found-inf check and the loss scale behave alike. bf16 needs CuPy >= 14 (refused, named,
    before)."""
    from mpifed.nn.layers import Context
    from mpifed.nn.models import loss_and_grad
    from mpifed.nn.precision import compute_dtype
    from mpifed.nn.presets import resnet
    from mpifed.optim.loss_scale import LossScaler
    from mpifed.train.precision import MixedPrecision

    cp = cupy_module()
    spec = resnet((3, 16, 16), 10, 8)
    params = spec.init(0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    want = np.zeros_like(params)
    loss_and_grad(spec, params, x, y, want, ctx=Context(train=True))
    got = {}
    for xp in (np, cp):
        half = compute_dtype(precision, np.float32, xp)
        mixed = MixedPrecision(spec, half, LossScaler(1024.0, dynamic=False), xp)
        grad = xp.zeros(params.size, np.float32)
        mixed.loss_and_grad(spec, xp.asarray(params), xp.asarray(x), xp.asarray(y), grad,
                            ctx=Context(train=True))
        assert not mixed.skip_step(type("One", (), {"size": 1})())
        got[xp.__name__] = grad.get() if xp is cp else grad
    trained = np.ones(params.size, bool)
    for lo, hi in spec.buffer_ranges("float32"):
        trained[lo:hi] = False
    eps = {"fp16": 2.0 ** -10, "bf16": 2.0 ** -7}[precision]
    for name, grad in got.items():
        error = np.linalg.norm((grad - want)[trained]) / np.linalg.norm(want[trained])
        assert error <= 40 * eps, (name, error)
