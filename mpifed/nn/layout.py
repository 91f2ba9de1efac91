"""The flat parameter layout: where each layer's arrays live in one contiguous buffer.

A model's parameters, its gradients and the optimiser's state are each one flat buffer, so one
all-reduce moves them all (the "flat" communicator of ChainerMN, Horovod's Tensor Fusion);
`views` hands each layer its arrays as windows into that buffer. `fuse` and `unfuse` are the
library helpers for users whose tensors live apart: pack them, all-reduce once, unpack.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from ..xp import get_array_module


@dataclass(frozen=True)
class Layout:
    """Where each packed array lives in the flat buffer: shapes, dtypes and element offsets."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    offsets: tuple[int, ...]  # len(shapes) + 1 entries; offsets[-1] is the flat length
    dtype: str  # the flat buffer's dtype: the common type of all inputs

    @classmethod
    def of(cls, arrays, xp=None) -> Layout:
        """Describe `arrays` (a list of xp arrays) as they will be packed."""
        if not arrays:
            raise ValueError("fuse: got no arrays to pack")
        xp = xp or get_array_module(arrays[0])
        shapes = tuple(tuple(a.shape) for a in arrays)
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + prod(shape))
        common = xp.result_type(*[a.dtype for a in arrays])
        return cls(shapes, tuple(a.dtype.name for a in arrays), tuple(offsets), common.name)

    @property
    def size(self) -> int:
        return self.offsets[-1]


def views(flat, layout: Layout) -> list:
    """Return arrays shaped as packed that share memory with `flat` (no copies)."""
    return [flat[lo:hi].reshape(shape)
            for shape, lo, hi in zip(layout.shapes, layout.offsets, layout.offsets[1:])]


def fuse(arrays, out=None):
    """Pack `arrays` into one contiguous 1-D buffer; return `(flat, layout)`.

    `out`, when given, is reused (its length must equal the total size) so a training step
    allocates nothing.
    """
    xp = get_array_module(arrays[0]) if arrays else None
    layout = Layout.of(arrays, xp)
    flat = xp.empty(layout.size, dtype=layout.dtype) if out is None else out
    if flat.size != layout.size:
        raise ValueError(f"fuse: out has {flat.size} elements, the arrays need {layout.size}")
    for a, lo, hi in zip(arrays, layout.offsets, layout.offsets[1:]):
        flat[lo:hi] = a.reshape(-1)
    return flat, layout


def unfuse(flat, layout: Layout) -> list:
    """Return new arrays with the packed shapes and original dtypes, copied out of `flat`."""
    return [v.astype(dtype, copy=True) for v, dtype in zip(views(flat, layout), layout.dtypes)]
