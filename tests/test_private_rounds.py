"""Secure aggregation and DP in federated runs under mpiexec, against plain runs and formulas."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import mpiexec, run_mpi, write_site

from mpifed.federated.dp import epsilon
from mpifed.nn.models import ModelSpec, init_params

FEATURES, CLASSES, HIDDEN = 5, 3, 4


def config(out, strategy="fedavg", extra="", dp="", lr=0.1, rounds=4, layout="institutions = 4"):
    text = f"""
[data]
train = "site-{{institution}}.h5"
[model]
kind = "mlp"
hidden = [{HIDDEN}]
dtype = "float64"
[optim]
lr = {lr}
batch_size = 3
[federated]
{layout}
rounds = {rounds}
local_steps = 3
strategy = "{strategy}"
server_lr = 0.05
{extra}
[run]
seed = 5
out = "{out}"
"""
    return text + (f"[federated.dp]\n{dp}\n" if dp else "")


def params(path):
    with h5py.File(path) as fh:
        return np.concatenate([fh[f"layers/{i}/{k}"][...].ravel() for i in range(2)
                               for k in "Wb"])


def rounds_of(path):
    records = [json.loads(line) for line in open(path)]
    return [r for r in records if r["event"] == "round"]


@pytest.fixture
def sites(tmp_path):
    for k, n in enumerate([23, 31, 17, 29]):
        write_site(tmp_path / f"site-{k}.h5", n, seed=k)
    return tmp_path


@pytest.mark.parametrize("strategy,layout,ranks", [("fedavg", "institutions = 4", 4),
                                                   ("fedadam", "institution_sizes = [1, 2, 1]", 4),
                                                   ("fedprox", "institutions = 2", 4)])
def test_secure_aggregation_equals_plain_aggregation(sites, strategy, layout, ranks):
    if "2, 1" in layout:
        (sites / "site-3.h5").unlink()  # three institutions
    elif layout.endswith("2"):
        for k in (2, 3):
            (sites / f"site-{k}.h5").unlink()
    for secure in ("false", "true"):
        (sites / f"{secure}.toml").write_text(config(
            f"out-{secure}", strategy, f"secure_aggregation = {secure}", layout=layout))
        done = run_mpi(ranks, ["train", f"{secure}.toml"], cwd=sites)
        assert done.returncode == 0, done.stderr
    plain, secure = params(sites / "out-false" / "model.h5"), params(sites / "out-true" / "model.h5")
    np.testing.assert_allclose(secure, plain, rtol=0, atol=1e-8)  # the quantisation step
    record = rounds_of(sites / "out-true" / "metrics.jsonl")[0]
    assert all(set(e) == {"institution", "participated"} for e in record["institutions"])


def test_dp_without_noise_and_with_a_loose_clip_is_fedavg_on_equal_sites(tmp_path):
    for k in range(4):
        write_site(tmp_path / f"site-{k}.h5", 24, seed=k)  # equal sizes: FedAvg weights equal
    (tmp_path / "plain.toml").write_text(config("plain"))
    (tmp_path / "dp.toml").write_text(config("dp", dp="clip = 1000.0\nnoise_multiplier = 0.0"))
    for name in ("plain", "dp"):
        assert run_mpi(4, ["train", f"{name}.toml"], cwd=tmp_path).returncode == 0
    np.testing.assert_allclose(params(tmp_path / "dp" / "model.h5"),
                               params(tmp_path / "plain" / "model.h5"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("secure", ["false", "true"])
def test_clipping_bounds_the_update_and_the_noise_has_its_stddev(sites, secure):
    start = init_params(ModelSpec("mlp", FEATURES, (HIDDEN,), CLASSES), 5, dtype="float64")
    # Tight clip, no noise: one round moves the model by at most the clip.
    (sites / "clip.toml").write_text(config("clip", extra=f"secure_aggregation = {secure}",
                                            dp="clip = 0.01\nnoise_multiplier = 0.0", rounds=1))
    assert run_mpi(4, ["train", "clip.toml"], cwd=sites).returncode == 0
    moved = np.linalg.norm(params(sites / "clip" / "model.h5") - start)
    assert 0.005 < moved <= 0.01 + 1e-9
    # Next to no training (lr 1e-12): the update is the noise, std z*C/(q*K) per parameter.
    (sites / "noise.toml").write_text(config(
        "noise", extra=f"secure_aggregation = {secure}\nsecure_range = 50.0",
        dp="clip = 2.0\nnoise_multiplier = 3.0", rounds=1, lr=1e-12))
    assert run_mpi(4, ["train", "noise.toml"], cwd=sites).returncode == 0
    noise = params(sites / "noise" / "model.h5") - start
    expected = 3.0 * 2.0 / 4
    assert np.std(noise) == pytest.approx(expected, rel=0.35)  # 35 parameters: a loose check
    assert abs(np.mean(noise)) < 3 * expected / np.sqrt(noise.size)


def test_epsilon_per_round_and_the_budget_stop(sites):
    (sites / "dp.toml").write_text(config(
        "dp", extra="fraction = 0.5\nsecure_aggregation = true\nsecure_range = 20.0",
        dp="clip = 1.0\nnoise_multiplier = 1.5\ndelta = 1e-5\nadaptive = true\n"
           "clip_count_stddev = 1.0\nmax_epsilon = 4.0", rounds=50))
    done = run_mpi(4, ["train", "dp.toml"], cwd=sites)
    assert done.returncode == 0, done.stderr
    rounds = rounds_of(sites / "dp" / "metrics.jsonl")
    expected = [epsilon(0.5, 1.5, r, 1e-5) for r in range(1, len(rounds) + 1)]
    assert [r["epsilon"] for r in rounds] == pytest.approx(expected, rel=1e-9)
    assert expected[-1] <= 4.0 < epsilon(0.5, 1.5, len(rounds) + 1, 1e-5)  # stopped at budget
    assert len(rounds) < 50 and "would exceed federated.dp.max_epsilon" in done.stdout
    clips = [r["clip"] for r in rounds]
    assert len(set(clips)) > 1  # adaptive clipping moved the clip
    summary = json.loads(open(sites / "dp" / "metrics.jsonl").read().splitlines()[-1])
    assert summary["epsilon"] == pytest.approx(expected[-1])


def test_a_leader_reusing_another_leaders_key_fails_on_every_rank(sites):
    (sites / "sa.toml").write_text(config("sa", extra="secure_aggregation = true"))
    script = (
        "from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey\n"
        "from cryptography.hazmat.primitives import serialization\n"
        "from mpi4py import MPI\n"
        "import mpifed.federated.private_aggregation as private\n"
        "fixed = X25519PrivateKey.from_private_bytes(bytes(range(32)))\n"
        "public = fixed.public_key().public_bytes(serialization.Encoding.Raw,\n"
        "                                         serialization.PublicFormat.Raw)\n"
        "real = private.new_keypair\n"
        "if MPI.COMM_WORLD.rank in (1, 3):  # institutions 1 and 3 share one key pair\n"
        "    private.new_keypair = lambda: (fixed, public)\n"
        "from mpifed.cli.main import main\n"
        "raise SystemExit(main(['train', 'sa.toml']))\n")
    done = subprocess.run([mpiexec(), "-n", "4", sys.executable, "-c", script], cwd=sites,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "institution 3 presented the same public key as institution 1" in done.stderr
    assert done.stderr.count("mpifed: error") == 1


def test_fednova_is_refused_with_privacy(sites):
    (sites / "n.toml").write_text(config("n", "fednova", "secure_aggregation = true"))
    done = run_mpi(2, ["train", "n.toml"], cwd=sites)
    assert done.returncode != 0 and "fednova" in done.stderr and "Traceback" not in done.stderr
