"""Models and losses, as pure functions over `xp` arrays (NumPy or CuPy)."""
