"""Field metadata for the config dataclasses: allowed values and numeric ranges.

`trainer.config` checks every loaded value against them and names the dotted key when one is
off, so `precision=fp8` or `schedule.warmup_frac=2.0` fail at load time, not hours later.
A separate module so that trainer.data.config and the task modules can use it without
importing trainer.config (no import loops).
"""

from __future__ import annotations


def choice(*values: str) -> dict:
    """metadata= for a field that must be one of `values`."""
    return {"choices": values}


def between(lo: float | None = None, hi: float | None = None) -> dict:
    """metadata= for a number in [lo, hi] (None: unbounded on that side)."""
    return {"range": (lo, hi)}
