"""Federated runs under mpiexec against an independent serial simulation of the same rounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import read_metrics, read_model, run_mpi, write_config, write_dataset
from reference import global_batches, initial_weights, mlp_sgd

from mpifed.federated.institutions import participants

FEATURES, CLASSES, HIDDEN = 5, 3, 4


def config(strategy, sizes, rounds, local_steps, lr, momentum, mu=0.0, batch=3,
           train="site-{institution}.h5", extra=None):
    """A federated run's config layers; sizes: {"institutions": K} or {"institution_sizes": [...]}."""
    return [{
        "data": {"train": train, "shuffle": True},
        "model": {"kind": "mlp", "hidden": [HIDDEN], "dtype": "float64"},
        "optim": {"lr": lr, "momentum": momentum, "batch_size": batch},
        "federated": {**sizes, "rounds": rounds, "local_steps": local_steps,
                      "strategy": strategy, "mu": mu},
        "run": {"seed": 5, "out": "out"},
    }, {"federated": extra or {}}]


def simulate(sites, site_ranks, rounds, local_steps, lr, momentum, seed, strategy="fedavg",
             mu=0.0, batch=3):
    """Serial FedAvg/FedProx: each institution trains from the global model, then n-weighted mean."""
    weights = initial_weights(FEATURES, HIDDEN, CLASSES, seed)
    streams = [global_batches(len(y), ranks, batch, seed, True)
               for (_, y), ranks in zip(sites, site_ranks)]
    total = sum(len(y) for _, y in sites)
    for _ in range(rounds):
        local = []
        for (x, y), stream in zip(sites, streams):
            batches = itertools.islice(stream, local_steps)
            anchor = weights if strategy == "fedprox" else None
            local.append(mlp_sgd(x, y, weights, batches, lr, momentum, anchor, mu))
        weights = [sum(len(y) / total * model[i] for (_, y), model in zip(sites, local))
                   for i in range(4)]
    return weights


@pytest.mark.parametrize("sizes,strategy,mu", [([2, 2], "fedavg", 0.0),
                                                ([1, 2, 1], "fedprox", 0.3)])
def test_federation_equals_serial_simulation(tmp_path, sizes, strategy, mu):
    site_samples = [23, 31, 17][:len(sizes)]
    sites = [write_dataset(tmp_path / f"site-{k}.h5", n, seed=k) for k, n in enumerate(site_samples)]
    key = ({"institutions": len(sizes)} if len(set(sizes)) == 1
           else {"institution_sizes": sizes})
    write_config(tmp_path / "fed.toml", *config(strategy, key, rounds=4, local_steps=3, lr=0.1,
                                                momentum=0.5, mu=mu))
    done = run_mpi(sum(sizes), ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected = simulate(sites, sizes, 4, 3, 0.1, 0.5, seed=5, strategy=strategy, mu=mu)
    for got, want in zip(read_model(tmp_path / "out" / "model.h5"), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    rounds = read_metrics(tmp_path / "out", "round")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    params = sum(w.size for w in expected) * 8
    # Each non-root leader sends one model (plus 40 bytes of counts) and receives one.
    assert rounds[0]["bytes_to_root"] == (len(sizes) - 1) * (params + 40)
    assert rounds[0]["bytes_from_root"] == (len(sizes) - 1) * params
    table = rounds[0]["institutions"]
    assert [e["samples"] for e in table] == site_samples and all(e["participated"] for e in table)
    assert all({"steps", "loss"} <= e.keys() for e in table)
    for record in rounds:  # the README's round record
        assert all(record[k] >= 0 for k in ("round_seconds", "exchange_seconds",
                                            "allreduce_seconds"))
        assert 0 <= record["comm_fraction"] <= 1


def sync_config(steps, batch, lr, train="d.h5"):
    return {"data": {"train": train},
            "model": {"kind": "mlp", "hidden": [HIDDEN], "dtype": "float64"},
            "optim": {"lr": lr, "batch_size": batch, "steps": steps},
            "run": {"seed": 5, "out": "sync"}}


@pytest.mark.parametrize("ranks,institutions", [(2, 1), (4, 4)])
def test_reduces_to_synchronous_sgd(tmp_path, ranks, institutions):
    # One institution, or one rank per institution with local_steps = 1 and plain SGD, is
    # synchronous SGD on the union (shards of equal size, so FedAvg's weights are equal too).
    write_dataset(tmp_path / "d.h5", 40, seed=9)
    write_config(tmp_path / "sync.toml", sync_config(steps=6, batch=2, lr=0.2))
    assert run_mpi(ranks, ["train", "sync.toml"], cwd=tmp_path).returncode == 0
    local_steps = 6 if institutions == 1 else 1
    rounds = 6 // local_steps
    write_config(tmp_path / "fed.toml", *config("fedavg", {"institutions": institutions}, rounds,
                                                local_steps, 0.2, 0.0, batch=2, train="d.h5"))
    done = run_mpi(ranks, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for fed, sync in zip(read_model(tmp_path / "out" / "model.h5"),
                         read_model(tmp_path / "sync" / "model.h5")):
        np.testing.assert_allclose(fed, sync, rtol=1e-12, atol=1e-14)


def test_fraction_idles_institutions_and_fednova_runs(tmp_path):
    for k, n in enumerate([20, 40, 20, 30]):
        write_dataset(tmp_path / f"site-{k}.h5", n, seed=k)
    write_config(tmp_path / "fed.toml", *config("fednova", {"institutions": 4}, 3, "proportional",
                                                0.1, 0.0, extra={"fraction": 0.5,
                                                                 "evaluate_local": True}),
                 {"data": {"test": "site-0.h5"}})
    done = run_mpi(4, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for record in read_metrics(tmp_path / "out", "round"):
        chosen = participants(4, 0.5, 5, record["round"] - 1)
        took_part = [e["institution"] for e in record["institutions"] if e["participated"]]
        assert took_part == chosen and len(chosen) == 2
        assert 0 <= record["accuracy"] <= 1 and record["test_loss"] > 0  # on data.test
        for e in record["institutions"]:  # evaluate_local: the participants' own scores
            if e["participated"]:
                assert 0 <= e["local_accuracy"] <= 1 and e["local_loss"] > 0
            else:
                assert "local_accuracy" not in e
        steps = {e["institution"]: e["steps"] for e in record["institutions"] if "steps" in e}
        for k, n in enumerate([20, 40, 20, 30]):
            if k in steps:
                assert steps[k] == n // 3  # proportional: one local epoch of batch 3


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("key,needle", [
    ({"institutions": 5}, "need at least 5 ranks"),
    ({"institution_sizes": [1, 1, 1, 1, 1]}, "adds up to 5 ranks"),
], ids=["institutions", "institution_sizes"])
def test_layout_errors(tmp_path, ranks, key, needle):
    write_dataset(tmp_path / "d.h5", 30, seed=0)
    write_config(tmp_path / "fed.toml", *config("fedavg", key, 1, 1, 0.1, 0.0, train="d.h5"))
    done = run_mpi(ranks, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode != 0 and needle in done.stderr and "Traceback" not in done.stderr


def test_missing_site_file_ends_all_ranks(tmp_path):
    write_dataset(tmp_path / "site-0.h5", 30, seed=0)  # site-1.h5 is missing
    write_config(tmp_path / "fed.toml", *config("fedavg", {"institutions": 2}, 1, 1, 0.1, 0.0))
    done = run_mpi(2, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode != 0 and "site-1.h5" in done.stderr
    assert len([ln for ln in done.stderr.splitlines() if "error" in ln]) == 1
