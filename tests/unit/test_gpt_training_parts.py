"""What language-model training adds, each against an independent reference: token files and
their windows, AdamW and global-norm clipping against PyTorch's, accumulation against one
large batch, greedy generation against a PyTorch GPT's argmax."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mpifed.data.shards import shard_bounds
from mpifed.data.stream import shard_stream
from mpifed.data.tokens import TokenShard, describe_tokens, write_tokens
from mpifed.errors import UserError
from mpifed.nn.generate import generate, next_token
from mpifed.nn.gpt import gpt
from mpifed.optim import AdamW, clip_grad_norm

torch = pytest.importorskip("torch")
from tests.torch_gpt import torch_twin  # noqa: E402


def test_byte_token_file_holds_the_files_bytes_in_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes("héllo\n".encode())
    b.write_bytes(b"world")
    info = write_tokens(str(tmp_path / "t.h5"), [str(a), str(b)])
    with h5py.File(tmp_path / "t.h5") as fh:
        assert fh["tokens"].attrs["vocab_size"] == 256
        assert bytes(fh["tokens"][...].astype(np.uint8)) == "héllo\nworld".encode()
    assert info.tokens == len("héllo\nworld".encode())
    with pytest.raises(UserError, match="exists; pass --force"):
        write_tokens(str(tmp_path / "t.h5"), [str(a)])


def test_tokenizer_without_the_library_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers":
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(UserError, match="tokenizers.*not installed"):
        write_tokens(str(tmp_path / "t.h5"), [str(tmp_path / "a.txt")], "tok.json")


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_sample_i_is_the_window_at_i_times_block_size(tmp_path, monkeypatch, ranks, streamed):
    tokens = np.random.default_rng(0).integers(0, 50, 103)
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh.create_dataset("tokens", data=tokens).attrs["vocab_size"] = 50
    if streamed:  # larger than memory allows: each batch reads its windows from the file
        monkeypatch.setenv("MPIFED_SHARD_MEMORY_BYTES", "8")
    info = describe_tokens(str(tmp_path / "t.h5"), 10)
    assert info.samples == 10  # (103 - 1) // 10
    seen = []
    for rank in range(ranks):
        shard = TokenShard(info, *shard_bounds(info.samples, ranks, rank))
        assert (shard.tokens is None) == streamed
        x, y = shard.rows(np.arange(len(shard))[::-1])  # any order
        for k, i in enumerate(range(shard.stop - 1, shard.start - 1, -1)):
            np.testing.assert_array_equal(x[k], tokens[i * 10:i * 10 + 10])
            np.testing.assert_array_equal(y[k], tokens[i * 10 + 1:i * 10 + 11])
            seen.append(i)
        assert x.dtype == np.float32 and y.dtype == np.int64
        stream = shard_stream(shard, 1, len(shard), 0, rank, True)  # shuffled: batch by batch
        window_of = {tuple(tokens[i * 10:i * 10 + 10]): i for i in range(shard.start, shard.stop)}
        drawn = []
        for _ in range(len(shard)):
            _, xs, ys = stream.next_rows(shard)
            drawn.append(window_of[tuple(xs[0].astype(np.int64))])
            np.testing.assert_array_equal(ys[0], tokens[drawn[-1] * 10 + 1:drawn[-1] * 10 + 11])
        assert sorted(drawn) == list(range(shard.start, shard.stop))  # an epoch: each once
        shard.close()
    assert sorted(seen) == list(range(10))


def test_token_file_errors_name_the_key(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as fh:
        fh["x"] = np.zeros((3, 2))
    with pytest.raises(UserError, match="data.train: .* has no dataset 'tokens'"):
        describe_tokens(str(tmp_path / "x.h5"), 4)
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh.create_dataset("tokens", data=np.arange(5)).attrs["vocab_size"] = 9
    with pytest.raises(UserError, match="fewer than one window"):
        describe_tokens(str(tmp_path / "t.h5"), 8)


def test_adamw_equals_pytorch_with_decay_on_matrices_only():
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.cumsum([0, *sizes])
    decayed = [(int(offsets[i]), int(offsets[i + 1])) for i, s in enumerate(shapes) if len(s) >= 2]
    flat = rng.standard_normal(offsets[-1]).astype(np.float32)
    tensors = [torch.tensor(flat[a:b].reshape(s).copy(), requires_grad=True)
               for s, a, b in zip(shapes, offsets, offsets[1:])]
    ref = torch.optim.AdamW([{"params": [t for t in tensors if t.dim() >= 2], "weight_decay": 0.1},
                             {"params": [t for t in tensors if t.dim() < 2], "weight_decay": 0}],
                            lr=0.01, betas=(0.9, 0.95))
    # sharded: two optimisers on two slices of the flat buffer, told where each starts
    halves = [AdamW(0.9, 0.95, 1e-8, 0.1, decayed), AdamW(0.9, 0.95, 1e-8, 0.1, decayed)]
    cut = 10
    for _ in range(5):
        grad = rng.standard_normal(flat.size).astype(np.float32)
        for t, a, b in zip(tensors, offsets, offsets[1:]):
            t.grad = torch.tensor(grad[a:b].reshape(t.shape))
        ref.step()
        halves[0].step(flat[:cut], grad[:cut].copy(), 0.01, offset=0)
        halves[1].step(flat[cut:], grad[cut:].copy(), 0.01, offset=cut)
    want = np.concatenate([t.detach().numpy().reshape(-1) for t in tensors])
    np.testing.assert_allclose(flat, want, rtol=0, atol=1e-6)


def test_clip_grad_norm_equals_pytorch_whole_and_sharded():
    rng = np.random.default_rng(1)
    g = rng.standard_normal(50).astype(np.float32) * 3
    t = torch.tensor(g.copy(), requires_grad=True)
    t.grad = torch.tensor(g.copy())
    norm = float(torch.nn.utils.clip_grad_norm_([t], 2.0))
    whole = g.copy()
    assert clip_grad_norm(whole, 2.0) == pytest.approx(norm, rel=1e-6)
    np.testing.assert_allclose(whole, t.grad.numpy(), rtol=1e-6)
    parts = [g[:20].copy(), g[20:].copy()]  # two ranks' chunks: the squares summed over them
    squares = [float(np.dot(p, p)) for p in parts]
    for p in parts:
        clip_grad_norm(p, 2.0, lambda s: np.array([sum(squares)]))
    np.testing.assert_allclose(np.concatenate(parts), t.grad.numpy(), rtol=1e-6)
    small = g / 100
    clip_grad_norm(small, 2.0)  # below the limit: unchanged
    np.testing.assert_array_equal(small, g / 100)


def test_accumulated_micro_batches_equal_one_large_batch():
    model = gpt(19, 8, 2, 2, 16)
    flat = model.init(0, dtype="float64")
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 19, (6, 8)).astype(np.float64), rng.integers(0, 19, (6, 8))
    whole = np.zeros_like(flat)
    loss = model.loss_and_grad(flat, x, y, whole)
    model.accumulate = 3
    parts, ready = np.zeros_like(flat), []
    acc_loss = model.loss_and_grad(flat, x, y, parts,
                                   on_ready=lambda lo, hi, loss: ready.append((lo, hi, loss)))
    assert acc_loss == pytest.approx(float(loss), rel=1e-12)
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-14)
    assert ready[-1][1] - ready[-1][0] > 0 and ready[-1][2] == pytest.approx(float(loss))


def test_greedy_generation_follows_pytorch_argmax_past_the_context():
    model = gpt(29, 6, 2, 2, 16)
    flat = model.init(4)
    twin = torch_twin(model, flat)
    ids = [3, 1, 4]
    out = generate(model, flat, ids, 8, temperature=0)
    want = list(ids)
    for _ in range(8):
        logits, _ = twin(torch.tensor([want[-6:]]))
        want.append(int(logits[0, -1].argmax()))
    assert out.tolist() == want
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 4.9, -1.0])
    assert {next_token(logits, 1.0, 1, rng) for _ in range(20)} == {1}  # top-1: greedy
    assert {next_token(logits, 1.0, 2, rng) for _ in range(200)} == {1, 2}


def test_demo_gpt_config_is_a_valid_gpt_run_on_mpifed_sources(tmp_path):
    import tomllib

    from mpifed.cli.demo_gpt import CONFIG, sources
    from mpifed.config import resolve

    files = sources()
    assert any(f.endswith("nn/gpt.py") for f in files) and files == sorted(files)
    cfg = resolve(tomllib.loads(CONFIG.format(out=tmp_path, steps=300)))
    assert (cfg.model.kind, cfg.optim.name, cfg.comm.shard) == ("gpt", "adamw", "optimizer")
    assert cfg.optim.grad_clip == 1.0 and cfg.optim.schedule == "cosine"


@pytest.mark.parametrize("section, message", [
    ({"model": {"kind": "mlp", "hidden": [4], "recompute": True}}, "model.recompute"),
    ({"model": {"kind": "gpt", "n_head": 3, "n_embd": 16}}, "model.n_embd"),
    ({"model": {"kind": "gpt", "gelu": "erf"}}, "model.gelu"),
    ({"optim": {"name": "adamw", "grad_clip": -1.0}}, "optim.grad_clip"),
    ({"optim": {"accumulate": 0}}, "optim.accumulate"),
])
def test_gpt_and_training_keys_refuse_nonsense_naming_the_key(section, message):
    from mpifed.config import resolve

    with pytest.raises(UserError, match=message):
        resolve({"data": {"train": "tokens.h5"}, **section})
