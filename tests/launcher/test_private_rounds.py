"""Secure aggregation and DP in federated runs under mpiexec, against plain runs and formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import (
    merged,
    model_vector,
    read_metrics,
    run_cli,
    run_mpi,
    write_config,
    write_dataset,
)

from mpifed.federated.dp import epsilon
from mpifed.federated.identity import generate_keys
from mpifed.federated.transcript import ENTRY, confirmation_bytes
from mpifed.nn.models import ModelSpec, init_params

FEATURES, CLASSES, HIDDEN = 5, 3, 4


def config(out, strategy="fedavg", extra=None, dp=None, lr=0.1, rounds=4,
           layout=None):
    """A federated run's config; extra: more [federated] keys; dp: the [federated.dp] table.
    Secure aggregation with DP is refused without identity keys: it gets `sites`' keys/."""
    if dp and (extra or {}).get("secure_aggregation"):
        extra = {"keys": "keys", **extra}
    return merged({
        "data": {"train": "site-{institution}.h5"},
        "model": {"kind": "mlp", "hidden": [HIDDEN], "dtype": "float64"},
        "optim": {"lr": lr, "batch_size": 3},
        "federated": {**(layout or {"institutions": 4}), "rounds": rounds, "local_steps": 3,
                      "strategy": strategy, "server_lr": 0.05},
        "run": {"seed": 5, "out": out},
    }, {"federated": {**(extra or {}), **({"dp": dp} if dp else {})}})


@pytest.fixture
def sites(tmp_path):
    """Four institutions' data and identity keys (keys/, one dealer: a test's shortcut)."""
    for k, n in enumerate([23, 31, 17, 29]):
        write_dataset(tmp_path / f"site-{k}.h5", n, seed=k)
    generate_keys(str(tmp_path / "keys"), 4)
    return tmp_path


@pytest.mark.parametrize("strategy,layout,ranks", [
    ("fedavg", {"institutions": 4}, 4),
    ("fedadam", {"institution_sizes": [1, 2, 1]}, 4),
    ("fedprox", {"institutions": 2, "min_participants": 2}, 4),
    ("fedavg", {"institutions": 4, "fraction": 0.75}, 4),  # round 1 leaves the root out
], ids=["fedavg-4", "fedadam-1-2-1", "fedprox-2", "fedavg-4-sampled"])
def test_secure_aggregation_equals_plain_aggregation(sites, strategy, layout, ranks):
    institutions = layout.get("institutions") or len(layout["institution_sizes"])
    for k in range(institutions, 4):
        (sites / f"site-{k}.h5").unlink()
    assert run_cli(["keys", "generate", "keys", "--institutions", str(institutions),
                    "--force"], cwd=sites).returncode == 0  # a roster of this many
    for secure in (False, True):
        keys = {"keys": "keys"} if secure else {}  # authenticated: signed keys, checked lists
        write_config(sites / f"{secure}.toml", config(
            f"out-{secure}", strategy, {"secure_aggregation": secure, **keys}, layout=layout))
        done = run_mpi(ranks, ["train", f"{secure}.toml"], cwd=sites)
        assert done.returncode == 0, done.stderr
    plain, secure = (model_vector(sites / "out-False" / "model.h5"),
                     model_vector(sites / "out-True" / "model.h5"))
    np.testing.assert_allclose(secure, plain, rtol=0, atol=1e-8)  # the quantisation step
    record = read_metrics(sites / "out-True", "round")[0]
    assert all(set(e) == {"institution", "participated"} for e in record["institutions"])
    if layout.get("fraction"):  # the root relays the keys of a round it sits out (it hung)
        assert not record["institutions"][0]["participated"]


def test_dp_without_noise_and_with_a_loose_clip_is_fedavg_on_equal_sites(tmp_path):
    for k in range(4):
        write_dataset(tmp_path / f"site-{k}.h5", 24, seed=k)  # equal sizes: FedAvg weights equal
    write_config(tmp_path / "plain.toml", config("plain"))
    write_config(tmp_path / "dp.toml", config("dp", dp={"clip": 1000.0, "noise_multiplier": 0.0}))
    for name in ("plain", "dp"):
        assert run_mpi(4, ["train", f"{name}.toml"], cwd=tmp_path).returncode == 0
    np.testing.assert_allclose(model_vector(tmp_path / "dp" / "model.h5"),
                               model_vector(tmp_path / "plain" / "model.h5"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("secure", [False, True])
def test_clipping_bounds_the_update_and_the_noise_has_its_stddev(sites, secure):
    start = init_params(ModelSpec("mlp", FEATURES, (HIDDEN,), CLASSES), 5, dtype="float64")
    # Tight clip, no noise: one round moves the model by at most the clip.
    write_config(sites / "clip.toml", config("clip", extra={"secure_aggregation": secure},
                                             dp={"clip": 0.01, "noise_multiplier": 0.0},
                                             rounds=1))
    assert run_mpi(4, ["train", "clip.toml"], cwd=sites).returncode == 0
    moved = np.linalg.norm(model_vector(sites / "clip" / "model.h5") - start)
    assert 0.005 < moved <= 0.01 + 1e-9
    # Next to no training (lr 1e-12): the update is the noise, std z*C/(q*K) per parameter.
    write_config(sites / "noise.toml", config(
        "noise", extra={"secure_aggregation": secure, "secure_range": 50.0},
        dp={"clip": 2.0, "noise_multiplier": 3.0}, rounds=1, lr=1e-12))
    assert run_mpi(4, ["train", "noise.toml"], cwd=sites).returncode == 0
    noise = model_vector(sites / "noise" / "model.h5") - start
    expected = 3.0 * 2.0 / 4
    if secure:  # 4 leaders' shares, each sized so that the 3 the root does not know give it all
        expected *= np.sqrt(4 / 3)
    assert np.std(noise) == pytest.approx(expected, rel=0.35)  # 35 parameters: a loose check
    assert abs(np.mean(noise)) < 3 * expected / np.sqrt(noise.size)


def test_epsilon_per_round_and_the_budget_stop(sites):
    """Items 2, 3, 6: secret sampling (no participation, every leader sends), no loss, the
    ledger's epsilon with amplification, the budget stop."""
    write_config(sites / "dp.toml", config(
        "dp", extra={"fraction": 0.5, "secure_aggregation": True, "secure_range": 20.0},
        dp={"clip": 1.0, "noise_multiplier": 1.5, "delta": 1e-5, "adaptive": True,
            "clip_count_stddev": 1.0, "max_epsilon": 4.0}, rounds=50))
    done = run_mpi(4, ["train", "dp.toml"], cwd=sites)
    assert done.returncode == 0, done.stderr
    rounds = read_metrics(sites / "dp", "round")
    expected = [epsilon(0.5, 1.5, r, 1e-5) for r in range(1, len(rounds) + 1)]
    assert [r["epsilon"] for r in rounds] == pytest.approx(expected, rel=1e-9)
    assert expected[-1] <= 4.0 < epsilon(0.5, 1.5, len(rounds) + 1, 1e-5)  # stopped at budget
    assert len(rounds) < 50 and "would exceed federated.dp.max_epsilon" in done.stdout
    clips = [r["clip"] for r in rounds]
    assert len(set(clips)) > 1  # adaptive clipping moved the clip
    size = (FEATURES + 1) * HIDDEN + (HIDDEN + 1) * CLASSES
    for r in rounds:
        assert "loss" not in r and "institutions" not in r and "participants" not in r
        # every leader, every round: its vector, its signed key, its signed view of the round
        assert r["bytes_to_root"] == 3 * (size + 1) * 8 + 3 * (ENTRY + confirmation_bytes(True))
    ledger = [json.loads(line) for line in open(sites / "dp" / "privacy-ledger.jsonl")]
    assert [e["round"] for e in ledger] == list(range(1, len(rounds) + 1))
    summary = read_metrics(sites / "dp")[-1]
    assert summary["epsilon"] == pytest.approx(expected[-1])


def test_dp_without_secure_aggregation_reports_each_institutions_epsilon(sites):
    """Item 3: the root sees who sent, so no amplification: each institution's epsilon is the
    unsampled Gaussian's over the rounds it took part in; the summary has the largest."""
    write_config(sites / "dp.toml", config("dp", extra={"fraction": 0.5},
                                           dp={"clip": 1.0, "noise_multiplier": 2.0},
                                           rounds=6))
    done = run_mpi(4, ["train", "dp.toml"], cwd=sites)
    assert done.returncode == 0, done.stderr
    rounds = read_metrics(sites / "dp", "round")
    counts = [0] * 4
    for r in rounds:
        assert "loss" not in r and all("loss" not in e for e in r["institutions"])
        for e in r["institutions"]:
            counts[e["institution"]] += e["participated"]
        assert r["epsilon_per_institution"] == pytest.approx(
            [epsilon(1.0, 2.0, n, 1e-5) for n in counts], rel=1e-9)
        assert r["epsilon"] == pytest.approx(max(r["epsilon_per_institution"]))
    assert read_metrics(sites / "dp")[-1]["epsilon"] == pytest.approx(
        max(epsilon(1.0, 2.0, n, 1e-5) for n in counts))


def test_a_replayed_round_is_counted(sites):
    """Item 6: killed after round 3 (checkpoint at 2), resumed: round 3 runs twice and the
    epsilon composes all 7 releases, as max_epsilon does."""
    cfg = config("dp", extra={"secure_aggregation": True, "secure_range": 20.0},
                 dp={"clip": 1.0, "noise_multiplier": 3.0}, rounds=6)
    cfg["run"]["checkpoint_every"] = 2
    write_config(sites / "dp.toml", cfg)
    killed = run_mpi(4, ["train", "dp.toml"], cwd=sites,
                     env={"MPIFED_FAULT": "kill:round=3:rank=1"})
    assert killed.returncode != 0
    done = run_mpi(4, ["train", "dp.toml"], cwd=sites)
    assert done.returncode == 0, done.stderr
    ledger = [json.loads(line) for line in open(sites / "dp" / "privacy-ledger.jsonl")]
    assert [e["round"] for e in ledger] == [1, 2, 3, 3, 4, 5, 6]
    summary = read_metrics(sites / "dp")[-1]
    assert summary["epsilon"] == pytest.approx(epsilon(1.0, 3.0, 7, 1e-5), rel=1e-9)
    assert summary["epsilon"] > epsilon(1.0, 3.0, 6, 1e-5) * 1.01
    # A budget between 6 and 7 releases: the resumed run now stops one round earlier.
    budget = (epsilon(1.0, 3.0, 6, 1e-5) + epsilon(1.0, 3.0, 7, 1e-5)) / 2
    write_config(sites / "b.toml", merged(cfg, {"run": {"out": "b"},
                                                "federated": {"dp": {"max_epsilon": budget}}}))
    run_mpi(4, ["train", "b.toml"], cwd=sites, env={"MPIFED_FAULT": "kill:round=3:rank=1"})
    done = run_mpi(4, ["train", "b.toml"], cwd=sites)
    assert done.returncode == 0, done.stderr
    assert read_metrics(sites / "b", "round")[-1]["round"] == 5


def test_secure_dp_with_too_few_institutions_is_refused(sites):
    write_config(sites / "s.toml", config("s", extra={"secure_aggregation": True},
                                          dp={"colluders": 3}))
    done = run_mpi(4, ["train", "s.toml"], cwd=sites)
    assert done.returncode != 0 and "federated.dp.colluders" in done.stderr


def test_fednova_is_refused_with_privacy(sites):
    write_config(sites / "n.toml", config("n", "fednova", {"secure_aggregation": True}))
    done = run_mpi(2, ["train", "n.toml"], cwd=sites)
    assert done.returncode != 0 and "fednova" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure+dp"])
def test_an_institution_that_diverges_ends_every_rank(sites, secure):
    """The loss check agrees inside one institution; the institutions left out of the round wait
    for it at the exchange and must end too, not hang."""
    dp = {"clip": 1.0, "noise_multiplier": 0.0} if secure else None
    write_config(sites / "div.toml", config("div", extra={"fraction": 0.5,
                                                          "secure_aggregation": secure},
                                            dp=dp, lr=1e200, rounds=3))
    done = run_mpi(4, ["train", "div.toml"], cwd=sites, timeout=120)
    assert done.returncode != 0 and "training diverged" in done.stderr


TIMING = ("round_seconds", "exchange_seconds", "allreduce_seconds", "comm_fraction")
SETTINGS = {  # [federated] keys; the [federated.dp] table
    "plain": ({}, None),
    "sa": ({"secure_aggregation": True, "keys": "keys", "fraction": 0.75}, None),
    "dp": ({"fraction": 0.75}, {"clip": 1.0, "noise_multiplier": 1.0}),
    "sa+dp": ({"secure_aggregation": True, "keys": "keys", "fraction": 0.5, "secure_range": 20.0},
              {"clip": 1.0, "noise_multiplier": 1.0}),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_roots_records_and_each_institutions_own(sites, setting):
    """The privacy rule: under secure aggregation or DP every per-institution figure is in
    OUT/institution-K/metrics.jsonl, written by its leader; under secret sampling (SA+DP) the
    root's records carry no timing at all. A plain run reports everything to the root."""
    extra, dp = SETTINGS[setting]
    write_config(sites / "r.toml", config("r", extra=extra, dp=dp, rounds=3))  # keys: `sites`
    done = run_mpi(4, ["train", "r.toml"], cwd=sites)
    assert done.returncode == 0, done.stderr
    rounds = read_metrics(sites / "r", "round")
    assert len(rounds) == 3
    folders = [sites / "r" / f"institution-{k}" for k in range(4)]
    if setting == "plain":
        assert all(set(TIMING) <= set(r) for r in rounds)
        assert all("loss" in e for e in rounds[0]["institutions"] if e["participated"])
        assert not any(f.exists() for f in folders)
        return
    for r in rounds:
        present = {k for k in r if "seconds" in k or "fraction" in k}
        if setting == "sa+dp":  # secret sampling: nothing timed, nothing per institution
            assert not present and not {"institutions", "participants", "loss"} & set(r)
        else:  # public sampling: the root's own clock, not its institution's all-reduce
            assert present == {"round_seconds", "exchange_seconds"}
            assert all(set(e) == {"institution", "participated"} for e in r["institutions"])
    summary = read_metrics(sites / "r", "summary")[0]
    for k, folder in enumerate(folders):
        first = read_metrics(folder)[0]  # its own environment, its own hosts, before its rounds
        assert (first["event"], first["institution"], first["institution_ranks"]) == (
            "environment", k, 1)
        assert first["config_sha256"] == summary["config_sha256"] and first["hosts"]
        assert "hosts" not in summary  # the root records no institution's hosts
        own = read_metrics(folder, "round")
        assert [r["round"] for r in own] == [1, 2, 3]
        for r in own:
            assert set(TIMING) <= set(r) and r["samples"] == [23, 31, 17, 29][k]
            assert ("loss" in r) == r["sampled"]
            if setting == "sa+dp":  # every leader trains and sends, sampled or not
                assert r["steps"] == 3 and r["bytes_sent"] > 0
            else:
                assert r["steps"] == 3 * r["sampled"]
                assert k == 0 or (r["bytes_sent"] > 0) == r["sampled"]  # the root: relays
    if setting == "sa+dp":
        assert len({r["bytes_sent"] for f in folders[1:] for r in read_metrics(f, "round")}) == 1


def test_padding_changes_no_result(tmp_path):
    """local_steps = "proportional" under SA+DP: every institution takes the largest count, its
    own steps then padding ones that are discarded, so one round's model is DP without secure
    aggregation's (no padding there), up to the fixed-point step."""
    for k, n in enumerate([17, 31, 23, 29]):  # 5, 10, 7 and 9 steps of 3 rows
        write_dataset(tmp_path / f"site-{k}.h5", n, seed=k)
    assert run_cli(["keys", "generate", "keys", "--institutions", "4"],
                   cwd=tmp_path).returncode == 0
    dp = {"clip": 1000.0, "noise_multiplier": 0.0}
    for name, extra in (("dp", {}), ("sadp", {"secure_aggregation": True, "keys": "keys",
                                              "secure_range": 20.0})):
        write_config(tmp_path / f"{name}.toml", config(
            name, extra={"local_steps": "proportional", **extra}, dp=dp, rounds=1))
        done = run_mpi(4, ["train", f"{name}.toml"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(model_vector(tmp_path / "sadp" / "model.h5"),
                               model_vector(tmp_path / "dp" / "model.h5"), rtol=0, atol=1e-8)
    own = [read_metrics(tmp_path / "sadp" / f"institution-{k}", "round")[0] for k in range(4)]
    assert [r["steps"] for r in own] == [10] * 4
    assert [r["trained_steps"] for r in own] == [5, 10, 7, 9]
