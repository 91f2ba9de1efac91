"""Every example in examples/ runs, shortened, as a user would start it; the accuracy it prints
is the one `mpifed evaluate` finds again from the model file it wrote, and beats chance.

(examples/train_arrays.py: tests/launcher/test_api_launch.py; examples/slurm/submit.sh:
tests/slurm/test_slurm_example.py, under the local SLURM.)
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LAUNCH_TIMEOUT, ROOT, read_metrics, run_cli

from mpifed.launch import mpiexec_path

EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.timeout(600)


def run_example(n: int, script: str, *args: str, cwd: Path) -> str:
    """Run examples/SCRIPT on n ranks in cwd as a user would; return its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [mpiexec_path(), "-n", str(n), sys.executable, str(EXAMPLES / script), *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def printed_accuracy(stdout: str) -> float:
    return float(re.search(r"test accuracy (\d\.\d+)", stdout).group(1))


def evaluated_accuracy(model: Path, data: Path, cwd: Path) -> float:
    """The accuracy `mpifed evaluate` computes from the saved model, in a process of its own."""
    done = run_cli(["evaluate", str(model), str(data)], cwd=cwd)
    assert done.returncode == 0, done.stderr
    return float(re.search(r"accuracy[ =:]+(\d\.\d+)", done.stdout).group(1))


def test_digits_mlp(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example(2, "digits_mlp.py", "--epochs", "3", cwd=tmp_path)
    accuracy = printed_accuracy(out)
    assert accuracy > 0.8  # 10 classes: chance is 0.1; 3 epochs reach about 0.9
    again = evaluated_accuracy(tmp_path / "runs/digits/model.h5",
                               tmp_path / "data/digits/test.h5", tmp_path)
    assert again == pytest.approx(accuracy, abs=2e-4)


def test_resnet_on_cifar_shaped_images(tmp_path):
    out = run_example(2, "resnet_cifar.py", "--train", "2048", "--epochs", "2", "--batch-size",
                      "32", cwd=tmp_path)
    accuracy = printed_accuracy(out)
    assert "ResNet-8 on 2 ranks" in out and accuracy > 0.2  # chance 0.1; about 0.35 after 64 steps
    again = evaluated_accuracy(tmp_path / "runs/resnet/model.h5",
                               tmp_path / "data/cifar-shaped/test-2048.h5", tmp_path)
    assert again == pytest.approx(accuracy, abs=2e-4)
    steps = read_metrics(tmp_path / "runs/resnet", "summary")[0]["steps"]
    assert steps == 2 * 2048 // (2 * 32)  # two epochs of 2,048 images at a global batch of 64


def test_custom_layer_checks_its_backward_then_trains(tmp_path):
    out = run_example(2, "custom_layer.py", "--steps", "150", cwd=tmp_path)
    error = float(re.search(r"max error (\S+)", out).group(1))
    assert error < 1e-6
    assert printed_accuracy(out) > 0.8  # 4 classes, each marked by +3 on its own feature


def test_sharded_mlp_holds_a_share_of_the_adam_state(tmp_path):
    out = run_example(2, "sharded_mlp.py", "--hidden", "256,128", "--steps", "10", cwd=tmp_path)
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d", line)]
    assert len(rows) == 2  # one per rank
    whole = read_metrics(tmp_path / "runs/sharded-unsharded", "summary")[0]
    sharded = read_metrics(tmp_path / "runs/sharded", "summary")[0]
    for r in range(2):  # ZeRO-3: half the Adam state on each of 2 ranks (to the padding)
        assert sharded["optimizer_state_bytes"][r] <= whole["optimizer_state_bytes"][r] / 2 + 64
    assert sum(sharded["optimizer_state_bytes"]) >= whole["optimizer_state_bytes"][0]


def test_federation_with_dp_and_secure_aggregation(tmp_path):
    pytest.importorskip("sklearn")
    env = dict(os.environ, OMP_NUM_THREADS="1", ROUNDS="3", RANKS="4",
               MPIEXEC=mpiexec_path(), MPIFED=f"{sys.executable} -m mpifed")
    done = subprocess.run([str(EXAMPLES / "federation_dp_secagg.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = read_metrics(tmp_path / "runs/federation", "round")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    epsilons = [r["epsilon"] for r in rounds]
    assert all(a < b for a, b in zip(epsilons, epsilons[1:]))  # the privacy loss adds up
    again = evaluated_accuracy(tmp_path / "runs/federation/model.h5",
                               tmp_path / "digits/test.h5", tmp_path)
    assert again == pytest.approx(rounds[-1]["accuracy"], abs=2e-4) and again > 0.2
