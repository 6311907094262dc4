"""Checks of command-line input that run before any search work, each raising
:class:`ConfigError` with one line naming the value and the rule it broke."""

from __future__ import annotations

import math
from pathlib import Path

from estimator.base.errors import ConfigError
from estimator.base.io import check_output_path

# Each chain is a process: more than this is no machine's core count, and would only exhaust
# the process table.
MAX_CHAINS = 1024


def check_out(path: str, flag: str = "--out") -> Path:
    """``path`` can be written (:func:`estimator.base.io.check_output_path`: a regular file or a
    character device, through symlinks, in an existing writable directory)."""
    return check_output_path(path, flag)


def check_budget(seconds: float) -> float:
    """A time budget must be a finite number of seconds above zero."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"--time-budget {seconds!r} must be a finite number of seconds above 0")
    return seconds


def check_positive(value: int, flag: str, hi: int | None = None) -> int:
    if value < 1:
        raise ConfigError(f"{flag} {value!r} must be a positive integer")
    if hi is not None and value > hi:
        raise ConfigError(f"{flag} {value!r} exceeds the limit {hi:,}")
    return value
