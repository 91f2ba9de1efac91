"""Data commands never overwrite without --force, never write empty sites, and name bad outputs;
sizes that cannot fit in memory are refused before allocating."""

import os

import h5py
import numpy as np
import pytest
from conftest import write_site

from mpifed.cli.main import main
from mpifed.config import CommConfig, ModelConfig, resolve
from mpifed.errors import UserError
from mpifed.train.setup import build_model


def errors(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if "error" in line]


def test_partition_refuses_its_own_input_stale_sites_and_empty_sites(tmp_path, capsys):
    out = tmp_path / "sites"
    write_site(tmp_path / "all.h5", 30, 0)
    args = ["data", "partition", str(tmp_path / "all.h5"), str(out), "--institutions"]
    assert main(args + ["3"]) == 0
    before = (out / "site-0.h5").read_bytes()
    assert main(args + ["2"]) == 1  # stale site-2.h5 would stay beside the new ones
    assert "already holds 3 site files" in errors(capsys)[0]
    assert main(args + ["2", "--force"]) == 0
    assert sorted(p.name for p in out.glob("site-*.h5")) == ["site-0.h5", "site-1.h5"]
    assert (out / "site-0.h5").read_bytes() != before
    own = ["data", "partition", str(out / "site-0.h5"), str(out), "--institutions", "2",
           "--force"]
    size = os.path.getsize(out / "site-0.h5")
    assert main(own) == 1 and "lies among the files" in errors(capsys)[0]
    assert os.path.getsize(out / "site-0.h5") == size
    assert main(args + ["31", "--force"]) == 1 and "would get no rows" in errors(capsys)[0]
    assert main(args + ["2", "--seed", "-1", "--force"]) == 1 and "--seed" in errors(capsys)[0]


def test_synth_and_digits_refuse_to_overwrite(tmp_path, capsys):
    path = str(tmp_path / "s.h5")
    synth = ["data", "synth", path, "--samples", "20", "--features", "3", "--classes", "2"]
    assert main(synth) == 0
    with h5py.File(path) as fh:
        first = fh["x"][...]
    assert main(synth + ["--seed", "5"]) == 1 and "add --force" in errors(capsys)[0]
    assert main(synth + ["--seed", "5", "--force"]) == 0
    with h5py.File(path) as fh:
        assert not np.array_equal(fh["x"][...], first)
    assert main(synth + ["--seed", "-1", "--force"]) == 1 and "--seed" in errors(capsys)[0]
    folder = ["data", "synth", str(tmp_path), "--samples", "2", "--features", "3",
              "--classes", "2"]
    assert main(folder) == 1 and "is a folder" in errors(capsys)[0]
    huge = ["data", "synth", str(tmp_path / "h.h5"), "--samples", "10",
            "--features", "100000000000", "--classes", "2"]
    assert main(huge) == 1 and "bytes" in errors(capsys)[0]
    assert main(["data", "digits", path]) == 1 and "existing file" in errors(capsys)[0]


def test_digits_refuses_to_overwrite(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main(["data", "digits", str(tmp_path)]) == 0
    assert main(["data", "digits", str(tmp_path)]) == 1 and "--force" in errors(capsys)[0]
    assert main(["data", "digits", str(tmp_path), "--force"]) == 0


def test_a_model_too_big_for_memory_is_refused_before_allocating():
    cfg = resolve({"data": {"train": "d.h5"},
                   "model": {"kind": "mlp", "hidden": [2_000_000_000]}})
    with pytest.raises(UserError, match="bytes.*model.hidden"):
        build_model(cfg.model, 0, 100, 10, np, np.float32)


def test_partition_out_dir_that_is_a_file(tmp_path, capsys):
    write_site(tmp_path / "all.h5", 30, 0)
    (tmp_path / "taken").write_text("x")
    assert main(["data", "partition", str(tmp_path / "all.h5"), str(tmp_path / "taken"),
                 "--institutions", "2"]) == 1
    assert "is an existing file" in errors(capsys)[0]


def test_nccl_without_gpu_arrays_is_named():
    from mpi4py import MPI

    from mpifed.train.setup import array_backend

    settings = CommConfig(backend="numpy", allreduce="nccl")
    with pytest.raises(UserError, match='comm.allreduce = "nccl" needs GPU arrays'):
        array_backend(settings, MPI.COMM_SELF)


def test_the_memory_check_is_per_rank_for_the_shard_stage():
    """A deep MLP whose whole state is 5x this machine's memory: refused unsharded (naming the
    fix), accepted as ZeRO-3 over 64 ranks (5/64 of it plus four of its widest layer)."""
    import os

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    depth = 64  # layers of width k: about depth * k * k parameters
    k = int((total / (depth * 4)) ** 0.5)  # whole parameters alone: about all of the memory
    model = ModelConfig(kind="mlp", hidden=[k] * depth)
    with pytest.raises(UserError, match='bytes.*comm.shard = "parameters"'):
        build_model(model, 0, k, 10, np, np.float32)
    spec, params = build_model(model, 0, k, 10, np, np.float32, "parameters", whole=False,
                               ranks=64)
    assert params is None and len(spec.layers) > depth
    with pytest.raises(UserError, match="'parameters' on 2 ranks, per rank"):
        build_model(model, 0, k, 10, np, np.float32, "parameters", whole=False, ranks=2)
