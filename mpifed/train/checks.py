"""Config checks that config.py calls: every float finite and in range, keys that the chosen
strategy ignores, `--set` at any depth, and settings that cannot mean anything.

Pure functions on dicts; each raises UserError naming the key and the fix, or returns warnings.
"""

from __future__ import annotations

import math

from ..errors import UserError

# (section path, key) -> (low, high, low included, high included); None: unbounded on that side.
RANGES = {
    ("optim", "lr"): (0, None, False, False),
    ("comm", "stall_timeout"): (0, None, True, False),
    ("optim", "momentum"): (0, 1, True, False),
    ("optim", "weight_decay"): (0, None, True, False),
    ("optim", "gamma"): (0, None, False, False),
    ("optim", "beta1"): (0, 1, True, False),
    ("optim", "beta2"): (0, 1, True, False),
    ("optim", "eps"): (0, None, False, False),
    ("federated", "mu"): (0, None, True, False),
    ("federated", "server_lr"): (0, None, False, False),
    ("federated", "beta1"): (0, 1, True, False),
    ("federated", "beta2"): (0, 1, True, False),
    ("federated", "tau"): (0, None, False, False),
    ("federated", "fraction"): (0, 1, False, True),
    ("federated", "secure_range"): (0, None, False, False),
    ("federated.dp", "clip"): (0, None, False, False),
    ("federated.dp", "noise_multiplier"): (0, None, True, False),
    ("federated.dp", "delta"): (0, 1, False, False),
    ("federated.dp", "target_quantile"): (0, 1, False, False),
    ("federated.dp", "clip_lr"): (0, None, True, False),
    ("federated.dp", "clip_count_stddev"): (0, None, True, False),
    ("federated.dp", "max_epsilon"): (0, None, True, False),
}

# The [federated] keys that each strategy reads; any other strategy ignores them.
STRATEGY_KEYS = {
    "mu": ("fedprox",),
    "server_lr": ("fedavgm", "fedadam", "fedyogi", "fedadagrad", "fednova"),
    "beta1": ("fedavgm", "fedadam", "fedyogi", "fedadagrad"),
    "beta2": ("fedadam", "fedyogi"),
    "tau": ("fedadam", "fedyogi", "fedadagrad"),
}


def check_number(name: str, value, low=None, high=None, low_in=True, high_in=True) -> None:
    """Raise UserError unless `value` is a finite number within [low, high] (ends as flagged)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UserError(f"{name}: must be a finite number, got {value!r}")
    too_low = low is not None and (value < low if low_in else value <= low)
    too_high = high is not None and (value > high if high_in else value >= high)
    if too_low or too_high:
        left = "[" if low_in else "("
        right = "]" if high_in else ")"
        span = (f"> {low}" if not low_in else f">= {low}") if high is None else \
            f"in {left}{low}, {high}{right}"
        raise UserError(f"{name}: must be {span}, got {value!r}")


def check_ranges(cfg: dict) -> None:
    """Check every float key of RANGES in a resolved config (sections that are present)."""
    for (path, key), bounds in RANGES.items():
        table = cfg
        for part in path.split("."):
            table = table.get(part) if isinstance(table, dict) else None
        if isinstance(table, dict) and key in table:
            check_number(f"{path}.{key}", table[key], *bounds)


def ignored_keys(raw_federated: dict, strategy: str) -> list[str]:
    """Return warnings for [federated] keys given in the file that `strategy` does not read."""
    return [f"federated.{key} = {raw_federated[key]!r} is ignored by strategy {strategy!r} "
            f"(it is read by {', '.join(users)})"
            for key, users in STRATEGY_KEYS.items()
            if key in raw_federated and strategy not in users]


def check_meaning(cfg: dict) -> None:
    """Refuse settings of the right type and range that still cannot mean anything."""
    run, data = cfg["run"], cfg["data"]
    if run["eval_every"] and not data["test"]:
        raise UserError(f"run.eval_every = {run['eval_every']} needs a test set; set data.test "
                        "or remove run.eval_every")
    if run["seed"] < 0:
        raise UserError(f"run.seed: must be >= 0, got {run['seed']}")
    dp = (cfg.get("federated") or {}).get("dp")
    if dp and dp["noise_multiplier"] == 0 and dp["max_epsilon"]:
        raise UserError("federated.dp.max_epsilon: with noise_multiplier = 0 every round costs "
                        "infinite epsilon, so no round could run; set noise_multiplier > 0 "
                        "or remove max_epsilon")


def set_dotted(cfg: dict, path: str, value) -> None:
    """Set `value` at the dotted `path` of `cfg` (any depth); a table merges into a table."""
    parts = [p.strip() for p in path.split(".")]
    if len(parts) < 2 or not all(parts):
        raise UserError(f"--set {path!r}: expected section.key=value, e.g. optim.lr=0.05 or "
                        "federated.dp.clip=0.5")
    table = cfg
    for depth, part in enumerate(parts[:-1]):
        inner = table.setdefault(part, {})
        if not isinstance(inner, dict):
            raise UserError(f"--set {path}: {'.'.join(parts[:depth + 1])} is a value, not a "
                            "table")
        table = inner
    key = parts[-1]
    if isinstance(value, dict) and isinstance(table.get(key), dict):
        merge(table[key], value)
    else:
        table[key] = value


def merge(into: dict, given: dict) -> None:
    """Merge the nested dict `given` into `into`, key by key."""
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def warn(messages) -> None:
    """Print each warning once (on world rank 0) to stderr."""
    import sys

    mpi = sys.modules.get("mpi4py.MPI")
    rank = mpi.COMM_WORLD.rank if mpi is not None and mpi.Is_initialized() else 0
    if messages and rank == 0:
        for message in messages:
            print(f"mpifed: warning: {message}", file=sys.stderr, flush=True)
