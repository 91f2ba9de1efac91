"""A GPT trained by `mpifed.train.run` on 1-4 ranks, every comm.shard stage, with and without
recomputation (and with optim.accumulate under every stage), equals a
nanoGPT-shaped PyTorch GPT trained on the same windows from the same state_dict, after 20 SGD
and 20 AdamW steps (cosine schedule with warm-up, weight decay on arrays of 2+ dimensions,
global-norm clipping); the model file's state_dict group loads strictly into the PyTorch
model."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpifed.nn.gpt import gpt
from mpifed.optim import learning_rate

torch = pytest.importorskip("torch")
from tests.torch_gpt import GPT, torch_twin  # noqa: E402

pytestmark = pytest.mark.mpi(min_size=1)

VOCAB, BLOCK, LAYERS, HEADS, WIDTH = 23, 8, 2, 2, 16
GLOBAL_BATCH, STEPS, WINDOWS, SEED = 12, 20, 240, 5
OPTIM = {
    "sgd": {"name": "sgd", "lr": 0.3},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1, "grad_clip": 0.5,
              "schedule": "cosine", "warmup": 4, "beta2": 0.95},
}


def token_file(folder: str) -> np.ndarray:
    """Write folder/tokens.h5 on rank 0 (random ids, WINDOWS windows); return the tokens."""
    tokens = np.random.default_rng(0).integers(0, VOCAB, WINDOWS * BLOCK + 1)
    if MPI.COMM_WORLD.rank == 0:
        with h5py.File(f"{folder}/tokens.h5", "w") as fh:
            fh.create_dataset("tokens", data=tokens.astype(np.uint16)).attrs["vocab_size"] = VOCAB
    MPI.COMM_WORLD.Barrier()
    return tokens


def global_windows(tokens, step: int, ranks: int) -> np.ndarray:
    """The (GLOBAL_BATCH, BLOCK + 1) windows of `step`: rank 0's rows, then rank 1's, ...;
    rank r reads its shard [r S/p, (r+1) S/p) of the S windows in order (data.shuffle off)."""
    per = GLOBAL_BATCH // ranks
    starts = [r * WINDOWS // ranks + step * per + j for r in range(ranks) for j in range(per)]
    return np.stack([tokens[s * BLOCK:s * BLOCK + BLOCK + 1] for s in starts])


def reference(tokens, name: str, ranks: int) -> GPT:
    """The PyTorch GPT after STEPS steps of `name` (as nanoGPT's configure_optimizers)."""
    torch.manual_seed(0)
    spec = gpt(VOCAB, BLOCK, LAYERS, HEADS, WIDTH)
    twin = torch_twin(spec, spec.init(SEED))
    o = OPTIM[name]
    params = list(twin.parameters())  # the tied matrix once
    if name == "sgd":
        opt = torch.optim.SGD(params, lr=o["lr"])
    else:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o["weight_decay"]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=o["lr"], betas=(0.9, o["beta2"]), eps=1e-8)
    for step in range(STEPS):
        lr = learning_rate(step, o["lr"], STEPS, o.get("schedule", "constant"),
                           o.get("warmup", 0))
        for group in opt.param_groups:
            group["lr"] = lr
        w = torch.tensor(global_windows(tokens, step, ranks))
        _, loss = twin(w[:, :-1], w[:, 1:])
        opt.zero_grad()
        loss.backward()
        if o.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(params, o["grad_clip"])
        opt.step()
    return twin


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recompute"])
@pytest.mark.parametrize("stage", ["none", "optimizer", "gradients", "parameters"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_gpt_equals_pytorch_after_20_steps(tmp_path_factory, name, stage, recompute):
    trained_equals_pytorch(tmp_path_factory, name, stage, recompute, 1)


@pytest.mark.parametrize("stage", ["none", "optimizer", "gradients", "parameters"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_accumulated_micro_batches_equal_pytorch_on_the_whole_batch(tmp_path_factory, name,
                                                                     stage):
    """optim.accumulate = 2: each rank's rows in two micro-batches, the same steps (ZeRO-2/3
    reduce-scatter each micro-batch and sum their parts; the clip sees the summed norm)."""
    trained_equals_pytorch(tmp_path_factory, name, stage, False, 2)


def trained_equals_pytorch(tmp_path_factory, name, stage, recompute, accumulate):
    from mpifed.train import run

    world = MPI.COMM_WORLD
    if GLOBAL_BATCH % (world.size * accumulate):
        pytest.skip(f"a global batch of {GLOBAL_BATCH} does not split over {world.size} ranks "
                    f"x {accumulate} micro-batches")
    torch.set_num_threads(1)
    folder = world.bcast(str(tmp_path_factory.mktemp("gpt")) if world.rank == 0 else None)
    tokens = token_file(folder)
    run({"data": {"train": f"{folder}/tokens.h5", "shuffle": False},
         "model": {"kind": "gpt", "n_layer": LAYERS, "n_head": HEADS, "n_embd": WIDTH,
                   "block_size": BLOCK, "recompute": recompute},
         "optim": {**OPTIM[name], "batch_size": GLOBAL_BATCH // world.size // accumulate,
                   "accumulate": accumulate, "steps": STEPS},
         "comm": {"shard": stage},
         "run": {"out": f"{folder}/out", "seed": SEED, "progress": "none"}})
    twin = reference(tokens, name, world.size)
    with h5py.File(f"{folder}/out/model.h5", "r") as fh:
        state = {k: torch.tensor(fh["state_dict"][k][...]) for k in fh["state_dict"]}
    loaded = GPT(VOCAB, BLOCK, LAYERS, HEADS, WIDTH)
    loaded.load_state_dict(state, strict=True)  # every name and shape nanoGPT's
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    ours, ref = loaded.state_dict(), twin.state_dict()
    worst = max(float((ours[k] - ref[k]).abs().max()) for k in ref)
    assert worst <= 1e-4, f"max |diff| {worst}"
    moved = max(float((ref[k] - v).abs().max()) for k, v in
                torch_twin(gpt(VOCAB, BLOCK, LAYERS, HEADS, WIDTH),
                           gpt(VOCAB, BLOCK, LAYERS, HEADS, WIDTH).init(SEED)).state_dict().items())
    assert moved > 1e-2  # the comparison is of trained parameters, not of the start
