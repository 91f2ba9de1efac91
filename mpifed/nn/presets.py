"""The named architectures: `softmax`, `mlp`, `lenet5` and He et al.'s CIFAR `resnet`."""

from __future__ import annotations

from ..errors import UserError
from .layers import BatchNorm2d, Conv2d, Flatten, GlobalAvgPool, Linear, MaxPool2d, ReLU, Residual
from .sequential import Sequential

RESNET_DEPTHS = (8, 14, 20)


def softmax(input_shape, num_classes: int) -> Sequential:
    """Multinomial logistic regression: flatten, linear C."""
    return Sequential([Flatten(), Linear(num_classes)], input_shape, num_classes, "softmax",
                      where="model")


def mlp(input_shape, hidden, num_classes: int) -> Sequential:
    """Flatten, then (linear h, ReLU) per hidden size, then linear C."""
    if not hidden:
        raise UserError("model.hidden: an mlp needs at least one hidden size, e.g. [128]")
    layers = [Flatten()]
    for h in hidden:
        layers += [Linear(h), ReLU()]
    return Sequential(layers + [Linear(num_classes)], input_shape, num_classes, "mlp",
                      where="model", hidden=tuple(int(h) for h in hidden))


def lenet5(input_shape, num_classes: int) -> Sequential:
    """conv 6@5x5 pad 2, ReLU, max-pool 2, conv 16@5x5, ReLU, max-pool 2, linear 120, ReLU,
    linear 84, ReLU, linear C (LeCun et al. 1998, with ReLU and max-pooling)."""
    layers = [Conv2d(6, 5, padding=2), ReLU(), MaxPool2d(2),
              Conv2d(16, 5), ReLU(), MaxPool2d(2), Flatten(),
              Linear(120), ReLU(), Linear(84), ReLU(), Linear(num_classes)]
    return Sequential(layers, input_shape, num_classes, "lenet5", where="model.kind=lenet5")


def resnet(input_shape, num_classes: int, depth: int = 20, sync: bool = False) -> Sequential:
    """He et al. 2016's CIFAR ResNet: conv 16@3x3, three stages of (depth-2)/6 basic blocks of
    16, 32 and 64 channels (stride 2 between stages, projection shortcuts), batch norm, global
    average pooling, linear C."""
    if depth not in RESNET_DEPTHS:
        raise UserError(f"model.depth: a resnet has depth 8, 14 or 20, got {depth!r}")
    blocks = (depth - 2) // 6
    layers = [Conv2d(16, 3, padding=1), BatchNorm2d(sync), ReLU()]
    for stage, channels in enumerate((16, 32, 64)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers += [Residual([Conv2d(channels, 3, stride, 1), BatchNorm2d(sync), ReLU(),
                                 Conv2d(channels, 3, 1, 1), BatchNorm2d(sync)]), ReLU()]
    layers += [GlobalAvgPool(), Linear(num_classes)]
    return Sequential(layers, input_shape, num_classes, "resnet", where="model.kind=resnet",
                      depth=depth)
