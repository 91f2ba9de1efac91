"""Private aggregation, in process: with and without secure aggregation the root gets the
weighted sums of the leaders' updates (checked against sums of the values each leader put in),
nothing else reaches it, and a reused key stops every rank with one message."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import mpifed.federated.private_aggregation as private
from mpifed.errors import UserError
from mpifed.federated.exchange import SiteReport
from mpifed.federated.institutions import make_federation
from mpifed.federated.private_aggregation import private_aggregate
from mpifed.train.config import resolve

pytestmark = pytest.mark.mpi

SIZE = 257


def config(institutions: int, secure: bool) -> dict:
    return resolve({"data": {"train": "site-{institution}.h5"},
                    "federated": {"institutions": institutions, "secure_aggregation": secure,
                                  "secure_max_samples": 1000, "secure_range": 4.0}})


def update_of(institution: int) -> np.ndarray:
    return np.random.default_rng(institution).uniform(-1, 1, SIZE)


def report_of(institution: int) -> SiteReport:
    return SiteReport(samples=20.0 + 3 * institution, steps=5.0, loss=0.25 + institution)


@pytest.fixture
def fed():
    world = MPI.COMM_WORLD
    federation = make_federation(world, [1] * world.size)  # one rank per institution
    yield federation
    federation.free()


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
@pytest.mark.parametrize("idle", [False, True], ids=["all", "one-idle"])
def test_the_root_gets_the_weighted_sums(fed, secure, idle):
    count = len(fed.sizes)
    chosen = [k for k in range(count) if not (idle and k == count - 1)] or [0]
    global_host = np.linspace(-1, 1, SIZE)
    params = global_host + update_of(fed.institution)
    cfg = config(count, secure)
    sums = private_aggregate(cfg["federated"], None, fed, params, global_host,
                             report_of(fed.institution), chosen, 3, {})
    if not fed.is_root:
        assert sums is None
        return
    weights = [report_of(k).samples for k in chosen]
    expected = sum(w * update_of(k) for w, k in zip(weights, chosen))
    atol = 1e-6 if secure else 1e-12  # the fixed-point step of the ring
    np.testing.assert_allclose(sums["delta_sum"], expected, rtol=0, atol=atol)
    assert sums["weight_sum"] == pytest.approx(sum(weights), abs=atol)
    assert sums["loss_sum"] == pytest.approx(sum(w * report_of(k).loss
                                                 for w, k in zip(weights, chosen)), abs=1e-3)
    others = len([k for k in chosen if k != 0])
    vector = (SIZE + 3) * 8  # update, w*loss, w, under-clip bit
    assert sums["bytes"] == others * vector + (len(chosen) * 32 if secure else 0)  # + keys


def test_a_leader_reusing_another_leaders_key_fails_on_every_rank(fed, monkeypatch):
    count = len(fed.sizes)
    if count < 3:
        pytest.skip("needs the root and two other leaders")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    fixed = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    public = fixed.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)
    if fed.institution in (1, count - 1):  # two institutions share one key pair
        monkeypatch.setattr(private, "new_keypair", lambda: (fixed, public))
    params = np.zeros(SIZE)
    with pytest.raises(UserError) as info:
        private_aggregate(config(count, True)["federated"], None, fed, params, np.zeros(SIZE),
                          report_of(fed.institution), list(range(count)), 0, {})
    messages = fed.world.allgather(str(info.value))
    assert len(set(messages)) == 1  # one message, the same on every rank
    assert f"institution {count - 1} presented the same public key as institution 1" in messages[0]
