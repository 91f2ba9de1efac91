"""Mean softmax cross-entropy and accuracy."""

from __future__ import annotations

from ..xp import get_array_module


def softmax_cross_entropy(logits, labels):
    """Return (mean loss, d loss / d logits) for logits (B, C) and integer labels (B,).

    Shifted by the row maximum so exp never overflows; the gradient is (softmax - onehot) / B.
    """
    xp = get_array_module(logits)
    batch = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = xp.arange(batch)
    # kept on the device (a 0-d array on a GPU): the step reads it back with the stop flag
    loss = (xp.log(total[:, 0]) - shifted[rows, labels]).mean() if batch else 0.0
    grad = exp / total
    grad[rows, labels] -= 1.0
    grad /= max(batch, 1)
    return loss, grad


def summed_loss_and_correct(logits, labels) -> tuple[float, int]:
    """Return (sum of per-row cross-entropy, number of rows whose argmax is the label)."""
    xp = get_array_module(logits)
    if logits.shape[0] == 0:
        return 0.0, 0
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_total = xp.log(xp.exp(shifted).sum(axis=1))
    rows = xp.arange(logits.shape[0])
    loss = float((log_total - shifted[rows, labels]).sum())
    correct = int((logits.argmax(axis=1) == labels).sum())
    return loss, correct
