"""Gradient compression: one class per comm.compression scheme behind one protocol
(`base.Compressor`), chosen by name from `COMPRESSORS` with `make_compressor`."""

from .base import COMPRESSORS, Compressor, make_compressor, model_blocks

__all__ = ["COMPRESSORS", "Compressor", "make_compressor", "model_blocks"]
