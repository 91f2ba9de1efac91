"""The PyTorch peer's model, shared by the CPU and GPU throughput benchmarks (torch is optional)."""

from __future__ import annotations

from .mlp import SIZES


def torch_mlp(device=None):
    """Return the benchmark MLP (mlp.SIZES) as a torch Sequential (seeded, on `device`)."""
    import torch

    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(SIZES, SIZES[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])  # no ReLU after the last layer
    return model.to(device) if device is not None else model
