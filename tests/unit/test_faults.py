"""The MPIFED_FAULT hook: what it accepts, what it refuses, and what each action does, a byzantine
institution's tampering included (no MPI)."""

from __future__ import annotations

import numpy as np
import pytest

from mpifed.faults import Byzantine, Fault, byzantine, inject, parse, tampered


@pytest.mark.parametrize("text,fault", [
    ("kill:step=5:rank=1", Fault("kill", "step", 5, 1)),
    ("raise:round=2", Fault("raise", "round", 2, None)),
    ("exit:rank=0:step=12", Fault("exit", "step", 12, 0)),
    (" stop:round=1\n", Fault("stop", "round", 1, None)),
    ("pause:step=100:rank=0", Fault("pause", "step", 100, 0)),
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


# --- byzantine:K:MODE[:SCALE] ------------------------------------------------------------------

@pytest.mark.parametrize("text,fault", [
    ("byzantine:2:scale", Byzantine(2, "scale", 100.0)),
    ("byzantine:0:signflip", Byzantine(0, "signflip", 1.0)),
    ("byzantine:4:noise:0.5", Byzantine(4, "noise", 0.5)),
    ("byzantine:1:constant:-3", Byzantine(1, "constant", -3.0)),
    (" byzantine:3:nan\n", Byzantine(3, "nan", None)),
    ("byzantine:1:scale:-10", Byzantine(1, "scale", -10.0)),
    ("byzantine:3,7:scale", Byzantine(3, "scale", 100.0, (7,))),  # two tamper alike (Bulyan)
])
def test_parse_reads_byzantine(text, fault):
    assert parse(text) == fault
    assert parse(str(fault)) == fault


@pytest.mark.parametrize("text,needle", [
    ("byzantine", "name the institution and the mode"),
    ("byzantine:2", "name the institution and the mode"),
    ("byzantine:x:scale", "whole number >= 0, got 'x'"),
    ("byzantine:-1:scale", "whole number >= 0, got '-1'"),
    ("byzantine:1:wobble", "unknown mode 'wobble'"),
    ("byzantine:1:scale:big", "SCALE must be a number, got 'big'"),
    ("byzantine:1:scale:inf", "SCALE must be finite"),
    ("byzantine:1:noise:-1", ">= 0 for noise"),
    ("byzantine:1:nan:3", "nan takes no SCALE"),
    ("byzantine:1:scale:2:3", "name the institution and the mode"),
    ("byzantine:1,1:scale", "each once"),
])
def test_parse_refuses_bad_byzantine(text, needle):
    with pytest.raises(ValueError) as info:
        parse(text)
    message = str(info.value)
    assert needle in message and "MPIFED_FAULT" in message and "byzantine:K:MODE" in message


def test_byzantine_is_read_only_from_its_own_form(monkeypatch):
    monkeypatch.delenv("MPIFED_FAULT", raising=False)
    assert byzantine() is None  # never on by accident
    monkeypatch.setenv("MPIFED_FAULT", "raise:round=2")
    assert byzantine() is None
    monkeypatch.setenv("MPIFED_FAULT", "byzantine:1:signflip")
    assert byzantine() == Byzantine(1, "signflip", 1.0)
    inject("round", 2, 1)  # not a point fault: inject does nothing


def test_tampered_modes():
    start, own = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.0])  # update [1, 0, -2]
    keep = own.copy()
    np.testing.assert_array_equal(tampered(Byzantine(0, "signflip", 1.0), start, own, 0),
                                  [0.0, 2.0, 5.0])
    np.testing.assert_array_equal(tampered(Byzantine(0, "scale", 100.0), start, own, 0),
                                  [101.0, 2.0, -197.0])
    np.testing.assert_array_equal(tampered(Byzantine(0, "constant", 7.0), start, own, 0),
                                  [7.0, 7.0, 7.0])
    assert np.isnan(tampered(Byzantine(0, "nan", None), start, own, 0)).all()
    big = np.zeros(20000)
    noisy = tampered(Byzantine(3, "noise", 0.5), big, big, 1)
    assert abs(noisy.std() - 0.5) < 0.02 and abs(noisy.mean()) < 0.02
    np.testing.assert_array_equal(noisy, tampered(Byzantine(3, "noise", 0.5), big, big, 1))
    assert not np.array_equal(noisy, tampered(Byzantine(3, "noise", 0.5), big, big, 2))
    assert tampered(Byzantine(0, "scale", 2.0), start.astype(np.float32),
                    own.astype(np.float32), 0).dtype == np.float32
    np.testing.assert_array_equal(own, keep)  # inputs unchanged


def test_pause_sleeps_until_a_signal_handler_runs(monkeypatch):
    """The pause action returns once a handler has run: here an alarm's, 50 ms later."""
    import signal
    import time

    hits = []
    previous = signal.signal(signal.SIGALRM, lambda *_: hits.append(time.monotonic()))
    monkeypatch.setenv("MPIFED_FAULT", "pause:step=3:rank=0")
    try:
        inject("step", 2, 0)  # another step: returns at once, no alarm needed
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        began = time.monotonic()
        inject("step", 3, 0)
        assert len(hits) == 1 and hits[0] >= began
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
