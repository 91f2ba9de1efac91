"""The MPIFED_FAULT hook: what it accepts, what it refuses, and what each action does (no MPI)."""

from __future__ import annotations

import pytest

from mpifed.faults import Fault, inject, parse


@pytest.mark.parametrize("text,fault", [
    ("kill:step=5:rank=1", Fault("kill", "step", 5, 1)),
    ("raise:round=2", Fault("raise", "round", 2, None)),
    ("exit:rank=0:step=12", Fault("exit", "step", 12, 0)),
    (" stop:round=1\n", Fault("stop", "round", 1, None)),
])
def test_parse_reads_every_form(text, fault):
    assert parse(text) == fault
    assert parse(str(fault)) == fault  # str() writes the form back


@pytest.mark.parametrize("text,needle", [
    ("boom:step=1", "unknown action 'boom'"),
    ("kill", "name exactly one of"),
    ("kill:rank=1", "name exactly one of"),
    ("kill:step=1:round=2", "name exactly one of"),
    ("kill:step=x", "step must be a whole number, got 'x'"),
    ("kill:step=1:rank=-1", "rank must be >= 0"),
    ("kill:steps=1", "cannot read 'steps=1'"),
    ("kill:step=1:step=2", "cannot read 'step=2'"),
    ("kill:step", "cannot read 'step'"),
])
def test_parse_refuses_bad_values_naming_the_variable_and_the_form(text, needle):
    with pytest.raises(ValueError) as info:
        parse(text)
    message = str(info.value)
    assert needle in message and "MPIFED_FAULT" in message and "kill:step=5:rank=1" in message


def test_inject_reads_the_variable_when_called(monkeypatch):
    monkeypatch.delenv("MPIFED_FAULT", raising=False)
    inject("step", 3, 0)  # unset: nothing
    monkeypatch.setenv("MPIFED_FAULT", "raise:step=3:rank=1")
    for point, number, rank in [("round", 3, 1), ("step", 2, 1), ("step", 4, 1), ("step", 3, 0)]:
        inject(point, number, rank)  # another point, number or rank: nothing
    with pytest.raises(RuntimeError, match=r"injected fault raise:step=3:rank=1 \(MPIFED_FAULT\)"):
        inject("step", 3, 1)
    monkeypatch.setenv("MPIFED_FAULT", "raise:round=2")  # no rank: every rank
    for rank in range(3):
        with pytest.raises(RuntimeError, match="raise:round=2"):
            inject("round", 2, rank)
    monkeypatch.setenv("MPIFED_FAULT", "kill:step")
    with pytest.raises(ValueError, match="MPIFED_FAULT"):
        inject("step", 1, 0)  # malformed: an error at the first injection point, not a no-op
