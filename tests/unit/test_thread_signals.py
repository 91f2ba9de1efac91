"""Background threads leave the stop signals to the main thread.

CPython 3.11 runs a Python signal handler only in the main thread, and when the kernel hands
the signal to another thread it does not wake the main thread's check: a SIGUSR1 that asked to
stop at step 101 was seen at step 102 (CI, tests/launcher/test_resume.py). Every thread mpifed
starts therefore blocks those signals; these tests read each thread's own signal mask.
"""

from __future__ import annotations

import queue
import signal
import threading

import numpy as np

from mpifed.xp import MAIN_THREAD_SIGNALS, background_thread, device_thread_pool


def _mask() -> set:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_the_stop_signals_are_the_ones_left_to_the_main_thread():
    from mpifed.train.signals import STOP_SIGNALS
    assert set(STOP_SIGNALS) | {signal.SIGINT} == set(MAIN_THREAD_SIGNALS)


def test_device_pool_thread_blocks_the_signals_and_main_thread_does_not():
    pool = device_thread_pool(np, "t")
    try:
        inside = pool.submit(_mask).result()
    finally:
        pool.shutdown()
    assert set(MAIN_THREAD_SIGNALS) <= inside
    assert not set(MAIN_THREAD_SIGNALS) & _mask()  # the caller's own mask is untouched


def test_background_thread_blocks_the_signals_and_passes_arguments():
    seen = queue.Queue()
    thread = background_thread(lambda a, b: seen.put((a, b, _mask())), "t", (1, 2))
    assert thread.daemon
    thread.start()
    thread.join()
    a, b, mask = seen.get_nowait()
    assert (a, b) == (1, 2) and set(MAIN_THREAD_SIGNALS) <= mask
    assert threading.current_thread() is threading.main_thread()



def test_every_thread_mpifed_starts_goes_through_these_helpers():
    """Read from the sources: threads are made only by background_thread (xp.py), and every
    ThreadPoolExecutor names an initializer that blocks the signals."""
    import ast
    from pathlib import Path
    package = Path(__file__).resolve().parents[2] / "mpifed"
    problems = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            keywords = {k.arg for k in node.keywords}
            where = f"{path.relative_to(package)}:{node.lineno}"
            if name == "Thread" and path.name != "xp.py":
                problems.append(f"{where} starts a thread directly")
            if name == "ThreadPoolExecutor" and "initializer" not in keywords:
                problems.append(f"{where} makes a pool without an initializer")
    assert not problems, "\n".join(problems)
