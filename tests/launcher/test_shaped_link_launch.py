"""`python -m mpifed.shaped_link` for real: the command runs in a network namespace that holds
only a loopback interface, shaped by tbf at the rate asked for; and the compression benchmark
over it (tiny, unshaped) prints its table. Skipped with the reason where shaping cannot run
(not root, no unshare or tc)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from helpers import LAUNCH_TIMEOUT, _env

from mpifed.launch import launcher_family, mpiexec_path
from mpifed.shaped_link import probe


def shaped(*args: str):
    return subprocess.run([sys.executable, "-m", "mpifed.shaped_link", *args],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env(None))


@pytest.fixture(scope="module")
def can_shape():
    problem = probe()
    if problem:
        pytest.skip(problem)


def test_the_command_sees_only_a_loopback_shaped_at_the_rate(can_shape):
    done = shaped("--rate", "100mbit", "--", "sh", "-c", "ip -o link show; tc qdisc show dev lo")
    assert done.returncode == 0, done.stderr
    interfaces = re.findall(r"^\d+: (\S+?):", done.stdout, re.M)
    assert interfaces == ["lo"], done.stdout  # nothing else to reach: traffic stays on lo
    assert re.search(r"qdisc tbf \S+ root .*rate 100Mbit burst 256Kb lat 50ms", done.stdout)


def test_the_commands_exit_status_comes_back(can_shape):
    assert shaped("--", "sh", "-c", "exit 7").returncode == 7


def test_nodes_sets_the_emulated_nodes_and_the_link_is_named(can_shape):
    done = shaped("--nodes", "2", "--", "sh", "-c",
                  "echo $MPIR_CVAR_NUM_CLIQUES $FI_TCP_IFACE; echo $MPIFED_SHAPED_LINK")
    if launcher_family(mpiexec_path())[0] == "openmpi":  # no clique emulation: one line
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("error: 2 emulated nodes under Open MPI")
        assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
        return
    assert done.stdout.splitlines() == ["2 lo", "tbf rate 1gbit burst 256kb latency 50ms"]


def test_a_bad_rate_is_one_line_naming_the_option():
    done = shaped("--rate", "fast", "--", "true")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: shaped link: --rate 'fast' is not a tc rate; write a "
                                   "number and a unit, e.g. 1gbit, 100mbit, 10gbit")


def test_the_compression_benchmark_prints_each_scheme_against_none(tmp_path):
    out = tmp_path / "c.json"
    done = subprocess.run([sys.executable, "-m", "mpifed", "bench", "compression", "--rate",
                           "none", "--sizes", "16,64,32,4", "--steps", "2", "--warmup", "2",
                           "--repeats", "1", "--batch", "8", "--json", str(out)],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_env(None))
    if launcher_family(mpiexec_path())[0] == "openmpi":  # 2 nodes x 1 rank: MPICH's cliques
        assert done.returncode == 1 and "needs MPICH's mpiexec" in done.stderr
        assert "Traceback" not in done.stderr
        return
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["scheme"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["none", "fp16", "powersgd"]
    assert rows["none"]["ratio"] == 1.0
    # bytes a rank sent per step, from the compressors' own counts: fp16 half of none's,
    # PowerSGD less (rank 2 factors of the 64x32 matrix, the rest exact)
    assert rows["fp16"]["bytes_per_step"] == pytest.approx(rows["none"]["bytes_per_step"] / 2,
                                                           rel=0.02)
    assert rows["powersgd"]["bytes_per_step"] < rows["none"]["bytes_per_step"]
    assert re.search(r"^  powersgd\s+[\d.]+\s", done.stdout, re.M)
