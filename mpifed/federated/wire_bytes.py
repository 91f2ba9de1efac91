"""The bytes of one institution's update on its way to the root, as sent and as it would be
uncompressed, for the accounting (`compression_ratio`). Public numbers: they depend on the
settings, the model's size and how many leaders send, never on an update.

    exchange             uncompressed               rotated (b bits, d' = rotated_size(d))
    plain                d * itemsize (the model)   8 + ceil(d' b / 8)
    DP alone             8 (d + t)                  8 (1 + t) + ceil(d' b / 8)
    secure aggregation   (d + t) secure_bits / 8    ceil(d' m / 8) + 8 t, m = b + ceil(log2 K)

t: the tail's values after the update (`masked_sum.tail_fields`); K: the leaders sending.
"""

from __future__ import annotations

from .masked_sum import tail_fields
from .quantize import packed_bytes
from .rotated_sum import ring_width
from .rotation import rotated_size


def update_bytes(fed_cfg, dp, size: int, itemsize: int, parties: int) -> tuple[int, int]:
    """Return (bytes sent, bytes uncompressed) of one leader's update of `size` values (the
    model's `itemsize`) when `parties` leaders send; equal under federated.compression = "none".
    """
    tail = len(tail_fields(dp))
    if fed_cfg.secure_aggregation:
        plain = (size + tail) * fed_cfg.secure_bits // 8
    elif dp is not None:
        plain = 8 * (size + tail)
    else:
        plain = size * itemsize
    if fed_cfg.compression == "none":
        return plain, plain
    bits, rotated = fed_cfg.compression_bits, rotated_size(size)
    if fed_cfg.secure_aggregation:
        return packed_bytes(rotated, ring_width(bits, parties)) + 8 * tail, plain
    if dp is not None:
        return 8 * (1 + tail) + packed_bytes(rotated, bits), plain
    return 8 + packed_bytes(rotated, bits), plain
