"""Optimisers and learning-rate schedules, as pure updates of flat parameter buffers."""

from .optimizers import SGD, Adam, make_optimizer
from .schedules import learning_rate

__all__ = ["SGD", "Adam", "learning_rate", "make_optimizer"]
