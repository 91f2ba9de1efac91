"""Optimisers and learning-rate schedules, as pure updates of flat parameter buffers."""

from .clip import clip_grad_norm
from .optimizers import SGD, Adam, AdamW, make_optimizer
from .schedules import learning_rate

__all__ = ["SGD", "Adam", "AdamW", "clip_grad_norm", "learning_rate", "make_optimizer"]
