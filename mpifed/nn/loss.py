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


IGNORE_INDEX = -1  # a target of this value is no token to predict (padding), as nanoGPT's


def sequence_cross_entropy(logits, targets, ignore_index: int = IGNORE_INDEX):
    """Return (mean loss, d loss / d logits) for logits (B, T, V) and integer targets (B, T).

    The mean is over the targets that are not `ignore_index` (PyTorch's F.cross_entropy with
    ignore_index); their rows of the gradient are zero. Stable as `softmax_cross_entropy`: each
    row is shifted by its maximum. The gradient overwrites a copy of the logits only once.
    """
    xp = get_array_module(logits)
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)  # (N, V)
    t = targets.reshape(-1).astype(xp.int64)
    keep = t != ignore_index  # (N,)
    count = int(keep.sum())
    safe = xp.where(keep, t, 0)
    grad = flat - flat.max(axis=1, keepdims=True)  # shifted logits, then the gradient
    rows = xp.arange(flat.shape[0])
    picked = grad[rows, safe]  # (N,) shifted logit of the target
    xp.exp(grad, out=grad)
    total = grad.sum(axis=1)  # (N,)
    losses = (xp.log(total) - picked) * keep
    loss = losses.sum() / max(count, 1)
    grad /= total[:, None]
    grad[rows, safe] -= 1.0
    grad *= (keep / max(count, 1)).astype(grad.dtype)[:, None]
    return loss, grad.reshape(logits.shape)


def sequence_loss_and_correct(logits, targets, ignore_index: int = IGNORE_INDEX):
    """Return (summed cross-entropy, correct predictions, counted targets) over (B, T, V)
    logits and (B, T) targets, `ignore_index` targets left out."""
    xp = get_array_module(logits)
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    t = targets.reshape(-1).astype(xp.int64)
    keep = t != ignore_index
    safe = xp.where(keep, t, 0)
    shifted = flat - flat.max(axis=1, keepdims=True)
    rows = xp.arange(flat.shape[0])
    losses = xp.log(xp.exp(shifted).sum(axis=1)) - shifted[rows, safe]
    correct = (flat.argmax(axis=1) == t) & keep
    return float((losses * keep).sum()), int(correct.sum()), int(keep.sum())
