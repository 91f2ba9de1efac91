"""The PyTorch peers' models, shared by the CPU and GPU throughput benchmarks (torch is optional):
the benchmark MLP, and the lenet5 and resnet presets of the layer library."""

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


def torch_lenet5(input_shape=(1, 28, 28), classes: int = 10, device=None):
    """Return mpifed's `lenet5` preset in torch (same layers, same order, seeded)."""
    import torch
    from torch import nn

    channels, h, w = input_shape
    side = [((s // 2 - 4) // 2) for s in (h, w)]  # after conv pad 2, pool, conv 5x5, pool
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * side[0] * side[1], 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, classes))
    return model.to(device) if device is not None else model


def torch_resnet(depth: int = 8, channels: int = 3, classes: int = 10, device=None):
    """Return mpifed's `resnet` preset in torch: conv 16@3x3, (depth-2)/6 basic blocks per stage
    of 16, 32, 64 channels, a 1x1 convolution (with bias, no norm) as the projection where the
    shape changes, batch norm, global average pooling, linear C. Convolutions keep their bias,
    as mpifed's do."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout))
            self.projection = (nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout
                               else None)

        def forward(self, x):
            skip = x if self.projection is None else self.projection(x)
            return torch.relu(self.body(x) + skip)

    torch.manual_seed(0)
    layers, cin = [nn.Conv2d(channels, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, cout in enumerate((16, 32, 64)):
        for block in range((depth - 2) // 6):
            layers.append(Block(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes)]
    model = nn.Sequential(*layers)
    return model.to(device) if device is not None else model
