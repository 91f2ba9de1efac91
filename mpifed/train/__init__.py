"""Wiring a training step and a run together: config, the loop, evaluation, reporting."""
