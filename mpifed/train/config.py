"""The run configuration: a TOML file, overridden by `--set section.key=value`, checked in full.

Unknown keys, wrong types and impossible values are UserErrors that name the key. Each list of
accepted values comes from the module that implements the choice, so checking and `--help` cannot
drift from what the code does.
"""

from __future__ import annotations

import copy
import math

import tomli_w

from ..comm.collectives import ALGORITHMS
from ..errors import UserError
from ..federated.dp import ACCOUNTANTS
from ..federated.secagg import OUT_OF_RANGE_MODES, SINT
from ..federated.strategies import STRATEGIES
from ..nn.models import DTYPES
from ..nn.spec import KINDS, MODEL_SCHEMA, check_model_config
from ..optim.optimizers import OPTIMIZERS
from ..optim.schedules import SCHEDULES
from ..xp import BACKENDS
from . import checks
from .checkpoint import RESUME_MODES
from .overrides import apply_override, parse_value, read_raw  # noqa: F401 (public here too)
from .report import PROGRESS_MODES
from .sharded_step import STAGES

# section -> key -> (accepted types, default). A default of None means "required" or "unset".
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], object]]] = {
    "data": {
        "train": ((str,), None), "test": ((str,), ""), "x": ((str,), "x"), "y": ((str,), "y"),
        "shuffle": ((bool,), True), "shuffle_block": ((int,), 0), "shuffle_buffer": ((int,), 0),
    },
    "model": MODEL_SCHEMA,
    "optim": {
        "name": ((str,), "sgd"), "lr": ((float, int), 0.1), "momentum": ((float, int), 0.0),
        "nesterov": ((bool,), False), "weight_decay": ((float, int), 0.0),
        "batch_size": ((int,), 32), "epochs": ((int,), None), "steps": ((int,), None),
        "schedule": ((str,), "constant"), "warmup": ((int,), 0), "step_size": ((int,), 1000),
        "gamma": ((float, int), 0.1), "beta1": ((float, int), 0.9),
        "beta2": ((float, int), 0.999), "eps": ((float, int), 1e-8),
    },
    "comm": {"allreduce": ((str,), "auto"), "backend": ((str,), "auto"),
             "overlap": ((bool,), False), "stall_timeout": ((float, int), 600),
             "shard": ((str,), "none")},
    "run": {
        "seed": ((int,), 0), "out": ((str,), "runs/latest"), "log_every": ((int,), 10),
        "eval_every": ((int,), 0), "progress": ((str,), "auto"),
        "checkpoint_every": ((int,), 0), "resume": ((str,), "auto"),
        "keep_checkpoints": ((int,), 3), "timeline": ((bool,), False),
    },
}

# The optional [federated] section: present, it turns the run into a federation.
FEDERATED = {
    "institutions": ((int,), None), "institution_sizes": ((list,), None),
    "rounds": ((int,), 10), "local_steps": ((int, str), None), "local_epochs": ((int,), None),
    "strategy": ((str,), "fedavg"), "mu": ((float, int), 0.01), "server_lr": ((float, int), None),
    "beta1": ((float, int), 0.9), "beta2": ((float, int), 0.99), "tau": ((float, int), 1e-3),
    "fraction": ((float, int), 1.0), "evaluate_local": ((bool,), False),
    "secure_aggregation": ((bool,), False), "secure_bits": ((int,), 64),
    "secure_range": ((float, int), 1.0), "secure_max_samples": ((int,), 2 ** 31),
    "secure_out_of_range": ((str,), "error"), "min_participants": ((int,), 3),
    "keys": ((str,), ""), "dp": ((dict,), None),
}

# The optional [federated.dp] table: institution-level DP-FedAvg.
DP = {
    "clip": ((float, int), 1.0), "noise_multiplier": ((float, int), 1.0),
    "delta": ((float, int), 1e-5), "adaptive": ((bool,), False),
    "target_quantile": ((float, int), 0.5), "clip_lr": ((float, int), 0.2),
    "clip_count_stddev": ((float, int), None), "max_epsilon": ((float, int), 0.0),
    "colluders": ((int,), 0), "accountant": ((str,), "rdp"),
}
STRATEGY_NAMES = tuple(STRATEGIES)

# (section, key) -> the accepted values, each tuple owned by the module that implements them.
CHOICES = {
    ("model", "kind"): KINDS, ("model", "dtype"): DTYPES,
    ("optim", "name"): OPTIMIZERS, ("optim", "schedule"): SCHEDULES,
    ("comm", "allreduce"): ALGORITHMS, ("comm", "backend"): BACKENDS, ("comm", "shard"): STAGES,
    ("run", "progress"): PROGRESS_MODES,
    ("federated", "strategy"): STRATEGY_NAMES,
    ("federated", "secure_bits"): tuple(SINT),
    ("federated", "secure_out_of_range"): OUT_OF_RANGE_MODES,
    ("federated.dp", "accountant"): ACCOUNTANTS,
}
# Keys that take one of a few words or a free value (shown in --help, checked in _check_values).
OPEN_CHOICES = {("run", "resume"): (*RESUME_MODES, "PATH")}


def load_config(path: str, overrides=()) -> dict:
    """Read the TOML file at `path`, apply overrides, check it; return the resolved config."""
    raw = read_raw(path, overrides)
    cfg = resolve(raw)
    if cfg["federated"]:
        checks.warn(checks.ignored_keys(raw["federated"], cfg["federated"]["strategy"]))
    return cfg


def resolve(raw: dict) -> dict:
    """Check every section and key of `raw`, fill defaults; return a new config dict."""
    cfg = {}
    for section in raw:
        if section not in SCHEMA and section != "federated":
            raise UserError(f"[{section}]: unknown section; known: "
                            f"{', '.join([*SCHEMA, 'federated'])}")
    schema = dict(SCHEMA, federated=FEDERATED) if "federated" in raw else SCHEMA
    for section, keys in schema.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise UserError(f"{section}: must be a table ([{section}]), got {given!r}")
        for key in given:
            if key not in keys:
                raise UserError(f"{section}.{key}: unknown key; known keys of [{section}]: "
                                f"{', '.join(keys)}")
        cfg[section] = {}
        for key, (types, default) in keys.items():
            value = copy.deepcopy(given.get(key, default))
            if value is not None:
                _check_type(f"{section}.{key}", value, types)
                choices = CHOICES.get((section, key))
                if choices and value not in choices:
                    raise UserError(f"{section}.{key}: {value!r} is not one of {choices}")
            cfg[section][key] = value
    _check_values(cfg)
    cfg["federated"] = _check_federated(cfg["federated"]) if "federated" in cfg else None
    checks.check_ranges(cfg)
    checks.check_meaning(cfg)
    return cfg


def _check_federated(fed: dict) -> dict:
    """Check the [federated] values that do not need the rank count (that comes at run time)."""
    if (fed["institutions"] is None) == (fed["institution_sizes"] is None):
        raise UserError("federated: set exactly one of federated.institutions (K equal groups) "
                        "and federated.institution_sizes (e.g. [2, 1, 3])")
    if fed["institutions"] is not None and fed["institutions"] < 1:
        raise UserError(f"federated.institutions: must be >= 1, got {fed['institutions']}")
    sizes = fed["institution_sizes"]
    if sizes is not None and (not sizes or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes)):
        raise UserError(f"federated.institution_sizes: expected a list of positive integers, "
                        f"got {sizes!r}")
    if fed["local_steps"] is not None and fed["local_epochs"] is not None:
        raise UserError("federated.local_steps and federated.local_epochs are both set; "
                        "set only one of them")
    steps = fed["local_steps"]
    if isinstance(steps, str) and steps != "proportional":
        raise UserError(f"federated.local_steps: expected a positive integer or "
                        f"\"proportional\", got {steps!r}")
    if isinstance(steps, int) and steps < 1:
        raise UserError(f"federated.local_steps: must be >= 1, got {steps}")
    if fed["local_epochs"] is not None and fed["local_epochs"] < 1:
        raise UserError(f"federated.local_epochs: must be >= 1, got {fed['local_epochs']}")
    if steps is None and fed["local_epochs"] is None:
        fed["local_steps"] = 1
    if fed["rounds"] < 1:
        raise UserError(f"federated.rounds: must be >= 1, got {fed['rounds']}")
    if not 0 < fed["fraction"] <= 1:
        raise UserError(f"federated.fraction: must be in (0, 1], got {fed['fraction']}")
    for key in ("mu", "tau"):
        if fed[key] < 0:
            raise UserError(f"federated.{key}: must be >= 0, got {fed[key]}")
    for key in ("beta1", "beta2"):
        if not 0 <= fed[key] < 1:
            raise UserError(f"federated.{key}: must be in [0, 1), got {fed[key]}")
    if fed["server_lr"] is not None and fed["server_lr"] <= 0:
        raise UserError(f"federated.server_lr: must be > 0, got {fed['server_lr']}")
    if fed["min_participants"] < 1:
        raise UserError(f"federated.min_participants: must be >= 1, got "
                        f"{fed['min_participants']}")
    if fed["keys"] and not fed["secure_aggregation"]:
        raise UserError("federated.keys: authenticated keys serve secure aggregation; set "
                        "federated.secure_aggregation = true or remove federated.keys")
    if fed["secure_range"] <= 0 or fed["secure_max_samples"] < 1:
        raise UserError("federated.secure_range and federated.secure_max_samples must be > 0")
    if fed["dp"] is not None:
        fed["dp"] = _check_dp(fed["dp"])
    private = fed["secure_aggregation"] or fed["dp"] is not None
    if private and fed["strategy"] == "fednova":
        raise UserError("federated.strategy: fednova needs every institution's own step count, "
                        "which secure aggregation and DP keep from the root; use another strategy")
    return fed


def _check_dp(given: dict) -> dict:
    """Check the [federated.dp] table; return it with defaults filled in."""
    for key in given:
        if key not in DP:
            raise UserError(f"federated.dp.{key}: unknown key; known keys of [federated.dp]: "
                            f"{', '.join(DP)}")
    dp = {}
    for key, (types, default) in DP.items():
        value = given.get(key, default)
        if value is not None:
            _check_type(f"federated.dp.{key}", value, types)
        dp[key] = value
    if dp["clip"] <= 0:
        raise UserError(f"federated.dp.clip: must be > 0, got {dp['clip']}")
    if dp["noise_multiplier"] < 0:
        raise UserError(f"federated.dp.noise_multiplier: must be >= 0, got {dp['noise_multiplier']}")
    if not 0 < dp["delta"] < 1:
        raise UserError(f"federated.dp.delta: must be in (0, 1), got {dp['delta']}")
    if not 0 < dp["target_quantile"] < 1:
        raise UserError(f"federated.dp.target_quantile: must be in (0, 1), "
                        f"got {dp['target_quantile']}")
    for key in ("clip_lr", "max_epsilon", "colluders"):
        if dp[key] < 0:
            raise UserError(f"federated.dp.{key}: must be >= 0, got {dp[key]}")
    if dp["accountant"] not in ACCOUNTANTS:
        raise UserError(f"federated.dp.accountant: {dp['accountant']!r} is not one of "
                        f"{ACCOUNTANTS}")
    return dp


def _check_type(name: str, value, types) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        wanted = " or ".join(t.__name__ for t in types)
        raise UserError(f"{name}: expected {wanted}, got {type(value).__name__} {value!r}")


def _check_values(cfg: dict) -> None:
    """Check values that are of the right type but impossible."""
    if not cfg["data"]["train"]:
        raise UserError("data.train: required; set it to an HDF5 file with datasets x and y")
    check_model_config(cfg["model"])
    for key in ("shuffle_block", "shuffle_buffer"):  # 0: the default (mpifed/data/blocks.py)
        if cfg["data"][key] < 0:
            raise UserError(f"data.{key}: must be >= 0 (0 picks the default), got "
                            f"{cfg['data'][key]}")
    optim = cfg["optim"]
    if not (optim["lr"] > 0 and math.isfinite(optim["lr"])):
        raise UserError(f"optim.lr: must be a positive number, got {optim['lr']!r}")
    if optim["batch_size"] < 1:
        raise UserError(f"optim.batch_size: must be >= 1 (rows per rank), got {optim['batch_size']}")
    if optim["epochs"] is not None and optim["steps"] is not None:
        raise UserError("optim.epochs and optim.steps are both set; set only one of them")
    if optim["epochs"] is None and optim["steps"] is None:
        optim["epochs"] = 1
    for key in ("epochs", "steps"):
        if optim[key] is not None and optim[key] < 1:
            raise UserError(f"optim.{key}: must be >= 1, got {optim[key]}")
    for key in ("momentum", "weight_decay", "warmup"):
        if optim[key] < 0:
            raise UserError(f"optim.{key}: must be >= 0, got {optim[key]}")
    if optim["momentum"] >= 1:
        raise UserError(f"optim.momentum: must be < 1, got {optim['momentum']}")
    if optim["nesterov"] and not optim["momentum"]:
        raise UserError("optim.nesterov: needs optim.momentum > 0")
    if optim["step_size"] < 1:
        raise UserError(f"optim.step_size: must be >= 1, got {optim['step_size']}")
    for key in ("beta1", "beta2"):
        if not 0 <= optim[key] < 1:
            raise UserError(f"optim.{key}: must be in [0, 1), got {optim[key]}")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if cfg["run"][key] < 0:
            raise UserError(f"run.{key}: must be >= 0, got {cfg['run'][key]}")
    if cfg["run"]["keep_checkpoints"] < 1:
        raise UserError(f"run.keep_checkpoints: must be >= 1, got {cfg['run']['keep_checkpoints']}")
    if not cfg["run"]["resume"]:
        raise UserError("run.resume: expected " + ", ".join(f'"{m}"' for m in RESUME_MODES)
                        + " or the path of a checkpoint file")


def to_toml(cfg: dict) -> str:
    """Return `cfg` as TOML text that `load_config` reads back to the same config.

    Unset (None) values and an absent [federated] section are left out: a reader fills them
    with the same defaults. Nested tables such as [federated.dp] stay tables.
    """
    return tomli_w.dumps(_without_none(cfg))


def _without_none(table: dict) -> dict:
    """Return `table` without None values, recursively (TOML has no null)."""
    return {k: _without_none(v) if isinstance(v, dict) else v
            for k, v in table.items() if v is not None}


def describe_keys() -> str:
    """Return every config section and key with its type and default, for `mpifed train --help`."""
    lines = []
    for section, keys in dict(SCHEMA, federated=FEDERATED, **{"federated.dp": DP}).items():
        lines.append(f"[{section}]")
        for key, (types, default) in keys.items():
            if dict in types:
                continue  # a nested table, listed as its own section
            kind = "|".join(t.__name__ for t in types)
            choices = CHOICES.get((section, key)) or OPEN_CHOICES.get((section, key))
            shown = "/".join(map(str, choices)) if choices else kind
            value = "required" if (section, key) == ("data", "train") else (
                "unset" if default is None else repr(default))
            lines.append(f"  {key:<18} {shown:<44} {value}")
    return "\n".join(lines)
