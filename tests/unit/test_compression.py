"""Gradient compression without MPI: the wire codecs against independent references, the
registry, the config's refusals, the exact scheme's arithmetic and the ring's byte count."""

from __future__ import annotations

import struct
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from mpifed.choices import COMPRESSIONS
from mpifed.comm.compression import COMPRESSORS, Compressor, make_compressor, model_blocks
from mpifed.comm.compression.codecs import add_decoded, bf16_bits, decode, decode_into, encode
from mpifed.comm.ring import chunk_bounds, mean_in_place, ring_bytes_sent, ring_order
from mpifed.errors import UserError
from mpifed.nn.models import ModelSpec
from mpifed.train.config import resolve


def bf16_reference(value: float) -> int:
    """bfloat16 bits of a float32 by hand: the nearer of the two neighbours, ties to even."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    if value != value:
        return 0x7FC0 | (bits >> 16 & 0x8000)
    low = bits >> 16
    rest = bits & 0xFFFF
    if rest > 0x8000 or (rest == 0x8000 and low & 1):
        low += 1
    return low


def awkward_float32(n: int, seed: int = 0) -> np.ndarray:
    """Random float32 values of every magnitude, exact ties, extremes, infinities and NaN."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2 ** 16, 64, dtype=np.uint32) << 16) | 0x8000  # halfway cases
    extra = np.array([0.0, -0.0, 1.0, -1.0, 3.4e38, -3.4e38, 1e-45, np.inf, -np.inf, np.nan],
                     dtype=np.float32)
    values = np.concatenate([bits.view(np.float32), ties.view(np.float32), extra])
    return values.astype(np.float32)


def test_bf16_rounds_to_nearest_even_like_the_hand_reference():
    values = awkward_float32(20000)
    got = bf16_bits(values)
    want = np.array([bf16_reference(float(v)) for v in values], dtype=np.uint16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(decode(got[nan], "bf16", np.float32)).all()


def test_bf16_overflow_goes_to_infinity_and_back():
    top = np.array([3.4028235e38, -3.4028235e38], dtype=np.float32)  # rounds past bf16's max
    assert np.isinf(decode(bf16_bits(top), "bf16", np.float32)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fp16_is_the_array_modules_own_rounding(dtype):
    values = np.random.default_rng(1).standard_normal(5000).astype(dtype) * 100
    bits = np.empty(values.size, np.uint16)
    encode(values, bits, "fp16")
    np.testing.assert_array_equal(bits, values.astype(np.float16).view(np.uint16))
    back = decode(bits, "fp16", dtype)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, values.astype(np.float16).astype(dtype))


def test_decode_then_encode_is_the_identity_on_the_wire():
    bits = np.arange(0, 2 ** 16, dtype=np.uint16)
    for wire in ("fp16", "bf16"):
        values = decode(bits, wire, np.float32)
        finite = np.isfinite(values)
        again = np.empty_like(bits)
        encode(values, again, wire)
        np.testing.assert_array_equal(again[finite], bits[finite])


def test_the_registry_serves_exactly_the_configs_words():
    assert tuple(COMPRESSORS) == COMPRESSIONS == ("none", "fp16", "bf16", "powersgd")
    for name in ("none", "fp16", "bf16"):
        cls = COMPRESSORS[name]
        assert issubclass(cls, Compressor) and cls.name == name


def test_powersgd_absent_from_the_build_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpifed.comm.compression.powersgd", None)  # import fails
    settings = resolve({"data": {"train": "d.h5"}, "comm": {"compression": "powersgd"}}).comm
    with pytest.raises(UserError, match="PowerSGD is not available in this build"):
        make_compressor(settings, [(0, (3, 4))], np, np.float32)


def test_powersgd_is_built_from_its_keys(monkeypatch):
    made = {}

    class FakePowerSGD(Compressor):
        name = "powersgd"

        def __init__(self, blocks, **kwargs):
            made.update(kwargs, blocks=blocks)

    monkeypatch.setitem(sys.modules, "mpifed.comm.compression.powersgd",
                        SimpleNamespace(PowerSGD=FakePowerSGD))
    settings = resolve({"data": {"train": "d.h5"},
                        "comm": {"compression": "powersgd", "powersgd_rank": 4,
                                 "powersgd_min_rate": 0.0, "compression_start": 3}}).comm
    make_compressor(settings, [(0, (3, 4)), (12, (4,))], np, np.float32, seed=7)
    assert made == {"blocks": [(0, (3, 4)), (12, (4,))], "rank": 4, "min_rate": 0.0,
                    "start": 3, "xp": np, "dtype": np.float32, "seed": 7}


def test_blocks_are_every_tensor_of_the_flat_buffer():
    spec = ModelSpec("mlp", 6, (5,), 3)
    # a linear layer's W is stored (in, out): flagged, its matrix is (out, in)
    assert model_blocks(spec, "float32") == [(0, (6, 5), True), (30, (5,)), (35, (5, 3), True),
                                             (50, (3,))]
    made = make_compressor(SimpleNamespace(compression="fp16", predivide=False),
                           model_blocks(spec, "float32"), np, np.float32)
    assert made.model_size == 53 and not made.predivide
    assert made.exact_tail(np.zeros(55), 0) == 2 and made.exact_tail(np.zeros(20), 35) == 2
    assert made.exact_tail(np.zeros(18), 35) == 0 and made.exact_tail(np.zeros(30), 0) == 0


def test_powersgd_reads_a_linear_layers_matrix_as_out_by_in():
    from mpifed.comm.compression.powersgd import PowerSGD

    spec = ModelSpec("mlp", 6, (5,), 3)
    made = PowerSGD(model_blocks(spec, "float32"), rank=1, min_rate=0.0, start=0, xp=np,
                    dtype=np.float32)
    assert [(m.rows, m.cols, m.transposed) for m in made.matrices] == [(5, 6, True), (3, 5, True)]


def config(**comm):
    return {"data": {"train": "d.h5"}, "comm": comm}


@pytest.mark.parametrize("comm,match", [
    ({"compression": "fp16", "allreduce": "nccl"}, "NCCL does not run"),
    ({"compression": "powersgd", "allreduce": "nccl"}, "NCCL does not run"),
    ({"compression": "bf16", "allreduce": "mpi"}, "only the package's own ring"),
    ({"compression": "fp16", "allreduce": "hierarchical"}, "only the package's own ring"),
    ({"compression": "powersgd", "shard": "gradients"}, "low-rank"),
    ({"compression": "powersgd", "shard": "parameters"}, "low-rank"),
    ({"compression": "fp16", "shard": "optimizer"}, "not wired into"),
    ({"compression": "powersgd", "shard": "optimizer"}, "not wired into"),
    ({"compression": "zip"}, "comm.compression"),
    ({"powersgd_rank": 0}, "comm.powersgd_rank"),
    ({"compression_start": -1}, "comm.compression_start"),
    ({"powersgd_min_rate": -1.0}, "comm.powersgd_min_rate"),
])
def test_combinations_that_cannot_work_are_refused_at_load(comm, match):
    with pytest.raises(UserError, match=match):
        resolve(config(**comm))


def test_powersgd_in_a_federation_is_refused():
    with pytest.raises(UserError, match="error feedback"):
        resolve({**config(compression="powersgd"), "federated": {"institutions": 2}})
    assert resolve({**config(compression="fp16"), "federated": {"institutions": 2}})


@pytest.mark.parametrize("comm", [{}, {"compression": "fp16"}, {"compression": "bf16",
                                  "allreduce": "ring", "predivide": False},
                                  {"compression": "powersgd", "overlap": True,
                                   "allreduce": "hierarchical"}])
def test_workable_combinations_load(comm):
    cfg = resolve(config(**comm))
    assert cfg.comm.predivide == comm.get("predivide", True)
    assert (cfg.comm.powersgd_rank, cfg.comm.compression_start,
            cfg.comm.powersgd_min_rate) == (2, 10, 2.0)


class OneRankPretendingMany:
    """allreduce_sum stand-in: every rank held the same buffer, so the sum is `size` times it."""

    def __init__(self, size: int):
        self.size, self.comm = size, SimpleNamespace(size=size, rank=0)

    def __call__(self, buf, algorithm=None) -> int:
        buf *= buf.dtype.type(self.size)
        return self.bytes_for(buf)

    def bytes_for(self, buf) -> int:
        return ring_bytes_sent(buf.size, buf.itemsize, self.size, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_none_divides_exactly_as_the_collectives_mean(dtype):
    values = np.random.default_rng(3).standard_normal(101).astype(dtype)
    exact = COMPRESSORS["none"]([(0, (101,))], xp=np, dtype=dtype)
    got = values.copy()
    exact.reduce_mean(got, 0, OneRankPretendingMany(3), 3, 1)
    want = values * dtype(3)
    mean_in_place(want, SimpleNamespace(size=3), "mean")  # how ring/mpi/nccl's "mean" divides
    np.testing.assert_array_equal(got, want)
    assert exact.bytes_sent() == exact.uncompressed_bytes() == ring_bytes_sent(101, 8 if
                                                                               dtype == np.float64
                                                                               else 4, 3, 0)
    assert exact.state() == {}


@pytest.mark.parametrize("length,size", [(0, 2), (1, 3), (10, 3), (11, 4), (1000, 3), (7, 7)])
def test_ring_bytes_are_what_the_rings_steps_send(length, size):
    """Walk the ring's schedule (ring.py's steps) and add up each rank's sends."""
    chunks = ring_order(chunk_bounds(length, size))
    for rank in range(size):
        reduce = sum(b - a for a, b in (chunks[(rank - s) % size] for s in range(size - 1)))
        gather = sum(b - a for a, b in (chunks[(rank + 1 - s) % size] for s in range(size - 1)))
        assert ring_bytes_sent(length, 4, size, rank) == 4 * (reduce + gather)
    total = sum(ring_bytes_sent(length, 4, size, r) for r in range(size))
    assert total == 4 * 2 * (size - 1) * length  # 2(p-1)/p of the buffer per rank, on average


def test_the_fp16_encoder_rounds_every_float32_as_numpy_does():
    # every exponent, the mantissas around each rounding boundary (half's subnormal step,
    # the normal threshold 2**-14, the largest half 65504, overflow at 65520), both signs
    rng = np.random.default_rng(3)
    sampled = np.arange(0, 2 ** 31, 4099, dtype=np.uint64).astype(np.uint32)
    edges = [0x33000000, 0x33800000, 0x387FC000, 0x38800000, 0x477FE000, 0x477FF000, 0x7F800000]
    near = np.concatenate([np.arange(e - 3000, e + 3000, dtype=np.uint32) for e in edges])
    noise = rng.integers(0, 2 ** 31, 200_000, dtype=np.uint64).astype(np.uint32)
    patterns = np.concatenate([sampled, near, noise])
    patterns = np.concatenate([patterns, patterns | np.uint32(0x80000000)])
    values = patterns.view(np.float32)
    bits = np.empty(values.size, np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        encode(values, bits, "fp16")  # in blocks of codecs.BLOCK
        want = values.astype(np.float16).view(np.uint16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(bits[~nan], want[~nan])
    assert np.isnan(bits[nan].view(np.float16)).all()  # a NaN stays a NaN


def test_adding_and_writing_decoded_halves_equal_decode():
    bits = np.arange(0, 2 ** 16, dtype=np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    for wire in ("fp16", "bf16"):
        for dtype in (np.float32, np.float64):
            base = np.random.default_rng(0).standard_normal(bits.size).astype(dtype)
            into = np.empty(bits.size, dtype)
            with np.errstate(invalid="ignore"):  # the NaN patterns
                got, want = base.copy(), base + decode(bits, wire, dtype)
                add_decoded(bits, wire, got)
                decode_into(bits, wire, into)
                decoded = decode(bits, wire, dtype)
            np.testing.assert_array_equal(got[finite], want[finite])
            np.testing.assert_array_equal(into[finite], decoded[finite])
