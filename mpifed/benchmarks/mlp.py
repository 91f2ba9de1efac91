"""The benchmark model, defined once: a 784-512-256-10 ReLU MLP in float32 (535,818 parameters).

Every throughput, scaling and federated-round benchmark trains it, and the PyTorch peer builds
the same layers (`peers.torch_mlp`), so their figures compare.
"""

from __future__ import annotations

FEATURES, HIDDEN, CLASSES = 784, (512, 256), 10
SIZES = (FEATURES, *HIDDEN, CLASSES)
NAME = "MLP " + "-".join(map(str, SIZES))  # "MLP 784-512-256-10"
PARAMETERS = sum(fan_in * fan_out + fan_out for fan_in, fan_out in zip(SIZES, SIZES[1:]))
GRAD_BYTES = 4 * PARAMETERS  # float32 gradients all-reduced per step


def model_section(hidden=HIDDEN) -> dict:
    """Return the [model] section of a config that trains this MLP."""
    return {"kind": "mlp", "hidden": list(hidden)}


def model_toml(hidden=HIDDEN) -> str:
    """Return the same [model] section as TOML text, for configs written to files."""
    return f'[model]\nkind = "mlp"\nhidden = {list(hidden)}\n'
