"""Private aggregation, in process: with and without secure aggregation the root gets the
weighted sums of the leaders' updates (checked against sums of the values each leader put in),
nothing else reaches it, nothing is unpickled, and a root that lies (test doubles of its relay),
or a leader whose view of the round differs (the round transcript), is refused by every honest
leader before any masked vector is sent."""

from __future__ import annotations

import pickle
import re
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
from mpifed.federated.transcript import ENTRY, VIEW, confirmation_bytes

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs

SIZE = 257


def config(institutions: int, secure: bool, dp=None, keys="", **federated):
    """A federation's Config. Secure aggregation with DP and no keys is refused at load (a run
    never reaches it); these tests still drive the aggregator's unsigned path, so they build the
    config with a placeholder folder and then clear it."""
    unsigned = secure and dp and not keys
    cfg = resolve({"data": {"train": "site-{institution}.h5"},
                   "federated": {"institutions": institutions, "secure_aggregation": secure,
                                 "secure_max_samples": 1000, "secure_range": 4.0,
                                 "min_participants": 1, "keys": keys or ("x" if unsigned else ""),
                                 **federated, **({"dp": dp} if dp else {})}})
    if unsigned:
        object.__setattr__(cfg.federated, "keys", "")  # the unsigned path, for these tests only
    return cfg


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


class OtherClip(Relay):
    """Sends leader 1 a clip of its own (finite and positive: only the transcript tells)."""

    def clips(self, clip, leaders):
        return [clip, clip * 1e-9] + [clip] * (leaders - 2)


class HiddenClip(OtherClip):
    """Sends leader 1 another clip and hides it: every leader is relayed every sender's view
    as a copy of its own, so only the views' signatures tell."""

    def confirmations(self, table, leaders):
        forged = []
        for k in range(leaders):
            mine = table.copy()
            mine[:, 1:1 + VIEW.size] = table[k, 1:1 + VIEW.size]
            forged.append(mine)
        return forged


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
    "other clip": (OtherClip(), "the round transcript differs from its own: the clip"),
    "hidden clip": (HiddenClip(), "a round transcript's signature does not verify"),
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
        "negative clip": range(count), "NaN clip": range(count), "other clip": range(count),
        "hidden clip": range(count)}[liar]
    assert f"refused by institutions {list(refusers)}" in messages[0]


# -- the round transcript: one lie per field --------------------------------------------------

DP = {"clip": 1.0, "noise_multiplier": 1.0}
ADAPTIVE = {**DP, "adaptive": True, "clip_count_stddev": 2.0}
# field: (the words of its refusal, the DP table (None: no DP), whether leaders have keys,
#         what leader 1 alone sees otherwise: its [federated] or [federated.dp] keys, "rnd",
#         "model" (its copy of the global model, altered by a leader relaying it), or a relay)
FIELD_LIES = {
    "round": ("the round number", DP, False, {"rnd": 3}),  # unsigned: keys would catch it first
    "clip": ("the clip", DP, True, {"relay": OtherClip()}),
    "model": ("the round's starting global model", DP, True, {"model": True}),
    "z": ("the noise multiplier z", DP, True, {"dp": {"noise_multiplier": 1.5}}),
    "q": ("the sampled fraction q", DP, True, {"federated": {"fraction": 0.9}}),
    "colluders": ("the colluder count", DP, True, {"dp": {"colluders": 1}}),
    "sigma_b": ("sigma_b", ADAPTIVE, True, {"dp": {"clip_count_stddev": 3.0}}),
    "ring width": ("the ring width", DP, True, {"federated": {"secure_bits": 32}}),
    # the same update range (1000 * 4 = 2000 * 2), the tail's fraction one bit apart
    "fraction bits": ("the fixed-point fraction bits", None, True,
                      {"federated": {"secure_max_samples": 2000, "secure_range": 2.0}}),
    "range": ("the encoding range", DP, True, {"federated": {"secure_range": 4.5}}),
}


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("field", list(FIELD_LIES))
def test_a_transcript_field_that_differs_is_refused_by_every_honest_leader(
        fed, identity, field, monkeypatch):
    """The root tells leader 1 alone another value of one field (a leader whose settings
    differ stands for a root that told it other settings; a leader relaying the model in
    `leaders.Bcast` alters its copy); every leader refuses before any masked vector."""
    count = len(fed.sizes)
    words, dp, keys, lie = FIELD_LIES[field]
    lied_to = fed.institution == 1
    federated = lie.get("federated", {}) if lied_to else {}
    dp_table = {**dp, **(lie.get("dp", {}) if lied_to else {})} if dp else None
    cfg = config(count, True, dp_table, keys="x" if keys else "", **federated)
    global_host = np.zeros(SIZE)
    if lie.get("model") and lied_to:
        global_host[SIZE // 2] = np.nextafter(0.0, 1.0)  # one bit of one weight
    rnd = lie.get("rnd", 2) if lied_to else 2
    relay = lie.get("relay") if fed.is_root else None
    masked = []
    original = MaskedSum.masked_ring
    monkeypatch.setattr(MaskedSum, "masked_ring",
                        lambda self, *a: masked.append(1) or original(self, *a))
    with pytest.raises(UserError) as info:
        private_aggregate(cfg.federated, cfg.federated.dp, fed, update_of(fed.institution),
                          global_host, report_of(fed.institution), list(range(count)), rnd,
                          {}, identity=identity if keys else None, relay=relay)
    # one message on every rank (each names the round by its own count)
    messages = [re.sub(r"round \d+ refused", "round refused", m)
                for m in fed.world.allgather(str(info.value))]
    assert len(set(messages)) == 1, messages
    assert "the round transcript differs from its own" in messages[0] and words in messages[0]
    assert f"refused by institutions {list(range(count))}" in messages[0]
    assert fed.world.allreduce(len(masked)) == 0


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("dp", [False, True], ids=["sa", "sa+dp"])
def test_a_rank_training_from_another_model_than_its_leader_is_refused(dp):
    """Institutions of two ranks: the second rank of institution 1 holds another starting
    model than its leader hashed (its copy altered on the way); the leader refuses."""
    world = MPI.COMM_WORLD
    if world.size % 2:
        pytest.skip("institutions of two ranks")
    fed = make_federation(world, [2] * (world.size // 2))
    try:
        count = len(fed.sizes)
        cfg = config(count, True, DP if dp else None)
        global_host = np.zeros(SIZE)
        if fed.institution == 1 and not fed.is_leader:
            global_host[0] = 1e-300
        with pytest.raises(UserError) as info:
            private_aggregate(cfg.federated, cfg.federated.dp, fed, update_of(fed.institution),
                              global_host, report_of(fed.institution), list(range(count)), 0,
                              {})
        messages = fed.world.allgather(str(info.value))
    finally:
        fed.free()
    assert len(set(messages)) == 1, messages
    assert "refused by institution 1: the round transcript differs from its own: the " \
           "round's starting global model" in messages[0]
    assert "refused by institutions [1]" in messages[0]


# -- aborts that say nothing about the data ---------------------------------------------------

@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("everyone", [False, True], ids=["one-leader", "every-leader"])
def test_an_update_outside_the_range_is_refused_with_a_generic_code(fed, everyone):
    """No value, no rank, no institution in the message every rank raises."""
    count = len(fed.sizes)
    cfg = config(count, True, secure_range=0.001)  # 1000 samples * 0.001: a range of 1
    update = update_of(fed.institution)
    if everyone or fed.institution == count - 1:
        update = update * 10
    with pytest.raises(UserError) as info:
        private_aggregate(cfg.federated, None, fed, update, np.zeros(SIZE),
                          report_of(fed.institution), list(range(count)), 1, {})
    messages = fed.world.allgather(str(info.value))
    assert len(set(messages)) == 1, messages
    assert "outside the declared range (code 20)" in messages[0]
    assert "rank" not in messages[0] and "institution " not in messages[0]
    assert not re.search(r"\d\.\d", messages[0]), messages[0]  # no value


@pytest.mark.mpi(min_size=3)
def test_under_dp_a_diverged_update_is_a_zero_one_over_the_clip(fed, identity):
    """Institution 1's update holds NaN: the round goes on, its update counts as zero and as
    over the clip, and nothing says which institution it was."""
    count = len(fed.sizes)
    dp = {"clip": 0.5, "noise_multiplier": 0.0, "adaptive": True, "clip_count_stddev": 0.0}
    cfg = config(count, True, dp, keys="x")
    small = [update_of(k) * 1e-3 for k in range(count)]  # under the clip
    params = small[fed.institution].copy()
    if fed.institution == 1:
        params[3] = np.nan
    sums = private_aggregate(cfg.federated, cfg.federated.dp, fed, params, np.zeros(SIZE),
                             SiteReport(), list(range(count)), 0, {}, identity=identity)
    if not fed.is_root:
        return
    others = [small[k] for k in range(count) if k != 1]
    np.testing.assert_allclose(sums["delta_sum"], sum(others), atol=1e-6)
    assert sums["under_clip"] == pytest.approx(len(others) - 0.5 * count, abs=1e-6)


@pytest.mark.mpi(min_size=2)
def test_a_clip_too_large_for_the_ring_fails_on_every_rank_together(fed):
    """The transcript's ring scales (the clip in the range) fail together, never one leader."""
    count = len(fed.sizes)
    cfg = config(count, True, DP, secure_bits=32)
    with pytest.raises(UserError) as info:
        private_aggregate(cfg.federated, cfg.federated.dp, fed, update_of(fed.institution),
                          np.zeros(SIZE), report_of(fed.institution), list(range(count)), 0,
                          {"dp_clip": 1e12})
    messages = fed.world.allgather(str(info.value))
    assert len(set(messages)) == 1 and "federated.secure_bits = 64" in messages[0]
