"""The GPT layers (embedding, causal self-attention, transformer block, tied head) and the
sequence cross-entropy: gradients against finite differences (float64) and against a PyTorch
GPT of nanoGPT's shape loaded from the same state_dict."""

from __future__ import annotations

import numpy as np
import pytest

from mpifed.errors import UserError
from mpifed.nn.gpt import gpt
from mpifed.nn.layers import CausalSelfAttention, Context, TransformerBlock
from mpifed.nn.loss import sequence_cross_entropy

torch = pytest.importorskip("torch")
from tests.torch_gpt import torch_flat, torch_twin  # noqa: E402

TRAIN = Context(train=True)


def tokens(shape, vocab, seed):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def numeric_grad(f, w, coords, eps=1e-6):
    """Central differences of scalar f() in the entries `coords` of array w (changed, restored)."""
    out = []
    flat = w.reshape(-1)
    for c in coords:
        keep = flat[c]
        flat[c] = keep + eps
        up = f()
        flat[c] = keep - eps
        down = f()
        flat[c] = keep
        out.append((up - down) / (2 * eps))
    return np.array(out)


def layer_params(layer, rng, dtype=np.float64):
    """Views of a fresh flat buffer for `layer`, initialised and perturbed (non-trivial norms)."""
    shapes = layer.params()
    size = sum(int(np.prod(s)) for _, s in shapes)
    flat = np.zeros(size, dtype=dtype)
    views, lo = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        views[name] = flat[lo:lo + n].reshape(shape)
        lo += n
    layer.init(rng, views)
    flat += rng.standard_normal(size) * 0.1
    return flat, views


@pytest.mark.parametrize("make", [lambda: CausalSelfAttention(2),
                                  lambda: TransformerBlock(2, gelu="tanh"),
                                  lambda: TransformerBlock(2, gelu="exact"),
                                  lambda: TransformerBlock(2, recompute=True)],
                         ids=["attention", "block-tanh", "block-exact", "block-recompute"])
def test_layer_gradients_match_finite_differences(make):
    rng = np.random.default_rng(0)
    layer = make()
    layer.build((5, 8), "model.layers[1]")
    flat, p = layer_params(layer, rng)
    x = rng.standard_normal((3, 5, 8))
    r = rng.standard_normal((3, 5, 8))  # loss = sum(r * y): dy = r

    def loss():
        return float((layer.forward(p, x, TRAIN) * r).sum())
    layer.forward(p, x, TRAIN)
    g = {k: np.zeros_like(v) for k, v in p.items()}
    dx = layer.backward(p, g, r.copy(), TRAIN)
    gflat = np.concatenate([g[name].reshape(-1) for name, _ in layer.params()])
    coords = rng.choice(flat.size, 40, replace=False)
    np.testing.assert_allclose(gflat[coords], numeric_grad(loss, flat, coords),
                               rtol=1e-5, atol=1e-7)
    xc = rng.choice(x.size, 20, replace=False)
    np.testing.assert_allclose(dx.reshape(-1)[xc], numeric_grad(loss, x, xc), rtol=1e-5,
                               atol=1e-7)


def test_sequence_cross_entropy_matches_finite_differences_and_ignores_targets():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 4, 7)) * 3
    y = tokens((2, 4), 7, 2)
    y[0, 1] = y[1, 3] = -1
    loss, grad = sequence_cross_entropy(logits, y)
    coords = np.arange(logits.size)
    num = numeric_grad(lambda: float(sequence_cross_entropy(logits, y)[0]), logits, coords)
    np.testing.assert_allclose(grad.reshape(-1), num, rtol=1e-6, atol=1e-9)
    assert np.all(grad[0, 1] == 0) and np.all(grad[1, 3] == 0)
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits).view(-1, 7),
                                            torch.tensor(y).view(-1), ignore_index=-1)
    assert float(loss) == pytest.approx(float(ref), rel=1e-12)


def test_whole_gpt_gradient_matches_finite_differences_with_tied_head():
    model = gpt(11, 6, 2, 2, 8, gelu="exact")
    rng = np.random.default_rng(3)
    flat = model.init(0, dtype="float64") + rng.standard_normal(model.layout("float64").size) * 0.05
    x, y = tokens((2, 6), 11, 4).astype(np.float64), tokens((2, 6), 11, 5)
    grad = np.zeros_like(flat)
    model.loss_and_grad(flat, x, y, grad)
    lo, hi = model.layer_range(0, "float64")  # wte first: its gradient has both uses
    coords = np.concatenate([np.arange(0, 40), rng.choice(flat.size, 60, replace=False)])
    num = numeric_grad(lambda: float(model.loss_and_grad(flat, x, y, np.zeros_like(flat))),
                       flat, coords)
    np.testing.assert_allclose(grad[coords], num, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("gelu", ["tanh", "exact"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpt_loss_logits_and_gradients_match_pytorch(gelu, dtype):
    model = gpt(13, 8, 3, 2, 16, gelu=gelu)
    flat = model.init(7, dtype=dtype)
    twin = torch_twin(model, flat, getattr(torch, dtype))
    x, y = tokens((4, 8), 13, 8), tokens((4, 8), 13, 9)
    y[2, :3] = -1  # ignored targets
    grad = np.zeros_like(flat)
    loss = model.loss_and_grad(flat, x.astype(dtype), y, grad)
    logits, ref = twin(torch.tensor(x), torch.tensor(y))
    ref.backward()
    tol = 1e-5 if dtype == "float32" else 1e-11
    assert float(loss) == pytest.approx(float(ref.detach()), rel=tol)
    np.testing.assert_allclose(grad, torch_flat(model, twin, grads=True), rtol=0, atol=tol)
    np.testing.assert_allclose(model.forward(flat, x.astype(dtype)), logits.detach().numpy(),
                               rtol=0, atol=tol * 10)


def test_recompute_gives_the_same_gradients_and_holds_fewer_activations():
    flats, grads, held = [], [], []
    for recompute in (False, True):
        model = gpt(17, 16, 4, 2, 16, recompute=recompute, dropout=0.2)
        flat = model.init(1)
        grad = np.zeros_like(flat)
        x, y = tokens((4, 16), 17, 1).astype(np.float32), tokens((4, 16), 17, 2)
        model.loss_and_grad(flat, x, y, grad, ctx=Context(seed=5, step=3))
        flats.append(flat)
        grads.append(grad)
        held.append(model.activation_bytes)
    assert np.array_equal(grads[0], grads[1])  # the same masks, the same arithmetic
    assert held[1] * 2.5 <= held[0]


def test_attention_is_causal_and_softmax_is_stable():
    layer = CausalSelfAttention(1)
    layer.build((4, 2), "attn")
    _, p = layer_params(layer, np.random.default_rng(0))
    p["c_attn.weight"][...] *= 1e4  # scores near 1e8: exp would overflow without the shift
    x = np.random.default_rng(1).standard_normal((1, 4, 2))
    y = layer.forward(p, x, TRAIN)
    assert np.isfinite(y).all()
    x2 = x.copy()
    x2[0, 3] += 5.0  # a later position cannot change an earlier output
    np.testing.assert_array_equal(layer.forward(p, x2, TRAIN)[0, :3], y[0, :3])


def test_gpt_settings_are_refused_with_the_key_named():
    with pytest.raises(UserError, match="model.n_embd"):
        gpt(10, 8, 1, 3, 16)
    with pytest.raises(UserError, match="model.gelu"):
        gpt(10, 8, 1, 2, 16, gelu="erf")
    with pytest.raises(UserError, match="token ids"):
        model = gpt(10, 8, 1, 2, 16)
        model.forward(model.init(0), np.full((1, 8), 10.0, dtype=np.float32))


def test_erf_without_scipy_is_accurate_to_float32():
    import math

    from mpifed.nn.layers.functional import _erf_fit

    x = np.linspace(-6, 6, 2001)
    want = np.array([math.erf(v) for v in x])
    assert np.abs(_erf_fit(x) - want).max() < 2e-7
