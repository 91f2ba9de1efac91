"""The [model] section: its keys, their checks, and the model each config describes.

    kind = "softmax" | "mlp" (hidden = [...]) | "lenet5" | "resnet" (depth = 8|14|20)
         | "gpt" (n_layer, n_head, n_embd, block_size, vocab_size, dropout, gelu, recompute)
         | "sequential" (layers = [{type = "conv2d", out = 16, kernel = 3, padding = 1}, ...])
    factory = "package.module:function"   # function(input_shape, num_classes) -> layers or model
    init = "model.h5"                     # start from a model file instead
"""

from __future__ import annotations

import importlib

from ..errors import UserError
from .layers import Layer, layers_from_config
from .presets import RESNET_DEPTHS, lenet5, mlp, resnet, softmax
from .sequential import Sequential

KINDS = ("softmax", "mlp", "sequential", "lenet5", "resnet", "gpt")
# model.kind in config.toml of a run given a model object with layers of one's own
# (mpifed.train.run(model=...)): a record, not a model a file run can build.
OBJECT_KIND = "object"
CONFIG_KINDS = (*KINDS, OBJECT_KIND)  # what model.kind accepts

def check_model_config(model) -> None:
    """Check a ModelConfig's values (types and ranges are checked already); raise a UserError
    naming the key."""
    kind = model.kind
    if kind == "sequential" and not model.factory:
        layers_from_config(model.layers)  # every layer's type and keys, named on error
    elif model.layers:
        raise UserError(f"model.layers: only read when model.kind = \"sequential\" (it is "
                        f"{kind!r}); remove model.layers or set the kind")
    if model.hidden and kind != "mlp":
        raise UserError(f"model.hidden: only read when model.kind = \"mlp\" (it is {kind!r}); "
                        "remove model.hidden or set model.kind = \"mlp\"")
    if kind == "resnet" and model.depth not in RESNET_DEPTHS:
        raise UserError(f"model.depth: a resnet has depth 8, 14 or 20, got {model.depth}")
    if model.recompute and kind != "gpt":
        raise UserError(f"model.recompute: only read when model.kind = \"gpt\" (it is {kind!r})")
    if kind == "gpt" and model.n_embd % model.n_head:
        raise UserError(f"model.n_embd: {model.n_embd} does not split into model.n_head = "
                        f"{model.n_head} heads; make n_embd a multiple of n_head")
    if model.factory:
        _factory_parts(model.factory)


def _factory_parts(name: str) -> tuple[str, str]:
    module, colon, function = name.partition(":")
    if not colon or not module or not function.isidentifier():
        raise UserError(f"model.factory: {name!r} is not \"package.module:function\"")
    return module, function


def model_from_config(model, input_shape, num_classes: int) -> Sequential:
    """Return the model that a ModelConfig describes, for inputs of `input_shape`."""
    shape = tuple(int(s) for s in input_shape)
    if model.factory:
        return model_from_factory(model.factory, shape, num_classes)
    kind = model.kind
    if kind == "softmax":
        if model.hidden:
            raise UserError("model.hidden: a softmax model has no hidden layers; "
                            "remove model.hidden or set model.kind = \"mlp\"")
        return softmax(shape, num_classes)
    if kind == "mlp":
        return mlp(shape, tuple(model.hidden), num_classes)
    if kind == "lenet5":
        return lenet5(shape, num_classes)
    if kind == "resnet":
        return resnet(shape, num_classes, model.depth)
    if kind == "sequential":
        return Sequential(layers_from_config(model.layers), shape, num_classes)
    if kind == "gpt":
        return gpt_from_config(model, shape, num_classes)
    if kind == OBJECT_KIND:
        raise UserError("model.kind: \"object\" records a run given a model object with layers "
                        "of its own (mpifed.train.run(model=...)); to train from a file, set "
                        "model.factory to a function that builds that model, or model.init to "
                        "its model.h5")
    raise UserError(f"model.kind: {kind!r} is not a model; use one of {', '.join(KINDS)}")


def gpt_from_config(model, input_shape, vocab_size: int):
    """The GPT that [model] describes on windows of input_shape = (block_size,) tokens; the
    vocabulary is model.vocab_size, else the data's."""
    from .gpt import gpt

    vocab = model.vocab_size or vocab_size
    if vocab < vocab_size:
        raise UserError(f"model.vocab_size: {vocab} is less than the data's {vocab_size}; "
                        "raise it or set 0 (the data's)")
    if tuple(input_shape) != (model.block_size,):
        raise UserError(f"model.block_size: {model.block_size}, but the data's windows have "
                        f"{input_shape} tokens")
    return gpt(vocab, model.block_size, model.n_layer, model.n_head, model.n_embd,
               model.dropout, model.gelu, model.recompute)


def model_from_factory(name: str, input_shape, num_classes: int) -> Sequential:
    """Call the user's `package.module:function(input_shape, num_classes)`; it returns a list
    of mpifed.nn layers (or a Sequential)."""
    module_name, function = _factory_parts(name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"model.factory: cannot import {module_name!r} ({err}); put it on "
                        "PYTHONPATH") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UserError(f"model.factory: {module_name!r} has no function {function!r}")
    made = fn(tuple(input_shape), num_classes)
    if isinstance(made, Sequential):
        made.kind, made.extra = "factory", dict(made.extra, factory=name)
        return made
    if isinstance(made, (list, tuple)) and all(isinstance(m, Layer) for m in made):
        return Sequential(list(made), input_shape, num_classes, "factory", factory=name)
    raise UserError(f"model.factory: {name} returned {type(made).__name__}; it must return a "
                    "list of mpifed.nn layers or an mpifed.nn.Sequential")


def fit_to_data(model: Sequential, input_shape, num_classes: int, key: str) -> None:
    """Check a loaded model against the data: the same classes, and inputs its layers take
    (rebuilt for the data's shape: a misfit names the layer and both shapes)."""
    shape = tuple(int(s) for s in input_shape)
    if model.num_classes != num_classes:
        raise UserError(f"{key}: the model has {model.num_classes} classes, the data has "
                        f"{num_classes}")
    if shape != model.input_shape:
        try:
            model.build(shape)
        except UserError as err:
            raise UserError(f"{key}: the model was built for inputs {model.input_shape}, the "
                            f"data has {shape}: {err}") from None
