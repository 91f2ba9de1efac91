"""The layer library: each layer one small class with its forward and backward side by side.

See `base.py` for the protocol a layer follows (also for layers that users write).
"""

from __future__ import annotations

from ...errors import UserError
from .activations import GELU, Dropout, ReLU, Tanh
from .attention import CausalSelfAttention
from .base import Context, Layer
from .chain import Chain
from .conv import Conv2d, col2im, im2col
from .dense import Flatten, Linear
from .embedding import Embedding, TiedHead
from .norm import BatchNorm2d, LayerNorm
from .pool import AvgPool2d, GlobalAvgPool, MaxPool2d
from .residual import Residual
from .transformer import TransformerBlock

# type -> (class, {config key: default}); None marks a required key. The keys are public.
LAYERS = {
    "linear": (Linear, {"out": None}),
    "conv2d": (Conv2d, {"out": None, "kernel": None, "stride": 1, "padding": 0}),
    "maxpool2d": (MaxPool2d, {"kernel": None, "stride": None}),
    "avgpool2d": (AvgPool2d, {"kernel": None, "stride": None}),
    "global_avgpool": (GlobalAvgPool, {}),
    "relu": (ReLU, {}),
    "tanh": (Tanh, {}),
    "gelu": (GELU, {}),
    "flatten": (Flatten, {}),
    "dropout": (Dropout, {"p": None}),
    "layernorm": (LayerNorm, {"eps": 1e-5}),
    "batchnorm2d": (BatchNorm2d, {"sync": False, "momentum": 0.1, "eps": 1e-5}),
    "residual": (Residual, {"layers": None}),
    "embedding": (Embedding, {"vocab_size": None, "block_size": None, "n_embd": None,
                              "dropout": 0.0}),
    "causal_self_attention": (CausalSelfAttention, {"n_head": None, "dropout": 0.0,
                                                    "n_layer": 1}),
    "transformer_block": (TransformerBlock, {"n_head": None, "dropout": 0.0, "gelu": "tanh",
                                             "n_layer": 1, "recompute": False}),
    "tied_head": (TiedHead, {}),
}


def layer_from_config(entry, where: str = "model.layers[0]") -> Layer:
    """Return the layer that one config table describes, e.g. {type = "conv2d", out = 16,
    kernel = 3}; a UserError names `where` and the key at fault."""
    if not isinstance(entry, dict) or "type" not in entry:
        raise UserError(f"{where}: expected a table with a type, e.g. "
                        f"{{type = \"relu\"}}, got {entry!r}")
    kind = entry["type"]
    if kind not in LAYERS:
        raise UserError(f"{where}.type: {kind!r} is not a layer; use one of {', '.join(LAYERS)}")
    cls, keys = LAYERS[kind]
    unknown = sorted(set(entry) - set(keys) - {"type"})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} for a {kind} layer; "
                        f"known: {', '.join(keys) or 'none'}")
    settings = {}
    for key, default in keys.items():
        if key not in entry and default is None and not (kind.endswith("pool2d")
                                                         and key == "stride"):
            raise UserError(f"{where}.{key}: required for a {kind} layer")
        settings[key] = entry.get(key, default)
    if kind == "residual":
        sub = settings["layers"]
        if not isinstance(sub, list) or not sub:
            raise UserError(f"{where}.layers: expected a non-empty list of layers")
        settings["layers"] = [layer_from_config(e, f"{where}.layers[{i}]")
                              for i, e in enumerate(sub)]
    try:
        return cls(**settings)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def layers_from_config(entries, where: str = "model.layers") -> list[Layer]:
    if not isinstance(entries, (list, tuple)) or not entries:
        raise UserError(f"{where}: expected a non-empty list of layer tables, e.g. "
                        "[{type = \"flatten\"}, {type = \"linear\", out = 10}]")
    return [layer_from_config(e, f"{where}[{i}]") for i, e in enumerate(entries)]


__all__ = ["AvgPool2d", "BatchNorm2d", "CausalSelfAttention", "Chain", "Context", "Conv2d",
           "Dropout", "Embedding", "Flatten", "GELU", "GlobalAvgPool", "LAYERS", "Layer",
           "LayerNorm", "Linear", "MaxPool2d", "ReLU", "Residual", "Tanh", "TiedHead",
           "TransformerBlock", "col2im", "im2col", "layer_from_config", "layers_from_config"]
