"""The package depends only downward and has no module cycles (read from the sources)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mpifed"


def _imports(path: Path) -> set[str]:
    """Return the mpifed modules that `path` imports (top-level and inside functions)."""
    package = ".".join(path.relative_to(PACKAGE.parent).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            if node.level and not node.module:  # from .. import faults
                found.update(f"{base}.{a.name}" for a in node.names
                             if not a.name.startswith("__"))  # __version__: an attribute
                continue
            name = f"{base}.{node.module}" if node.level else node.module
            if name and name.startswith("mpifed"):
                found.add(name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mpifed"))
    return found


# Each package may import those listed (and itself); the architecture of docs/architecture.md.
ALLOWED = {
    "xp": set(), "errors": set(), "faults": set(), "hostmem": set(), "choices": set(),
    "log": {"errors"},
    "nn": {"xp", "errors", "data"}, "optim": {"xp", "errors"},
    "data": {"xp", "errors", "log"},  # log sits at the bottom (it imports only errors)
    "comm": {"xp", "errors", "log", "nn", "choices"},
    "federated": {"xp", "errors", "log", "comm"},
    "config": {"xp", "errors", "log", "choices", "nn", "optim", "federated"},
    "train": {"xp", "errors", "faults", "hostmem", "log", "choices", "comm", "data", "nn",
              "optim", "federated", "config"},
}


def test_packages_import_only_downward():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        top = parts[0]
        if top not in ALLOWED:
            continue  # cli, benchmarks, demo: the top layer may import anything
        for name in _imports(path):
            target = name.split(".")[1] if name.count(".") else None
            if target and target != top and target not in ALLOWED[top]:
                problems.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not problems, "\n".join(problems)
