"""The run configuration: typed sections, loading, and what users read about it.

    from mpifed.config import load_config
    cfg = load_config("run.toml", ["optim.lr=0.05"])
    cfg.optim.lr                                       # 0.05
"""

from .load import load_config, resolve
from .overrides import apply_override, parse_value, read_raw
from .render import describe_keys, to_toml
from .sections import (
    ALL_SECTIONS,
    SECTIONS,
    CommConfig,
    Config,
    DataConfig,
    DPConfig,
    FederatedConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)

__all__ = [
    "ALL_SECTIONS", "SECTIONS", "CommConfig", "Config", "DataConfig", "DPConfig",
    "FederatedConfig", "ModelConfig", "OptimConfig", "RunConfig", "apply_override",
    "describe_keys", "load_config", "parse_value", "read_raw", "resolve", "to_toml",
]
