"""The run configuration: typed sections, loading, and what users read about it.

    from mpifed.config import load_config
    cfg = load_config("run.toml", ["optim.lr=0.05"])
    cfg.optim.lr                                       # 0.05

Names are imported when first used (PEP 562), so `mpifed.config.overrides` stays as light as
the job scripts need it (`python -m mpifed.cli.run_out` reads run.out before the venv's
packages are on hand).
"""

import importlib

_WHERE = {
    "load_config": "load", "resolve": "load", "resolve_warned": "load",
    "apply_override": "overrides", "parse_value": "overrides", "read_raw": "overrides",
    "describe_keys": "render", "to_toml": "render",
    "ALL_SECTIONS": "sections", "SECTIONS": "sections", "CommConfig": "sections",
    "Config": "sections", "DataConfig": "sections", "DPConfig": "sections",
    "FederatedConfig": "sections", "ModelConfig": "sections", "OptimConfig": "sections",
    "RunConfig": "sections",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mpifed.config' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
