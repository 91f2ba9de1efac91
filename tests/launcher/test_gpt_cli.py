"""A GPT from the command line: `mpifed data tokens`, `mpifed train` (ZeRO-3, recompute,
dropout, AdamW, clipping) resumed after a SIGKILL to the bits of an uninterrupted
run, perplexity in the summary, and `mpifed generate`."""

from __future__ import annotations

import json
import math

import h5py
from helpers import _env, run_cli, run_mpi

CONFIG = """
[data]
train = "tokens.h5"
test = "tokens.h5"
[model]
kind = "gpt"
n_layer = 2
n_head = 2
n_embd = 16
block_size = 16
dropout = 0.1
recompute = true
[optim]
name = "adamw"
lr = 0.01
weight_decay = 0.1
grad_clip = 1.0
batch_size = 4
steps = 14
schedule = "cosine"
warmup = 3
[comm]
shard = "{shard}"
[run]
seed = 1
out = "{out}"
checkpoint_every = 5
keep_checkpoints = 5
"""


def model_arrays(path):
    found = {}
    with h5py.File(path) as fh:
        fh.visititems(lambda name, item: found.update(
            {name: item[...].tobytes()} if isinstance(item, h5py.Dataset) else {}))
    assert found
    return found


def summary_of(out):
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("event") == "summary"][-1]


def test_tokens_train_sigkill_resume_and_generate(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    made = run_cli(["data", "tokens", str(text), "tokens.h5"], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "1,800 tokens, vocabulary 256" in made.stdout
    (tmp_path / "run.toml").write_text(CONFIG.format(shard="parameters", out="whole"))
    assert run_mpi(2, ["train", "run.toml"], cwd=tmp_path).returncode == 0
    (tmp_path / "run.toml").write_text(CONFIG.format(shard="parameters", out="out"))
    killed = run_mpi(2, ["train", "run.toml"], cwd=tmp_path,
                     env={"MPIFED_FAULT": "kill:step=12:rank=1"})
    assert killed.returncode != 0
    again = run_mpi(2, ["train", "run.toml"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed at step 10" in again.stdout + again.stderr
    assert model_arrays(tmp_path / "out" / "model.h5") == model_arrays(
        tmp_path / "whole" / "model.h5")
    summary = summary_of(tmp_path / "out")
    assert summary["perplexity"] == math.exp(summary["test_loss"])
    assert min(summary["activation_bytes"]) > 0
    assert summary["tokens_per_s"] == summary["samples_per_s"] * 16

    model = str(tmp_path / "out" / "model.h5")
    scored = run_cli(["evaluate", model, "tokens.h5"], cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert f"perplexity {summary['perplexity']:.4f}" in scored.stdout
    runs = [run_cli(["generate", model, "--prompt", "the qu", "--tokens", "30", "--top-k", "5",
                     "--seed", "3"]) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout.startswith("the qu") and runs[0].stdout == runs[1].stdout
    assert len(runs[0].stdout.rstrip("\n").encode()) >= 6 + 30 - 3  # a few bytes may merge


def test_generate_refuses_a_model_that_is_no_gpt_and_tokens_need_text(tmp_path):
    import numpy as np

    with h5py.File(tmp_path / "d.h5", "w") as fh:
        fh["x"] = np.random.default_rng(0).standard_normal((40, 3))
        fh["y"] = np.arange(40) % 2
    (tmp_path / "m.toml").write_text('[data]\ntrain = "d.h5"\n[optim]\nsteps = 2\n'
                                     '[run]\nout = "o"\n')
    assert run_cli(["train", "m.toml"], cwd=tmp_path).returncode == 0
    refused = run_cli(["generate", str(tmp_path / "o" / "model.h5"), "--prompt", "x"])
    assert refused.returncode != 0
    assert "samples from a GPT" in refused.stderr and "Traceback" not in refused.stderr
    missing = run_cli(["data", "tokens", "out.h5"], cwd=tmp_path)
    assert missing.returncode != 0 and "TEXT [TEXT ...] OUT.h5" in missing.stderr


def test_demo_gpt_trains_on_the_sources_and_prints_a_sample(tmp_path):
    """The demo (make demo-gpt) cut to 20 steps: the token file, 2 ranks, a sample after the
    prompt. Its loss after 20 steps is below a uniform guess over 256 bytes (ln 256 = 5.55)."""
    import subprocess
    import sys

    code = f"from mpifed.cli.demo_gpt import main; main({str(tmp_path / 'demo')!r}, 2, 20)"
    # as `make demo-gpt`: not under mpiexec; with Python's copy of the environment, as every
    # helper here passes: another test may have started MPI in this process, and under Open
    # MPI that puts a singleton's PMIX_/OMPI_ variables into the C environment
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=_env(None))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr  # the ranks' own lines too
    assert "a sample (prompt \"def \"" in done.stdout
    assert done.stdout.rstrip().split("\n")[-1] != ""
    summary = summary_of(tmp_path / "demo" / "gpt" / "train")
    assert summary["steps"] == 20 and summary["loss"] < math.log(256)
