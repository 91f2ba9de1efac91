"""Loading the configuration: a TOML file, `--set` overrides, then the typed sections.

    cfg = load_config("run.toml", ["optim.lr=0.05"])   # -> Config, every key checked
    cfg.optim.lr, cfg.comm.allreduce, cfg.federated    # None for a data-parallel run

Loading never imports MPI: `mpifed config show|validate` run on a login node.
"""

from __future__ import annotations

from ..log import get_logger, world_rank_and_size
from .overrides import read_raw
from .sections import Config

log = get_logger(__name__)

# The [federated] keys that each strategy reads; any other strategy ignores them.
STRATEGY_KEYS = {
    "mu": ("fedprox",),
    "server_lr": ("fedavgm", "fedadam", "fedyogi", "fedadagrad", "fednova", "qfedavg"),
    "beta1": ("fedavgm", "fedadam", "fedyogi", "fedadagrad"),
    "beta2": ("fedadam", "fedyogi"),
    "tau": ("fedadam", "fedyogi", "fedadagrad"),
    "trim_fraction": ("fedtrimmedavg",),
    "num_malicious": ("krum", "multikrum", "bulyan"),
    "num_selected": ("multikrum",),
    "q": ("qfedavg",),
}


def load_config(path: str, overrides=()) -> Config:
    """Read the TOML file at `path`, apply `overrides` ("section.key=value"), check every key;
    return the resolved Config. Raises UserError naming the key and the fix."""
    raw = read_raw(path, overrides)
    log.debug("read %r with %d override(s)", path, len(overrides))
    return resolve_warned(raw)


def resolve_warned(raw: dict) -> Config:
    """resolve(raw), warning of what the run will ignore or leave unprotected (as a file
    loaded by load_config is warned of)."""
    cfg = resolve(raw)
    if cfg.federated is not None:
        warn(ignored_keys(raw["federated"], cfg.federated.strategy)
             + unauthenticated(cfg.federated) + unread_by_a_federation(raw))
    return cfg


# Keys a data-parallel run reads and a federation does not (it counts rounds, evaluates and
# records every round).
DATA_PARALLEL_ONLY = {"run": ("eval_every", "log_every"), "optim": ("epochs", "steps")}


def unread_by_a_federation(raw: dict) -> list[str]:
    """Return warnings for keys given in the file that a federation does not read."""
    return [f"{section}.{key} = {raw[section][key]!r} is not read by a federation (it counts "
            "federated.rounds and reports every round); remove it"
            for section, keys in DATA_PARALLEL_ONLY.items()
            for key in keys if isinstance(raw.get(section), dict) and key in raw[section]]


def resolve(raw: dict) -> Config:
    """Check the dict of sections `raw` (as TOML gives it) and return the typed Config."""
    return Config.from_table(raw)


def ignored_keys(raw_federated: dict, strategy: str) -> list[str]:
    """Return warnings for [federated] keys given in the file that `strategy` does not read."""
    return [f"federated.{key} = {raw_federated[key]!r} is ignored by strategy {strategy!r} "
            f"(it is read by {', '.join(users)})"
            for key, users in STRATEGY_KEYS.items()
            if key in raw_federated and strategy not in users]


def unauthenticated(fed) -> list[str]:
    """Return a warning when secure aggregation runs without identity keys (allowed without
    DP, where no epsilon rests on it; FederatedConfig.check refuses it with DP)."""
    if not fed.secure_aggregation or fed.keys:
        return []
    return ["federated.secure_aggregation without federated.keys is unauthenticated: the root "
            "relays the leaders' round keys unsigned, so an active root can sit in the middle "
            "of every pair and read each institution's update; set federated.keys (mpifed keys "
            "new on each institution, then mpifed keys roster)"]


def warn(messages) -> None:
    """Log each warning once (on world rank 0, where MPI runs)."""
    if messages and world_rank_and_size()[0] == 0:
        for message in messages:
            log.warning(message)
