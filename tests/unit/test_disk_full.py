"""Disk full while writing a checkpoint, the model, the config or a dataset: one line saying so,
the path named, files intact, run.out never describing a model that this run did not write, and
the message saying where the earlier files are (never "left as it was" of a path emptied first)."""

import errno
import os

import h5py
import pytest
from conftest import write_site
from mpi4py import MPI

from mpifed.data import atomic
from mpifed.data.synth import write_synthetic
from mpifed.errors import UserError
from mpifed.train.config import load_config
from mpifed.train.loop import train

RUN = '[data]\ntrain = "d.h5"\n[optim]\nbatch_size = 4\nsteps = 6\nlr = {lr}\n' \
      '[run]\nout = "out"\nprogress = "none"\ncheckpoint_every = {every}\nresume = "never"\n'


def run(tmp_path, lr, every=0):
    (tmp_path / "run.toml").write_text(RUN.format(lr=lr, every=every))
    return train(load_config(str(tmp_path / "run.toml")), MPI.COMM_SELF)


def disk_full_for(monkeypatch, name):
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(atomic.os, "fsync", fsync)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_full_writing_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_site(tmp_path / "d.h5", 40, 0)
    run(tmp_path, 0.1)
    with h5py.File("out/model.h5") as fh:
        old_weights = fh["layers/0/W"][...]
    disk_full_for(monkeypatch, "model.h5")
    with pytest.raises(UserError) as caught:
        run(tmp_path, 0.2)
    first = str(caught.value).splitlines()[0]
    assert first.startswith("no space left on device") and "model.h5" in first
    assert getattr(caught.value, "collective", True) is False  # rank 0 alone: abort the others
    assert not os.path.exists("out/model.h5")  # the new config.toml describes no model
    (previous,) = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("previous-")]
    assert "lr = 0.1" in (previous / "config.toml").read_text()
    assert "left as it was" not in first and f"no file is left at {'out/model.h5'!r}" in first
    assert f"the earlier run's model.h5 is in {str(previous.relative_to(tmp_path))!r}" in first
    with h5py.File(previous / "model.h5") as fh:
        assert (fh["layers/0/W"][...] == old_weights).all()
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_full_writing_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_site(tmp_path / "d.h5", 40, 0)
    disk_full_for(monkeypatch, "step-000000004")
    with pytest.raises(UserError, match=r"^no space left on device writing .*step-000000004"):
        run(tmp_path, 0.1, every=2)
    kept = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert kept == ["step-000000002.h5"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_full_after_never_moved_the_checkpoints_names_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_site(tmp_path / "d.h5", 40, 0)
    run(tmp_path, 0.1, every=2)
    disk_full_for(monkeypatch, "step-000000002")
    with pytest.raises(UserError) as caught:
        run(tmp_path, 0.2, every=2)
    (before,) = (tmp_path / "out").glob("checkpoints.before-*")
    assert list(before.glob("step-*.h5"))  # the first run's, moved by run.resume = "never"
    message = str(caught.value)
    assert message.startswith("no space left on device writing") and "left as it was" not in message
    assert f"the earlier checkpoints are in {str(before.relative_to(tmp_path))!r}" in message


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_full_writing_the_config_after_a_finished_run_names_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_site(tmp_path / "d.h5", 40, 0)
    run(tmp_path, 0.1)
    disk_full_for(monkeypatch, "config.toml")
    with pytest.raises(UserError) as caught:
        run(tmp_path, 0.2)
    (previous,) = (tmp_path / "out").glob("previous-*")
    assert "lr = 0.1" in (previous / "config.toml").read_text()
    assert f"the earlier run's config.toml is in {str(previous.relative_to(tmp_path))!r}" \
        in str(caught.value)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_full_writing_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_site(tmp_path / "d.h5", 40, 0)
    disk_full_for(monkeypatch, "config.toml")
    with pytest.raises(UserError, match=r"^no space left on device writing .*config\.toml.*"
                                        r"no file is left at"):
        run(tmp_path, 0.1)
    assert not [p for p in (tmp_path / "out").iterdir()]  # no config, no temporary


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_disk_full_writing_a_dataset_leaves_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "big.h5")
    write_synthetic(path, 50, 4, 3, seed=0)
    before = open(path, "rb").read()
    disk_full_for(monkeypatch, "big.h5")
    with pytest.raises(UserError, match=r"^no space left on device writing .*big\.h5.*"
                                        r"was left as it was$"):
        write_synthetic(path, 80, 4, 3, seed=1, force=True)
    assert open(path, "rb").read() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.h5"]


def test_a_synthetic_set_larger_than_the_free_space_is_refused_before_writing(tmp_path,
                                                                               monkeypatch):
    """`data synth --samples 10000000 --features 784` needs 31.4 GB: checked before a byte."""
    import shutil

    from mpifed.data import synth

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 10**9))
    with pytest.raises(UserError, match=r"--samples 10000000 --features 784: the file would "
                                        r"take 31\.4 GB, but .* has 10\.0 GB free"):
        synth.write_synthetic(str(tmp_path / "big.h5"), 10_000_000, 784, 10)
    with pytest.raises(UserError, match=r"--shape 3,32,32: the file would take 12\.3 GB"):
        synth.write_synthetic_images(str(tmp_path / "img.h5"), 1_000_000, (3, 32, 32), 10)
    assert list(tmp_path.iterdir()) == []
