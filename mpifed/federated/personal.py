"""Personalisation's pure pieces: which parameters an institution keeps to itself, and the
summary of its own figures.

    federated.personalization = "fedbn"     # batch-norm parameters and statistics stay local
    federated.personalization = "fedper"    # the layers in federated.personal_layers stay local
    federated.personalization = "ditto"     # a whole personal model beside the global one

FedBN (Li et al., ICLR 2021) and FedPer (Arivazhagan et al., 2019) split the flat parameter
vector in two: the shared part travels to the root and is aggregated, the personal part never
leaves the institution. `shared_mask` says which is which, element by element, over the model's
flat layout (`Sequential.layout`). Ditto (Li et al., ICML 2021) shares the whole global model and
keeps a second, personal one, trained with the proximal term lambda/2 ||v - w||^2 toward the
round's global model w.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError

PERSONALIZATIONS = ("none", "fedbn", "fedper", "ditto")
SPLITS = ("fedbn", "fedper")  # the modes that keep a part of the one model local


def batchnorm_names(layer, prefix: str = "") -> set[str]:
    """Return the names of `layer`'s arrays (as its `params()` names them) that belong to a
    batch-norm layer, itself or nested (a Residual's children)."""
    if layer.type == "batchnorm2d":
        return {prefix + name for name, _ in layer.params()}
    names = set()
    for child_prefix, child in getattr(layer, "children", lambda: [])():
        names |= batchnorm_names(child, prefix + child_prefix)
    return names


def shared_mask(spec, mode: str, personal_layers=(), dtype="float32") -> np.ndarray | None:
    """Return a bool vector over the flat parameters (n,): True where the element is shared
    with the root, False where it stays with its institution; None when everything is shared
    ("none" and "ditto", whose personal model is a second vector).

    spec: the Sequential model; personal_layers: FedPer's layer indices (into spec.layers)."""
    if mode not in SPLITS:
        return None
    layout = spec.layout(dtype)
    mask = np.ones(layout.size, dtype=bool)
    for i, (layer, entries) in enumerate(zip(spec.layers, spec.entries)):
        first = spec.bounds[i]
        local = batchnorm_names(layer) if mode == "fedbn" else (
            {name for name, _ in entries} if i in personal_layers else set())
        for j, (name, _) in enumerate(entries):
            if name in local:
                mask[layout.offsets[first + j]:layout.offsets[first + j + 1]] = False
    return mask


def check_split(spec, mode: str, personal_layers, mask) -> None:
    """Refuse a split that cannot work on this model, naming the key: FedBN without batch
    norm, FedPer's indices out of range or on layers without parameters, or nothing left to
    share."""
    count = len(spec.layers)
    if mode == "fedbn" and mask.all():
        raise UserError("federated.personalization: \"fedbn\" keeps the batch-norm layers local, "
                        "but the model has none; add {type = \"batchnorm2d\"} layers or choose "
                        "\"fedper\" or \"ditto\"")
    if mode == "fedper":
        wrong = [i for i in personal_layers if i >= count]
        if wrong:
            raise UserError(f"federated.personal_layers: {wrong} out of range; the model has "
                            f"{count} layers (0 to {count - 1})")
        empty = [i for i in personal_layers if not spec.entries[i]]
        if empty:
            kinds = ", ".join(f"{i}: {spec.layers[i].type}" for i in empty)
            raise UserError(f"federated.personal_layers: layers without parameters ({kinds}) "
                            "have nothing to keep local; list layers with weights (linear, "
                            "conv2d, ...)")
    if mask is not None and not mask.any():
        raise UserError("federated.personal_layers: every parameter would stay local, leaving "
                        "nothing to share with the other institutions; keep at least one layer "
                        "shared (the head alone is usual)")


def local_summary(accuracies) -> dict:
    """Return {"local_accuracy_mean", "local_accuracy_worst"} of per-institution accuracies."""
    values = np.asarray(accuracies, dtype=np.float64)
    return {"local_accuracy_mean": float(values.mean()),
            "local_accuracy_worst": float(values.min())}
