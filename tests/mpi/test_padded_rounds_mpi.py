"""Rounds that look the same whoever trained (secure aggregation with DP, secret sampling): a
federation run in process, with each leader's secret draw replaced by a known pattern, the step
function's calls counted on every rank and the bytes each leader sends to the others counted on
its leaders communicator. Sampled or not, every institution takes the same number of steps and
sends the same bytes in every round, also when local_steps follows the data sizes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
from helpers import write_dataset
from mpi4py import MPI

import mpifed.train.federated as federated
import mpifed.train.federated_sampling as sampling
from mpifed.config import resolve
from mpifed.federated.identity import generate_keys
from mpifed.train.step import DataParallelStep

pytestmark = pytest.mark.mpi(min_size=3)  # three institutions of one rank each (more: idle)

ROUNDS = 4


class CountedSends:
    """The test's own count of the bytes a leader sends point to point on `leaders`."""

    def __init__(self, comm):
        self.comm, self.sent = comm, 0

    def Send(self, buf, *args, **kwargs):  # noqa: N802
        self.sent += np.asarray(buf).nbytes
        return self.comm.Send(buf, *args, **kwargs)

    def Isend(self, buf, *args, **kwargs):  # noqa: N802
        self.sent += np.asarray(buf).nbytes
        return self.comm.Isend(buf, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.comm, name)


@pytest.fixture
def folder():
    world = MPI.COMM_WORLD
    path = tempfile.mkdtemp() if world.rank == 0 else None
    path = world.bcast(path, root=0)  # the test's own plumbing, not mpifed's
    if world.rank == 0:
        for k, rows in enumerate([17, 31, 23]):  # proportional: 5, 10 and 7 steps of 3 rows
            write_dataset(os.path.join(path, f"site-{k}.h5"), rows, seed=k)
        generate_keys(os.path.join(path, "keys"), 3)
    world.Barrier()
    yield path
    world.Barrier()
    if world.rank == 0:
        shutil.rmtree(path)


def run(folder, local_steps, monkeypatch) -> tuple[dict, list[dict]]:
    """Run ROUNDS secret-sampled rounds on the first 3 ranks; return this rank's counts per
    round ({"steps": [...], "sent": [...]}) and, on a leader, its own records."""
    world = MPI.COMM_WORLD.Split(0 if MPI.COMM_WORLD.rank < 3 else MPI.UNDEFINED, 0)
    if world == MPI.COMM_NULL:
        return {}, []
    cfg = resolve({
        "data": {"train": os.path.join(folder, "site-{institution}.h5")},
        "model": {"kind": "mlp", "hidden": [4], "dtype": "float64"},
        "optim": {"lr": 0.1, "batch_size": 3},
        "federated": {"institutions": 3, "rounds": ROUNDS, "local_steps": local_steps,
                      "fraction": 0.5, "secure_aggregation": True, "secure_range": 20.0,
                      "keys": os.path.join(folder, "keys"),
                      "dp": {"clip": 1.0, "noise_multiplier": 1.0}},
        "run": {"seed": 5, "out": os.path.join(folder, f"out-{local_steps}"),
                "progress": "none"}})
    draws = []

    def drawn(q):  # institution k is left out of rounds k+1, k+3, ...: each round mixes both
        draws.append(None)
        return (len(draws) + world.rank) % 2 == 0

    monkeypatch.setattr(sampling, "secure_bernoulli", drawn)
    calls, senders = [0], []
    real_call = DataParallelStep.__call__

    def counted_call(self, *args, **kwargs):
        calls[0] += 1
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(DataParallelStep, "__call__", counted_call)
    real_federation = federated.make_federation

    def counted_federation(comm, sizes):
        fed = real_federation(comm, sizes)
        if fed.leaders is not None:
            fed.leaders = CountedSends(fed.leaders)
            senders.append(fed.leaders)
        return fed

    monkeypatch.setattr(federated, "make_federation", counted_federation)
    counts = {"steps": [], "sent": [], "sampled": []}
    real_round = federated.run_round

    def counted_round(*args):
        steps, sent = calls[0], senders[0].sent if senders else 0
        result = real_round(*args)
        counts["steps"].append(calls[0] - steps)
        counts["sent"].append((senders[0].sent if senders else 0) - sent)
        return result

    monkeypatch.setattr(federated, "run_round", counted_round)
    federated.run_federation(cfg, world, np)
    mine = os.path.join(cfg.run.out, f"institution-{world.rank}", "metrics.jsonl")
    records = [json.loads(line) for line in open(mine)] if os.path.exists(mine) else []
    records = [r for r in records if r["event"] == "round"]  # after its environment record
    world.Free()
    return counts, records


@pytest.mark.parametrize("local_steps", [4, "proportional"])
def test_sampled_or_not_every_institution_steps_and_sends_alike(folder, local_steps,
                                                                 monkeypatch):
    counts, records = run(folder, local_steps, monkeypatch)
    world = MPI.COMM_WORLD
    every = world.allgather((counts, records))[:3]  # the test's own plumbing
    if world.rank >= 3:
        return
    expected = 4 if local_steps == 4 else 10  # proportional: the largest institution's epoch
    for k, (counted, mine) in enumerate(every):
        assert counted["steps"] == [expected] * ROUNDS, k  # the step function's calls
        assert [r["steps"] for r in mine] == [expected] * ROUNDS
        assert [r["bytes_sent"] for r in mine] == counted["sent"]
        assert [r["sampled"] for r in mine] == [(r + k) % 2 == 0 for r in range(1, ROUNDS + 1)]
    # the non-root leaders send the same bytes every round, sampled or not
    assert len({s for counted, _ in every[1:] for s in counted["sent"]}) == 1
    # a sampled institution trained its own count (its epoch), the rest was padding
    own = [4] * 3 if local_steps == 4 else [5, 10, 7]
    for k, (_, mine) in enumerate(every):
        assert {r["trained_steps"] for r in mine if r["sampled"]} == {own[k]}
