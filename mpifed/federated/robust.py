"""Robust and fair aggregation: pure functions over the institutions' results, as Flower's.

Each has the strategies' signature (`strategies.py`), `strategy(global_params, results, state,
hp) -> (new_params, state)`, over flat models, and equals the function of
`flwr.server.strategy.aggregate` (flwr 1.42) named in its docstring on the same models, with the
hyper-parameters mapped one to one (tests/unit/test_robust_strategies.py checks it to 1e-9).
Flower works on lists of layers; a flat model is their concatenation, and every rule here is
either coordinate-wise or reads whole-model distances, so the two agree.

They need each institution's own update (and q-FedAvg its loss), which secure aggregation and DP
keep from the root: `FederatedConfig.check` refuses them there. `check_institution_count` refuses,
before round 1, a count of institutions per round too small for `federated.num_malicious`.
"""

from __future__ import annotations

from ..errors import UserError
from ..xp import get_array_module, is_device_array
from .sorting_network import BLOCK, nearest_values, order_statistics

QFFL_EPSILON = 1e-10  # Flower's QFedAvg adds it to each loss before raising it to q


def _stacked(results):
    """Return the institutions' models as one (K, n) array."""
    xp = get_array_module(results[0][0])
    return xp.stack([r[0] for r in results])


def fedmedian(global_params, results, state, hp):
    """FedMedian (Yin et al. 2018): the coordinate-wise median of the models, unweighted.

    Flower: `aggregate_median(results)`."""
    return coordinate_median([r[0] for r in results]), state


def coordinate_median(rows):
    """Return the median over the K rows (K arrays of shape (n,), or (K, n)), as xp.median:
    the middle one or two order statistics from a sorting network (sorting_network.py), the
    same values as a sort's; rows with a NaN go through xp.median, which propagates it as
    Flower's does."""
    xp = get_array_module(rows[0])
    count = len(rows)
    middle = count // 2
    wanted = (middle,) if count % 2 else (middle - 1, middle)
    part = order_statistics(rows, wanted)
    if part is None:
        return xp.median(xp.stack(list(rows)), axis=0)
    if count % 2:
        return part[0]
    return (part[0] + part[1]) / 2


def fedtrimmedavg(global_params, results, state, hp):
    """FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the int(trim_fraction * K) lowest
    and highest values and average the rest, unweighted.

    Flower: `aggregate_trimmed_avg(results, proportiontocut=hp.trim_fraction)` (FedTrimmedAvg's
    `beta`)."""
    if not 0.0 <= hp.trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {hp.trim_fraction}")
    xp = get_array_module(results[0][0])
    count = len(results)
    cut = int(hp.trim_fraction * count)
    kept = order_statistics([r[0] for r in results], range(cut, count - cut))  # (K - 2cut, n)
    if kept is None:  # a NaN: sorted last, as Flower's partition does
        kept = xp.sort(_stacked(results), axis=0)[cut:count - cut]
    return kept.mean(axis=0), state


def squared_distances(results):
    """Return the (K, K) matrix of squared Euclidean distances between the models.

    Direct differences (not |a|^2 + |b|^2 - 2ab, which loses precision), summed over column
    blocks that stay in cache on the host (BLOCK columns; on a GPU, all of them at once); the
    per-block sums also keep float32 rounding down (2.8e-7 relative against float64 at n =
    535,818, where one einsum over the whole row gave 3.4e-5)."""
    xp = get_array_module(results[0][0])
    models = [r[0] for r in results]
    count, n = len(models), models[0].shape[0]
    dtype = xp.result_type(*models)
    width = n if is_device_array(models[0]) else min(n, BLOCK)
    block, diff = xp.empty((count, width), dtype), xp.empty((count - 1, width), dtype)
    upper = xp.zeros((count, count), dtype=dtype)
    for start in range(0, n, width):
        w = min(n, start + width) - start
        for k, model in enumerate(models):
            block[k, :w] = model[start:start + w]
        for i in range(count - 1):  # the upper triangle, one row at a time
            d = xp.subtract(block[i + 1:, :w], block[i, :w], out=diff[:count - i - 1, :w])
            upper[i, i + 1:] += _row_dots(xp, d)
    return upper + upper.T


def _row_dots(xp, rows):
    """Return each row's dot product with itself, (m, w) -> (m,), with no temporary of
    squares: xp.vecdot where the array module has it (NumPy >= 2: 3x einsum's speed on a
    block), else xp.einsum."""
    vecdot = getattr(xp, "vecdot", None)
    return vecdot(rows, rows) if vecdot is not None else xp.einsum("ij,ij->i", rows, rows)


def krum_scores(distances, num_malicious: int):
    """Return each model's Krum score: the sum of squared distances to its K - f - 2 nearest
    others (at least 1, as Flower), K the rows of `distances`."""
    xp = get_array_module(distances)
    nearest = max(1, distances.shape[0] - num_malicious - 2)
    ordered = xp.sort(distances, axis=1)  # column 0: the model itself, at distance 0
    return ordered[:, 1:nearest + 1].sum(axis=1)


def krum(global_params, results, state, hp):
    """Krum (Blanchard et al. 2017): the one model with the lowest Krum score.

    Flower: `aggregate_krum(results, num_malicious=hp.num_malicious, to_keep=0)` (Krum's
    `num_malicious_clients`, `num_clients_to_keep = 0`)."""
    xp = get_array_module(results[0][0])
    scores = krum_scores(squared_distances(results), hp.num_malicious)
    return results[int(xp.argmin(scores))][0].copy(), state


def multikrum(global_params, results, state, hp):
    """Multi-Krum (Blanchard et al. 2017): the average, weighted by samples, of the
    num_selected models with the lowest Krum scores.

    Flower: `aggregate_krum(results, num_malicious=hp.num_malicious, to_keep=hp.num_selected)`
    (Krum's `num_clients_to_keep`); num_selected = 0 is Krum, as in Flower."""
    from .strategies import weighted_average  # strategies.py registers this module

    if hp.num_selected == 0:
        return krum(global_params, results, state, hp)
    xp = get_array_module(results[0][0])
    scores = krum_scores(squared_distances(results), hp.num_malicious)
    best = [int(i) for i in xp.argsort(scores)[:hp.num_selected]]
    return weighted_average([results[i] for i in best]), state


def bulyan(global_params, results, state, hp):
    """Bulyan (El Mhamdi et al. 2018) over Krum: pick theta = K - 2f models one by one, each
    time Krum's choice among those left; then per coordinate average the beta = theta - 2f
    values nearest the selection's median, unweighted.

    Flower: `aggregate_bulyan(results, num_malicious=hp.num_malicious,
    aggregation_rule=aggregate_krum, to_keep=0)` (Bulyan's `num_malicious_clients`, its
    `first_aggregation_rule` Krum). Needs K >= 4f + 3, as Flower. The beta nearest values come
    from a sorting network keyed on the distance (`sorting_network.nearest_values`), summed
    from the nearest out as Flower's argsort orders them. Ties in distance between different
    values order either way: the two middle ones of an even theta are summed first (exact);
    two distances rounding to the same float at the beta-th place (in float32, about one
    coordinate in a million) may keep another value than Flower's argsort, whose tie order
    NumPy leaves unspecified."""
    xp = get_array_module(results[0][0])
    f, count = hp.num_malicious, len(results)
    if count < 4 * f + 3:
        raise ValueError(f"bulyan needs at least 4 * num_malicious + 3 = {4 * f + 3} "
                         f"institutions, got {count}")
    theta, beta = count - 2 * f, count - 4 * f
    distances = squared_distances(results)
    left, chosen = list(range(count)), []
    for _ in range(theta):  # Krum on the models not yet chosen, its K shrinking with them
        scores = krum_scores(distances[left][:, left], f)
        chosen.append(left.pop(int(xp.argmin(scores))))
    picked = [results[i][0] for i in chosen]  # theta models
    median = coordinate_median(picked)
    nearest = nearest_values(picked, median, beta)  # (beta, n), from the nearest out
    if nearest is None:  # a NaN: argsort puts it last, as Flower's
        stacked = xp.stack(picked)
        order = xp.argsort(xp.abs(stacked - median), axis=0)[:beta]
        nearest = xp.take_along_axis(stacked, order, axis=0)
    return nearest.mean(axis=0), state


def qfedavg(global_params, results, state, hp):
    """q-FedAvg (Li et al. 2020, q-FFL): weigh each institution's update by its loss to the q.

    With L = 1 / server_lr and, per institution, F_k its mean local loss (+1e-10, as Flower)
    and g_k = L (w - w_k): Delta_k = F_k^q g_k, h_k = q F_k^(q-1) |g_k|^2 + L F_k^q,
    w <- w - sum_k Delta_k / sum_k h_k. q = 0 is the unweighted mean of the models.

    Flower: `aggregate_qffl(w, deltas, hs_fll)` with Delta_k and h_k computed as QFedAvg's
    `aggregate_fit` does (`q_param` = hp.q, `qffl_learning_rate` = hp.server_lr), except that F_k
    is each institution's own loss (results' 4th field), where Flower's QFedAvg uses one loss
    the server evaluates for all (the paper uses each client's)."""
    xp = get_array_module(global_params)
    q, lr = hp.q, hp.server_lr
    step, denominator = xp.zeros_like(global_params), 0.0
    for params, _, _, loss in results:
        grad = (global_params - params) / lr
        weight = float(loss) + QFFL_EPSILON
        step += weight ** q * grad
        denominator += q * weight ** (q - 1) * float((grad * grad).sum()) + weight ** q / lr
    return global_params - step / denominator, state


ROBUST = {"fedmedian": fedmedian, "fedtrimmedavg": fedtrimmedavg, "krum": krum,
          "multikrum": multikrum, "bulyan": bulyan, "qfedavg": qfedavg}

# Why secure aggregation and DP refuse them: the root sees only a sum there.
PRIVATE_REFUSAL = {
    "fedmedian": "robust rules need each institution's single update",
    "fedtrimmedavg": "robust rules need each institution's single update",
    "krum": "robust rules need each institution's single update",
    "multikrum": "robust rules need each institution's single update",
    "bulyan": "robust rules need each institution's single update",
    "qfedavg": "q-FedAvg needs each institution's own loss and update",
}


def check_institution_count(fed_cfg, senders: int) -> None:
    """Refuse, before round 1, Krum, Multi-Krum or Bulyan with `senders` institutions per round
    too few for federated.num_malicious (or num_selected); raise UserError naming the key."""
    strategy, f = fed_cfg.strategy, fed_cfg.num_malicious
    fix = "add institutions, raise federated.fraction or lower federated.num_malicious"
    if strategy in ("krum", "multikrum") and senders <= 2 * f + 2:
        raise UserError(f"federated.num_malicious: {strategy} with {f} malicious needs more than "
                        f"2 * {f} + 2 = {2 * f + 2} institutions per round, the run has "
                        f"{senders}; {fix}")
    if strategy == "multikrum" and fed_cfg.num_selected > senders - f:  # the paper's m <= n - f
        raise UserError(f"federated.num_selected: multikrum averages at most the {senders} - {f} "
                        f"= {senders - f} institutions per round that may be honest, got "
                        f"{fed_cfg.num_selected}; lower it")
    if strategy == "bulyan" and senders < 4 * f + 3:
        raise UserError(f"federated.num_malicious: bulyan with {f} malicious needs at least "
                        f"4 * {f} + 3 = {4 * f + 3} institutions per round, the run has "
                        f"{senders}; {fix}")
