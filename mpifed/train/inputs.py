"""What `mpifed.train.run` takes besides a configuration: a model object, this rank's arrays, and
callbacks; and how config.toml records them.

    run(cfg, model=Sequential(...), data=(x, y), test=(x_test, y_test), callbacks=[show])

Recorded in OUT/config.toml, so that the file still describes the run:
- `data`: data.train = "<arrays>" (`test`: data.test = "<arrays>"); no file holds the rows.
- `model`: [model] kind = "sequential" with model.layers, the object's layers as tables, when
  every layer is one of mpifed's (`mpifed train OUT/config.toml` rebuilds the same model); else
  kind = "object" (layers of your own: model.h5 holds the trained model, and a file run needs
  model.factory to build it again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..comm.agree import raise_together
from ..data.memory import ARRAYS
from ..errors import UserError
from ..log import get_logger
from ..nn.layers import Residual
from ..nn.sequential import Sequential
from ..nn.spec import model_from_config

log = get_logger(__name__)


class StepRecord(NamedTuple):
    """What a data-parallel callback receives after each step (the same on every rank)."""

    step: int  # steps done, 1-based
    loss: float  # the step's global mean loss
    lr: float  # the learning rate the step used


@dataclass(frozen=True)
class RunInputs:
    """Objects given to `mpifed.train.run` instead of what the configuration names.

    model: a Sequential instead of [model]; data, test: this rank's (x, y) instead of
    data.train, data.test; callbacks: called with a StepRecord after each data-parallel step,
    with (round, record) after each federated round.
    """

    model: Sequential | None = None
    data: Any = None
    test: Any = None
    callbacks: tuple[Callable, ...] = ()

    def __post_init__(self):
        if self.model is not None and not isinstance(self.model, Sequential):
            raise UserError(f"model: expected an mpifed.nn.Sequential, got "
                            f"{type(self.model).__name__}; build one with "
                            "mpifed.nn.Sequential([...layers], input_shape, num_classes)")
        callbacks = tuple(self.callbacks) if isinstance(self.callbacks, (list, tuple)) \
            else (self.callbacks,)
        for i, fn in enumerate(callbacks):
            if not callable(fn):
                raise UserError(f"callbacks[{i}]: {fn!r} is not callable; pass functions")
        object.__setattr__(self, "callbacks", callbacks)


NO_INPUTS = RunInputs()  # `mpifed train`: everything from the configuration


def recorded_config(cfg, inputs: RunInputs):
    """Return `cfg` (a Config) as OUT/config.toml records a run given `inputs`; refuse what
    contradicts them (a file as well as arrays, model.init or model.factory with a model)."""
    data, model = cfg.data, cfg.model
    if inputs.data is not None and data.train != ARRAYS:
        raise UserError(f"data: arrays were given and data.train names {data.train!r}; leave "
                        f"data.train out (it is recorded as {ARRAYS!r}) or pass no data")
    if inputs.data is None and data.train == ARRAYS:
        raise UserError(f"data.train = {ARRAYS!r} means this rank's arrays: pass "
                        "data=(x, y) to mpifed.train.run, or name an HDF5 file")
    if inputs.test is not None and data.test not in ("", ARRAYS):
        raise UserError(f"test: arrays were given and data.test names {data.test!r}; leave "
                        "data.test out or pass no test")
    if inputs.test is None and data.test == ARRAYS:
        raise UserError(f"data.test = {ARRAYS!r} means this rank's arrays: pass "
                        "test=(x, y) to mpifed.train.run, or name an HDF5 file")
    if inputs.test is not None:
        data = dataclasses.replace(data, test=ARRAYS)
    if inputs.model is not None:
        for key in ("init", "factory"):
            if getattr(model, key):
                raise UserError(f"model: a model object was given and model.{key} = "
                                f"{getattr(model, key)!r}; use one of them")
        model = model_record(model, inputs.model)
    if cfg.federated is not None and (inputs.data is not None or inputs.test is not None
                                      or inputs.model is not None):
        raise UserError("data: a federation ([federated]) takes its data from files and its "
                        "model from [model] for now; write each institution's arrays with "
                        "`mpifed data from-numpy` and set data.train (a template with "
                        "{institution}), or leave [federated] out to train data-parallel on "
                        "arrays (callbacks work in both)")
    return dataclasses.replace(cfg, data=data, model=model)


def model_record(model, given: Sequential):
    """Return the ModelConfig `model` with kind and layers describing `given`."""
    tables = [layer_table(layer) for layer in given.layers]
    try:
        recorded = dataclasses.replace(model, kind="sequential", layers=tuple(tables), hidden=())
        rebuilt = model_from_config(recorded, given.input_shape, given.num_classes)
    except (UserError, TypeError, ValueError):
        rebuilt = None
    if rebuilt is not None and rebuilt.describe()[1:] == given.describe()[1:]:
        return recorded
    return dataclasses.replace(model, kind="object", layers=(), hidden=())


def layer_table(layer) -> dict:
    """Return the config table of `layer` ({type = ..., settings}), as model.layers holds it."""
    table = {"type": layer.type, **layer.settings()}
    if isinstance(layer, Residual):
        table["layers"] = [layer_table(sub) for sub in layer.chain.layers]
    return table


def call_back(comm, callbacks, *args) -> None:
    """Call each callback with `args` on every rank; if one raised anywhere, every rank raises
    a UserError naming it (its traceback is logged on the rank that raised)."""
    if not callbacks:
        return

    def call():
        for i, fn in enumerate(callbacks):
            try:
                fn(*args)
            except Exception as err:  # noqa: BLE001 -- user code: told to every rank
                log.error("callbacks[%d] raised", i, exc_info=True)
                raise UserError(f"callbacks[{i}] ({getattr(fn, '__name__', fn)!r}) raised "
                                f"{type(err).__name__}: {err}") from None
    raise_together(comm, call)
