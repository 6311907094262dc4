"""Errors a user can cause, and the one place that turns them into CLI exit codes.

Every user-facing mistake (bad experiment file, bad plan, unknown preset) raises
:class:`ConfigError` with a message that names the offending key or value and the rule it
broke. CLIs call :func:`cli_guard`, which prints that message on one line and returns exit
code 2 instead of a traceback.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable, Sequence

EXIT_INVALID = 2


class ConfigError(ValueError):
    """A user input (file, preset name, plan) violates a documented rule."""


class PlanInvalidError(ConfigError):
    """A plan violates one or more validation rules; ``messages`` holds all of them."""

    def __init__(self, messages: Sequence[str]):
        self.messages = list(messages)
        super().__init__("invalid plan: " + "; ".join(self.messages))


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``word``, or ""."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def cli_guard(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a CLI ``main`` and map :class:`ConfigError` to one line on stderr and exit 2."""
    try:
        return main(argv)
    except PlanInvalidError as exc:
        for msg in exc.messages:
            print(f"error: {msg}", file=sys.stderr)
        return EXIT_INVALID
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
