"""How a configuration key is declared: its type, default, accepted values and one line of help.

A section is a frozen dataclass whose fields are made with `setting(...)`; everything a user can
read about a key (the checks, `mpifed train --help`, the reference page, the JSON Schema) is
derived from that one declaration. Checks raise UserError naming the key (`optim.lr: ...`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, ClassVar

from ..errors import UserError


def setting(default: Any = None, doc: str = "", *, choices: tuple | None = None,
            words: tuple | None = None, low=None, high=None, low_in: bool = True,
            high_in: bool = True, required: bool = False, other: str = ""):
    """Declare one key: `default` (None: unset), `doc` (one line), accepted `choices`, or `words`
    that a free value may also take (run.resume: "auto", "never" or a path), and a numeric range
    [low, high] whose ends are included as `low_in`/`high_in` say; `other`: what else a free
    value may be, in words ("a checkpoint path")."""
    meta = {"doc": doc, "choices": choices, "words": words, "required": required, "other": other,
            "range": (low, high, low_in, high_in) if low is not None or high is not None else None}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Section:
    """A typed, immutable section of the configuration. Constructing one checks every key.

    SECTION is the dotted name users write (`optim`, `federated.dp`); each subclass may add a
    `check()` for rules that tie several of its keys together.
    """

    SECTION: ClassVar[str] = ""
    OTHERWISE: ClassVar[str] = ""  # what to write instead of a table, if anything

    def __post_init__(self):
        for f in dataclasses.fields(self):
            name = f"{self.SECTION}.{f.name}"
            value = getattr(self, f.name)
            if isinstance(value, Section):
                continue
            if value is None or (value == "" and f.metadata.get("required")):
                if f.metadata.get("required"):
                    raise UserError(f"{name}: required; {f.metadata['doc']}")
                continue
            value = coerce(name, value, f.type)
            object.__setattr__(self, f.name, value)
            check_choice(name, value, f.metadata.get("choices"))
            bounds = f.metadata.get("range")
            for item in (value if isinstance(value, tuple) else (value,)) if bounds else ():
                check_number(name, item, *bounds)
        self.check()

    def check(self) -> None:
        """Refuse combinations of this section's keys that cannot mean anything."""

    @classmethod
    def declared(cls) -> dict[str, dataclasses.Field]:
        """Return {key: its dataclass field}, in declaration order."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_table(cls, table) -> Section:
        """Build the section from a TOML table, refusing unknown keys (with a near miss named)."""
        if not isinstance(table, dict):
            raise UserError(f"{cls.SECTION}: expected a table, got {type(table).__name__} "
                            f"{table!r}; write its keys under [{cls.SECTION}]{cls.OTHERWISE}")
        known = cls.declared()
        for key in table:
            if key not in known:
                raise UserError(f"{cls.SECTION}.{key}: unknown key{did_you_mean(key, known)}; "
                                f"known keys of [{cls.SECTION}]: {', '.join(known)}")
        values = {}
        for key, value in table.items():
            nested = section_type(known[key].type)
            values[key] = nested.from_table(value) if nested and value is not None else value
        return cls(**values)

    def to_dict(self) -> dict:
        """Return the section as plain data (lists, dicts, None for unset), JSON and TOML ready."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def did_you_mean(key: str, known) -> str:
    """Return ' (did you mean "x"?)' when `key` is a near miss of one known key, else ''."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def plain(value):
    """Return `value` as plain data: a Section as a dict, tuples as lists."""
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def section_type(annotation):
    """Return the Section class inside `annotation` (DPConfig | None), or None."""
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, Section):
            return arg
    return None


def type_name(annotation) -> str:
    """Return a short name for a key's type: int, float, str, bool, list of int, int|str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in args)
    if typing.get_origin(annotation) is tuple:
        inner = args[0].__name__ if args else "any"
        return f"list of {'table' if inner == 'dict' else inner}"
    return "table" if annotation is dict else annotation.__name__


def coerce(name: str, value, annotation):
    """Check `value` against `annotation`; return it as stored (an int as a float for a float
    key, a list as a tuple). Raise UserError naming the key and the expected type."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(options) == 1:
        return coerce(name, value, options[0])  # X | None: None was handled by the caller
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for option in options:
            try:
                return coerce(name, value, option)
            except UserError:
                continue
        raise _wrong_type(name, value, annotation)
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(name, value, annotation)
        item = options[0]
        return tuple(coerce(f"{name}[{i}]", v, item) if item is not dict
                     else _table(f"{name}[{i}]", v) for i, v in enumerate(value))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (str, bool) and type(value) is annotation:
        return value
    raise _wrong_type(name, value, annotation)


def _table(name: str, value):
    if not isinstance(value, dict):
        raise UserError(f"{name}: expected a table with a type, e.g. {{type = \"relu\"}}, got "
                        f"{type(value).__name__} {value!r}")
    return dict(value)


def _wrong_type(name: str, value, annotation) -> UserError:
    wanted = type_name(annotation).replace("|", " or ")
    return UserError(f"{name}: expected {wanted}, got {type(value).__name__} {value!r}")


def check_choice(name: str, value, choices) -> None:
    """Raise UserError unless `value` is one of `choices` (no check when choices is None)."""
    if choices is not None and value not in choices:
        raise UserError(f"{name}: {value!r} is not one of {tuple(choices)}"
                        f"{did_you_mean(str(value), [str(c) for c in choices])}")


def check_number(name: str, value, low=None, high=None, low_in=True, high_in=True) -> None:
    """Raise UserError unless `value` is a finite number within [low, high] (ends as flagged)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # a word such as "proportional", checked by its section
    if not math.isfinite(value):
        raise UserError(f"{name}: must be a finite number, got {value!r}")
    too_low = low is not None and (value < low if low_in else value <= low)
    too_high = high is not None and (value > high if high_in else value >= high)
    if too_low or too_high:
        raise UserError(f"{name}: must be {describe_range(low, high, low_in, high_in)}, "
                        f"got {value!r}")


def describe_range(low, high, low_in=True, high_in=True) -> str:
    """Return a range in words: '>= 0', '> 0', 'in [0, 1)'."""
    if high is None:
        return f">= {low}" if low_in else f"> {low}"
    if low is None:
        return f"<= {high}" if high_in else f"< {high}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
