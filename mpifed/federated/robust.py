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
from ..xp import get_array_module

QFFL_EPSILON = 1e-10  # Flower's QFedAvg adds it to each loss before raising it to q


def _stacked(results):
    """Return the institutions' models as one (K, n) array."""
    xp = get_array_module(results[0][0])
    return xp.stack([r[0] for r in results])


def fedmedian(global_params, results, state, hp):
    """FedMedian (Yin et al. 2018): the coordinate-wise median of the models, unweighted.

    Flower: `aggregate_median(results)`."""
    return coordinate_median(_stacked(results)), state


def coordinate_median(stacked):
    """Return the median over axis 0 of (K, n), as xp.median: a partial sort (partition) of
    the middle one or two rows, a third of a full median's time at K = 11; a model with a NaN
    goes through xp.median, which propagates it as Flower's does."""
    xp = get_array_module(stacked)
    count = stacked.shape[0]
    if bool(xp.isnan(stacked).any()):
        return xp.median(stacked, axis=0)
    middle = count // 2
    if count % 2:
        return xp.partition(stacked, middle, axis=0)[middle]
    part = xp.partition(stacked, (middle - 1, middle), axis=0)
    return (part[middle - 1] + part[middle]) / 2


def fedtrimmedavg(global_params, results, state, hp):
    """FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the int(trim_fraction * K) lowest
    and highest values and average the rest, unweighted.

    Flower: `aggregate_trimmed_avg(results, proportiontocut=hp.trim_fraction)` (FedTrimmedAvg's
    `beta`)."""
    if not 0.0 <= hp.trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {hp.trim_fraction}")
    xp = get_array_module(results[0][0])
    cut = int(hp.trim_fraction * len(results))
    ordered = xp.sort(_stacked(results), axis=0)  # (K, n)
    return ordered[cut:len(results) - cut].mean(axis=0), state


def squared_distances(results):
    """Return the (K, K) matrix of squared Euclidean distances between the models."""
    xp = get_array_module(results[0][0])
    stacked = _stacked(results)  # (K, n)
    distances = xp.zeros((len(results), len(results)), dtype=stacked.dtype)
    for i in range(len(results) - 1):  # the upper triangle, one row at a time: K x n memory
        diff = stacked[i + 1:] - stacked[i]  # (K - i - 1, n)
        row = xp.einsum("ij,ij->i", diff, diff)  # no (K, n) temporary of squares
        distances[i, i + 1:] = row
        distances[i + 1:, i] = row
    return distances


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
    `first_aggregation_rule` Krum). Needs K >= 4f + 3, as Flower."""
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
    picked = _stacked([results[i] for i in chosen])  # (theta, n)
    median = coordinate_median(picked)
    nearest = xp.argsort(xp.abs(picked - median), axis=0)[:beta]  # (beta, n)
    return xp.take_along_axis(picked, nearest, axis=0).mean(axis=0), state


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
