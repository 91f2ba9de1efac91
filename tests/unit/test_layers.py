"""Every layer's backward against central finite differences (float64), for odd sizes, strides
and paddings; conv2d and the pools against direct loops; shape errors name layer and shapes."""

import numpy as np
import pytest

from mpifed.errors import UserError
from mpifed.nn.layers import (
    GELU,
    AvgPool2d,
    BatchNorm2d,
    Context,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool,
    LayerNorm,
    Linear,
    MaxPool2d,
    ReLU,
    Residual,
    Tanh,
    layers_from_config,
)
from mpifed.nn.models import loss_and_grad
from mpifed.nn.sequential import Sequential

EPS = 1e-6


def built(layer, in_shape, seed=0, xp=np):
    """Build `layer` on in_shape; return (param dict, grad dict) of fresh float64 xp arrays."""
    layer.build(in_shape, "model.layers[0]")
    rng = np.random.default_rng(seed)
    p = {n: np.zeros(s) for n, s in layer.params()}
    layer.init(rng, p)
    for name in p:
        if name not in layer.buffers:
            p[name] += 0.3 * rng.standard_normal(p[name].shape)  # non-trivial biases and scales
    g = {n: xp.zeros(s) for n, s in layer.params()}
    return {n: xp.asarray(v) for n, v in p.items()}, g


def host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def central_differences(array, loss):
    """Return d loss() / d array (host float64, array's shape) by central differences of step
    EPS, one element at a time; `array` (NumPy or CuPy) is restored after each."""
    numeric = np.zeros(array.shape)
    for i in np.ndindex(array.shape):
        saved = float(array[i])
        array[i] = saved + EPS
        up = loss()
        array[i] = saved - EPS
        down = loss()
        array[i] = saved
        numeric[i] = (up - down) / (2 * EPS)
    return numeric


def check_layer(layer, in_shape, batch=3, ctx=None, seed=0, positive=False, xp=np):
    """Compare backward with central differences of L = sum(forward(x) * R), on the arrays of
    `xp` (NumPy, or CuPy on a GPU)."""
    ctx = ctx or Context(train=True, seed=4, step=7, rank=1)
    p, g = built(layer, in_shape, seed, xp)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((batch, *in_shape))
    if positive:
        x = np.abs(x) + 0.1
    x = xp.asarray(x)
    out = layer.forward(p, x, ctx)
    assert out.shape == (batch, *layer.out_shape)
    assert type(out) is type(x)
    r = xp.asarray(rng.standard_normal(out.shape))

    def loss():
        return float((layer.forward(p, x, ctx) * r).sum())

    layer.forward(p, x, ctx)
    dx = layer.backward(p, g, r.copy(), ctx, True)
    np.testing.assert_allclose(host(dx), central_differences(x, loss), rtol=1e-5, atol=1e-7)
    for name, value in p.items():
        if name in layer.buffers:
            continue
        np.testing.assert_allclose(host(g[name]), central_differences(value, loss),
                                   rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("kernel,stride,padding,shape", [
    (3, 1, 1, (2, 5, 7)), (3, 2, 1, (3, 7, 9)), (2, 3, 0, (1, 8, 7)), (5, 1, 2, (2, 5, 5)),
    (1, 2, 0, (3, 5, 6)), (4, 3, 2, (2, 7, 5))])
def test_conv2d_backward(kernel, stride, padding, shape, xp):
    check_layer(Conv2d(4, kernel, stride, padding), shape, xp=xp)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("kernel,stride,padding,shape", [
    (3, 1, 1, (2, 5, 7)), (2, 1, 0, (3, 4, 6)), (5, 1, 2, (2, 5, 5)), (3, 2, 1, (3, 7, 9))])
def test_conv2d_backward_every_path(kernel, stride, padding, shape, chunked, monkeypatch):
    """The host's path for large images, on small ones: the output rows in chunks of one row,
    their columns rebuilt in backward."""
    from mpifed.nn.layers import conv

    if chunked:
        monkeypatch.setattr(conv, "WHOLE_BYTES", 0)
        monkeypatch.setattr(conv, "COLUMN_BYTES", 1)
    layer = Conv2d(4, kernel, stride, padding)
    check_layer(layer, shape, batch=3)
    assert layer._chunk(np, 3, 8) == (1 if chunked else layer.out_shape[1])


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("kernel,padding,channels,out", [(3, 1, 6, 6), (3, 1, 5, 10),
                                                         (5, 2, 3, 4), (1, 0, 4, 2)])
def test_conv2d_backward_same_from_output_columns(kernel, padding, channels, out, chunked,
                                                  monkeypatch):
    """Stride-1 `same` convolutions (output no wider than twice the input): the backward from
    the output gradient's columns, in one chunk and one output row per chunk."""
    from mpifed.nn.layers import conv

    if chunked:
        monkeypatch.setattr(conv, "WHOLE_BYTES", 0)
        monkeypatch.setattr(conv, "COLUMN_BYTES", 1)
    layer = Conv2d(out, kernel, 1, padding)
    check_layer(layer, (channels, 4, 5), batch=2)
    assert layer._same() and layer.out <= 2 * channels


@pytest.mark.parametrize("stride,chunked", [(2, False), (1, False), (2, True), (1, True)])
def test_conv2d_forward_equals_direct_loops(stride, chunked, monkeypatch):
    from mpifed.nn.layers import conv

    if chunked:
        monkeypatch.setattr(conv, "WHOLE_BYTES", 0)
        monkeypatch.setattr(conv, "COLUMN_BYTES", 1)
    rng = np.random.default_rng(2)
    layer = Conv2d(3, 3, stride=stride, padding=1)
    p, _ = built(layer, (2, 7, 6))
    x = rng.standard_normal((3, 2, 7, 6))
    y = layer.forward(p, x, Context())
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    s = stride
    want = np.zeros((3, 3, (7 + 2 - 3) // s + 1, (6 + 2 - 3) // s + 1))
    for b, o, i, j in np.ndindex(want.shape):
        want[b, o, i, j] = (padded[b, :, s * i:s * i + 3, s * j:s * j + 3] * p["W"][o]).sum() \
            + p["b"][o]
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_im2col_and_col2im_are_adjoint():
    """<col2im(D), X> = <D, im2col(X)>: col2im adds back exactly what im2col read."""
    from mpifed.nn.layers import col2im, im2col

    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 7, 8))
    col = im2col(x, 3, 2, 2, 1)  # (C*KH*KW, B*OH*OW)
    d = rng.standard_normal(col.shape)
    assert np.vdot(col2im(d, x.shape, 3, 2, 2, 1), x) == pytest.approx(np.vdot(d, col))


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d])
@pytest.mark.parametrize("kernel,stride,shape", [(2, None, (2, 5, 5)), (3, 2, (2, 7, 9)),
                                                  (2, 1, (1, 4, 5)), (3, 3, (3, 6, 8))])
def test_pool_backward(cls, kernel, stride, shape, xp):
    check_layer(cls(kernel, stride), shape, xp=xp)


def test_pools_forward_equal_direct_loops():
    x = np.random.default_rng(3).standard_normal((2, 3, 7, 9))
    mx, av = MaxPool2d(3, 2), AvgPool2d(3, 2)
    mx.build((3, 7, 9), "l"), av.build((3, 7, 9), "l")
    want_max, want_avg = np.zeros((2, 3, 3, 4)), np.zeros((2, 3, 3, 4))
    for b, c, i, j in np.ndindex(want_max.shape):
        window = x[b, c, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
        want_max[b, c, i, j], want_avg[b, c, i, j] = window.max(), window.mean()
    np.testing.assert_array_equal(mx.forward({}, x, Context()), want_max)
    np.testing.assert_allclose(av.forward({}, x, Context()), want_avg, rtol=1e-14)


@pytest.mark.parametrize("layer,shape", [
    (Linear(5), (7,)), (ReLU(), (3, 5, 4)), (Tanh(), (6,)), (GELU(), (2, 3, 5)),
    (Flatten(), (3, 5, 7)), (GlobalAvgPool(), (3, 5, 7)), (LayerNorm(), (3, 5)),
    (LayerNorm(eps=1e-3), (7,)), (Dropout(0.4), (5, 3)), (Dropout(0.0), (4,))])
def test_simple_layer_backward(layer, shape, xp):
    check_layer(layer, shape, batch=4, xp=xp)


@pytest.mark.parametrize("shape,batch", [((3, 5, 7), 3), ((4,), 6), ((2, 3, 3), 1)])
def test_batchnorm_backward(shape, batch, xp):
    check_layer(BatchNorm2d(), shape, batch=batch, xp=xp)


def test_batchnorm_eval_uses_running_statistics():
    layer = BatchNorm2d(momentum=0.25)
    p, g = built(layer, (2, 3, 3))
    x = np.random.default_rng(5).standard_normal((4, 2, 3, 3)) * 3 + 1
    layer.forward(p, x, Context())
    layer.backward(p, g, np.ones_like(x), Context())
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(g["running_mean"], 0.75 * p["running_mean"] + 0.25 * mean)
    np.testing.assert_allclose(g["running_var"], 0.75 * p["running_var"] + 0.25 * var)
    p["running_mean"][...], p["running_var"][...] = mean, var
    y = layer.forward(p, x, Context(train=False))
    want = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) \
        * p["gamma"][:, None, None] + p["beta"][:, None, None]
    np.testing.assert_allclose(y, want, rtol=1e-12)


def test_dropout_mask_depends_on_seed_step_rank_only():
    layer = Dropout(0.5)
    layer.build((50,), "model.layers[2]")
    x = np.ones((4, 50))
    a = layer.forward({}, x, Context(seed=1, step=3, rank=0))
    b = layer.forward({}, x, Context(seed=1, step=3, rank=0))
    c = layer.forward({}, x, Context(seed=1, step=4, rank=0))
    d = layer.forward({}, x, Context(seed=1, step=3, rank=1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert set(np.unique(a)) <= {0.0, 2.0}
    np.testing.assert_array_equal(layer.forward({}, x, Context(train=False)), x)


@pytest.mark.parametrize("sub,shape", [
    ([Conv2d(3, 3, 1, 1), BatchNorm2d(), ReLU(), Conv2d(3, 3, 1, 1)], (3, 5, 5)),  # identity
    ([Conv2d(4, 3, 2, 1), ReLU(), Conv2d(4, 3, 1, 1)], (2, 7, 7)),  # 1x1 projection, stride 2
    ([Linear(4), Tanh()], (6,)),  # linear projection
])
def test_residual_backward(sub, shape, xp):
    check_layer(Residual(sub), shape, xp=xp)


def test_model_backward_with_batchnorm_and_residual():
    """A whole convnet's loss_and_grad against central differences of its mean loss."""
    layers = layers_from_config([
        {"type": "conv2d", "out": 3, "kernel": 3, "padding": 1},
        {"type": "batchnorm2d"}, {"type": "relu"},
        {"type": "residual", "layers": [{"type": "conv2d", "out": 4, "kernel": 3, "stride": 2,
                                         "padding": 1}, {"type": "batchnorm2d"},
                                        {"type": "gelu"}]},
        {"type": "avgpool2d", "kernel": 2}, {"type": "flatten"}, {"type": "layernorm"},
        {"type": "dropout", "p": 0.2}, {"type": "linear", "out": 3}])
    model = Sequential(layers, (2, 5, 5), 3)
    flat = model.init(3, dtype="float64")
    rng = np.random.default_rng(4)
    flat += 0.05 * rng.standard_normal(flat.size)
    x, y = rng.standard_normal((4, 2, 5, 5)), rng.integers(0, 3, 4)
    grad = np.zeros_like(flat)
    loss_and_grad(model, flat, x, y, grad)
    scratch = np.zeros_like(flat)
    trained = np.ones(flat.size, bool)
    for lo, hi in model.buffer_ranges(flat.dtype):
        trained[lo:hi] = False
    for i in np.flatnonzero(trained):
        saved = flat[i]
        flat[i] = saved + EPS
        up = loss_and_grad(model, flat, x, y, scratch)
        flat[i] = saved - EPS
        down = loss_and_grad(model, flat, x, y, scratch)
        flat[i] = saved
        assert grad[i] == pytest.approx((up - down) / (2 * EPS), rel=1e-5, abs=1e-8), i


def test_flatten_is_row_major_like_torch():
    x = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    layer = Flatten()
    layer.build((3, 4, 5), "l")
    np.testing.assert_array_equal(layer.forward({}, x, Context()), x.reshape(2, 60))


def test_on_ready_covers_every_layer_last_first():
    model = Sequential(layers_from_config([
        {"type": "conv2d", "out": 2, "kernel": 3}, {"type": "relu"}, {"type": "flatten"},
        {"type": "linear", "out": 5}, {"type": "relu"}, {"type": "linear", "out": 3}]),
        (1, 5, 5), 3)
    flat = model.init(0)
    seen = []
    loss_and_grad(model, flat, np.ones((2, 1, 5, 5), np.float32), np.array([0, 1]),
                  np.zeros_like(flat), on_ready=lambda lo, hi, loss: seen.append((lo, hi)))
    assert seen == sorted(seen, reverse=True)
    assert seen[0][1] == flat.size and seen[-1][0] == 0
    assert all(a[0] == b[1] for a, b in zip(seen, seen[1:]))  # contiguous, no gap


# Shapes that do not fit: one line naming the layer index and both shapes.
def test_kernel_larger_than_input_names_layer_and_shapes():
    with pytest.raises(UserError) as err:
        Sequential(layers_from_config([{"type": "conv2d", "out": 4, "kernel": 3},
                                       {"type": "conv2d", "out": 4, "kernel": 5},
                                       {"type": "flatten"}, {"type": "linear", "out": 2}]),
                   (1, 6, 6), 2)
    message = str(err.value)
    assert "model.layers[1] (conv2d)" in message and "(5, 5)" in message
    assert "(4, 4, 4)" in message and "\n" not in message


def test_linear_without_flatten_names_layer_and_shapes():
    with pytest.raises(UserError) as err:
        Sequential(layers_from_config([{"type": "conv2d", "out": 4, "kernel": 3},
                                       {"type": "relu"}, {"type": "linear", "out": 2}]),
                   (1, 6, 6), 2)
    message = str(err.value)
    assert "model.layers[2] (linear)" in message and "(4, 4, 4)" in message
    assert "flatten" in message and "(features,)" in message


def test_channel_count_differing_from_data_names_layer_and_shapes():
    model = Sequential([Conv2d(4, 3), Flatten(), Linear(2)], (3, 6, 6), 2)
    with pytest.raises(UserError) as err:
        model.build((1, 6, 6))
    message = str(err.value)
    assert "model.layers[0] (conv2d)" in message and "(1, 6, 6)" in message
    assert "(4, 3, 3, 3)" in message


def test_unknown_layer_type_and_key_are_named():
    with pytest.raises(UserError, match=r"model.layers\[1\].type: 'conv'"):
        layers_from_config([{"type": "relu"}, {"type": "conv"}])
    with pytest.raises(UserError, match=r"model.layers\[0\]: unknown key 'size'"):
        layers_from_config([{"type": "linear", "size": 3}])
    with pytest.raises(UserError, match=r"model.layers\[0\].out: required"):
        layers_from_config([{"type": "linear"}])


def test_docs_layer_example_backward(tmp_path, monkeypatch):
    """The "Writing a layer" example of docs/model.md: its backward against finite differences,
    and a factory model built from it trains through loss_and_grad."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "model.md").read_text()
    section = text.split("## Writing a layer", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "readme_layer.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import readme_layer

    check_layer(readme_layer.ChannelScale(), (3, 4, 5))
    check_layer(readme_layer.ChannelScale(), (6,))
    from mpifed.nn.spec import model_from_factory

    model = model_from_factory("readme_layer:build", (3, 4, 5), 2)
    flat = model.init(0, dtype="float64")
    grad = np.zeros_like(flat)
    x, y = np.random.default_rng(0).standard_normal((4, 3, 4, 5)), np.array([0, 1, 1, 0])
    loss_and_grad(model, flat, x, y, grad)
    i = 1  # a scale: d loss / d s[1] by central differences
    flat[i] += EPS
    up = loss_and_grad(model, flat, x, y, np.zeros_like(flat))
    flat[i] -= 2 * EPS
    down = loss_and_grad(model, flat, x, y, np.zeros_like(flat))
    assert grad[i] == pytest.approx((up - down) / (2 * EPS), rel=1e-5)


def test_layers_use_only_xp_operations():
    """Forward and backward reach arrays through xp alone, so CuPy runs them unchanged: in the
    layer modules NumPy (`np.`) appears only where the host is meant (initialisation, dtype
    names, dropout's host generator) and never as np.add.at and the like on device arrays."""
    import ast
    from pathlib import Path

    import mpifed.nn.layers as layers

    # host-only uses, reviewed (errstate: silences NumPy's overflow warning; CuPy never warns)
    allowed = {"dtype", "sqrt", "random", "ndarray", "errstate"}
    found = {}
    for path in Path(layers.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or fn.name == "init":
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                        and node.value.id == "np" and node.attr not in allowed:
                    found.setdefault(f"{path.name}:{fn.name}", []).append(node.attr)
    assert found == {}


@pytest.mark.parametrize("name", ["lenet5", "resnet8", "resnet20"])
def test_benchmark_peers_build_the_presets(name):
    """The convnet benchmark's torch peers have the presets' trained arrays, one for one."""
    pytest.importorskip("torch")
    from mpifed.benchmarks.cnn_throughput import CLASSES, MODELS, torch_model
    from mpifed.config import ModelConfig
    from mpifed.nn.spec import model_from_config

    section, shape = MODELS[name]
    ours = model_from_config(ModelConfig(**section), shape, CLASSES)
    sizes = sorted(int(np.prod(s)) for layer in ours.layers for n, s in layer.params()
                   if n.rsplit(".", 1)[-1] not in ("running_mean", "running_var"))
    peer = sorted(p.numel() for p in torch_model(name).parameters())
    assert sizes == peer


def test_cnn_benchmark_skips_cleanly_without_cupy(capsys, monkeypatch):
    from mpifed.benchmarks import cnn_throughput

    monkeypatch.setattr(cnn_throughput, "cupy_ready", lambda: False)
    assert cnn_throughput.main(["--backend", "cupy"]) == 0
    assert "skipped" in capsys.readouterr().out
