"""Placeholder replaced by the fault-injection hook (MPIFED_FAULT); see tests."""

from __future__ import annotations


def inject(point: str, number: int, rank: int) -> None:
    """Raise or die here when MPIFED_FAULT names this point (no-op until the hook lands)."""
    return None
