"""Hand-written gradients against central finite differences; model files round-trip."""

import numpy as np
import pytest

from mpifed.errors import UserError
from mpifed.nn.io import load_model, save_model
from mpifed.nn.layout import views
from mpifed.nn.loss import softmax_cross_entropy
from mpifed.nn.models import ModelSpec, init_params, logits, loss_and_grad


def numeric_grad(spec, flat, x, y, eps=1e-6):
    """Central differences of the mean loss with respect to every parameter."""
    out = np.zeros_like(flat)
    scratch = np.zeros_like(flat)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        up = loss_and_grad(spec, flat, x, y, scratch)
        flat[i] = saved - eps
        down = loss_and_grad(spec, flat, x, y, scratch)
        flat[i] = saved
        out[i] = (up - down) / (2 * eps)
    return out


@pytest.mark.parametrize("kind,hidden", [("softmax", ()), ("mlp", (5,)), ("mlp", (6, 4))])
def test_gradients_match_finite_differences(kind, hidden):
    rng = np.random.default_rng(0)
    spec = ModelSpec(kind, 7, hidden, 3)
    flat = init_params(spec, seed=1, dtype="float64")
    flat += 0.1 * rng.standard_normal(flat.size)  # non-zero biases exercise every path
    x = rng.standard_normal((9, 7))
    y = rng.integers(0, 3, size=9)
    grad = np.zeros_like(flat)
    loss_and_grad(spec, flat, x, y, grad)
    np.testing.assert_allclose(grad, numeric_grad(spec, flat, x, y), rtol=1e-5, atol=1e-8)


def test_loss_of_uniform_logits_is_log_classes():
    loss, grad = softmax_cross_entropy(np.zeros((4, 5)), np.array([0, 1, 2, 3]))
    assert loss == pytest.approx(np.log(5))
    np.testing.assert_allclose(grad[0], np.array([-0.8, 0.2, 0.2, 0.2, 0.2]) / 4)


def test_loss_is_stable_for_huge_logits():
    loss, grad = softmax_cross_entropy(np.array([[1000.0, 0.0]]), np.array([1]))
    assert loss == pytest.approx(1000.0) and np.isfinite(grad).all()


def test_model_file_round_trip(tmp_path):
    spec = ModelSpec("mlp", 4, (3,), 2)
    flat = init_params(spec, seed=5)
    save_model(str(tmp_path / "m.h5"), spec, flat)
    spec2, flat2 = load_model(str(tmp_path / "m.h5"))
    assert spec2 == spec
    np.testing.assert_array_equal(flat2, flat)
    import h5py

    with h5py.File(tmp_path / "m.h5") as fh:  # the documented layout
        assert fh["layers/0/W"].shape == (4, 3) and fh["layers/1/b"].shape == (2,)
        assert fh.attrs["kind"] == "mlp" and list(fh.attrs["hidden"]) == [3]


def test_init_is_the_same_for_the_same_seed_and_views_are_per_layer():
    spec = ModelSpec("mlp", 3, (2,), 2)
    a, b = init_params(spec, 7), init_params(spec, 7)
    np.testing.assert_array_equal(a, b)
    w0, b0, w1, b1 = views(a, spec.layout(a.dtype))
    assert w0.shape == (3, 2) and b1.shape == (2,) and not b0.any()
    x = np.ones((1, 3), dtype=np.float32)
    np.testing.assert_allclose(logits(spec, a, x), np.maximum(x @ w0 + b0, 0) @ w1 + b1)


def test_unknown_model_kind_names_the_key():
    with pytest.raises(UserError, match="model.kind"):
        ModelSpec("cnn", 3, (), 2)
