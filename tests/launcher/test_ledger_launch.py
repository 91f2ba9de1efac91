"""The privacy ledger under mpiexec: every leader counts the releases itself (a root that says
"go" past the budget is refused), checkpoints pin the ledger, a torn line is cut, an aborted
round stays counted; and a federation unpickles nothing once MPI has started."""

from __future__ import annotations

import json

import pytest
from helpers import merged, read_metrics, run_cli, run_mpi, run_script, write_config, write_dataset

from mpifed.federated.dp import epsilon

Z = 2.0


def config(out, rounds=4, dp=None, lr=0.1, **federated):
    """A DP federation of 4 one-rank institutions, every one sending every round."""
    return merged({
        "data": {"train": "site-{institution}.h5"},
        "model": {"kind": "mlp", "hidden": [4], "dtype": "float64"},
        "optim": {"lr": lr, "batch_size": 3},
        "federated": {"institutions": 4, "rounds": rounds, "local_steps": 2,
                      "dp": {"clip": 1.0, "noise_multiplier": Z, **(dp or {})}},
        "run": {"seed": 5, "out": out},
    }, {"federated": federated})


def lines(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture
def sites(tmp_path):
    for k, n in enumerate([23, 31, 17, 29]):
        write_dataset(tmp_path / f"site-{k}.h5", n, seed=k)
    return tmp_path


LYING_ROOT = """\
import sys

from mpi4py import MPI

from mpifed.train import federated_budget, run

if MPI.COMM_WORLD.rank == 0:  # the root: every ledger it reads is worth nothing
    federated_budget.ledger_epsilon = lambda dp, entries, n: (0.0, [0.0] * n)
run(sys.argv[1])
"""


def test_a_root_that_says_go_past_the_budget_is_refused_by_every_leader(sites):
    budget = (epsilon(1.0, Z, 3, 1e-5) + epsilon(1.0, Z, 4, 1e-5)) / 2  # 3 rounds fit
    write_config(sites / "b.toml", config("b", rounds=8, dp={"max_epsilon": budget}))
    done = run_script(4, LYING_ROOT.replace("sys.argv[1]", "'b.toml'"), sites)
    assert done.returncode == 0, done.stderr
    assert len(read_metrics(sites / "b", "round")) == 3
    assert "would exceed federated.dp.max_epsilon" in done.stdout
    for k in (1, 2, 3):  # each leader refused for itself, and said so on its own console
        assert f"institution {k} refuses round 4" in done.stderr
        copy = lines(sites / "b" / f"institution-{k}" / "privacy-ledger.jsonl")
        assert [e["round"] for e in copy] == [1, 2, 3]
        assert all(e["participants"] == [0, 1, 2, 3] and e["q"] == 1.0 for e in copy)
    assert lines(sites / "b" / "privacy-ledger.jsonl") == copy  # the same public entries


def test_a_resume_whose_ledger_lost_or_changed_releases_is_refused(sites):
    cfg = config("c")
    cfg["run"]["checkpoint_every"] = 2
    write_config(sites / "c.toml", cfg)
    assert run_mpi(4, ["train", "c.toml"], cwd=sites).returncode == 0
    root = sites / "c" / "privacy-ledger.jsonl"
    whole = root.read_bytes()
    assert len(whole.splitlines()) == 4
    root.write_bytes(whole.splitlines(keepends=True)[0])  # 1 release; the checkpoint counted 2
    done = run_mpi(4, ["train", "c.toml"], cwd=sites)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert ("the privacy ledger 'c/privacy-ledger.jsonl' holds 1 releases, but the checkpoint "
            "after round 2 was written after 2") in done.stderr
    root.write_bytes(whole.replace(b'"noise_multiplier": 2.0', b'"noise_multiplier": 9.0', 1))
    done = run_mpi(4, ["train", "c.toml"], cwd=sites)
    assert done.returncode != 0 and "SHA-256 differs" in done.stderr
    assert "the first 2 releases of the privacy ledger 'c/privacy-ledger.jsonl'" in done.stderr
    root.write_bytes(whole)
    copy = sites / "c" / "institution-2" / "privacy-ledger.jsonl"
    kept = copy.read_bytes()
    copy.write_bytes(b"")  # a leader's own count is checked too
    done = run_mpi(4, ["train", "c.toml"], cwd=sites)
    assert done.returncode != 0 and "'c/institution-2/privacy-ledger.jsonl' holds 0" in done.stderr
    copy.write_bytes(kept)
    done = run_mpi(4, ["train", "c.toml"], cwd=sites)  # resumes after round 2
    assert done.returncode == 0, done.stderr
    assert [e["round"] for e in lines(root)] == [1, 2, 3, 4, 3, 4]


def test_a_torn_ledger_line_is_cut_on_the_next_start_and_the_releases_kept(sites):
    write_config(sites / "t.toml", config("t", rounds=2))
    assert run_mpi(4, ["train", "t.toml"], cwd=sites).returncode == 0
    root = sites / "t" / "privacy-ledger.jsonl"
    with open(root, "ab") as fh:
        fh.write(b'{"round": 3, "noise_mult')  # a crash in the middle of the write
    done = run_mpi(4, ["train", "t.toml"], cwd=sites)
    assert done.returncode == 0, done.stderr
    assert "privacy ledger 't/privacy-ledger.jsonl': cut a torn last line (24 bytes" in done.stderr
    assert [e["round"] for e in lines(root)] == [1, 2, 1, 2]
    assert read_metrics(sites / "t")[-1]["epsilon"] == pytest.approx(
        epsilon(1.0, Z, 4, 1e-5), rel=1e-9)


def test_a_round_aborted_after_its_release_stays_counted_by_every_leader(sites):
    write_config(sites / "a.toml", config("a", rounds=2, lr=1e200))
    done = run_mpi(4, ["train", "a.toml"], cwd=sites, timeout=120)
    assert done.returncode != 0 and "training diverged" in done.stderr
    ledgers = [sites / "a" / "privacy-ledger.jsonl",
               *(sites / "a" / f"institution-{k}" / "privacy-ledger.jsonl" for k in (1, 2, 3))]
    for path in ledgers:
        assert [e["round"] for e in lines(path)] == [1]
    write_config(sites / "a.toml", config("a", rounds=2))
    done = run_mpi(4, ["train", "a.toml"], cwd=sites)
    assert done.returncode == 0, done.stderr
    for path in ledgers:
        assert [e["round"] for e in lines(path)] == [1, 1, 2]
    summary = read_metrics(sites / "a")[-1]
    assert summary["epsilon"] == pytest.approx(epsilon(1.0, Z, 3, 1e-5), rel=1e-9)


NO_PICKLE = """\
import pickle
import sys

from mpi4py import MPI

from mpifed.train import run


def refuse(*args, **kwargs):
    raise RuntimeError(f"rank {MPI.COMM_WORLD.rank} unpickled a message")


MPI.pickle.__init__(pickle.dumps, refuse)  # from here on, no lower-case collective can finish
run("fed.toml")
"""


def test_a_federation_unpickles_nothing(tmp_path):
    """ZeRO-3, data.test and authenticated secure aggregation with DP, with every unpickling
    refused from the first call: stricter than the rule (no pickle on a communicator that spans
    institutions), as an institution's own communicator uses buffers too."""
    for k in range(3):
        write_dataset(tmp_path / f"site-{k}.h5", 40 + 7 * k, seed=k)
    write_dataset(tmp_path / "test.h5", 50, seed=9)
    assert run_cli(["keys", "generate", "keys", "--institutions", "3"],
                   cwd=tmp_path).returncode == 0
    write_config(tmp_path / "fed.toml", {
        "data": {"train": "site-{institution}.h5", "test": "test.h5"},
        "model": {"kind": "mlp", "hidden": [4], "dtype": "float64"},
        "optim": {"lr": 0.1, "batch_size": 3},
        "comm": {"shard": "parameters"},
        "federated": {"institution_sizes": [2, 1, 1], "rounds": 3, "local_steps": 2,
                      "fraction": 0.5, "secure_aggregation": True, "secure_range": 20.0,
                      "keys": "keys", "dp": {"clip": 1.0, "noise_multiplier": 1.0}},
        "run": {"seed": 5, "out": "out"},
    })
    done = run_script(4, NO_PICKLE, tmp_path)
    assert done.returncode == 0, done.stderr
    rounds = read_metrics(tmp_path / "out", "round")
    assert [r["round"] for r in rounds] == [1, 2, 3] and all("accuracy" in r for r in rounds)
    for r in rounds:  # the root can time who trained: the unamplified epsilon is reported too
        assert r["epsilon"] == pytest.approx(epsilon(0.5, 1.0, r["round"], 1e-5), rel=1e-9)
        assert r["epsilon_unamplified"] == pytest.approx(epsilon(1.0, 1.0, r["round"], 1e-5),
                                                         rel=1e-9)
    summary = read_metrics(tmp_path / "out")[-1]
    assert summary["epsilon_unamplified"] == pytest.approx(epsilon(1.0, 1.0, 3, 1e-5), rel=1e-9)
    root = (tmp_path / "out" / "privacy-ledger.jsonl").read_bytes()
    for k in (1, 2):  # under secret sampling every leader's copy is the root's, line for line
        assert (tmp_path / "out" / f"institution-{k}" / "privacy-ledger.jsonl").read_bytes() \
            == root
