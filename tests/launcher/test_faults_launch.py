"""The MPIFED_FAULT actions on a real process: kill and exit end it, stop freezes it until SIGCONT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from helpers import LAUNCH_TIMEOUT, wait_until


def start_injecting(fault: str) -> subprocess.Popen:
    """Start a process that reaches inject("step", 3, 0) under MPIFED_FAULT=fault."""
    code = "from mpifed.faults import inject; inject('step', 3, 0); print('went on')"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, MPIFED_FAULT=fault))


@pytest.mark.parametrize("fault,returncode", [("kill:step=3", -signal.SIGKILL),
                                              ("exit:step=3:rank=0", 1),
                                              ("kill:step=4", 0)])
def test_kill_and_exit_end_the_process(fault, returncode):
    proc = start_injecting(fault)
    out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == returncode
    assert ("went on" in out) == (returncode == 0)


def test_stop_freezes_the_process_until_sigcont():
    proc = start_injecting("stop:step=3")
    state = f"/proc/{proc.pid}/stat"
    wait_until(lambda: open(state).read().rsplit(")", 1)[1].split()[0] == "T", "the stop",
               proc=proc)
    os.kill(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0 and "went on" in out
