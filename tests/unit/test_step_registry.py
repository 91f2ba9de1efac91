"""One step protocol: comm.shard names one `Step` class each, built by `make_step` from the
[comm] settings' attributes alone; no step asks which stage it is. Serial (COMM_SELF)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.errors import UserError
from mpifed.nn.models import ModelSpec, init_params
from mpifed.optim import Adam
from mpifed.train.sharded_step import STAGES, STEPS, ShardedStep, bytes_per_rank
from mpifed.train.step import DataParallelStep, Step, make_step

TRAIN = Path(__file__).resolve().parents[2] / "mpifed" / "train"
SPEC = ModelSpec("mlp", 7, (6, 3), 3)  # 81 parameters


def settings(shard: str) -> SimpleNamespace:
    """What make_step may read of [comm], and nothing else (a missing attribute would raise)."""
    return SimpleNamespace(shard=shard, allreduce="mpi", overlap=False, stall_timeout=600.0,
                           compression="none")


def test_every_name_has_its_own_step_class():
    assert STAGES == ("none", "optimizer", "gradients", "parameters") == tuple(STEPS)
    assert len(set(STEPS.values())) == len(STEPS)
    assert STEPS["none"] is DataParallelStep
    for name, cls in STEPS.items():
        assert issubclass(cls, Step) and not inspect.isabstract(cls), name
        assert cls.stage == name
        assert issubclass(cls, ShardedStep) == cls.sharded == (name != "none")
        assert cls.holds_whole_model == (name != "parameters")
    assert inspect.isabstract(ShardedStep) and inspect.isabstract(Step)


@pytest.mark.parametrize("cls", list(STEPS.values()), ids=list(STEPS))
def test_constructors_take_stall_timeout_by_keyword_with_no_default(cls):
    """The config's default (600 s) is the only one: no class carries another."""
    parameter = inspect.signature(cls).parameters["stall_timeout"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    assert parameter.default is inspect.Parameter.empty


def test_make_step_builds_each_from_attributes_and_all_take_the_same_step():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 7)), rng.integers(0, 3, 5)
    results = {}
    for name in STAGES:
        SPEC.seed = 3
        params = None if name == "parameters" else init_params(SPEC, 3, np, "float64")
        step = make_step(SPEC, params, MPI.COMM_SELF, settings(name), np, np.float64)
        try:
            assert type(step) is STEPS[name] and step.watch.timeout == 600.0
            loss = step(x, y, Adam(), 0.05, 1)
        finally:
            step.close()
        assert (step.params is None) == (not step.holds_whole_model)
        results[name] = loss, np.array(step.gather_params())
        step.free()
    want_loss, want = results["none"]
    for name, (loss, got) in results.items():
        assert loss == pytest.approx(want_loss, rel=1e-12), name
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=name)


def test_an_unknown_name_is_refused_with_the_choices():
    with pytest.raises(UserError, match="comm.shard: 'everything' is not one of none, "
                                        "optimizer, gradients, parameters"):
        make_step(SPEC, init_params(SPEC, 0, np, "float64"), MPI.COMM_SELF,
                  settings("everything"), np)


def test_bytes_per_rank_per_stage_by_hand():
    """n = 81, widest layer 50, 4 ranks: chunks of ceil(83 / 4) = 21 elements, 8 bytes each."""
    n, widest, ranks, chunk = 81, 50, 4, 21
    want = {"none": 5 * n, "optimizer": 2 * n + 3 * chunk,
            "gradients": n + 4 * chunk + 2 * widest, "parameters": 5 * chunk + 4 * widest}
    assert {s: bytes_per_rank(n, widest, 8, s, ranks) for s in STAGES} == \
        {s: 8 * v for s, v in want.items()}


@pytest.mark.parametrize("module", ["step.py", "sharded_step.py"])
def test_no_step_asks_which_stage_it_is(module):
    """Stage differences are overridden methods: no `stage ==` or `!=`, no self.stage."""
    tree = ast.parse((TRAIN / module).read_text())

    def names_stage(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "stage"
                or isinstance(node, ast.Attribute) and node.attr == "stage")

    equality = (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)  # `in STEPS` is the registry's lookup
    found = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
             and any(isinstance(op, equality) for op in node.ops)
             and any(names_stage(side) for side in [node.left, *node.comparators])]
    found += [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute)
              and node.attr == "stage" and isinstance(node.value, ast.Name)
              and node.value.id == "self"]
    assert not found, f"{module} branches on the stage at lines {found}"
