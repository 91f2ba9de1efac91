"""The shaped link's command line and its refusals (mpifed/shaped_link.py), without starting
anything: tests/launcher/test_shaped_link_launch.py runs it, tests/multinode trains over it."""

from __future__ import annotations

import pytest

from mpifed import shaped_link


def test_the_command_shapes_lo_in_a_namespace_of_its_own_then_runs_the_argv():
    argv = ["mpiexec", "-n", "2", "python", "-c", "print('a b')"]
    command = shaped_link.shaped_command(argv, rate="100Mbit", burst="1mb", latency="20ms")
    assert command[:2] == ["unshare", "--net"]
    assert command[2:4] == ["sh", "-c"]
    script = command[4]
    assert "ip link set lo up" in script and "tc qdisc add dev lo root tbf" in script
    assert 'exec "$@"' in script
    assert command[5:9] == ["shaped-link", "100mbit", "1mb", "20ms"]  # $0, $1..$3
    assert command[9:] == argv  # untouched: no shell quoting of the user's words


@pytest.mark.parametrize("what,value", [("rate", "1gbt"), ("rate", "fast"), ("rate", "1"),
                                        ("burst", "lots"), ("latency", "50")])
def test_values_tc_cannot_read_are_refused_naming_the_option(what, value):
    with pytest.raises(ValueError, match=f"--{what} '{value}' is not a tc {what}"):
        shaped_link.shaped_command(["true"], **{what: value})


@pytest.mark.parametrize("value", ["1gbit", "10Gbit", "2.5gbit", "100mbit", "125mbps", "1000kbit"])
def test_rates_in_tc_units_are_accepted(value):
    assert shaped_link.check_value("rate", value) == value.lower()


def test_not_root_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(shaped_link.sys, "platform", "linux")
    monkeypatch.setattr(shaped_link.os, "geteuid", lambda: 1000)
    assert "needs root" in shaped_link.shaping_problem()


def test_missing_tools_are_named_with_their_package(monkeypatch):
    monkeypatch.setattr(shaped_link.sys, "platform", "linux")
    monkeypatch.setattr(shaped_link.os, "geteuid", lambda: 0)
    monkeypatch.setattr(shaped_link.shutil, "which", lambda tool: None if tool == "tc" else tool)
    problem = shaped_link.shaping_problem()
    assert "needs tc" in problem and "apt-get install iproute2" in problem
    assert "unshare" not in problem


def test_the_command_line_refuses_before_running_anything(monkeypatch, capsys):
    monkeypatch.setattr(shaped_link, "shaping_problem", lambda: "a shaped link needs root")
    ran = []
    monkeypatch.setattr(shaped_link.subprocess, "run", lambda *a, **k: ran.append(a))
    assert shaped_link.main(["--", "true"]) == 2
    assert capsys.readouterr().err.strip() == "error: a shaped link needs root"
    assert not ran
