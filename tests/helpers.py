"""What many tests do: launch mpifed, write datasets and configs, read models and metrics back.

Fixtures stay in conftest.py; independent reference computations in reference.py.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import tomli_w

from mpifed.launch import mpiexec_path as mpiexec  # beside this Python, else PATH's

ROOT = Path(__file__).resolve().parents[1]
# Generous: a hang fails the test, a loaded machine (make test beside another job) does not.
LAUNCH_TIMEOUT = 240


def documentation(pages: bool = True) -> str:
    """Return README.md and every hand-written page under docs/ (not the generated reference
    pages, configuration.md and cli.md), joined: what the documentation tests read."""
    generated = {"reference/configuration.md", "reference/cli.md"}
    texts = [(ROOT / "README.md").read_text()]
    if pages:
        texts += [p.read_text() for p in sorted((ROOT / "docs").rglob("*.md"))
                  if str(p.relative_to(ROOT / "docs")) not in generated]
    return "\n".join(texts)


def _env(extra: dict | None) -> dict:
    """This environment, one OpenMP thread, and `extra` over both (it may set OMP_NUM_THREADS)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


def run_mpi(n: int, args: list[str], timeout: float = LAUNCH_TIMEOUT, cwd=None, env=None):
    """Run `mpiexec -n n python -m mpifed ARGS`; return the CompletedProcess (never hangs).

    env: variables added to this process's environment (e.g. MPIFED_FAULT).
    """
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "mpifed", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=_env(env))


def run_cli(args: list[str], timeout: float = LAUNCH_TIMEOUT, cwd=None, env=None):
    """Run `python -m mpifed ARGS` as one process, without mpiexec."""
    return subprocess.run([sys.executable, "-m", "mpifed", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=_env(env))


def run_script(n: int, text: str, folder, timeout: float = LAUNCH_TIMEOUT, env=None):
    """Write `text` to FOLDER/script.py and run it on n ranks; return the CompletedProcess.

    For what is itself a user's program (a script that imports mpifed), not for injecting
    faults into mpifed (MPIFED_FAULT does that).
    """
    (Path(folder) / "script.py").write_text(text)
    return subprocess.run([mpiexec(), "-n", str(n), sys.executable, "script.py"], cwd=folder,
                          capture_output=True, text=True, timeout=timeout, env=_env(env))


def start_mpi(n: int, args: list[str], cwd=None, env=None) -> subprocess.Popen:
    """Start `mpiexec -n n python -m mpifed ARGS` in a session of its own; return the Popen.

    Signals to `proc.pid` reach mpiexec, which forwards SIGUSR1/SIGTERM to every rank and, if
    killed, takes the ranks down with it.
    """
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "mpifed", *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=_env(env))


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL, timeout: float = LAUNCH_TIMEOUT):
    """Send `sig` to every rank of the launch at once; return (stdout, stderr) once it ends.

    SIGKILL: the whole job dies at once, as a job killer's view of a crash. mpiexec and its
    proxy are left to notice and exit, so that they remove their files in /tmp (killed, they
    leave them behind).
    """
    table = _process_table()
    family = _family(proc.pid, table)
    parents = {table[pid][0] for pid in family if pid in table}
    for pid in family - parents:  # the ranks; their proxy and mpiexec then end and clean up
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # it had already ended
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # the last resort: never a hang
        return proc.communicate()


# ---- datasets -------------------------------------------------------------------------------

def write_h5(path, attrs: dict | None = None, **datasets) -> Path:
    """Write `datasets` (name -> array) and file attributes to a new HDF5 file; return its path."""
    with h5py.File(path, "w") as fh:
        for name, value in datasets.items():
            fh[name] = value
        for key, value in (attrs or {}).items():
            fh.attrs[key] = value
    return Path(path)


def make_classification(samples: int, seed: int, features: int = 5, classes: int = 3,
                        shift: float = 0.7, dtype="float64"):
    """Return (x, y): labels uniform in [0, classes), x standard normal + shift * label (learnable)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=samples)
    x = (rng.standard_normal((samples, features)) + shift * y[:, None]).astype(dtype)
    return x, y


def write_dataset(path, samples: int, seed: int = 0, features: int = 5, classes: int = 3,
                  shift: float = 0.7, dtype="float64", num_classes: bool = True):
    """Write a small learnable classification file (datasets x and y); return (x, y).

    num_classes: also store the `num_classes` attribute (else mpifed infers it from y).
    """
    x, y = make_classification(samples, seed, features, classes, shift, dtype)
    write_h5(path, {"num_classes": classes} if num_classes else None, x=x, y=y)
    return x, y


# ---- configs --------------------------------------------------------------------------------

def merged(*layers: dict) -> dict:
    """Return the layers deep-merged left to right (tables merge, other values replace)."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def write_config(path, *layers: dict) -> Path:
    """Write the deep-merged layers as a TOML config (a key set to None is left out)."""
    def drop_none(table):
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in table.items()
                if v is not None}
    Path(path).write_text(tomli_w.dumps(drop_none(merged(*layers))))
    return Path(path)


# ---- results --------------------------------------------------------------------------------

def read_model(path) -> list[np.ndarray]:
    """Return a model file's parameters per layer: [W0, b0, W1, b1, ...]."""
    with h5py.File(path) as fh:
        return [fh[f"layers/{i}/{k}"][...] for i in range(len(fh["layers"])) for k in "Wb"]


def model_vector(path) -> np.ndarray:
    """Return a model file's parameters as one flat vector (layer by layer, W then b)."""
    return np.concatenate([p.ravel() for p in read_model(path)])


def model_arrays(path) -> dict[str, np.ndarray]:
    """Return every dataset of a model file by its path (W, b, gamma, running_mean, ...)."""
    found = {}
    with h5py.File(path) as fh:
        fh.visititems(lambda name, obj: found.__setitem__(name, obj[...])
                      if isinstance(obj, h5py.Dataset) else None)
    return found


def assert_same_bits(got_path, want_path) -> None:
    """Assert two model files hold bit-identical arrays (parameters and running statistics)
    of the same dtypes."""
    got, want = model_arrays(got_path), model_arrays(want_path)
    assert sorted(got) == sorted(want) and got
    for name, array in got.items():
        assert array.dtype == want[name].dtype and np.array_equal(array, want[name]), name


def read_metrics(out, event: str | None = None) -> list[dict]:
    """Return the records of OUT/metrics.jsonl, only those of `event` when given."""
    with open(Path(out) / "metrics.jsonl") as fh:
        records = [json.loads(line) for line in fh]
    return [r for r in records if event is None or r.get("event") == event]


# ---- processes ------------------------------------------------------------------------------

def _process_table() -> dict[int, tuple[int, str]]:
    """Return {pid: (parent pid, state letter)} of every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it ended while we looked
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def stopped_processes(launch: subprocess.Popen) -> list[int]:
    """Return the pids of a launch's processes that are stopped (state T, as after SIGSTOP).

    mpiexec's proxy and ranks run in sessions of their own, so they are found as descendants
    of mpiexec, not as members of its process group.
    """
    table = _process_table()
    return sorted(pid for pid in _family(launch.pid, table) if table.get(pid, (0, ""))[1] == "T")


def paused_processes(launch: subprocess.Popen) -> list[int]:
    """Return the pids of a launch's processes that sleep in pause() (MPIFED_FAULT's pause),
    read from /proc/PID/syscall against the number a process in pause() shows here."""
    number = _pause_syscall()
    found = []
    for pid in _family(launch.pid):
        try:
            if (Path("/proc") / str(pid) / "syscall").read_text().split()[0] == number:
                found.append(pid)
        except (OSError, IndexError):  # gone, or not ours to read
            continue
    return sorted(found)


@functools.cache
def _pause_syscall() -> str:
    """The syscall number /proc shows for a process in signal.pause() on this machine (a
    probe that writes one byte, then pauses: once it sleeps, it sleeps there)."""
    probe = subprocess.Popen([sys.executable, "-c", "import os, signal; os.write(1, b'x'); "
                              "signal.pause()"], stdout=subprocess.PIPE)
    try:
        probe.stdout.read(1)
        proc = Path("/proc") / str(probe.pid)
        wait_until(lambda: (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "S",
                   "a probe sleeping in pause()")
        return (proc / "syscall").read_text().split()[0]
    finally:
        probe.kill()
        probe.wait()
        probe.stdout.close()


def _family(root: int, table: dict | None = None) -> set[int]:
    """Return `root` and every process descended from it."""
    table, family = table or _process_table(), {root}
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in family} - family
        family |= children
        grew = bool(children)
    return family


def has_pending(pid: int, sig: int) -> bool:
    """Tell whether signal `sig` is pending (delivered, not yet handled) for process `pid`."""
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) >> (sig - 1) & 1:
            return True
    return False


def wait_until(predicate, what: str, timeout: float = LAUNCH_TIMEOUT, proc=None):
    """Poll predicate() until it returns something truthy; return that (fail after `timeout`).

    proc: a launch that must still be running meanwhile (its output is shown if it ended).
    """
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the launch ended before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            if proc is not None:
                kill_group(proc)
            raise AssertionError(f"{what} did not happen in {timeout} s")
        time.sleep(0.02)
