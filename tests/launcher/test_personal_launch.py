"""Personalisation under mpiexec: FedPer, Ditto and fine-tuning equal a serial NumPy simulation
(the global model.h5 and every institution's personal.h5), each institution's evaluation on its
own test file equals an independent one, nothing personal is in any message a leader sends,
under DP or secure aggregation the figures stay in the institutions' folders, an interrupted run
resumes to the same bits, and wrong settings are refused with the key named."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from helpers import (
    assert_same_bits,
    read_metrics,
    read_model,
    run_mpi,
    run_script,
    write_config,
    write_dataset,
)
from reference import global_batches, initial_weights, mlp_sgd

FEATURES, CLASSES, HIDDEN = 5, 3, 4
SAMPLES = [23, 31, 17]
HEAD = 3  # an mlp's layers: flatten, linear, relu, linear


BATCHNORM = {"kind": "sequential", "dtype": "float64", "layers": [
    {"type": "linear", "out": HIDDEN}, {"type": "batchnorm2d"}, {"type": "relu"},
    {"type": "linear", "out": CLASSES}]}


def config(mode, rounds=3, steps=3, lr=0.1, federated=None, run=None, test="", model=None):
    return [{
        "data": {"train": "site-{institution}.h5", "test": test},
        "model": model or {"kind": "mlp", "hidden": [HIDDEN], "dtype": "float64"},
        "optim": {"lr": lr, "batch_size": 4},
        "federated": {"institutions": len(SAMPLES), "rounds": rounds, "local_steps": steps,
                      "personalization": mode},
        "run": {"seed": 5, "out": "out", **(run or {})},
    }, {"federated": federated or {}}]


def write_sites(folder, test=False):
    sites = [write_dataset(folder / f"site-{k}.h5", n, seed=k) for k, n in enumerate(SAMPLES)]
    tests = [write_dataset(folder / f"test-{k}.h5", 30, seed=20 + k) for k in range(len(SAMPLES))
             ] if test else []
    return sites, tests


def simulate(sites, mode, rounds, steps, lr, lam=0.0, finetune=0):
    """Serial FedAvg with FedPer's head (layers 2, 3 of [W1, b1, W2, b2]) kept per institution,
    or Ditto's personal models; return (global weights, personal weights per institution)."""
    weights = initial_weights(FEATURES, HIDDEN, CLASSES, 5)
    start = [w.copy() for w in weights]
    streams = [global_batches(len(y), 1, 4, 5, True) for _, y in sites]
    personal = [[w.copy() for w in weights] for _ in sites]
    total = sum(len(y) for _, y in sites)
    for _ in range(rounds):
        local = []
        for k, ((x, y), stream) in enumerate(zip(sites, streams)):
            batches = list(itertools.islice(stream, steps))
            mine = weights[:2] + personal[k][2:] if mode == "fedper" else weights
            trained = mlp_sgd(x, y, mine, batches, lr)
            if mode == "fedper":
                personal[k][2:] = trained[2:]
            if mode == "ditto":
                personal[k] = mlp_sgd(x, y, personal[k], batches, lr, anchor=weights, mu=lam)
            local.append(trained)
        weights = [sum(len(y) / total * w[i] for (_, y), w in zip(sites, local))
                   for i in range(4)]
        if mode == "fedper":
            weights[2:] = start[2:]  # the global model's head: the initial one
    for k, ((x, y), stream) in enumerate(zip(sites, streams)):
        own = {"fedper": weights[:2] + personal[k][2:], "ditto": personal[k]}.get(mode, weights)
        personal[k] = mlp_sgd(x, y, own, itertools.islice(stream, finetune), lr)
    return weights, personal


def accuracy(weights, x, y):
    w1, b1, w2, b2 = weights
    return float(np.mean((np.maximum(x @ w1 + b1, 0) @ w2 + b2).argmax(1) == y))


@pytest.mark.parametrize("mode,extra", [
    ("fedper", {"personal_layers": [HEAD]}),
    ("ditto", {"ditto_lambda": 0.5}),
    ("none", {"finetune_steps": 4}),
])
def test_federation_equals_serial_simulation(tmp_path, mode, extra):
    sites, tests = write_sites(tmp_path, test=True)
    write_config(tmp_path / "fed.toml", *config(mode, federated=extra, test="test-{institution}.h5"))
    done = run_mpi(len(SAMPLES), ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    want, personal = simulate(sites, mode, 3, 3, 0.1, extra.get("ditto_lambda", 0.0),
                              extra.get("finetune_steps", 0))
    for got, w in zip(read_model(tmp_path / "out" / "model.h5"), want):
        np.testing.assert_allclose(got, w, rtol=1e-7, atol=1e-10)
    seen = []
    for k, ((x, y), mine) in enumerate(zip(tests, personal)):
        folder = tmp_path / "out" / f"institution-{k}"
        for got, w in zip(read_model(folder / "personal.h5"), mine):
            np.testing.assert_allclose(got, w, rtol=1e-7, atol=1e-10)
        records = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        last = [r for r in records if r["event"] in ("evaluation", "finetune")][-1]
        assert last["personal_accuracy"] == pytest.approx(accuracy(mine, x, y), abs=1e-12)
        assert last["global_accuracy"] == pytest.approx(accuracy(want, x, y), abs=1e-12)
        seen.append(last["personal_accuracy"])
    summary = read_metrics(tmp_path / "out", "summary")[-1]
    assert summary["local_accuracy_mean"] == pytest.approx(np.mean(seen), abs=1e-12)
    assert summary["local_accuracy_worst"] == pytest.approx(min(seen), abs=1e-12)
    rounds = read_metrics(tmp_path / "out", "round")
    assert all("local_accuracy_mean" in r and "local_accuracy_worst" in r for r in rounds)


SPY = """
import json, sys
import numpy as np
import mpifed.train.federated as federated
from mpi4py import MPI
import mpifed.federated.institutions as institutions

sent, personal = [], []


class Recording:
    '''The leaders' communicator, keeping a copy of every buffer this rank sends on it.'''

    def __init__(self, comm):
        self._comm = comm

    def _keep(self, buf):
        buf = buf[0] if isinstance(buf, (list, tuple)) else buf
        if buf is not None:
            sent.append(np.array(buf, copy=True).ravel().astype(np.float64))

    def Isend(self, buf, *a, **k):
        self._keep(buf); return self._comm.Isend(buf, *a, **k)

    def Send(self, buf, *a, **k):
        self._keep(buf); return self._comm.Send(buf, *a, **k)

    def Gather(self, buf, *a, **k):
        self._keep(buf); return self._comm.Gather(buf, *a, **k)

    def Bcast(self, buf, root=0):
        if self._comm.rank == root:
            self._keep(buf)
        return self._comm.Bcast(buf, root=root)

    def __getattr__(self, name):
        return getattr(self._comm, name)


make = federated.make_federation


def recorded(world, sizes):
    fed = make(world, sizes)
    if fed.leaders is not None:
        object.__setattr__(fed, "leaders", Recording(fed.leaders))
    return fed


train = federated.local_training


def spied(fed_cfg, optim, fed, site, *args):
    report = train(fed_cfg, optim, fed, site, *args)
    p = site.personal
    if p.mask is not None:  # what training made personal: not the initial values
        values = site.params[~p.mask]
        values = values[values != p.initial[~p.mask]]
    else:  # Ditto's v where it differs from the global model at the same element
        values = p.model[p.model != site.params]
    personal.append(np.array(values, dtype=np.float64, copy=True))
    shared = site.params[p.mask] if p.mask is not None else site.params
    spied.shared.append(np.array(shared, dtype=np.float64, copy=True))
    return report


spied.shared = []
federated.make_federation, federated.local_training = recorded, spied
import mpifed.train
mpifed.train.run("fed.toml")
rank = MPI.COMM_WORLD.rank
json.dump({"sent": [s.tolist() for s in sent], "personal": [p.tolist() for p in personal],
           "shared": [s.tolist() for s in spied.shared]}, open(f"spy-{rank}.json", "w"))
"""


@pytest.mark.parametrize("mode,extra,model", [
    ("fedper", {"personal_layers": [HEAD]}, None),
    ("ditto", {}, None),
    ("fedbn", {}, BATCHNORM),
])
def test_no_message_a_leader_sends_holds_a_personal_value(tmp_path, mode, extra, model):
    write_sites(tmp_path, test=True)
    write_config(tmp_path / "fed.toml", *config(mode, federated=extra, test="test-{institution}.h5",
                                                 run={"checkpoint_every": 1}, model=model))
    done = run_script(len(SAMPLES), SPY, tmp_path)
    assert done.returncode == 0, done.stderr
    for rank in range(len(SAMPLES)):
        spy = json.load(open(tmp_path / f"spy-{rank}.json"))
        sent = np.concatenate([np.asarray(s) for s in spy["sent"]])
        assert spy["personal"] and len(spy["sent"]) >= 3
        for shared in spy["shared"]:  # the recording works: the update itself is among them
            if rank:
                assert np.isin(shared, sent).all()
        for values in spy["personal"]:  # values, not names: no personal number left the site
            values = np.asarray(values)
            assert not np.isin(values, sent).any(), rank


@pytest.mark.parametrize("mode,extra", [("fedper", {"personal_layers": [HEAD]}),
                                        ("ditto", {"ditto_lambda": 0.5})])
def test_interrupted_run_resumes_to_the_same_bits(tmp_path, mode, extra):
    write_sites(tmp_path)
    for out in ("full", "cut"):
        write_config(tmp_path / f"{out}.toml", *config(
            mode, rounds=6, federated={**extra, "finetune_steps": 2},
            run={"out": out, "checkpoint_every": 2}))
    assert run_mpi(3, ["train", "full.toml"], cwd=tmp_path).returncode == 0
    killed = run_mpi(3, ["train", "cut.toml"], cwd=tmp_path,
                     env={"MPIFED_FAULT": "kill:round=5:rank=1"})
    assert killed.returncode != 0, "the fault did not kill the run"
    assert (tmp_path / "cut" / "institution-1" / "checkpoints" / "personal-round-4.h5").exists()
    done = run_mpi(3, ["train", "cut.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_bits(tmp_path / "cut" / "model.h5", tmp_path / "full" / "model.h5")
    for k in range(3):
        assert_same_bits(tmp_path / "cut" / f"institution-{k}" / "personal.h5",
                         tmp_path / "full" / f"institution-{k}" / "personal.h5")


@pytest.mark.parametrize("private", [
    {"dp": {"clip": 1.0, "noise_multiplier": 0.5}},
    {"secure_aggregation": True, "secure_range": 8.0},
])
def test_under_privacy_the_figures_stay_in_the_institutions_folders(tmp_path, private):
    write_sites(tmp_path, test=True)
    write_config(tmp_path / "fed.toml", *config("ditto", rounds=2, federated=private,
                                                 test="test-{institution}.h5"))
    done = run_mpi(3, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for record in read_metrics(tmp_path / "out"):
        assert not any(key.startswith("local_accuracy") for key in record), record
    for k in range(3):
        mine = read_metrics(tmp_path / "out" / f"institution-{k}", "evaluation")
        assert len(mine) == 2 and "personal_accuracy" in mine[0]


@pytest.mark.parametrize("extra,needle", [
    ({"personalization": "fedbn"}, "federated.personalization: \"fedbn\" keeps the batch-norm"),
    ({"personalization": "fedper", "personal_layers": [7]}, "[7] out of range; the model has 4"),
    ({"personalization": "fedper", "personal_layers": [2]}, "layers without parameters (2: relu)"),
    ({"personalization": "fedper", "personal_layers": [1, 3]}, "nothing to share"),
    ({"personalization": "fedper"}, "federated.personal_layers: fedper keeps"),
    ({"personalization": "fedbn", "secure_aggregation": True}, "use \"ditto\" there"),
])
def test_refused_before_round_one(tmp_path, extra, needle):
    write_sites(tmp_path)
    layers = config("none", rounds=1)
    layers[1]["federated"] = extra
    write_config(tmp_path / "fed.toml", *layers)
    done = run_mpi(3, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode != 0 and needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
