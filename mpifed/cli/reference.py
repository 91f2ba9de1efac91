"""The CLI reference page (docs/reference/cli.md), derived from `build_parser()`.

    python -m mpifed.cli.reference > docs/reference/cli.md      (also: make docs-reference)

Built from the parser's actions, not from argparse's help text, whose wrapping follows the
terminal's width and whose layout changes between Python versions: the page must come out the
same everywhere, since a test regenerates it and compares.
"""

from __future__ import annotations

import argparse

from .main import build_parser

HEADER = """# Command-line reference

Generated from the argument parser (`mpifed/cli/main.py`) by `python -m mpifed.cli.reference`
(`make docs-reference`); a test fails when this page differs from what the parser says.
Every command also takes `-q`/`--quiet` and `-v`/`--verbose` after its name.
`mpifed bench WHICH --help` lists each benchmark's own options.
"""


def expand(action: argparse.Action, prog: str) -> str:
    """Return an action's help with argparse's %(default)s-style fields filled in."""
    text = action.help or ""
    if "%" not in text:
        return text
    fields = dict(vars(action), prog=prog)
    if isinstance(fields.get("choices"), (list, tuple)):
        fields["choices"] = ", ".join(map(str, fields["choices"]))
    return text % fields


def flags(action: argparse.Action) -> str:
    """Return how an option or positional is written: `--num-classes N`, `FILE ...`."""
    if not action.option_strings:
        name = action.metavar or action.dest.upper()
        return {"?": f"[{name}]", "*": f"[{name} ...]", "+": f"{name} ...",
                argparse.REMAINDER: "..."}.get(action.nargs, name)
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar or action.dest.upper()
    if action.nargs in ("*", "+"):
        metavar = f"{metavar} ..."
    return ", ".join(f"{o} {metavar}" for o in action.option_strings)


def cell(text: str) -> str:
    """Return text safe inside one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    """Return the Markdown table of one parser's arguments, sub-command listings left out."""
    rows = []
    for action in parser._actions:  # argparse keeps them there; it offers no public listing
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        if action.help == argparse.SUPPRESS or action.dest in ("log_level",):
            continue  # --quiet and --verbose: said once in the header
        text = expand(action, parser.prog)
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            text = f"{text} (one of: {', '.join(map(str, action.choices))})".lstrip()
        if action.required and action.option_strings:
            text = f"required. {text}".strip()
        default = action.default
        if action.option_strings and default not in (None, False, argparse.SUPPRESS) \
                and action.nargs != 0 and "default" not in text:
            text = f"{text} (default {default})".lstrip()
        rows.append(f"| `{flags(action)}` | {cell(text)} |")
    if not rows:
        return []
    return ["| argument | meaning |", "|---|---|", *rows, ""]


def commands(parser: argparse.ArgumentParser):
    """Yield (name, help, parser) for each sub-command below `parser`, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in action._choices_actions}
            for name, command in action.choices.items():
                yield name, helps.get(name, ""), command
                for sub_name, sub_help, sub in commands(command):
                    yield f"{name} {sub_name}", sub_help, sub


def cli_reference() -> str:
    """Return the CLI reference page as Markdown: every command, its arguments and help."""
    parser = build_parser()
    lines = [HEADER, "## `mpifed`", "", cell(parser.description or ""), "",
             *arguments_table(parser)]
    for name, text, command in commands(parser):
        lines += [f"## `mpifed {name}`", "", cell(text)]
        if command.description and command.description != text:
            lines += ["", cell(command.description)]
        if name == "train":  # its --help lists the keys; here they have their own page
            lines += ["", "The keys: the [configuration reference](configuration.md)."]
        lines += ["", *arguments_table(command)]
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    from .output import emit

    emit(cli_reference(), end="")
