"""Mixed precision for the training steps: fp32 master weights, half-precision compute, loss
scaling, and the found-inf flag agreed over the step's communicator.

`make_precision` returns what `model.precision` and the optim.loss_scale keys ask for:

    FullPrecision   "fp32": the model's loss_and_grad, untouched (no copy, no check, no
                    collective: the step is bit for bit what it was)
    MixedPrecision  "fp16", "bf16": each step casts the flat fp32 parameters (or, under ZeRO-3,
                    each gathered layer) to the half dtype, and the input batch with them; the
                    model runs forward and backward in half precision on loss_scale * loss
                    (the loss itself and its reduction in fp32); each layer's half gradients
                    are cast back to fp32 and divided by the scale into the step's own
                    gradient buffer (or ZeRO-2/3 bucket) as soon as the layer is done, so the
                    exchange, the optimiser and the checkpoint see fp32 only.

A step asks `skip_step(comm)` after its exchange: one all-reduce (MAX) of a one-int flag, set
where any rank found inf or NaN in its gradients, then the loss scaler's update. Every rank gets
the same answer, so every rank skips the same steps whatever comm.shard and comm.overlap are;
a skipped step leaves the parameters, the running statistics and the optimiser state as they
were. Running statistics (batch norm's buffers) travel in the gradient buffer unscaled.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .. import faults
from ..errors import UserError
from ..nn.models import loss_and_grad
from ..nn.precision import HALF, compute_dtype
from ..optim.loss_scale import LossScaler


def loss_scaling(model, optim) -> float | str:
    """Return the loss scale in use: "dynamic" or a fixed number. Unset, fp16 scales
    dynamically (its 5 exponent bits lose small gradients), bf16 and fp32 do not (1: bf16 has
    fp32's exponent range)."""
    if optim.loss_scale is not None:
        return optim.loss_scale
    return "dynamic" if model.precision == "fp16" else 1.0


def make_precision(model, optim, spec, storage, xp):
    """Return the step's precision for `model` (ModelConfig) and `optim` (OptimConfig), over
    parameters stored as `storage`; raise UserError naming what the backend `xp` lacks."""
    if model.precision not in HALF:
        return FULL
    compute = compute_dtype(model.precision, storage, xp)
    scale = loss_scaling(model, optim)
    dynamic = scale == "dynamic"
    scaler = LossScaler(optim.loss_scale_init if dynamic else float(scale),
                        optim.loss_scale_growth_interval, dynamic)
    return MixedPrecision(spec, compute, scaler, xp)


def check_levers(model, run, xp) -> None:
    """Refuse the GPU levers (run.cuda_graph, model.conv_backend = "cudnn") where they cannot
    work, naming what is missing; raise UserError."""
    on_gpu = xp is not np
    if run.cuda_graph:
        if not on_gpu:
            raise UserError("run.cuda_graph = true captures the training step as a CUDA graph, "
                            "which needs CuPy and a CUDA device; this run computes with NumPy "
                            "(comm.backend resolved to \"numpy\"): set run.cuda_graph = false")
        raise UserError("run.cuda_graph = true: capturing the step as a CUDA graph is not "
                        "built in this version (the step still launches its kernels one by "
                        "one); set run.cuda_graph = false")
    if model.conv_backend == "cudnn":
        if not on_gpu:
            raise UserError("model.conv_backend = \"cudnn\" runs convolutions through NVIDIA "
                            "cuDNN, which needs CuPy and a CUDA device; this run computes with "
                            "NumPy: set model.conv_backend = \"native\"")
        try:
            import cudnn  # noqa: F401  (nvidia-cudnn-frontend; CuPy 14 has no cuDNN of its own)
        except ImportError:
            raise UserError("model.conv_backend = \"cudnn\" needs NVIDIA's cuDNN frontend "
                            "(pip install nvidia-cudnn-frontend; CuPy 14 removed its own cuDNN "
                            "bindings); install it or set model.conv_backend = \"native\""
                            ) from None
        raise UserError("model.conv_backend = \"cudnn\": the cuDNN convolution path is not "
                        "built in this version; set model.conv_backend = \"native\" (the "
                        "package's own kernels)")


class FullPrecision:
    """model.precision = "fp32": compute in the parameters' own dtype; nothing to scale."""

    scaler = None

    def memory_bytes(self) -> dict:
        """Bytes of half-precision copies this rank holds: none."""
        return {"param_bytes": 0, "grad_bytes": 0}

    def loss_and_grad(self, spec, params, x, y, grad_out, on_ready=None, ctx=None):
        """The model's own `loss_and_grad` (see nn/models.py)."""
        return loss_and_grad(spec, params, x, y, grad_out, on_ready=on_ready, ctx=ctx)

    def skip_step(self, comm) -> bool:
        """Never skip (no collective)."""
        return False


FULL = FullPrecision()


class MixedPrecision:
    """fp32 master parameters, compute in `compute` (float16 or bfloat16), loss scaling by
    `scaler` (see module). One per step object; not thread-safe (the step's own thread calls
    it; the gradients it writes are then handed to the communication thread)."""

    def __init__(self, spec, compute, scaler: LossScaler, xp):
        self.spec, self.compute, self.scaler, self.xp = spec, np.dtype(compute), scaler, xp
        self._params = None  # (n,) half copy of whole flat parameters
        self._grads = None  # (n,) half gradients, for flat gradient buffers
        self._slots = [None] * 4  # per-layer half buffers for providers: params 0-1, grads 2-3
        self._turn = {"params": 0, "grads": 0}
        self._bad: list = []  # per layer: whether its gradients hold inf or NaN (device bools)
        self._inject = False  # MPIFED_FAULT=overflow: put an inf into this step's gradients

    def memory_bytes(self) -> dict:
        """Bytes of the half copies this rank holds (allocated on the first step): the
        parameters' and the gradients' (whole-model buffers, or the per-layer slots)."""
        def size(*arrays):
            return int(sum(a.nbytes for a in arrays if a is not None))
        return {"param_bytes": size(self._params, *self._slots[:2]),
                "grad_bytes": size(self._grads, *self._slots[2:])}

    # --- casting in ------------------------------------------------------------------------

    def _buffer(self, name: str, n: int):
        """A half buffer of n elements kept across steps (whole-model copies)."""
        held = getattr(self, name)
        if held is None or held.size != n:
            held = self.xp.empty(n, dtype=self.compute)
            setattr(self, name, held)
        return held

    def _slot(self, kind: str, n: int):
        """One of two alternating half buffers per kind for one layer's elements: a layer's
        copy lives until the one after next is handed out, as ZeRO's own buffers do."""
        turn = self._turn[kind] = 1 - self._turn[kind]
        key = 2 * (kind == "grads") + turn
        held = self._slots[key]
        if held is None or held.size < n:
            held = self._slots[key] = self.xp.empty(max(n, self._widest()), dtype=self.compute)
        return held[:n]

    def _widest(self) -> int:
        n = [hi - lo for lo, hi in (self.spec.layer_range(i, "float32")
                                    for i in range(len(self.spec.layers)))]
        return max(n or [0])

    def _half_params(self, params):
        """The parameters in the compute dtype: a copy of a flat buffer, or a provider that
        casts each layer it is asked for."""
        if not callable(params):
            half = self._buffer("_params", params.size)
            half[...] = params
            return half

        def layer(i, lo, hi):
            half = self._slot("params", hi - lo)
            half[...] = params(i, lo, hi)
            return half
        return layer

    # --- casting out -----------------------------------------------------------------------

    def _unscale(self, half, target, lo: int, hi: int) -> None:
        """target (fp32, elements [lo, hi) of the model) = half / scale; running statistics
        copied unscaled; note whether any element is not finite."""
        target[...] = half
        inv = 1.0 / self.scaler.scale
        if inv != 1.0:
            target *= target.dtype.type(inv)
            for a, b in self.spec.buffer_ranges("float32"):
                a, b = max(a, lo), min(b, hi)
                if b > a:
                    target[a - lo:b - lo] = half[a - lo:b - lo]
        if self._inject:  # the test hook: one rank's gradients overflow at one step
            target[0] = np.inf
            self._inject = False
        self._bad.append(~self.xp.isfinite(target).all())

    def loss_and_grad(self, spec, params, x, y, grad_out, on_ready=None, ctx=None):
        """Write the fp32 gradients of the mean loss into `grad_out` (flat, or a provider of
        each layer's part); return the mean loss (fp32). As nn/models.py's `loss_and_grad`,
        with the compute in half precision (see module)."""
        self._bad = []
        self._inject = ctx is not None and faults.overflows(ctx.step, ctx.rank)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught, not warned
            return self._scaled_loss_and_grad(spec, params, x, y, grad_out, on_ready, ctx)

    def _scaled_loss_and_grad(self, spec, params, x, y, grad_out, on_ready, ctx):
        """`loss_and_grad`'s work, half buffers in and fp32 gradients out."""
        scale = self.scaler.scale
        xh, ph = x.astype(self.compute), self._half_params(params)
        if not callable(grad_out) and on_ready is None:
            half = self._buffer("_grads", grad_out.size)
            loss = loss_and_grad(spec, ph, xh, y, half, ctx=ctx, loss_scale=scale)
            self._unscale(half, grad_out, 0, grad_out.size)
            return loss
        pending = {}

        def grads_of(i, lo, hi):
            target = grad_out(i, lo, hi) if callable(grad_out) else grad_out[lo:hi]
            pending[lo] = (self._slot("grads", hi - lo), target)
            return pending[lo][0]

        def ready(lo, hi, loss):
            half, target = pending.pop(lo)
            self._unscale(half, target, lo, hi)
            if on_ready is not None:
                on_ready(lo, hi, loss)
        return loss_and_grad(spec, ph, xh, y, grads_of, on_ready=ready, ctx=ctx,
                             loss_scale=scale)

    # --- the skip ----------------------------------------------------------------------------

    def skip_step(self, comm) -> bool:
        """Agree over `comm` whether any rank's gradients overflowed (one all-reduce MAX of one
        int, collective), update the scaler; return True if the step must be skipped."""
        local = bool(self.xp.stack(self._bad).any()) if self._bad else False
        flag = np.array([int(local)], dtype=np.int32)
        if comm.size > 1:
            comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
        return self.scaler.update(bool(flag[0]))
