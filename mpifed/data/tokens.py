"""Token files for language models: a 1-D integer dataset `tokens` with a `vocab_size`
attribute, cut into windows of block_size + 1 tokens.

Sample i is the window tokens[i*T : i*T + T + 1] (T = block_size): its first T tokens are the
input, its last T the targets (the next token at each position). Windows overlap by one token,
so N tokens give (N - 1) // T samples. A rank of p owns samples [floor(r*S/p), floor((r+1)*S/p))
and reads only their tokens, one hyperslab (Heat's `load_hdf5` habit); a shard larger than
MPIFED_SHARD_MEMORY_BYTES stays in the file and each batch reads its windows.

    mpifed data tokens notes.txt more.txt OUT.h5             bytes: vocabulary 256
    mpifed data tokens notes.txt OUT.h5 --tokenizer tok.json  a `tokenizers` JSON file
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from ..errors import UserError
from .atomic import atomic_path
from .shards import file_identity, open_hdf5, shard_memory_bytes

TOKENS = "tokens"  # the dataset's name
BYTE_VOCAB = 256


@dataclass
class TokenInfo:
    """A checked token file, cut into windows of block_size + 1 tokens (see module)."""

    path: str
    tokens: int  # how many the file holds
    vocab_size: int
    block_size: int
    x: str = TOKENS
    y: str = TOKENS

    @property
    def samples(self) -> int:
        return max(0, (self.tokens - 1) // self.block_size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.block_size,)

    @property
    def features(self) -> int:
        return self.block_size

    @property
    def num_classes(self) -> int:
        return self.vocab_size


def describe_tokens(path: str, block_size: int, key: str = "data.train") -> TokenInfo:
    """Open `path` and check its `tokens` dataset (1-D integer) and `vocab_size` attribute."""
    with open_hdf5(path, key, "write one with `mpifed data tokens TEXT... OUT.h5`") as fh:
        if TOKENS not in fh or not isinstance(fh[TOKENS], h5py.Dataset):
            raise UserError(f"{key}: {path!r} has no dataset 'tokens' (found: "
                            f"{', '.join(map(repr, sorted(fh))) or 'nothing'}); a GPT trains "
                            "on token files: `mpifed data tokens TEXT... OUT.h5` writes one")
        ds = fh[TOKENS]
        if ds.ndim != 1 or ds.dtype.kind not in "iu":
            raise UserError(f"{key}: dataset 'tokens' in {path!r} must be 1-D integer, got "
                            f"shape {ds.shape} of {ds.dtype}")
        vocab = fh[TOKENS].attrs.get("vocab_size", fh.attrs.get("vocab_size"))
        if vocab is None or np.asarray(vocab).ndim or int(vocab) < 2:
            raise UserError(f"{key}: {path!r} needs a vocab_size attribute (an integer >= 2) "
                            "on its tokens dataset")
        info = TokenInfo(path, int(ds.shape[0]), int(vocab), int(block_size))
    if info.samples < 1:
        raise UserError(f"{key}: {path!r} holds {info.tokens} tokens, fewer than one window "
                        f"of model.block_size + 1 = {block_size + 1}; give more text or lower "
                        "model.block_size")
    return info


class TokenShard:
    """One rank's windows [start, stop) of a token file: x (b, T) inputs in `dtype` (token
    ids are exact in float32 below 2^24), y (b, T) int64 targets, as `Shard.rows` gives them."""

    def __init__(self, info: TokenInfo, start: int, stop: int, dtype="float32"):
        self.info, self.start, self.stop = info, start, stop
        self.dtype = np.dtype(dtype)
        t = info.block_size
        self.first = start * t  # this rank's tokens: [first, last)
        self.last = stop * t + 1 if stop > start else self.first
        self._file = None
        if (self.last - self.first) * 8 <= shard_memory_bytes():
            with h5py.File(info.path, "r") as fh:
                self.tokens = self._read(fh[TOKENS], self.first, self.last)
        else:
            self.tokens = None
            self._file = h5py.File(info.path, "r")
            self._identity = file_identity(info.path)
        self.x = self.tokens  # the rows are in memory unless None (what shard_stream asks)

    def __len__(self) -> int:
        return self.stop - self.start

    def _read(self, dataset, lo: int, hi: int) -> np.ndarray:
        try:
            return dataset[lo:hi].astype(np.int64)
        except OSError as err:
            error = UserError(f"{self.info.path!r}: dataset 'tokens' cannot be read ({err}); "
                              "the file is damaged, write it again")
            error.collective = False
            raise error from None

    def windows(self, local_index) -> np.ndarray:
        """Return the (b, T + 1) windows of the shard-local sample numbers `local_index`."""
        t = self.info.block_size
        local_index = np.asarray(local_index, dtype=np.int64)
        if self.tokens is not None:
            starts = local_index * t  # (b,)
            return self.tokens[starts[:, None] + np.arange(t + 1)]
        if file_identity(self.info.path) != self._identity:
            error = UserError(f"{self.info.path!r} changed while training read it batch by "
                              "batch; restore it and resume from the checkpoint")
            error.collective = False
            raise error
        ds = self._file[TOKENS]
        out = np.empty((len(local_index), t + 1), dtype=np.int64)
        for row, i in enumerate(local_index):
            lo = self.first + int(i) * t
            out[row] = self._read(ds, lo, lo + t + 1)
        return out

    def rows(self, local_index):
        """Return (x (b, T) in the shard's dtype, y (b, T) int64) of the samples."""
        w = self.windows(local_index)
        return w[:, :-1].astype(self.dtype), w[:, 1:]

    def label_range(self) -> tuple[int, int]:
        if self.tokens is None or not len(self):
            return (0, self.info.vocab_size - 1) if len(self) else (0, -1)
        return int(self.tokens.min()), int(self.tokens.max())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def byte_tokens(texts: list[str]) -> np.ndarray:
    """The bytes of the files `texts`, one token per byte, in file order (uint8)."""
    parts = []
    for path in texts:
        try:
            with open(path, "rb") as fh:
                parts.append(np.frombuffer(fh.read(), dtype=np.uint8))
        except OSError as err:
            raise UserError(f"mpifed data tokens: cannot read {path!r} ({err.strerror})") from None
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def load_tokenizer(tokenizer: str):
    """The `tokenizers` library's Tokenizer of a JSON file; a UserError when the library or
    the file is missing."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("--tokenizer: the `tokenizers` library is not installed (pip install "
                        "tokenizers); or leave --tokenizer out for byte-level tokens "
                        "(vocabulary 256)") from None
    try:
        return Tokenizer.from_file(tokenizer)
    except Exception as err:  # noqa: BLE001 -- the library's own error, named
        raise UserError(f"--tokenizer: cannot read {tokenizer!r} as a tokenizers JSON file "
                        f"({err})") from None


def tokenizer_tokens(texts: list[str], tokenizer: str) -> tuple[np.ndarray, int]:
    """Token ids of the files' text under a `tokenizers` JSON file, and its vocabulary size."""
    tok = load_tokenizer(tokenizer)
    ids = []
    for path in texts:
        try:
            with open(path, encoding="utf-8") as fh:
                ids.extend(tok.encode(fh.read()).ids)
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"mpifed data tokens: cannot read {path!r} as UTF-8 text "
                            f"({err})") from None
    return np.asarray(ids, dtype=np.int64), int(tok.get_vocab_size())


def write_tokens(out: str, texts: list[str], tokenizer: str | None = None,
                 force: bool = False) -> TokenInfo:
    """Write `out` (atomically) with the tokens of the text files; return what it holds."""
    if not texts:
        raise UserError("mpifed data tokens: give at least one text file before OUT.h5")
    if os.path.exists(out) and not force:
        raise UserError(f"mpifed data tokens: {out!r} exists; pass --force to replace it")
    if tokenizer:
        ids, vocab = tokenizer_tokens(texts, tokenizer)
        dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
        ids = ids.astype(dtype)
    else:
        ids, vocab = byte_tokens(texts), BYTE_VOCAB
    if ids.size < 2:
        raise UserError(f"mpifed data tokens: {', '.join(texts)} hold {ids.size} tokens; a "
                        "language model needs at least two")
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as fh:
        ds = fh.create_dataset(TOKENS, data=ids, chunks=(min(ids.size, 1 << 20),))
        ds.attrs["vocab_size"] = vocab
        fh.attrs["vocab_size"] = vocab
        fh.attrs["tokenizer"] = os.path.basename(tokenizer) if tokenizer else "bytes"
    return TokenInfo(out, int(ids.size), vocab, 1)
