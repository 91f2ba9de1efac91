"""The CuPy path on a GPU: training on the device equals training on the host, NCCL equals MPI,
each rank binds to the device of its node-local rank. Skipped without CuPy and a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import read_model, run_mpi, run_script, write_config, write_dataset

from mpifed.xp import cupy_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    cupy_module() is None, reason="CuPy or a CUDA device is missing: GPU tests run on a GPU")]

CONFIG = {
    "data": {"train": "d.h5"},
    "model": {"kind": "mlp", "hidden": [32], "dtype": "float64"},
    "optim": {"lr": 0.05, "momentum": 0.9, "batch_size": 16, "steps": 30},
}


@pytest.mark.parametrize("algorithm", ["ring", "mpi", "nccl"])
def test_device_training_equals_host_training(tmp_path, algorithm):
    write_dataset(tmp_path / "d.h5", 500, seed=0, features=12, classes=3, shift=0.0,
                  num_classes=False)
    for backend, algo, out in (("numpy", "ring", "host"), ("cupy", algorithm, "device")):
        write_config(tmp_path / f"{out}.toml", CONFIG, {
            "comm": {"backend": backend, "allreduce": algo}, "run": {"out": out}})
        done = run_mpi(2, ["train", f"{out}.toml"], cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
    for a, b in zip(read_model(tmp_path / "device" / "model.h5"),
                    read_model(tmp_path / "host" / "model.h5")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_nccl_equals_mpi_allreduce_and_devices_follow_node_rank(tmp_path):
    script = (
        "import numpy as np, cupy as cp\n"
        "from mpi4py import MPI\n"
        "from mpifed.comm import select_device, allreduce\n"
        "comm = MPI.COMM_WORLD\n"
        "device = select_device(comm)\n"
        "node = comm.Split_type(MPI.COMM_TYPE_SHARED)\n"
        "assert device == node.rank % cp.cuda.runtime.getDeviceCount()\n"
        "host = np.random.default_rng(comm.rank).standard_normal(100_003)\n"
        "ref = host.copy(); comm.Allreduce(MPI.IN_PLACE, ref)\n"
        "for algo in ('nccl', 'ring', 'mpi', 'hierarchical'):\n"
        "    buf = cp.asarray(host)\n"
        "    allreduce(buf, comm, algorithm=algo)\n"
        "    np.testing.assert_allclose(buf.get(), ref, rtol=1e-12, atol=1e-12)\n"
        "print('ok', comm.rank)\n")
    done = run_script(2, script, tmp_path, timeout=300)
    assert done.returncode == 0 and done.stdout.count("ok") == 2, done.stderr
