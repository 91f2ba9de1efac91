"""The raw run configuration: a TOML file with `--set section.key=value` overrides applied.

Pure: no check against the schema (that is `config.resolve`) and no import of MPI, so a job
script can read what a config names before any rank starts.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import UserError
from .checks import set_dotted


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
