"""The run configuration, as earlier releases imported it: see `mpifed.config`."""

from ..config import apply_override, describe_keys, load_config, parse_value, read_raw, resolve, to_toml

__all__ = ["apply_override", "describe_keys", "load_config", "parse_value", "read_raw",
           "resolve", "to_toml"]
