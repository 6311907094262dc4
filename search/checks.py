"""Checks of command-line input that run before any search work, each raising
:class:`ConfigError` with one line naming the value and the rule it broke."""

from __future__ import annotations

import math
import os
from pathlib import Path

from estimator.errors import ConfigError


def check_out(path: str, flag: str = "--out") -> Path:
    """``path`` can be written: not a directory, in an existing writable directory."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path!r} is a directory; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"{flag} {path!r}: not writable")
    return p


def check_budget(seconds: float) -> float:
    """A time budget must be a finite number of seconds above zero."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"--time-budget {seconds!r} must be a finite number of seconds above 0")
    return seconds


def check_positive(value: int, flag: str) -> int:
    if value < 1:
        raise ConfigError(f"{flag} {value!r} must be a positive integer")
    return value
