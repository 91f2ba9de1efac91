"""Robust strategies under mpiexec: a federation equals a serial simulation with Flower's rule
(ours where flwr is missing), and one byzantine institution of 5 (MPIFED_FAULT) steers FedAvg
but not FedMedian or Krum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import read_metrics, read_model, run_mpi, write_config, write_dataset
from reference import global_batches, initial_weights, mlp_sgd

from mpifed.federated.robust import ROBUST
from mpifed.federated.strategies import ServerHyper

FEATURES, CLASSES, HIDDEN = 5, 3, 4


def config(strategy, institutions, rounds, local_steps, lr, extra=None, test=""):
    return [{
        "data": {"train": "site-{institution}.h5", "test": test},
        "model": {"kind": "mlp", "hidden": [HIDDEN], "dtype": "float64"},
        "optim": {"lr": lr, "batch_size": 4},
        "federated": {"institutions": institutions, "rounds": rounds,
                      "local_steps": local_steps, "strategy": strategy},
        "run": {"seed": 5, "out": "out"},
    }, {"federated": extra or {}}]


def flower_or_ours(name, global_layers, local, losses, hp):
    """Return the new layers: Flower's aggregate function where flwr is installed, else ours."""
    try:
        from flwr.server.strategy import aggregate as agg
    except ImportError:
        agg = None
    flat = [np.concatenate([w.ravel() for w in layers]) for layers in local]
    glob = np.concatenate([w.ravel() for w in global_layers])
    if agg is None or name == "qfedavg":  # Flower's QFedAvg reads one server loss for all
        new = ROBUST[name](glob, [(p, n, 1, loss) for p, (n, loss) in zip(flat, losses)], {}, hp)[0]
        shapes = [w.shape for w in global_layers]
        cuts = np.cumsum([0] + [w.size for w in global_layers])
        return [new[a:b].reshape(s) for a, b, s in zip(cuts, cuts[1:], shapes)]
    pairs = [(layers, n) for layers, (n, _) in zip(local, losses)]
    if name == "fedmedian":
        return agg.aggregate_median(pairs)
    if name == "fedtrimmedavg":
        return agg.aggregate_trimmed_avg(pairs, proportiontocut=hp.trim_fraction)
    if name in ("krum", "multikrum"):
        keep = hp.num_selected if name == "multikrum" else 0
        return agg.aggregate_krum(pairs, num_malicious=hp.num_malicious, to_keep=keep)
    return agg.aggregate_bulyan(pairs, num_malicious=hp.num_malicious,
                                aggregation_rule=agg.aggregate_krum, to_keep=0)


CASES = {  # strategy: (institutions, [federated] keys)
    "fedmedian": (4, {}),
    "fedtrimmedavg": (5, {"trim_fraction": 0.2}),
    "krum": (5, {"num_malicious": 1}),
    "multikrum": (5, {"num_malicious": 1, "num_selected": 3}),
    "bulyan": (4, {"num_malicious": 0}),
    "qfedavg": (4, {"q": 1.0, "server_lr": 0.5}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_federation_equals_serial_simulation_with_flowers_rule(tmp_path, name):
    count, extra = CASES[name]
    samples = [23, 31, 17, 40, 26][:count]
    sites = [write_dataset(tmp_path / f"site-{k}.h5", n, seed=k) for k, n in enumerate(samples)]
    rounds, steps, lr = 3, 3, 0.1
    write_config(tmp_path / "fed.toml", *config(name, count, rounds, steps, lr, extra))
    done = run_mpi(count, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = read_metrics(tmp_path / "out", "round")
    hp = ServerHyper(server_lr=extra.get("server_lr", 1.0), beta1=0.9, beta2=0.99, tau=1e-3,
                     trim_fraction=extra.get("trim_fraction", 0.2),
                     num_malicious=extra.get("num_malicious", 0),
                     num_selected=extra.get("num_selected", 0), q=extra.get("q", 0.2))
    weights = initial_weights(FEATURES, HIDDEN, CLASSES, 5)
    streams = [global_batches(len(y), 1, 4, 5, True) for _, y in sites]
    for record in records:
        local = [mlp_sgd(x, y, weights, itertools.islice(stream, steps), lr)
                 for (x, y), stream in zip(sites, streams)]
        losses = [(len(y), e["loss"]) for (_, y), e in zip(sites, record["institutions"])]
        weights = flower_or_ours(name, weights, local, losses, hp)
    for got, want in zip(read_model(tmp_path / "out" / "model.h5"), weights):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def run(tmp_path, folder, strategy, extra=None, fault=None):
    """One run of the 5 institutions in `folder`; return (flat model, last accuracy, stderr)."""
    work = tmp_path / folder
    work.mkdir()
    for k in range(5):
        write_dataset(work / f"site-{k}.h5", 60, seed=k, shift=1.5)
    write_dataset(work / "test.h5", 300, seed=99, shift=1.5)
    write_config(work / "fed.toml", *config(strategy, 5, 8, 4, 0.2, extra, test="test.h5"))
    done = run_mpi(5, ["train", "fed.toml"], cwd=work,
                   env={"MPIFED_FAULT": fault} if fault else None)
    assert done.returncode == 0, done.stderr
    model = np.concatenate([w.ravel() for w in read_model(work / "out" / "model.h5")])
    return model, read_metrics(work / "out", "round")[-1]["accuracy"], done.stderr


def test_one_byzantine_of_five_steers_fedavg_not_fedmedian_or_krum(tmp_path):
    fault = "byzantine:3:scale:100"
    clean, clean_accuracy, quiet = run(tmp_path, "clean", "fedavg")
    assert "byzantine" not in quiet  # never on by accident
    steered, steered_accuracy, told = run(tmp_path, "fedavg", "fedavg", fault=fault)
    assert "warning" in told and f"MPIFED_FAULT={fault}" in told and "[rank 3]" in told
    far = np.linalg.norm(steered - clean)
    for strategy, extra in [("fedmedian", {}), ("krum", {"num_malicious": 1})]:
        robust, accuracy, _ = run(tmp_path, strategy, strategy, extra, fault)
        # 5 x 60 rows, a 4-unit MLP, 8 rounds: Krum keeps one institution's model a round and
        # lands a few points under the clean FedAvg (about 5 seen), FedMedian about 2
        assert np.linalg.norm(robust - clean) < far / 100, strategy
        assert accuracy >= clean_accuracy - 0.1, strategy
    assert steered_accuracy < clean_accuracy - 0.25  # seen: 0.65 clean, 0.24 steered


@pytest.mark.parametrize("extra,fault,needle", [
    ({"strategy": "krum", "num_malicious": 1}, None, "federated.num_malicious: krum with 1"),
    ({"strategy": "bulyan", "num_malicious": 1}, None, "4 * 1 + 3 = 7"),
    ({}, "byzantine:4:signflip", "there is no institution 4"),
    ({}, "byzantine:1:wobble", "unknown mode 'wobble'"),
])
def test_refused_before_round_one(tmp_path, extra, fault, needle):
    for k in range(4):
        write_dataset(tmp_path / f"site-{k}.h5", 20, seed=k)
    write_config(tmp_path / "fed.toml", *config("fedavg", 4, 1, 1, 0.1, extra))
    done = run_mpi(4, ["train", "fed.toml"], cwd=tmp_path,
                   env={"MPIFED_FAULT": fault} if fault else None)
    assert done.returncode != 0 and needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
