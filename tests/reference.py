"""Independent serial references for the MPI tests: no code shared with mpifed's model,
loss, optimiser, sharding or aggregation."""

from __future__ import annotations

import itertools

import numpy as np


def global_batches(samples: int, ranks: int, batch: int, seed: int, shuffle: bool,
                   block: int = 0, buffer: int = 0):
    """Yield, forever, each step's global batch rows: rank 0's rows, then rank 1's, ...

    Rank r owns rows [r*N//p, (r+1)*N//p), walks them in order or in a permutation seeded by
    (seed, epoch, r) (block-shuffled when `block` is given: a shard streamed from its file), and
    every rank takes floor(smallest shard / batch) steps per epoch.
    """
    bounds = [((r * samples) // ranks, ((r + 1) * samples) // ranks) for r in range(ranks)]
    per_epoch = min(b - a for a, b in bounds) // batch
    for step in itertools.count():
        epoch, k = divmod(step, per_epoch)
        rows = []
        for r, (a, b) in enumerate(bounds):
            if shuffle and block:
                order = block_shuffled_order(a, b, block, buffer, seed, epoch, r)
            elif shuffle:
                order = np.random.default_rng([seed, epoch, r]).permutation(b - a)
            else:
                order = np.arange(b - a)
            rows.append(a + order[k * batch:(k + 1) * batch])
        yield np.concatenate(rows)


def block_shuffled_order(start: int, stop: int, block: int, buffer: int, seed: int, epoch: int,
                         rank: int) -> np.ndarray:
    """Return one epoch's shard-local rows of file rows [start, stop) under block shuffling.

    From the definition in the README: blocks end at file rows that are multiples of `block`;
    the blocks are visited in the permutation of (seed, epoch, rank); every `buffer` blocks in
    that order fill a buffer whose rows come out in the permutation of (seed, epoch, rank, g+1).
    """
    cuts = [start] + [row for row in range(start + 1, stop) if row % block == 0] + [stop]
    blocks = [list(range(lo - start, hi - start)) for lo, hi in zip(cuts, cuts[1:])]
    visit = np.random.default_rng([seed, epoch, rank]).permutation(len(blocks))
    order = []
    for g, first in enumerate(range(0, len(blocks), buffer)):
        rows = [row for k in visit[first:first + buffer] for row in blocks[k]]
        shuffle = np.random.default_rng([seed, epoch, rank, g + 1]).permutation(len(rows))
        order += [rows[i] for i in shuffle]
    return np.array(order, dtype=np.int64)


def mlp_sgd(x, y, weights, batches, lr, momentum=0.0, anchor=None, mu=0.0):
    """Plain NumPy: a 1-hidden-layer ReLU MLP, mean cross-entropy, SGD with momentum.

    anchor, mu: FedProx's proximal term (mu/2)||w - anchor||^2 added to the loss.
    weights: [W1, b1, W2, b2]; returns the trained copies.
    """
    params = [w.copy() for w in weights]
    velocity = [np.zeros_like(w) for w in params]
    for rows in batches:
        w1, b1, w2, b2 = params
        xb, yb = x[rows], y[rows]
        pre = xb @ w1 + b1
        hidden = np.maximum(pre, 0)
        out = hidden @ w2 + b2
        prob = np.exp(out - out.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        prob[np.arange(len(rows)), yb] -= 1
        d_out = prob / len(rows)
        d_hidden = (d_out @ w2.T) * (pre > 0)
        grads = [xb.T @ d_hidden, d_hidden.sum(0), hidden.T @ d_out, d_out.sum(0)]
        if anchor is not None:
            grads = [g + mu * (p - a) for g, p, a in zip(grads, params, anchor)]
        for param, vel, grad in zip(params, velocity, grads):
            vel *= momentum
            vel += grad
            param -= lr * vel
    return params


def initial_weights(features: int, hidden: int, classes: int, seed: int):
    """Return mpifed's seeded initial MLP weights, split per layer (the start, not under test)."""
    from mpifed.nn.models import ModelSpec, init_params

    flat = init_params(ModelSpec("mlp", features, (hidden,), classes), seed, dtype="float64")
    shapes = [(features, hidden), (hidden,), (hidden, classes), (classes,)]
    cuts = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    return [flat[a:b].reshape(s).copy() for a, b, s in zip(cuts, cuts[1:], shapes)]

