"""Which checkpoint a run resumes from, and what it refuses and why (no MPI)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import merged

from mpifed.errors import UserError
from mpifed.train.checkpoint import (
    choose_checkpoint,
    differences,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from mpifed.train.config import resolve

LAYOUT = {"ranks": 2}


def config(out, *changes) -> dict:
    return resolve(merged({"data": {"train": "d.h5"}, "model": {"kind": "mlp", "hidden": [4]},
                           "optim": {"lr": 0.01, "steps": 100}, "run": {"out": str(out)}},
                          *changes))


def save(cfg, index, kind="step", layout=LAYOUT, keep=5) -> str:
    params = np.full(7, float(index))
    return save_checkpoint(cfg.run.out, kind, index, params, {"velocity": params * 2},
                           {"step": index}, cfg, layout, keep)


def test_the_same_run_and_changes_that_keep_the_bits_are_resumable(tmp_path):
    cfg = config(tmp_path)
    assert differences(cfg.to_dict(), cfg, LAYOUT, dict(LAYOUT)) == []
    longer = config(tmp_path, {"optim": {"steps": 500}, "data": {"test": "t.h5"},
                               "run": {"log_every": 1, "eval_every": 3, "checkpoint_every": 9,
                                       "keep_checkpoints": 1, "timeline": True}})
    assert differences(cfg.to_dict(), longer, LAYOUT, LAYOUT) == []


def test_every_other_difference_is_named_with_both_values(tmp_path):
    cfg = config(tmp_path)
    other = config(tmp_path, {"optim": {"lr": 0.5}, "model": {"hidden": [8]}})
    assert differences(cfg.to_dict(), other, LAYOUT, {"ranks": 3}) == [
        "MPI layout {'ranks': 2} != {'ranks': 3}",
        "model.hidden: [4] then, [8] now",
        "optim.lr: 0.01 then, 0.5 now",
    ]
    federated = config(tmp_path, {"federated": {"institutions": 2}})
    problems = differences(cfg.to_dict(), federated, LAYOUT, LAYOUT)
    assert "federated.institutions: None then, 2 now" in problems  # a section added


def test_keys_added_since_the_checkpoint_count_at_their_defaults(tmp_path):
    """A checkpoint written before comm.compression existed resumes when the run leaves the
    new keys at their defaults, and is refused when it sets one."""
    cfg = config(tmp_path)
    older = cfg.to_dict()
    for key in ("compression", "predivide", "powersgd_rank", "compression_start",
                "powersgd_min_rate"):
        del older["comm"][key]
    assert differences(older, cfg, LAYOUT, LAYOUT) == []
    fp16 = config(tmp_path, {"comm": {"compression": "fp16"}})
    assert differences(older, fp16, LAYOUT, LAYOUT) == [
        "comm.compression: None then, 'fp16' now"]


def test_auto_takes_the_newest_complete_checkpoint(tmp_path):
    cfg = config(tmp_path)
    assert choose_checkpoint(cfg, "step", LAYOUT) is None  # nothing written yet
    for index in (37, 74, 111):
        save(cfg, index)
    save(cfg, 3, kind="round")  # another kind is not a candidate
    found = choose_checkpoint(cfg, "step", LAYOUT)
    assert found["index"] == 111 and found["counters"] == {"step": 111}
    np.testing.assert_array_equal(found["params"], np.full(7, 111.0))
    np.testing.assert_array_equal(found["state"]["velocity"], np.full(7, 222.0))
    with h5py.File(found["path"], "r+") as fh:  # as if killed before the last attribute
        del fh.attrs["complete"]
    (tmp_path / "checkpoints" / "step-000000148.h5").write_bytes(b"torn")  # unreadable
    assert choose_checkpoint(cfg, "step", LAYOUT)["index"] == 74


def test_never_sets_checkpoints_aside_and_a_path_names_one(tmp_path):
    cfg = config(tmp_path)
    first, _ = save(cfg, 37), save(cfg, 74)
    assert choose_checkpoint(config(tmp_path, {"run": {"resume": first}}), "step",
                             LAYOUT)["index"] == 37
    assert choose_checkpoint(config(tmp_path, {"run": {"resume": "never"}}), "step",
                             LAYOUT) is None
    assert not list((tmp_path / "checkpoints").glob("step-*.h5"))  # moved, not mixed with
    moved = sorted(tmp_path.glob("checkpoints.before-*/step-*.h5"))
    assert [p.name for p in moved] == ["step-000000037.h5", "step-000000074.h5"]


def test_a_named_checkpoint_that_cannot_be_used_is_an_error(tmp_path):
    cfg = config(tmp_path)
    path = save(cfg, 37)
    with h5py.File(path, "r+") as fh:
        del fh.attrs["complete"]
    with pytest.raises(UserError, match="is incomplete"):
        choose_checkpoint(config(tmp_path, {"run": {"resume": path}}), "step", LAYOUT)
    missing = str(tmp_path / "nope.h5")
    with pytest.raises(UserError, match="nope.h5.*neither"):
        choose_checkpoint(config(tmp_path, {"run": {"resume": missing}}), "step", LAYOUT)


def test_another_runs_checkpoint_is_refused_naming_what_differs_and_the_fix(tmp_path):
    path = save(config(tmp_path), 37)
    with pytest.raises(UserError) as info:
        choose_checkpoint(config(tmp_path, {"optim": {"lr": 0.5}}), "step", {"ranks": 3})
    message = str(info.value)
    assert message.startswith(f"run.resume: checkpoint {path!r} is from a different run")
    assert "MPI layout" in message and "optim.lr: 0.01 then, 0.5 now" in message
    assert "another run.out" in message and 'run.resume = "never"' in message


def test_saving_keeps_the_newest_and_removes_torn_writes(tmp_path):
    cfg = config(tmp_path)
    torn = tmp_path / "checkpoints" / ".step-000000001.h5.tmp-999999999"
    save(cfg, 1)
    torn.write_bytes(b"a killed run's half-written file")
    for index in (2, 3, 4):
        save(cfg, index, keep=2)
    assert [p.rsplit("/", 1)[1] for p in list_checkpoints(str(tmp_path), "step")] == [
        "step-000000003.h5", "step-000000004.h5"]
    assert not torn.exists()


def test_every_ranks_compressor_state_round_trips_checked(tmp_path):
    cfg = config(tmp_path)
    params = np.arange(6, dtype=np.float64)
    states = [{"error": params * (r + 1), "steps": 4 + r} for r in range(2)]
    path = save_checkpoint(cfg.run.out, "step", 5, params, {}, {"step": 5}, cfg, LAYOUT, 2,
                           compressor=states)
    found = load_checkpoint(path)
    assert [sorted(s) for s in found["compressor"]] == [["error", "steps"]] * 2
    for got, want in zip(found["compressor"], states):
        np.testing.assert_array_equal(got["error"], want["error"])
        assert int(got["steps"]) == want["steps"]
    stateless = save_checkpoint(cfg.run.out, "step", 6, params, {}, {"step": 6}, cfg, LAYOUT,
                                2, compressor=[{}, {}])
    assert load_checkpoint(stateless)["compressor"] is None  # no group: the file as before
