"""Secure aggregation pieces: masks cancel, the aggregate equals the plain sum within the
quantisation step, what one leader sends tells nothing of its update, reused keys fail."""


import numpy as np
import pytest

from mpifed.errors import UserError
from mpifed.federated.secagg import (
    check_distinct,
    decode,
    encode,
    keystream,
    new_keypair,
    pairwise_mask,
    scale_bits,
)


def masked_vectors(values_by_site, round_index=3, bits=64, bound=1.0):
    keys = {k: new_keypair() for k in values_by_site}
    publics = {k: pub for k, (_, pub) in keys.items()}
    frac = scale_bits(bound, len(values_by_site), bits)
    sent = {k: encode(v, bound, frac, bits) + pairwise_mask(k, keys[k][0], publics, round_index,
                                                          v.size, bits)
            for k, v in values_by_site.items()}
    return sent, frac


@pytest.mark.parametrize("bits", [32, 64])
def test_aggregate_equals_plain_sum_within_quantisation(bits):
    rng = np.random.default_rng(0)
    values = {k: rng.uniform(-1, 1, 10_001) for k in (0, 2, 5)}
    sent, frac = masked_vectors(values, bits=bits)
    total = np.zeros(10_001, dtype=next(iter(sent.values())).dtype)
    for v in sent.values():
        total += v
    got = decode(total, frac, bits)
    np.testing.assert_allclose(got, sum(values.values()), atol=len(values) * 2.0 ** -frac)


def test_what_one_leader_sends_is_uncorrelated_with_its_update():
    rng = np.random.default_rng(1)
    update = rng.uniform(-1, 1, 200_000)
    sent, frac = masked_vectors({0: update, 1: rng.uniform(-1, 1, 200_000)})
    seen = decode(sent[0], frac, 64)  # what the root sees of leader 0 alone
    assert abs(np.corrcoef(seen, update)[0, 1]) < 0.01
    spread = 2.0 ** (63 - frac) / np.sqrt(3)  # a uniform draw over the whole ring, decoded
    assert np.std(seen) == pytest.approx(spread, rel=0.02)


def test_keystreams_differ_by_key_and_are_uniform():
    a, b = keystream(b"a" * 32, 100_000, 64), keystream(b"b" * 32, 100_000, 64)
    assert not np.array_equal(a, b)
    top_bits = (a >> np.uint64(62)).astype(int)
    assert np.all(np.abs(np.bincount(top_bits, minlength=4) / 100_000 - 0.25) < 0.01)


def test_a_reused_key_is_refused():
    _, mine = new_keypair()
    with pytest.raises(UserError, match="institution 3 presented the same public key as "
                                        "institution 1"):
        check_distinct({1: mine, 2: new_keypair()[1], 3: mine})


def test_out_of_range_is_an_error_or_a_warned_clip():
    frac = scale_bits(1.0, 2, 64)
    with pytest.raises(UserError, match="outside the declared range"):
        encode(np.array([0.5, 3.0]), 1.0, frac, 64)
    with pytest.warns(UserWarning, match="clipped"):
        ring = encode(np.array([0.5, 3.0]), 1.0, frac, 64, out_of_range="clip")
    np.testing.assert_allclose(decode(ring, frac, 64), [0.5, 1.0], atol=2.0 ** -frac)


def test_ring_too_small_is_a_clear_error():
    with pytest.raises(UserError, match="secure_bits = 64"):
        scale_bits(2.0 ** 31, 16, 32)
