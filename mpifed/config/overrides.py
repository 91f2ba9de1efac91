"""The raw run configuration: a TOML file with `--set section.key=value` overrides applied.

Pure: no check against the sections (that is `config.resolve`) and no import of MPI, so a job
script can read what a config names before any rank starts.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import UserError


def parse_value(text: str):
    """Parse a `--set` value as TOML (1, 0.5, true, [64, 32], "s"); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(cfg: dict, assignment: str) -> None:
    """Apply one `section.key=value` (any depth: federated.dp.clip=0.5) to `cfg` in place; a
    table value (`federated.dp={clip=0.5}`) merges into the table already there."""
    target, sep, text = assignment.partition("=")
    if not sep:
        raise UserError(f"--set {assignment!r}: expected section.key=value, e.g. optim.lr=0.05")
    set_dotted(cfg, target.strip(), parse_value(text.strip()))


def read_raw(path: str, overrides=()) -> dict:
    """Return the TOML file at `path` as a dict, with `overrides` applied in order."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path!r} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path!r} is not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"config file {path!r} cannot be read ({err.strerror}); give the path "
                        "of a TOML file") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


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
