"""Mixed precision: the loss scaler's state machine against a hand-computed sequence, half
compute of an MLP, LeNet-5 and a ResNet against fp32 within the half's rounding, loss scaling
recovering gradients that fp16 flushes to zero, the provider (ZeRO) paths against the flat one,
and the refused combinations."""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest

from mpifed import faults
from mpifed.config.sections import (
    CommConfig,
    Config,
    DataConfig,
    FederatedConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)
from mpifed.errors import UserError
from mpifed.nn.layers import Context
from mpifed.nn.models import ModelSpec, loss_and_grad
from mpifed.nn.precision import accumulator, compute_dtype
from mpifed.nn.presets import lenet5, mlp, resnet
from mpifed.optim.loss_scale import LossScaler
from mpifed.train.precision import (
    FULL,
    MixedPrecision,
    check_levers,
    loss_scaling,
    make_precision,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
EPS = {"fp16": 2.0 ** -10, "bf16": 2.0 ** -7}  # the halves' machine epsilon
DTYPES = {"fp16": np.dtype(np.float16), "bf16": BF16}


# --- the loss scaler ------------------------------------------------------------------------

def test_dynamic_scaler_follows_a_hand_computed_sequence():
    """init 8, growth after 3 clean steps, x2 up, x0.5 down, an overflow skipped and resetting
    the clean count."""
    scaler = LossScaler(8.0, growth_interval=3, dynamic=True)
    flags = [0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    want_scale = [8, 8, 16, 8, 8, 8, 4, 2, 2, 2, 4, 4, 4, 8]
    want_clean = [1, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 0]
    got = [(scaler.update(bool(f)), scaler.scale, scaler.clean_steps) for f in flags]
    assert [g[0] for g in got] == [bool(f) for f in flags]
    assert [g[1] for g in got] == want_scale
    assert [g[2] for g in got] == want_clean
    assert scaler.skipped == 3


def test_fixed_scaler_skips_but_keeps_its_scale():
    scaler = LossScaler(128.0, growth_interval=1, dynamic=False)
    assert [scaler.update(f) for f in (False, True, False, False)] == [False, True, False, False]
    assert scaler.scale == 128.0 and scaler.skipped == 1


def test_scaler_state_round_trips():
    scaler = LossScaler(1024.0, growth_interval=5)
    for f in (0, 1, 0, 0):
        scaler.update(bool(f))
    again = LossScaler(7.0, growth_interval=5)
    again.load_state(scaler.state())
    assert again.state() == scaler.state() == {"scale": 512.0, "clean_steps": 2, "skipped": 1}
    for f in (0, 0, 0, 1, 0):
        assert again.update(bool(f)) == scaler.update(bool(f))
        assert again.state() == scaler.state()


def test_default_loss_scale_by_precision():
    optim = OptimConfig()
    assert loss_scaling(ModelConfig(precision="fp16"), optim) == "dynamic"
    assert loss_scaling(ModelConfig(precision="bf16"), optim) == 1.0
    assert loss_scaling(ModelConfig(precision="bf16"), OptimConfig(loss_scale="dynamic")) \
        == "dynamic"
    spec = ModelSpec("mlp", 4, (3,), 2)
    assert make_precision(ModelConfig(), optim, spec, np.float32, np) is FULL
    fp16 = make_precision(ModelConfig(precision="fp16"), optim, spec, np.float32, np)
    assert fp16.scaler.state() == {"scale": 65536.0, "clean_steps": 0, "skipped": 0}
    assert fp16.scaler.growth_interval == 2000 and fp16.scaler.dynamic
    bf16 = make_precision(ModelConfig(precision="bf16"), optim, spec, np.float32, np)
    assert bf16.compute == BF16 and bf16.scaler.scale == 1.0 and not bf16.scaler.dynamic


# --- half compute against fp32 ----------------------------------------------------------------

def _batch(spec, rows=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, *spec.input_shape)).astype(np.float32)
    return x, rng.integers(0, spec.num_classes, rows)


def _trained_mask(spec, n):
    mask = np.ones(n, bool)
    for lo, hi in spec.buffer_ranges("float32"):
        mask[lo:hi] = False
    return mask


def _half_step(spec, precision, scale, params, x, y, provider=False):
    """fp32 gradients from MixedPrecision (flat buffers, or per-layer providers as ZeRO-3)."""
    mixed = MixedPrecision(spec, DTYPES[precision], LossScaler(scale, dynamic=False), np)
    grad = np.full(params.size, np.nan, np.float32)
    if not provider:
        loss = mixed.loss_and_grad(spec, params, x, y, grad, ctx=Context(train=True))
    else:
        ready = []
        loss = mixed.loss_and_grad(spec, lambda i, lo, hi: params[lo:hi], x, y,
                                   lambda i, lo, hi: grad[lo:hi], ctx=Context(train=True),
                                   on_ready=lambda lo, hi, loss: ready.append((lo, hi)))
        assert sorted(ready) == sorted(spec.layer_range(i, "float32")
                                       for i in range(len(spec.layers))
                                       if np.subtract(*spec.layer_range(i, "float32")))
    assert not mixed.skip_step(_NoComm())
    return float(loss), grad


class _NoComm:
    size = 1


MODELS = {"mlp": lambda: mlp((3, 8, 8), [32], 10),
          "lenet5": lambda: lenet5((3, 32, 32), 10),
          "resnet8": lambda: resnet((3, 16, 16), 10, 8)}
# The bound, in units of the half's epsilon, on the gradient's relative L2 error: ~sqrt(depth)
# roundings of eps/2 each, amplified by batch norm's division by the batch's spread.
BOUND = {"mlp": 8, "lenet5": 40, "resnet8": 40}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_half_step_equals_fp32_within_the_halfs_rounding(model, precision):
    """The loss to 4 eps and the fp32 gradient (trained entries) to BOUND eps in relative L2,
    against the same model run wholly in fp32; running statistics to 4 eps absolute."""
    spec = MODELS[model]()
    params = spec.init(0)
    x, y = _batch(spec, rows=4 if model == "resnet8" else 8)
    want = np.zeros_like(params)
    want_loss = float(loss_and_grad(spec, params, x, y, want, ctx=Context(train=True)))
    loss, got = _half_step(spec, precision, 1024.0, params, x, y)
    eps, trained = EPS[precision], _trained_mask(spec, params.size)
    assert abs(loss - want_loss) <= 4 * eps * abs(want_loss)
    error = np.linalg.norm((got - want)[trained]) / np.linalg.norm(want[trained])
    assert error <= BOUND[model] * eps, error
    assert np.abs(got - want)[~trained].max(initial=0) <= 4 * eps * (1 + np.abs(want).max())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_layer_providers_give_the_flat_paths_bits(precision):
    """ZeRO-2/3's per-layer providers and the flat buffers cast the same values: equal bits."""
    spec = MODELS["resnet8"]()
    params = spec.init(3)
    x, y = _batch(spec, rows=2)
    flat = _half_step(spec, precision, 256.0, params, x, y)
    layered = _half_step(spec, precision, 256.0, params, x, y, provider=True)
    assert flat[0] == layered[0]
    np.testing.assert_array_equal(flat[1], layered[1])


def test_loss_scaling_recovers_gradients_fp16_flushes_to_zero():
    """An MLP whose output weights are ~1e-4 back-propagates ~1e-6 into its hidden layer
    (batch 256), under fp16's smallest normal (6.1e-5): at scale 1 those gradients keep a few
    subnormal bits (error ~30%), at 65536 they are normal numbers again (error ~ eps)."""
    spec = ModelSpec("mlp", 16, (8,), 4)
    params = spec.init(0)
    lo, hi = spec.layout("float32").offsets[2:4]  # the output weights (8, 4)
    params[lo:hi] = 1e-4 * (1 + np.random.default_rng(5).random(hi - lo))
    x, y = _batch(spec, rows=256)
    want = np.zeros_like(params)
    loss_and_grad(spec, params, x, y, want)
    w = slice(0, 16 * 8)  # the hidden layer's weights

    def error(scale):
        got = _half_step(spec, "fp16", scale, params, x, y)[1]
        return np.linalg.norm(got[w] - want[w]) / np.linalg.norm(want[w])
    assert error(65536.0) <= 2 * EPS["fp16"]
    assert error(1.0) > 100 * EPS["fp16"]


def test_overflow_is_found_and_the_fault_hook_injects_one(monkeypatch):
    spec = ModelSpec("mlp", 6, (5,), 3)
    params = spec.init(0)
    x, y = _batch(spec)
    mixed = MixedPrecision(spec, np.float16, LossScaler(2.0 ** 40), np)  # scaled past 65504
    grad = np.zeros_like(params)
    mixed.loss_and_grad(spec, params, x, y, grad, ctx=Context(step=1))
    assert mixed.skip_step(_NoComm()) and mixed.scaler.scale == 2.0 ** 39
    mixed = MixedPrecision(spec, np.float16, LossScaler(4.0), np)
    monkeypatch.setenv(faults.ENV, "overflow:step=2:rank=1")
    for step, rank, skip in [(1, 1, False), (2, 0, False), (2, 1, True), (3, 1, False)]:
        mixed.loss_and_grad(spec, params, x, y, grad, ctx=Context(step=step, rank=rank))
        assert mixed.skip_step(_NoComm()) is skip
    faults.inject("step", 2, 1)  # the loop's own injection point leaves it to the step


def test_accumulator_and_bf16_sums():
    """ml_dtypes sums bfloat16 in bfloat16 (65536 ones: 256); the layers' sums do not."""
    from mpifed.nn.layers.base import acc_sum

    ones = np.ones((4, 4, 64, 64), BF16)
    assert float(ones.sum()) == 256.0  # the trap
    assert acc_sum(ones, (0, 2, 3)).tolist() == [16384.0] * 4
    assert accumulator(np.float16) == np.float32 and accumulator(np.float64) == np.float64


# --- refused combinations ---------------------------------------------------------------------

DATA = DataConfig(train="x.h5")


@pytest.mark.parametrize("build,words", [
    (lambda: ModelConfig(precision="fp16", dtype="float64"),
     ["model.precision", "model.dtype", "float32"]),
    (lambda: Config(data=DATA, optim=OptimConfig(loss_scale=1024)),
     ["optim.loss_scale", "model.precision", "fp32"]),
    (lambda: OptimConfig(loss_scale="auto"), ["optim.loss_scale", "dynamic"]),
    (lambda: OptimConfig(loss_scale=0), ["optim.loss_scale", "> 0"]),
    (lambda: OptimConfig(loss_scale_growth_interval=0), ["optim.loss_scale_growth_interval"]),
    (lambda: ModelConfig(precision="fp8"), ["model.precision", "fp16"]),
    (lambda: ModelConfig(conv_backend="cuda"), ["model.conv_backend", "cudnn"]),
    (lambda: Config(data=DATA, model=ModelConfig(precision="fp16"),
                    comm=CommConfig(compression="powersgd")),
     ["model.precision", "powersgd"]),
    (lambda: Config(data=DATA, model=ModelConfig(precision="bf16"),
                    federated=FederatedConfig(institutions=2)),
     ["model.precision", "federation"]),
    (lambda: Config(data=DATA, model=ModelConfig(precision="fp16"),
                    optim=OptimConfig(accumulate=2, steps=1)),
     ["model.precision", "optim.accumulate = 2"]),
    (lambda: Config(data=DATA, model=ModelConfig(kind="gpt", precision="bf16")),
     ["model.precision", "model.kind = \"gpt\""]),
])
def test_refused_combinations_name_their_keys(build, words):
    with pytest.raises(UserError) as err:
        build()
    for word in words:
        assert word in str(err.value)


def test_loss_scale_one_is_accepted_with_fp32():
    assert Config(data=DATA, optim=OptimConfig(loss_scale=1)).optim.loss_scale == 1.0


@pytest.mark.parametrize("model,run,words", [
    (ModelConfig(), RunConfig(cuda_graph=True), ["run.cuda_graph", "CuPy", "NumPy"]),
    (ModelConfig(conv_backend="cudnn"), RunConfig(), ["model.conv_backend", "NumPy",
                                                      "native"]),
])
def test_gpu_levers_are_refused_on_the_host(model, run, words):
    with pytest.raises(UserError) as err:
        check_levers(model, run, np)
    for word in words:
        assert word in str(err.value)
    check_levers(ModelConfig(), RunConfig(), np)  # the defaults pass


def test_gpu_levers_on_a_gpu_name_what_is_missing(monkeypatch):
    import fake_cupy

    monkeypatch.setitem(sys.modules, "cudnn", None)  # nvidia-cudnn-frontend absent
    with pytest.raises(UserError, match="nvidia-cudnn-frontend"):
        check_levers(ModelConfig(conv_backend="cudnn"), RunConfig(), fake_cupy)
    with pytest.raises(UserError, match="not built"):
        check_levers(ModelConfig(), RunConfig(cuda_graph=True), fake_cupy)


def test_bf16_names_what_the_backend_lacks(monkeypatch):
    class OldCupy:
        __version__ = "13.6.0"

    with pytest.raises(UserError, match="CuPy >= 14"):
        compute_dtype("bf16", np.float32, OldCupy)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(UserError, match="ml_dtypes"):
        compute_dtype("bf16", np.float32, np)
    assert compute_dtype("fp16", np.float32, np) == np.float16


def test_the_gpu_path_keeps_its_copies_on_the_device_and_gives_numpys_bits():
    """On a (fake) GPU the half copies are device arrays, nothing is read back to the host
    during the forward and backward, and the gradients are NumPy's bits."""
    from fake_cupy import FakeCupy

    spec = MODELS["mlp"]()
    params = spec.init(0)
    x, y = _batch(spec)
    want = _half_step(spec, "fp16", 1024.0, params, x, y)[1]
    fake = FakeCupy(devices=1)
    mixed = MixedPrecision(spec, np.float16, LossScaler(1024.0, dynamic=False), fake)
    grad = fake.zeros(params.size, np.float32)
    mixed.loss_and_grad(spec, fake.asarray(params), fake.asarray(x), y, grad,
                        ctx=Context(train=True))
    assert isinstance(mixed._params, type(grad)) and mixed._params.dtype == np.float16
    assert fake.of("d2h") == []
    assert not mixed.skip_step(_NoComm())
    np.testing.assert_array_equal(np.asarray(grad), want)


def test_half_copies_are_counted_in_the_steps_memory():
    """After a step, memory_bytes counts the half copies: a whole-model one of each for flat
    buffers (2 bytes per element), two layer slots of each behind providers."""
    spec = MODELS["resnet8"]()
    params = spec.init(0)
    x, y = _batch(spec, rows=2)
    flat = MixedPrecision(spec, np.float16, LossScaler(1.0), np)
    assert flat.memory_bytes() == {"param_bytes": 0, "grad_bytes": 0}
    flat.loss_and_grad(spec, params, x, y, np.zeros_like(params), ctx=Context())
    assert flat.memory_bytes() == {"param_bytes": 2 * params.size, "grad_bytes": 2 * params.size}
    layered = MixedPrecision(spec, np.float16, LossScaler(1.0), np)
    grad = np.zeros_like(params)
    layered.loss_and_grad(spec, lambda i, lo, hi: params[lo:hi], x, y,
                          lambda i, lo, hi: grad[lo:hi], ctx=Context(), on_ready=lambda *a: None)
    widest = layered._widest()
    assert widest < params.size
    assert layered.memory_bytes() == {"param_bytes": 4 * widest, "grad_bytes": 4 * widest}


def test_overflow_fault_is_for_steps_only():
    with pytest.raises(ValueError, match="overflow:step=NUMBER"):
        faults.parse("overflow:round=2")
    assert faults.parse("overflow:step=3:rank=1,2") == faults.Fault("overflow", "step", 3, (1, 2))
