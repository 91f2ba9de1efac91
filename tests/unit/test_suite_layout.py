"""The suite is sorted by kind, a folder each, and each folder holds only its kind:
unit (one process), launcher (mpiexec or the CLI in a subprocess), mpi (pytest under mpiexec,
each test marked with the ranks it needs), gpu, multinode, slurm."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
KINDS = ("unit", "launcher", "mpi", "gpu", "multinode", "slurm")
# Calls that start another process: what a unit test never does.
LAUNCHERS = {"run_mpi", "run_cli", "run_script", "mpiexec", "Popen", "run_worker", "run_job"}


def files_of(kind: str) -> list[Path]:
    return sorted((TESTS / kind).glob("test_*.py"))


def mpi_marks(decorators) -> list[ast.expr]:
    return [d for d in decorators if "mark.mpi" in ast.unparse(d)]


def test_every_test_file_is_in_a_folder_of_its_kind():
    assert not list(TESTS.glob("test_*.py")), "a test file at the top: move it to its kind"
    names = [p.name for kind in KINDS for p in files_of(kind)]
    assert len(names) == len(set(names)), "two test files share a name"
    assert sum(len(files_of(k)) for k in KINDS) == len(list(TESTS.rglob("test_*.py")))


@pytest.mark.parametrize("path", [p for k in KINDS for p in files_of(k)], ids=lambda p: p.name)
def test_mpi_tests_live_in_tests_mpi_and_name_their_world_size(path):
    tree = ast.parse(path.read_text())
    module = [n for n in tree.body if isinstance(n, ast.Assign)
              and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)]
    file_mark = any("mark.mpi" in ast.unparse(n.value) for n in module)
    tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    for fn in tests:
        marks = mpi_marks(fn.decorator_list)
        is_mpi = file_mark or bool(marks)
        assert is_mpi == (path.parent.name == "mpi"), f"{path.name}::{fn.name}"
        if is_mpi:
            sized = [m for m in marks + [n.value for n in module] if "min_size" in ast.unparse(m)]
            assert sized, f"{path.name}::{fn.name}: mark it mpi(min_size=N)"


@pytest.mark.parametrize("path", files_of("unit"), ids=lambda p: p.name)
def test_unit_tests_start_no_process(path):
    calls = {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)}
    assert not calls & LAUNCHERS, f"{path.name} launches {calls & LAUNCHERS}: tests/launcher"
    imported = {a.name for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    imported |= {node.module for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom)}
    assert "subprocess" not in imported, f"{path.name} uses subprocess: tests/launcher"
