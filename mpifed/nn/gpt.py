"""`GPT`: nanoGPT's decoder-only transformer as a list of mpifed layers over one flat buffer.

    layers: embedding (wte, wpe, dropout), n_layer x transformer_block, tied_head (ln_f, then
    logits through wte)
    inputs (B, T) token ids, targets (B, T) next tokens -> logits (B, T, V)

The head is tied to the embedding: one slot of the flat buffer, whose gradient is the sum of
both uses. `state_dict` names every array as nanoGPT's `GPT.state_dict()` does, weights in
PyTorch's [out, in] layout, with `lm_head.weight` the copy of `transformer.wte.weight` it is tied
to, so a trained model loads strictly into a PyTorch GPT.
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import UserError
from .layers.base import Context
from .layers.embedding import Embedding, TiedHead, tie
from .layers.transformer import TransformerBlock
from .loss import IGNORE_INDEX, sequence_cross_entropy, sequence_loss_and_correct
from .sequential import EVAL, TRAIN, Sequential

EVAL_TOKENS = 1 << 21  # evaluation batches hold at most this many logits (B * T * V)


class GPT(Sequential):
    """A Sequential whose samples are token windows: x (B, T) ids, y (B, T) next tokens.

    num_classes is the vocabulary size; input_shape is (T,). `accumulate` (optim.accumulate)
    splits each batch into that many micro-batches whose gradients are averaged.
    """

    ignore_index = IGNORE_INDEX

    def _before_build(self) -> None:
        layers = self.layers
        if not (layers and isinstance(layers[0], Embedding) and isinstance(layers[-1], TiedHead)):
            raise UserError("model: a GPT starts with an embedding and ends with a tied_head")
        tie(layers[-1], layers[0])
        if layers[0].vocab_size != self.num_classes:
            raise UserError(f"model.vocab_size: the embedding has {layers[0].vocab_size} "
                            f"tokens, the data {self.num_classes}")

    def _check_output(self, input_shape, out, where: str) -> None:
        """Refuse a last layer that does not give (T, vocab_size) logits."""
        if out != (input_shape[0], self.num_classes):
            raise UserError(f"{where}: a GPT gives logits (T, vocab_size), got {out}")

    @property
    def sizes(self):
        e = self.layers[0]
        heads = self.layers[1].n_head if len(self.layers) > 2 else 0
        return (f"[{len(self.layers) - 2} layers, {heads} heads, {e.n_embd} wide, context "
                f"{e.block_size}, vocabulary {e.vocab_size}, {self.layout().size:,} parameters]")

    @property
    def eval_batch(self) -> int:
        """Windows per evaluation batch: at most EVAL_TOKENS logits at once."""
        return max(1, EVAL_TOKENS // (self.input_shape[0] * self.num_classes))

    def loss(self, logits, y):
        return sequence_cross_entropy(logits, y, self.ignore_index)

    def evaluate_batch(self, flat, x, y) -> tuple[float, float]:
        """Return (summed per-window mean loss, summed per-window token accuracy): the
        evaluation's sums over windows (its mean is the mean over windows)."""
        self.layers[0].copy_weight = callable(flat)
        logits = self.forward(flat, x, EVAL)
        total, correct = 0.0, 0.0
        for b in range(logits.shape[0]):
            loss, right, count = sequence_loss_and_correct(logits[b:b + 1], y[b:b + 1],
                                                           self.ignore_index)
            total += loss / max(count, 1)
            correct += right / max(count, 1)
        return total, correct

    def forward(self, flat, x, ctx: Context = EVAL):
        self.layers[0].copy_weight = callable(flat)
        return super().forward(flat, x, ctx)

    def loss_and_grad(self, flat, x, y, grad_out, on_ready=None, ctx: Context = TRAIN,
                      loss_scale: float = 1.0):
        self.layers[0].copy_weight = callable(flat)
        loss = super().loss_and_grad(flat, x, y, grad_out, on_ready, ctx, loss_scale)
        recomputed = max(getattr(layer, "peak_recompute_bytes", 0) for layer in self.layers)
        self.activation_bytes = max(self.activation_bytes, self._held + recomputed)
        return loss

    activation_bytes = 0  # the most activation memory a training step held (bytes)

    def _after_forward(self, logits) -> None:
        """Count the activations held at the end of the forward pass: the blocks' caches,
        the head's input and the logits with their gradient."""
        held = sum(layer.cache_bytes() for layer in self.layers[1:-1])
        self._held = held + 2 * logits.nbytes + logits.nbytes // self.num_classes * 2

    def _shaped(self, x):
        """Token windows (B, t) go in as they are: t may be shorter than the context."""
        return x

    def state_dict_names(self, i: int) -> dict:
        """Layer i's {mpifed name: nanoGPT state_dict name}."""
        if i == 0 or i == len(self.layers) - 1:
            prefix = "transformer."
        else:
            prefix = f"transformer.h.{i - 1}."
        return {name: prefix + name for name, _ in self.layers[i].params()}

    def state_dict(self, flat) -> OrderedDict:
        """Return nanoGPT's state_dict of the flat parameters: name -> array (views of flat,
        lm_head.weight a copy of transformer.wte.weight), in nanoGPT's order."""
        out = OrderedDict()
        for i, views in enumerate(self.param_views(flat)):
            names = self.state_dict_names(i)
            for name, view in views.items():
                out[names[name]] = view
        out["lm_head.weight"] = out["transformer.wte.weight"].copy()
        return out


def gpt(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
        dropout: float = 0.0, gelu: str = "tanh", recompute: bool = False) -> GPT:
    """Return nanoGPT's GPT (bias = True) on windows of `block_size` tokens."""
    for key, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd),
                       ("block_size", block_size), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"model.{key}: expected an integer >= 1, got {value!r}")
    if n_embd % n_head:
        raise UserError(f"model.n_embd: {n_embd} does not split into model.n_head = {n_head} "
                        "heads; make n_embd a multiple of n_head")
    layers = [Embedding(vocab_size, block_size, n_embd, dropout)]
    layers += [TransformerBlock(n_head, dropout, gelu, n_layer, recompute)
               for _ in range(n_layer)]
    layers.append(TiedHead())
    return GPT(layers, (block_size,), vocab_size, "gpt", where="model")
