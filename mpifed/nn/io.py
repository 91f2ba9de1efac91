"""Model files (HDF5). The root has attributes `kind`, `input_shape` and `num_classes`; group
`layers/<i>` holds layer i's arrays and its attributes `type` and settings: `linear` W (in x out)
and b; `conv2d` W (out_channels, in_channels, kh, kw) and b; batch norm gamma, beta,
running_mean, running_var; `residual` its sublayers in layers/<i>/layers/<j> and a projection
in layers/<i>/projection. A `gpt` file also holds group `state_dict`: nanoGPT's
`GPT.state_dict()` names and [out, in] shapes, `lm_head.weight` a copy of
`transformer.wte.weight`, so it loads strictly into a PyTorch GPT.

`softmax` and `mlp` files keep the first layout: layers/<i> is the i-th linear layer (W, b), the
root has `hidden`; those written before the layer library still load.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from ..data.atomic import atomic_path
from ..errors import UserError
from .layers import LAYERS, Residual
from .layout import views
from .models import LEGACY_KINDS
from .sequential import Sequential


def save_model(path: str, spec: Sequential, flat, dtype=None) -> None:
    """Write the model atomically (temporary name, fsync, rename): never half-written.

    flat: the flat parameters, or a provider (i, lo, hi) -> layer i's elements (NumPy or
    CuPy), asked for once per layer with parameters, in layer order (a sharded model gathered
    layer by layer into the file); `dtype` is then the parameters' dtype.
    """
    if callable(flat):
        dtype = np.dtype(dtype)

        def layer_of(i):
            lo, hi = spec.layer_range(i, dtype)
            return spec.layer_views(i, _host(flat(i, lo, hi)) if hi > lo else None)
    else:
        host = _host(flat)
        layers = views(host, spec.layout(host.dtype))
        bounds = spec.bounds

        def layer_of(i):
            return {name: layers[j] for j, (name, _) in
                    zip(range(bounds[i], bounds[i + 1]), spec.entries[i])}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        fh.attrs["kind"] = spec.kind
        fh.attrs["num_classes"] = spec.num_classes
        if spec.kind in LEGACY_KINDS:
            _save_legacy(fh, spec, layer_of)
            return
        fh.attrs["input_shape"] = np.asarray(spec.input_shape, dtype=np.int64)
        for key, value in spec.extra.items():
            fh.attrs[key] = value
        names = getattr(spec, "state_dict_names", None)
        for i, layer in enumerate(spec.layers):
            group = fh.create_group(f"layers/{i}")
            arrays = layer_of(i)
            for name, array in arrays.items():
                group.create_dataset(name.replace(".", "/"), data=array)
            _write_settings(group, layer)
            if names is not None:  # a GPT: nanoGPT's state_dict beside layers/
                torch_names = names(i)
                for name, array in arrays.items():
                    fh.create_dataset(f"state_dict/{torch_names[name]}", data=array)
        if names is not None:
            fh["state_dict/lm_head.weight"] = fh["state_dict/transformer.wte.weight"][...]


def _host(a):
    """A NumPy array of `a` (copied from the device for CuPy)."""
    return np.asarray(a.get() if hasattr(a, "get") else a)


def _write_settings(group, layer) -> None:
    group.attrs["type"] = layer.type
    for key, value in layer.settings().items():
        group.attrs[key] = value
    if isinstance(layer, Residual):
        for j, sub in enumerate(layer.chain.layers):
            _write_settings(group.require_group(f"layers/{j}"), sub)


def _save_legacy(fh, spec: Sequential, layer_of) -> None:
    """softmax/mlp: layers/<k> is the k-th layer with parameters (a linear layer: W, b)."""
    fh.attrs["hidden"] = np.asarray(spec.hidden, dtype=np.int64)
    if spec.input_shape != (spec.features,):
        fh.attrs["input_shape"] = np.asarray(spec.input_shape, dtype=np.int64)
    k = 0
    for i, entries in enumerate(spec.entries):
        if entries:
            p = layer_of(i)
            group = fh.create_group(f"layers/{k}")
            group.create_dataset("W", data=p["W"])
            group.create_dataset("b", data=p["b"])
            k += 1


def load_model(path: str, dtype=None, key: str = "model.init") -> tuple[Sequential, np.ndarray]:
    """Read a model file; return (model, flat host parameters)."""
    if not os.path.exists(path):
        raise UserError(f"{key}: model file {path!r} does not exist")
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{key}: {path!r} is not a readable HDF5 model file ({err})") from None
    with fh:
        try:
            kind = _text(fh.attrs["kind"])
            classes = int(fh.attrs["num_classes"])
            _check_kind(kind, path, key)
            if len(fh["layers"]) == 0:
                raise UserError(f"{key}: {path!r} has an empty 'layers' group: no weights to "
                                "read; give a model file written by mpifed train")
            if kind in LEGACY_KINDS:
                return _load_legacy(fh, path, kind, classes, dtype, key)
            shape = tuple(int(s) for s in fh.attrs["input_shape"])
            extra = {k: _plain(v) for k, v in fh.attrs.items()
                     if k not in ("kind", "num_classes", "input_shape")}
            if "factory" in extra:
                from .spec import model_from_factory

                model = model_from_factory(extra["factory"], shape, classes)
            else:
                count = len(fh["layers"])
                layers = [_read_layer(fh[f"layers/{i}"], f"layers/{i}", key)
                          for i in range(count)]
                cls = Sequential
                if kind == "gpt":
                    from .gpt import GPT as cls
                model = cls(layers, shape, classes, kind, where=f"{key} {path!r} layers",
                            **extra)
            dtype = np.dtype(dtype or _stored_dtype(fh["layers"]))
            flat = np.zeros(model.layout(dtype).size, dtype=dtype)
            for i, p in enumerate(model.param_views(flat)):
                for name, view in p.items():
                    stored = fh[f"layers/{i}/{name.replace('.', '/')}"]
                    if stored.shape != view.shape:
                        raise UserError(f"{key}: layers/{i}/{name.replace('.', '/')} in {path!r} "
                                        f"has shape {stored.shape}, the layer needs {view.shape}")
                    view[...] = stored[...]
                    _check_finite(view, f"layers/{i}/{name.replace('.', '/')}", path, key)
            model._views.clear()
        except KeyError as err:
            raise UserError(f"{key}: {path!r} is not an mpifed model file (missing {err}); it "
                            "needs attributes kind, input_shape, num_classes and groups "
                            "layers/<i>") from None
    return model, flat


def _read_layer(group, where: str, key: str):
    kind = _text(group.attrs["type"])
    if kind not in LAYERS:
        raise UserError(f"{key}: {where} is a {kind!r} layer, which mpifed does not know; "
                        "a model with layers of your own loads through model.factory")
    cls, keys = LAYERS[kind]
    settings = {k: _plain(group.attrs[k]) for k in keys if k in group.attrs}
    if kind == "residual":
        settings["layers"] = [_read_layer(group[f"layers/{j}"], f"{where}/layers/{j}", key)
                              for j in range(len(group["layers"]))]
    return cls(**settings)


def _load_legacy(fh, path, kind, classes, dtype, key):
    from .models import ModelSpec

    hidden = tuple(int(h) for h in np.atleast_1d(fh.attrs.get("hidden", [])))
    arrays = []
    for i in range(len(fh["layers"])):
        arrays += [fh[f"layers/{i}/W"][...], fh[f"layers/{i}/b"][...]]
    shape = tuple(int(s) for s in fh.attrs.get("input_shape", [arrays[0].shape[0]]))
    spec = ModelSpec(kind, shape, hidden, classes)
    layout = spec.layout(dtype or arrays[0].dtype)
    if tuple(a.shape for a in arrays) != layout.shapes:
        raise UserError(f"{key}: layer shapes in {path!r} do not match kind={kind!r}, "
                        f"hidden={list(hidden)}, num_classes={classes}")
    for i, array in enumerate(arrays):
        _check_finite(array, f"layers/{i // 2}/{'Wb'[i % 2]}", path, key)
    flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(layout.dtype)
    return spec, flat


def _check_kind(kind: str, path: str, key: str) -> None:
    """Refuse a file whose `kind` no mpifed model has (damaged, or not from mpifed)."""
    from .spec import KINDS

    if kind not in (*KINDS, "factory"):
        raise UserError(f"{key}: {path!r} holds kind = {kind!r}, which is no model mpifed knows "
                        f"({', '.join(KINDS)}, factory); the file is damaged or not from mpifed")


def _check_finite(array, where: str, path: str, key: str) -> None:
    if not np.isfinite(array).all():
        raise UserError(f"{key}: {path!r} has NaN or Inf in {where}; the model it holds is "
                        "broken (a diverged run?)")


def _stored_dtype(group):
    """The dtype of the first array stored under `group` (float32 when there is none)."""
    found = []
    group.visititems(lambda name, obj: found.append(obj.dtype)
                     if isinstance(obj, h5py.Dataset) else None)
    return found[0] if found else np.float32


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value):
    """An HDF5 attribute as a Python value (numpy scalars to int, float, bool; text to str)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if hasattr(value, "item") else value
