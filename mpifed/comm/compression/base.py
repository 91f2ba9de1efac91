"""The compressor protocol, its registry and `make_compressor`.

A compressor (after PyTorch's `powerSGD_hook.py`) is a state object beside the all-reduce it
wraps: the step hands it each range of gradients to average and the all-reduce to do it with;
whatever must survive between steps (error feedback, warm start) lives in the compressor and
goes into checkpoints through `state()`, never into the collectives. One class per scheme,
chosen once by name from `COMPRESSORS` (comm.compression):

    "none"      ExactMean       (exact.py)     today's all-reduce: the sum, then / size
    "fp16"      Fp16Wire        (half.py)      a half-precision ring, fp32 sums on each hop
    "bf16"      Bf16Wire        (half.py)      the same with bfloat16 on the wire
    "powersgd"  PowerSGD        (powersgd.py)  low rank with error feedback and warm start
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from math import prod

import numpy as np

from ...errors import UserError


class Compressor:
    """One scheme's state for one step (one instance per step, over that step's communicator).

    Construction: `Cls(blocks, *, xp, dtype, seed, **options)`, blocks the (offset, shape) of
    every tensor in the flat buffer, in order (a dense weight is (in, out), a convolution's
    (out, in, kh, kw)); options are the scheme's own settings (`make_compressor`).

    The gradient range a step passes to `reduce_mean` may run past the model's last element
    (`model_size`) by the step's loss and stop slots: those must come back as their exact mean
    (`exact_tail` says how many there are in a range).
    """

    name: str = ""

    def __init__(self, blocks, *, xp, dtype, seed: int = 0):
        self.blocks = [(int(offset), tuple(int(d) for d in shape)) for offset, shape, *_ in blocks]
        self.model_size = max((o + prod(s) for o, s in self.blocks), default=0)
        self.xp, self.dtype, self.seed = xp, np.dtype(dtype), seed
        self._sent = self._uncompressed = 0

    def reduce_mean(self, grad, lo: int, allreduce_sum, world_size: int, step: int) -> None:
        """In place: on return every rank holds the (approximate) mean over ranks of `grad`,
        this rank's gradients for the flat-buffer elements [lo, lo + grad.size) (a layer's
        range under comm.overlap, else the whole model). `allreduce_sum(buf)` sums buf in place
        over the step's communicator with the run's algorithm (`algorithm="ring"`: the
        package's own ring) and returns the bytes this rank sent; `allreduce_sum.comm` is that
        communicator and `allreduce_sum.bytes_for(buf)` what summing buf would send. `step`
        counts from 1."""
        raise NotImplementedError

    def bytes_sent(self) -> int:
        """Return the bytes this rank has sent for gradient exchange (running total)."""
        return self._sent

    def uncompressed_bytes(self) -> int:
        """Return the bytes the exact all-reduce would have sent for the same exchanges."""
        return self._uncompressed

    def state(self) -> dict:
        """Return the arrays and scalars a checkpoint must carry (this rank's)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Take back what `state()` returned (from a checkpoint of the same run)."""
        if state:
            raise ValueError(f"compressor {self.name!r} keeps no state, got {sorted(state)}")

    def exact_tail(self, grad, lo: int) -> int:
        """Return how many trailing elements of `grad` (at flat offset lo) lie past the model."""
        return max(0, lo + grad.size - max(lo, self.model_size))

    def count(self, sent: int, uncompressed: int) -> None:
        """Add one exchange's bytes to the running totals."""
        self._sent += int(sent)
        self._uncompressed += int(uncompressed)


class _Registry(Mapping):
    """comm.compression name -> compressor class, each imported at its first lookup, so that a
    scheme whose module this build lacks is refused by name when chosen, not at import."""

    def __init__(self, entries: dict):
        self._entries = entries  # name -> ("module:Class", {constructor argument: setting})

    def __getitem__(self, name: str) -> type:
        where, _ = self._entries[name]
        module, cls = where.split(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as err:
            if err.name != module:
                raise  # the module is there, something it imports is not: say that instead
        except AttributeError:
            pass
        raise UserError(f"comm.compression = \"{name}\": {cls} is not available in this build "
                        f"({module} is missing or has no {cls}); choose one of "
                        f"{', '.join(n for n in self._entries if n != name)}")

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def options(self, name: str, settings) -> dict:
        """Return the constructor's own arguments for scheme `name`, read from `settings`."""
        return {arg: getattr(settings, key) for arg, key in self._entries[name][1].items()}


_HERE = __name__.rsplit(".", 1)[0]
COMPRESSORS = _Registry({
    "none": (f"{_HERE}.exact:ExactMean", {}),
    "fp16": (f"{_HERE}.half:Fp16Wire", {"predivide": "predivide"}),
    "bf16": (f"{_HERE}.half:Bf16Wire", {"predivide": "predivide"}),
    "powersgd": (f"{_HERE}.powersgd:PowerSGD", {"rank": "powersgd_rank",
                                                "min_rate": "powersgd_min_rate",
                                                "start": "compression_start"}),
})


def make_compressor(settings, blocks, xp, dtype, seed: int = 0) -> Compressor:
    """Return the compressor settings.compression names (settings: a CommConfig, read by
    attribute), for a flat buffer whose tensors are `blocks` [(offset, shape)], in `dtype`.

    seed: the run's seed (PowerSGD's first Q). Raises UserError for a scheme this build lacks.
    """
    name = settings.compression
    cls = COMPRESSORS[name]
    return cls(blocks, xp=xp, dtype=dtype, seed=seed, **COMPRESSORS.options(name, settings))


def model_blocks(spec, dtype) -> list[tuple]:
    """Return the (offset, shape) of every tensor of `spec`'s flat buffer in `dtype`, with a
    third entry True for a linear layer's W: stored (in, out), its matrix (output count, the
    rest) is the transpose (PowerSGD's orientation; other schemes ignore the flag)."""
    from ...nn.layers import Linear

    layout = spec.layout(dtype)
    linear_w = [isinstance(layer, Linear) and name == "W"
                for layer, entry in zip(spec.layers, spec.entries) for name, _ in entry]
    return [(offset, shape, True) if flag else (offset, shape)
            for offset, shape, flag in zip(layout.offsets[:-1], layout.shapes, linear_w)]
