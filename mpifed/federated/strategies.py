"""Aggregation strategies: pure functions over the institutions' results, testable without MPI.

Every strategy has the signature

    strategy(global_params, results, state, hp) -> (new_params, new_state)

global_params: flat array, the model the round started from; results: list of
(params, n_samples, n_steps, loss), one per participating institution (loss: its mean local
training loss over the round, read by q-FedAvg only; the other strategies also take the first
three alone); state: the server's state from the previous round (a dict, {} at first); hp:
ServerHyper. Inputs are never modified.

The robust and fair rules (FedMedian, FedTrimmedAvg, Krum, Multi-Krum, Bulyan, q-FedAvg) live in
`robust.py`, each equal to Flower's, and are registered in STRATEGIES below.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..xp import get_array_module


@dataclass(frozen=True)
class ServerHyper:
    """Server hyperparameters (Reddi et al. 2021 names): step size, moment decays, adaptivity.
    No defaults here: a run builds it from [federated] (mpifed/config/sections.py), the one
    place they are written."""

    server_lr: float
    beta1: float
    beta2: float
    tau: float
    # The robust rules' (robust.py). Defaults only so that the FedOpt family, which ignores
    # them, can be built from its four: they are the neutral values (nothing trimmed, no
    # malicious institution assumed, q = 0), and a run sets all of them from [federated].
    trim_fraction: float = 0.0
    num_malicious: int = 0
    num_selected: int = 0
    q: float = 0.0


def sample_weights(results) -> list[float]:
    """Return p_k = n_k / sum(n): each institution's share of the samples."""
    total = float(sum(r[1] for r in results))
    if total <= 0:
        raise ValueError("aggregation needs at least one sample among the institutions")
    return [r[1] / total for r in results]


def weighted_average(results):
    """Return sum_k (n_k / n) params_k (FedAvg's average)."""
    weights = sample_weights(results)
    xp = get_array_module(results[0][0])
    out = xp.zeros_like(results[0][0])
    for result, weight in zip(results, weights):
        out += weight * result[0]
    return out


def mean_delta(global_params, results):
    """Return the weighted mean update sum_k p_k (params_k - global): the pseudo-gradient's negative."""
    return weighted_average(results) - global_params


def fedavg(global_params, results, state, hp):
    """FedAvg (McMahan et al. 2017): w <- sum_k (n_k / n) w_k."""
    return weighted_average(results), state


def fedprox(global_params, results, state, hp):
    """FedProx (Li et al. 2020): FedAvg's average; the proximal term lives in the local step."""
    return weighted_average(results), state


def fedavgm(global_params, results, state, hp):
    """FedAvgM (Hsu et al. 2019): server momentum m <- beta1 m + delta; w <- w + server_lr m."""
    delta = mean_delta(global_params, results)
    m = delta if "m" not in state else hp.beta1 * state["m"] + delta
    return global_params + hp.server_lr * m, {"m": m}


def _server_adaptive(global_params, results, state, hp, second_moment):
    """Shared FedOpt step: m <- b1 m + (1 - b1) delta; v by `second_moment`; w += lr m/(sqrt v + tau)."""
    xp = get_array_module(global_params)
    delta = mean_delta(global_params, results)
    m = (1 - hp.beta1) * delta if "m" not in state else hp.beta1 * state["m"] + (1 - hp.beta1) * delta
    v_prev = state.get("v")
    if v_prev is None:
        v_prev = xp.full_like(global_params, hp.tau ** 2)  # v_{-1} = tau^2 (Reddi et al., Alg. 2)
    v = second_moment(v_prev, delta * delta, hp)
    return global_params + hp.server_lr * m / (xp.sqrt(v) + hp.tau), {"m": m, "v": v}


def fedadagrad(global_params, results, state, hp):
    """FedAdagrad (Reddi et al. 2021): v <- v + delta^2."""
    return _server_adaptive(global_params, results, state, hp, lambda v, d2, hp: v + d2)


def fedadam(global_params, results, state, hp):
    """FedAdam (Reddi et al. 2021): v <- b2 v + (1 - b2) delta^2 (no bias correction, as the paper)."""
    return _server_adaptive(global_params, results, state, hp,
                            lambda v, d2, hp: hp.beta2 * v + (1 - hp.beta2) * d2)


def fedyogi(global_params, results, state, hp):
    """FedYogi (Reddi et al. 2021): v <- v - (1 - b2) delta^2 sign(v - delta^2)."""
    def yogi(v, d2, hp):
        xp = get_array_module(v)
        return v - (1 - hp.beta2) * d2 * xp.sign(v - d2)
    return _server_adaptive(global_params, results, state, hp, yogi)


def fednova(global_params, results, state, hp):
    """FedNova (Wang et al. 2020): normalise each update by its local step count.

    With s_k institution k's local steps (the paper's tau_k; unrelated to FedOpt's `tau`):
    d_k = (w - w_k) / s_k; s_eff = sum_k p_k s_k; w <- w - server_lr s_eff sum_k p_k d_k.
    With equal step counts it is FedAvg; with unequal ones it removes FedAvg's bias toward
    institutions that took more steps.
    """
    weights = sample_weights(results)
    steps_eff = sum(p * r[2] for p, r in zip(weights, results))
    direction = sum(p * (global_params - r[0]) / r[2] for p, r in zip(weights, results))
    return global_params - hp.server_lr * steps_eff * direction, state


STRATEGIES = {
    "fedavg": fedavg, "fedprox": fedprox, "fedavgm": fedavgm, "fedadam": fedadam,
    "fedyogi": fedyogi, "fedadagrad": fedadagrad, "fednova": fednova,
}

from .robust import ROBUST  # noqa: E402  (robust.py reads weighted_average, defined above)

STRATEGIES.update(ROBUST)

# Server step sizes when federated.server_lr is not set: 1 keeps FedAvg's plain average; the
# adaptive servers take 0.1, Flower's default eta for FedAdam and FedAdagrad (Flower's FedYogi
# defaults to 0.01). docs/federations.md says how our FedOpt servers differ from Flower's.
# q-FedAvg's server_lr is Flower's `qffl_learning_rate` (1/L, the paper's local step size): unset
# it is 1, where Flower's default is 0.1 (docs/federations.md says so).
DEFAULT_SERVER_LR = {"fedadam": 0.1, "fedyogi": 0.1, "fedadagrad": 0.1}
