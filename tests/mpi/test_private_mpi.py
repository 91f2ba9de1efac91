"""Private aggregation, in process: with and without secure aggregation the root gets the
weighted sums of the leaders' updates (checked against sums of the values each leader put in),
nothing else reaches it, nothing is unpickled, and a root that lies (test doubles of its relay)
is refused by every honest leader before any masked vector is sent."""

from __future__ import annotations

import pickle
import shutil
import tempfile
from dataclasses import replace

import numpy as np
import pytest
from mpi4py import MPI
from private_helpers import private_aggregate

import mpifed.federated.private_aggregation as private
from mpifed.config import resolve
from mpifed.errors import UserError
from mpifed.federated.exchange import SiteReport
from mpifed.federated.identity import generate_keys, load_identity
from mpifed.federated.institutions import make_federation
from mpifed.federated.key_exchange import Relay
from mpifed.federated.masked_sum import MaskedSum
from mpifed.federated.transcript import ENTRY, confirmation_bytes

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs

SIZE = 257


def config(institutions: int, secure: bool, dp=None, keys=""):
    return resolve({"data": {"train": "site-{institution}.h5"},
                    "federated": {"institutions": institutions, "secure_aggregation": secure,
                                  "secure_max_samples": 1000, "secure_range": 4.0,
                                  "min_participants": 1, "keys": keys,
                                  **({"dp": dp} if dp else {})}})


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


@pytest.fixture
def identity(fed):
    folder = tempfile.mkdtemp() if fed.is_root else None
    folder = fed.world.bcast(folder, root=0)  # the test's own plumbing, not mpifed's
    if fed.is_root:
        generate_keys(folder, len(fed.sizes))
    fed.world.Barrier()
    yield load_identity(folder, fed.institution, len(fed.sizes))
    fed.world.Barrier()
    if fed.is_root:
        shutil.rmtree(folder)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
@pytest.mark.parametrize("idle", [False, True], ids=["all", "one-idle"])
def test_the_root_gets_the_weighted_sums(fed, secure, idle):
    count = len(fed.sizes)
    chosen = [k for k in range(count) if not (idle and k == count - 1)] or [0]
    global_host = np.linspace(-1, 1, SIZE)
    params = global_host + update_of(fed.institution)
    cfg = config(count, secure)
    sums = private_aggregate(cfg.federated, None, fed, params, global_host,
                             report_of(fed.institution), chosen, 3, {})
    if not fed.is_root:
        assert sums is None
        return
    weights = [report_of(k).samples for k in chosen]
    expected = sum(w * update_of(k) for w, k in zip(weights, chosen))
    atol = 1e-6 if secure else 1e-12  # the fixed-point step of the ring
    np.testing.assert_allclose(sums["delta_sum"], expected, rtol=0, atol=atol)
    assert sums["weight"] == pytest.approx(sum(weights), abs=atol)
    assert sums["loss"] == pytest.approx(sum(w * report_of(k).loss
                                             for w, k in zip(weights, chosen)), abs=1e-3)
    others = len([k for k in chosen if k != 0])
    vector = (SIZE + 2) * 8  # update, w*loss, w
    relayed = ENTRY + confirmation_bytes(False)  # its key, its view of the round
    assert sums["bytes"] == others * vector + (others * relayed if secure else 0)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_under_dp_every_leader_sends_and_the_unsampled_send_zeros(fed, identity, secure,
                                                                   monkeypatch):
    """Items 3, 4, 8, 9: authenticated, every leader sends (zeros when its draw left it out),
    the sum is the clipped updates of the sampled ones, no numpy generator and no pickle."""
    count = len(fed.sizes)
    if secure and count < 2:
        pytest.skip("secure aggregation with DP needs a leader besides the root")
    dp = {"clip": 0.5, "noise_multiplier": 0.0, "adaptive": True, "clip_count_stddev": 0.0}
    cfg = config(count, secure, dp, keys="x" if secure else "")
    sampled = fed.institution % 2 == 0
    global_host = np.zeros(SIZE)
    params = update_of(fed.institution)
    chosen = [k for k in range(count) if k % 2 == 0]
    clipped = [update_of(k) * min(1, 0.5 / np.linalg.norm(update_of(k))) for k in chosen]

    def refuse(*args, **kwargs):
        raise AssertionError("a numpy generator or an unpickle on the private path")

    monkeypatch.setattr(np.random, "default_rng", refuse)
    MPI.pickle.__init__(pickle.dumps, refuse)
    try:
        sums = private_aggregate(cfg.federated, cfg.federated.dp, fed, params,
                                 global_host, SiteReport(), list(range(count)), 0, {},
                                 sampled=sampled, identity=identity if secure else None)
    finally:
        MPI.pickle.__init__(pickle.dumps, pickle.loads)
    if not fed.is_root:
        return
    np.testing.assert_allclose(sums["delta_sum"], sum(clipped), atol=1e-6)
    assert sums["under_clip"] == pytest.approx(-0.5 * len(chosen), abs=1e-6)  # all over
    assert "loss" not in sums and "weight" not in sums
    if secure:
        assert sums["bytes"] == (count - 1) * ((SIZE + 1) * 8 + ENTRY
                                               + confirmation_bytes(True))  # + signed views


def test_fewer_senders_than_min_participants_is_refused_on_every_rank(fed):
    count = len(fed.sizes)
    cfg = config(count, True)
    cfg = cfg.with_values(federated=replace(cfg.federated, min_participants=3))
    with pytest.raises(UserError) as info:
        private_aggregate(cfg.federated, None, fed, np.zeros(SIZE), np.zeros(SIZE),
                          report_of(fed.institution), [0, 1][:count], 0, {})
    messages = fed.world.allgather(str(info.value))
    assert len(set(messages)) == 1 and "federated.min_participants = 3" in messages[0]


@pytest.mark.mpi(min_size=3)
def test_a_leader_reusing_another_leaders_key_fails_on_every_rank(fed, monkeypatch):
    count = len(fed.sizes)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    fixed = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    public = fixed.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)
    if fed.institution in (1, count - 1):  # two institutions share one key pair
        monkeypatch.setattr(private, "new_keypair", lambda: (fixed, public))
    with pytest.raises(UserError) as info:
        private_aggregate(config(count, True).federated, None, fed, np.zeros(SIZE),
                          np.zeros(SIZE), report_of(fed.institution), list(range(count)), 0, {})
    messages = fed.world.allgather(str(info.value))
    assert len(set(messages)) == 1  # one message, the same on every rank
    assert "two institutions present the same public key" in messages[0]
    assert f"(institution {count - 1})" in messages[0]


# -- roots that lie: test doubles of the relay ----------------------------------------------

class SubstitutedKey(Relay):
    """Puts a key of the root's own making in place of institution 1's, for every leader but
    institution 1 (which would see its own key altered)."""

    def key_tables(self, table, leaders):
        forged = table.copy()
        forged[1, 1:33] = np.frombuffer(private.new_keypair()[1], dtype=np.uint8)
        return [table, table] + [forged] * (leaders - 2)


class MissingKey(Relay):
    """Leaves institution 1's key out of the list."""

    def key_tables(self, table, leaders):
        forged = table.copy()
        forged[1] = 0
        return [table] + [forged] * (leaders - 1)


class OwnKeyAltered(Relay):
    """Hands every leader its own key with one bit flipped."""

    def key_tables(self, table, leaders):
        tables = [table]
        for k in range(1, leaders):
            forged = table.copy()
            forged[k, 5] ^= 1
            tables.append(forged)
        return tables


class DifferentLists(Relay):
    """Every check of a list alone passes, but leader 1 gets another list than the rest (a byte
    that no check of one list reads), so only the consistency round can catch it."""

    def key_tables(self, table, leaders):
        other = table.copy()
        other[0, 0] = 2  # still 'present'
        return [table, other] + [table] * (leaders - 2)


class BadClip(Relay):
    def __init__(self, value):
        self.value = value

    def clips(self, clip, leaders):
        return [np.array([self.value])] * leaders


LIARS = {
    "substituted key": (SubstitutedKey(), "does not verify (a substituted key)"),
    "missing key": (MissingKey(), "key is missing"),
    "own key altered": (OwnKeyAltered(), "its own key came back altered"),
    "different lists": (DifferentLists(), "different lists to different leaders"),
    "negative clip": (BadClip(-1.0), "clip relayed by the root is not finite and positive"),
    "NaN clip": (BadClip(float("nan")), "clip relayed by the root is not finite and positive"),
}


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("dp", [False, True], ids=["sa", "sa+dp"])
@pytest.mark.parametrize("liar", list(LIARS))
def test_a_lying_root_is_refused_by_every_honest_leader(fed, identity, liar, dp, monkeypatch):
    count = len(fed.sizes)
    if "clip" in liar and not dp:
        pytest.skip("the clip is relayed under DP only")
    relay, check = LIARS[liar]
    dp_table = {"clip": 1.0, "noise_multiplier": 1.0} if dp else None
    cfg = config(count, True, dp_table, keys="x")
    masked = []
    original = MaskedSum.masked_ring
    monkeypatch.setattr(MaskedSum, "masked_ring",
                        lambda self, *a: masked.append(1) or original(self, *a))
    with pytest.raises(UserError) as info:
        private_aggregate(cfg.federated, cfg.federated.dp, fed,
                          update_of(fed.institution), np.zeros(SIZE),
                          report_of(fed.institution), list(range(count)), 2, {},
                          identity=identity, relay=relay if fed.is_root else None)
    messages = fed.world.allgather(str(info.value))
    assert len(set(messages)) == 1, messages  # one message on every rank
    assert check in messages[0]
    assert fed.world.allreduce(len(masked)) == 0  # no masked vector anywhere
    refusers = {  # the honest leaders that received the lie, each refused on its own check
        "substituted key": range(2, count), "missing key": range(1, count),
        "own key altered": range(1, count), "different lists": range(count),
        "negative clip": range(count), "NaN clip": range(count)}[liar]
    assert f"refused by institutions {list(refusers)}" in messages[0]
