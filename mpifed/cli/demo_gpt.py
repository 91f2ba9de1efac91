"""`mpifed demo --gpt` (and `make demo-gpt`): a tiny character-level GPT trained on mpifed's own
Python sources on 2 local ranks in about a minute, then a sample of what it writes.

    mpifed data tokens mpifed/*.py ... OUT/tokens.h5      bytes, vocabulary 256
    mpiexec -n 2 mpifed train OUT/gpt.toml                AdamW, cosine schedule, ZeRO-1
    mpifed generate OUT/train/model.h5 --prompt "def "
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import launch
from ..launch import mpifed_command
from .output import emit

CONFIG = """\
# The GPT demo: a character-level GPT on mpifed's own sources, data-parallel over 2 ranks.
[data]
train = "{out}/tokens.h5"

[model]
kind = "gpt"
n_layer = 2
n_head = 4
n_embd = 64
block_size = 64
gelu = "tanh"

[optim]
name = "adamw"
lr = 0.004
weight_decay = 0.1
grad_clip = 1.0
beta2 = 0.99
batch_size = 12      # windows of 65 bytes per rank
steps = {steps}
schedule = "cosine"
warmup = 20

[comm]
shard = "optimizer"  # ZeRO-1: each rank keeps half of AdamW's state

[run]
seed = 0
out = "{out}/train"
log_every = 50
progress = "lines"
"""


def sources() -> list[str]:
    """mpifed's own Python files, in a fixed order: the demo's text."""
    package = Path(__file__).resolve().parents[1]
    return [str(p) for p in sorted(package.rglob("*.py"))]


def main(out: str = "demo-out", ranks: int = 2, steps: int = 300) -> int:
    """Write the token file, train on `ranks` ranks for `steps` steps, print a sample."""
    folder = Path(out).resolve() / "gpt"
    folder.mkdir(parents=True, exist_ok=True)
    mpifed = mpifed_command()
    launch.run([*mpifed, "data", "tokens", *sources(), str(folder / "tokens.h5"), "--force"])
    config = folder / "gpt.toml"
    config.write_text(CONFIG.format(out=folder, steps=steps))
    began = time.perf_counter()
    launch.run([*mpifed_command(ranks), "train", str(config), "--set", "run.resume=never"])
    emit(f"trained in {time.perf_counter() - began:.0f} s; a sample (prompt \"def \", 300 "
         "bytes, temperature 0.8, top-k 20):")
    launch.run([*mpifed, "generate", str(folder / "train" / "model.h5"), "--prompt", "def ",
                "--tokens", "300", "--temperature", "0.8", "--top-k", "20"])
    return 0
