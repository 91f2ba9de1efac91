"""Gradient compressors: what a rank sends instead of its full gradient, wrapped around an
all-reduce that sums."""
