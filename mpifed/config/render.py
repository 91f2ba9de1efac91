"""What users read about the configuration, derived from the sections' declarations:
`mpifed train --help`'s key list, the reference page, the JSON Schema, and resolved TOML.
"""

from __future__ import annotations

import dataclasses
import json

import tomli_w

from .fields import Section, describe_range, plain, section_type, type_name
from .sections import ALL_SECTIONS, Config

SCHEMA_ID = "https://mpifed.example/config.schema.json"


def accepted(f: dataclasses.Field) -> str:
    """Return what a key accepts in words: its choices, its words, or its range."""
    meta = f.metadata
    if meta.get("choices"):
        return " | ".join(map(str, meta["choices"]))
    parts = [describe_range(*meta["range"])] if meta.get("range") else []
    if parts and type_name(f.type).startswith("list"):
        parts = [f"each {parts[0]}"]
    if meta.get("words"):
        parts += [f'"{w}"' for w in meta["words"]]
    if meta.get("other"):
        parts.append(meta["other"])
    return " or ".join(parts)


def shown_type(f: dataclasses.Field) -> str:
    """Return a key's type with what it accepts, for --help: 'int >= 0', 'a | b | c'."""
    if f.metadata.get("choices"):
        return accepted(f)
    if f.metadata.get("words"):  # a number or a word: "int >= 1 or \"proportional\""
        numeric = [t for t in type_name(f.type).split("|") if t != "str"]
        return " ".join(numeric[:1] + [accepted(f)])
    return " ".join(part for part in (type_name(f.type), accepted(f)) if part)


def default_text(f: dataclasses.Field) -> str:
    """Return a key's default as users write it, or 'required' / 'unset'."""
    if f.metadata.get("required"):
        return "required"
    if f.default is None:
        return "unset"
    return toml_value(plain(f.default))


def leaf_keys(section: type[Section]):
    """Yield the (name, field) of a section's keys, leaving out nested sections."""
    for name, f in section.declared().items():
        if section_type(f.type) is None:
            yield name, f


def describe_keys() -> str:
    """Return every section and key with type or choices, default and description (--help)."""
    lines = []
    for name, section in ALL_SECTIONS.items():
        lines.append(f"[{name}]")
        for key, f in leaf_keys(section):
            lines.append(f"  {key:<19} {shown_type(f):<40}  {default_text(f)}")
            lines.append(f"  {'':<19} {f.metadata['doc']}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """Return docs/reference/configuration.md: one table per section."""
    out = ["# Configuration reference", "",
           "Generated from `mpifed/config/sections.py` by `mpifed config reference`; do not edit "
           "by hand (a test fails when this page and the code differ).", "",
           "A run reads one TOML file; `--set section.key=value` overrides any key. "
           "`mpifed config show FILE` prints the resolved configuration, every default "
           "included; `mpifed config validate FILE` checks it; `mpifed config schema` prints "
           "the JSON Schema (`docs/reference/config.schema.json`) for editors.", ""]
    for name, section in ALL_SECTIONS.items():
        out += [f"## [{name}]", "", section_doc(name), "",
                "| key | type | default | accepted | description |", "|---|---|---|---|---|"]
        for key, f in leaf_keys(section):
            cells = [f"`{key}`", type_name(f.type), f"`{default_text(f)}`", accepted(f),
                     f.metadata["doc"]]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def section_doc(name: str) -> str:
    """Return the one-line description of a section (from the field that holds it)."""
    if name == "federated.dp":
        return ALL_SECTIONS["federated"].declared()["dp"].metadata["doc"]
    return Config.declared()[name].metadata.get("doc") or "the training data"


def json_schema() -> dict:
    """Return the JSON Schema (draft 2020-12) of a configuration file."""
    schema = section_schema(Config)
    schema.update({"$schema": "https://json-schema.org/draft/2020-12/schema",
                   "$id": SCHEMA_ID, "title": "mpifed run configuration (TOML)"})
    return schema


def section_schema(section: type[Section]) -> dict:
    """Return the JSON Schema of one section: an object of its keys, nothing else allowed."""
    props, required = {}, []
    for name, f in section.declared().items():
        nested = section_type(f.type)
        props[name] = section_schema(nested) if nested else key_schema(f)
        if nested:
            props[name]["description"] = f.metadata.get("doc") or "the training data"
        if f.metadata.get("required") or (section is Config and name == "data"):
            required.append(name)
    out = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object"}


def key_schema(f: dataclasses.Field) -> dict:
    """Return the JSON Schema of one key: type, bounds, choices, default, description."""
    meta = f.metadata
    out = _type_schema(f.type, meta)
    if meta.get("words") and "anyOf" not in out:
        out["examples"] = list(meta["words"])
    if f.default is not None:
        out["default"] = plain(f.default)
    out["description"] = meta["doc"]
    return out


def _type_schema(annotation, meta) -> dict:
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return {"type": "array", "items": _type_schema(args[0], meta)}
    if args and origin is not tuple:  # a union: X | None, or int | str
        if len(args) == 1:
            return _type_schema(args[0], meta)
        return {"anyOf": [_type_schema(a, meta) for a in args]}
    if annotation is str and meta.get("words") and not meta.get("choices") \
            and meta.get("range"):  # a word beside a number (local_steps = "proportional")
        return {"enum": list(meta["words"])}
    out = {"type": _JSON_TYPES[annotation]}
    if meta.get("choices"):
        out["enum"] = list(meta["choices"])
    if meta.get("range") and annotation in (int, float):
        low, high, low_in, high_in = meta["range"]
        if low is not None:
            out["minimum" if low_in else "exclusiveMinimum"] = low
        if high is not None:
            out["maximum" if high_in else "exclusiveMaximum"] = high
    return out


def schema_text() -> str:
    """Return the JSON Schema as the committed file holds it."""
    return json.dumps(json_schema(), indent=2) + "\n"


def to_toml(cfg: Config) -> str:
    """Return `cfg` as TOML that `load_config` reads back to the same Config (OUT/config.toml).

    Unset values and an absent [federated] are left out: a reader fills them the same way.
    """
    return tomli_w.dumps(_without_none(cfg.to_dict()))


def _without_none(table: dict) -> dict:
    return {k: _without_none(v) if isinstance(v, dict) else v
            for k, v in table.items() if v is not None}


def show_toml(cfg: Config) -> str:
    """Return every key of `cfg` with its value, defaults included, as TOML; an unset key is a
    comment that says what unset means (`mpifed config show`)."""
    lines = []
    tables = {"data": cfg.data, "model": cfg.model, "optim": cfg.optim, "comm": cfg.comm,
              "run": cfg.run, "federated": cfg.federated,
              "federated.dp": cfg.federated.dp if cfg.federated else None}
    for name, section in tables.items():
        if section is None:
            lines += [f"# [{name}] is not set: {section_doc(name)}", ""]
            continue
        lines.append(f"[{name}]")
        for key, f in leaf_keys(type(section)):
            value = getattr(section, key)
            lines.append(f"# {key} is unset: {f.metadata['doc']}" if value is None
                         else f"{key} = {toml_value(plain(value))}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value) -> str:
    """Return one TOML value on one line: arrays and tables inline."""
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    return tomli_w.dumps({"v": value})[4:].rstrip("\n")
