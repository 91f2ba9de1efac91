"""Rotated compression in the private aggregation, in process (one rank per institution): under
secure aggregation the root's decoded sum is the weighted sum of the updates within the
quantisation bound and it receives the packed masked integers' bytes; under DP alone each
decoded update is clipped to the clip again, so the sum stays within K clips, and no seeded
generator draws the rounding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from mpi4py import MPI
from private_helpers import private_aggregate

from mpifed.config import resolve
from mpifed.federated.exchange import SiteReport
from mpifed.federated.institutions import make_federation
from mpifed.federated.quantize import packed_bytes, step_of
from mpifed.federated.rotated import make_codec
from mpifed.federated.rotated_sum import ring_width
from mpifed.federated.rotation import rotate, rotation_signs
from mpifed.federated.transcript import ENTRY, confirmation_bytes

pytestmark = pytest.mark.mpi(min_size=1)

SIZE, SEED, ROUND = 300, 5, 2  # 300 values rotate to 512 coordinates


def config(institutions: int, secure: bool, bits: int, dp=None):
    return resolve({"data": {"train": "site-{institution}.h5"},
                    "run": {"seed": SEED},
                    "federated": {"institutions": institutions, "secure_aggregation": secure,
                                  "secure_max_samples": 1000, "min_participants": 1,
                                  "compression": "rotated", "compression_bits": bits,
                                  **({"dp": dp} if dp else {})}})


def update_of(institution: int) -> np.ndarray:
    return np.random.default_rng(institution).uniform(-1, 1, SIZE)


def report_of(institution: int) -> SiteReport:
    return SiteReport(samples=20.0 + 3 * institution, steps=5.0, loss=0.25 + institution)


@pytest.fixture
def fed():
    world = MPI.COMM_WORLD
    federation = make_federation(world, [1] * world.size)
    yield federation
    federation.free()


@pytest.mark.parametrize("bits", [8, 3])
def test_secure_rotated_sum_is_the_weighted_sum_within_the_bound(fed, bits):
    count = len(fed.sizes)
    cfg = config(count, True, bits)
    global_host = np.linspace(-1, 1, SIZE)
    params = global_host + update_of(fed.institution)
    sums = private_aggregate(cfg.federated, None, fed, params, global_host,
                             report_of(fed.institution), list(range(count)), ROUND, {},
                             codec=make_codec(cfg.federated, SEED))
    if not fed.is_root:
        assert sums is None
        return
    weights = [report_of(k).samples for k in range(count)]
    exact = sum(w * update_of(k) for w, k in zip(weights, range(count)))
    signs = rotation_signs(SEED, ROUND, SIZE)
    bound = max(np.abs(rotate(w * update_of(k), signs)).max() for w, k in zip(weights,
                                                                             range(count)))
    error = np.linalg.norm(sums["delta_sum"] - exact)
    assert 0 < error < count * step_of(bound, bits) * np.sqrt(512)
    assert sums["weight"] == pytest.approx(sum(weights), abs=1e-4)
    assert sums["loss"] == pytest.approx(sum(w * report_of(k).loss
                                             for w, k in zip(weights, range(count))), abs=1e-3)
    wire = packed_bytes(512, ring_width(bits, count)) + 2 * 8
    relayed = ENTRY + confirmation_bytes(False)
    assert sums["bytes"] == (count - 1) * (wire + relayed)


def test_under_dp_alone_each_decoded_update_keeps_the_clip(fed, monkeypatch):
    """Noise 0, clip 0.5 (below every update's norm): the root's sum is the sum of the decoded
    updates each clipped to 0.5 again, within K steps of the sum of the clipped updates; no
    numpy generator rounds and nothing is unpickled."""
    count = len(fed.sizes)
    cfg = config(count, False, 4, dp={"clip": 0.5, "noise_multiplier": 0.0})
    params = update_of(fed.institution)
    codec = make_codec(cfg.federated, SEED)
    codec.signs(ROUND, SIZE)  # the public rotation signs are seeded (and cached): drawn first

    def refuse(*args, **kwargs):
        raise AssertionError("a numpy generator or an unpickle on the private path")

    monkeypatch.setattr(np.random, "default_rng", refuse)
    MPI.pickle.__init__(pickle.dumps, refuse)
    try:
        sums = private_aggregate(cfg.federated, cfg.federated.dp, fed, params, np.zeros(SIZE),
                                 SiteReport(), list(range(count)), ROUND, {}, codec=codec)
    finally:
        MPI.pickle.__init__(pickle.dumps, pickle.loads)
    if not fed.is_root:
        return
    monkeypatch.undo()
    clipped = [update_of(k) * 0.5 / np.linalg.norm(update_of(k)) for k in range(count)]
    signs = rotation_signs(SEED, ROUND, SIZE)
    step = max(step_of(np.abs(rotate(c, signs)).max(), 4) for c in clipped)
    assert np.linalg.norm(sums["delta_sum"]) <= count * 0.5 + 1e-12
    assert np.linalg.norm(sums["delta_sum"] - sum(clipped)) < count * step * np.sqrt(512)
    assert sums["bytes"] == (count - 1) * (8 + packed_bytes(512, 4))
