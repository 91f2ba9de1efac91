"""Models and losses, as pure functions over `xp` arrays (NumPy or CuPy).

    from mpifed.nn import Linear, ReLU, Sequential
    model = Sequential([Linear(64), ReLU(), Linear(10)], input_shape=(20,), num_classes=10)
"""

from .layers import (
    GELU,
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool,
    Layer,
    LayerNorm,
    Linear,
    MaxPool2d,
    ReLU,
    Residual,
    Tanh,
)
from .sequential import Sequential

__all__ = ["AvgPool2d", "BatchNorm2d", "Conv2d", "Dropout", "Flatten", "GELU", "GlobalAvgPool",
           "Layer", "LayerNorm", "Linear", "MaxPool2d", "ReLU", "Residual", "Sequential", "Tanh"]
