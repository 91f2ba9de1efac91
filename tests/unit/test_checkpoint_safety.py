"""Checkpoints are never lost, never silently damaged, never resumed on other data."""

import h5py
import numpy as np
import pytest

from mpifed.config import FederatedConfig, resolve
from mpifed.errors import UserError
from mpifed.train.checkpoint import (
    choose_checkpoint,
    list_checkpoints,
    newest_valid,
    save_checkpoint,
)

SHAPE = {"ranks": 2}


def config(tmp_path, resume="auto"):
    data = tmp_path / "d.h5"
    if not data.exists():
        write_data(data, seed=0)
    return resolve({"data": {"train": str(data), "x": "x", "y": "y"}, "optim": {"lr": 0.1},
                    "run": {"out": str(tmp_path / "out"), "resume": resume}})


def write_data(path, seed, rows=300):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as fh:
        fh["x"], fh["y"] = rng.standard_normal((rows, 4)), rng.integers(0, 3, rows)


def save(cfg, step, keep=3):
    params = np.full(10, float(step))
    return save_checkpoint(cfg.run.out, "step", step, params, {"m": params * 2},
                           {"step": step}, cfg, SHAPE, keep)


def steps_of(cfg):
    return [int(p.rsplit("-", 1)[1][:-3]) for p in list_checkpoints(cfg.run.out, "step")]


def test_never_moves_earlier_checkpoints_aside(tmp_path, capsys):
    cfg = config(tmp_path)
    for step in (300, 400, 500):
        save(cfg, step)
    fresh = config(tmp_path, "never")
    assert choose_checkpoint(fresh, "step", SHAPE) is None
    assert "moved the earlier checkpoints" in capsys.readouterr().err
    save(fresh, 100), save(fresh, 200)
    assert steps_of(fresh) == [100, 200]  # not pruned as "older" than 500
    assert choose_checkpoint(cfg, "step", SHAPE)["index"] == 200
    aside = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoints.before-")]
    assert len(aside) == 1 and len(list(aside[0].glob("step-*.h5"))) == 3


@pytest.mark.parametrize("damage", ["json", "params", "state"])
def test_a_damaged_newest_checkpoint_falls_back_with_one_warning(tmp_path, capsys, damage):
    cfg = config(tmp_path)
    save(cfg, 1), save(cfg, 2)
    newest = list_checkpoints(cfg.run.out, "step")[-1]
    with h5py.File(newest, "r+") as fh:
        if damage == "json":
            fh.attrs["counters"] = '{"step": 2'
        elif damage == "params":
            raw = fh["params"][...]
            raw.view(np.uint64)[3] ^= 1 << 20  # one bit
            fh["params"][...] = raw
        else:
            fh["state/m"][0] = 7.0
    found = newest_valid(cfg.run.out, "step")
    assert found["index"] == 1 and np.all(found["params"] == 1.0)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and newest in warnings[0]


def test_every_checkpoint_damaged_is_said(tmp_path):
    cfg = config(tmp_path)
    path = save(cfg, 1)
    with h5py.File(path, "r+") as fh:
        fh["params"][0] = 5.0
    with pytest.raises(UserError, match="every checkpoint"):
        choose_checkpoint(cfg, "step", SHAPE)


def test_resume_on_replaced_data_is_refused(tmp_path):
    cfg = config(tmp_path)
    save(cfg, 1)
    assert choose_checkpoint(cfg, "step", SHAPE)["index"] == 1
    write_data(tmp_path / "d.h5", seed=1)  # same path, same shapes, other rows
    with pytest.raises(UserError, match="changed since the checkpoint"):
        choose_checkpoint(cfg, "step", SHAPE)


def test_resume_values_that_are_not_checkpoints(tmp_path):
    cfg = config(tmp_path, "yes")
    with pytest.raises(UserError, match='neither "auto", "never"'):
        choose_checkpoint(cfg, "step", SHAPE)
    model = tmp_path / "model.h5"
    with h5py.File(model, "w") as fh:
        fh["layers/0/W"], fh["layers/0/b"] = np.zeros((4, 3)), np.zeros(3)
    with pytest.raises(UserError, match="is a model file, not a checkpoint"):
        choose_checkpoint(config(tmp_path, str(model)), "step", SHAPE)


def test_federated_resume_past_the_last_round_is_nothing_to_do(tmp_path):
    cfg = config(tmp_path)
    cfg = cfg.with_values(federated=FederatedConfig(institutions=1, rounds=3))
    save_checkpoint(cfg.run.out, "round", 5, np.zeros(3), {}, {"round": 5}, cfg, SHAPE, 3)
    with pytest.raises(UserError, match="nothing to do"):
        choose_checkpoint(cfg, "round", SHAPE)
