"""Model files: HDF5 with groups layers/<i> holding W (in x out) and b (out), and attributes
`kind`, `hidden`, `num_classes`."""

from __future__ import annotations

import os

import h5py
import numpy as np

from ..data.atomic import atomic_path
from ..errors import UserError
from .layout import views
from .models import ModelSpec


def save_model(path: str, spec: ModelSpec, flat) -> None:
    """Write the model atomically (temporary name, fsync, rename): never half-written."""
    host = np.asarray(flat.get() if hasattr(flat, "get") else flat)
    layers = views(host, spec.layout(host.dtype))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        fh.attrs["kind"] = spec.kind
        fh.attrs["hidden"] = np.asarray(spec.hidden, dtype=np.int64)
        fh.attrs["num_classes"] = spec.num_classes
        for i in range(0, len(layers), 2):
            group = fh.create_group(f"layers/{i // 2}")
            group.create_dataset("W", data=layers[i])
            group.create_dataset("b", data=layers[i + 1])


def load_model(path: str, dtype=None, key: str = "model.init") -> tuple[ModelSpec, np.ndarray]:
    """Read a model file; return (spec, flat host parameters)."""
    if not os.path.exists(path):
        raise UserError(f"{key}: model file {path!r} does not exist")
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{key}: {path!r} is not a readable HDF5 model file ({err})") from None
    with fh:
        try:
            kind = fh.attrs["kind"]
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            hidden = tuple(int(h) for h in np.atleast_1d(fh.attrs.get("hidden", [])))
            count = len(fh["layers"])
            arrays = []
            for i in range(count):
                arrays += [fh[f"layers/{i}/W"][...], fh[f"layers/{i}/b"][...]]
            classes = int(fh.attrs["num_classes"])
        except KeyError as err:
            raise UserError(f"{key}: {path!r} is not an mpifed model file (missing {err}); "
                            "it needs layers/<i>/W, layers/<i>/b and attributes kind, hidden, "
                            "num_classes") from None
    spec = ModelSpec(kind, int(arrays[0].shape[0]), hidden, classes)
    layout = spec.layout(dtype or arrays[0].dtype)
    if tuple(a.shape for a in arrays) != layout.shapes:
        raise UserError(f"{key}: layer shapes in {path!r} do not match kind={kind!r}, "
                        f"hidden={list(hidden)}, num_classes={classes}")
    flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(layout.dtype)
    return spec, flat
