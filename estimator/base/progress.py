"""Progress bars of the long commands: a live bar on a terminal, a plain line now and then in a log.

tqdm redraws its bar in place with carriage returns. Where stderr is a file or a pipe
(``python -m search > log 2>&1``) every redraw stays in it: kilobytes of updates on one line.
:func:`progress_bar` is the one way the commands make a bar: tqdm's own when the stream is a
terminal, otherwise the same tqdm object writing through :class:`LogLines`, which keeps a
whole line at most every :data:`LOG_INTERVAL_S` seconds and the final state when the bar
closes::

    from estimator.base.progress import progress_bar

    with progress_bar(total=len(cases), desc="kernels", unit="case") as bar:
        for case in cases:
            ...
            bar.update()
    for point in progress_bar(points, desc="what-if points", unit="point"):
        ...
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

LOG_INTERVAL_S = 5.0  # at most one progress line this often where stderr is not a terminal


class LogLines:
    """A file for tqdm that turns its in-place redraws into whole lines: the first state at once,
    then at most one line every ``interval`` seconds, and the last state when the bar closes
    (tqdm then writes a newline). Redraws in between are dropped."""

    def __init__(self, stream: IO[str], interval: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.interval = interval  # seconds between lines
        self.clock = clock
        self.written: str | None = None  # the last line written
        self.written_at: float | None = None
        self.pending: str | None = None  # the newest state not written yet

    def write(self, text: str) -> int:
        for chunk in text.split("\r"):  # tqdm redraws as "\r" + state + padding
            for i, piece in enumerate(chunk.split("\n")):
                if i > 0:  # a newline: tqdm closed the bar
                    self._close_line()
                if piece.strip():
                    self._state(piece.rstrip())
        return len(text)

    def _state(self, state: str) -> None:
        now = self.clock()
        if self.written_at is None or now - self.written_at >= self.interval:
            self._emit(state, now)
        else:
            self.pending = state

    def _close_line(self) -> None:
        """tqdm closed the bar (its final newline): write the last state if it is not out yet."""
        if self.pending is not None and self.pending != self.written:
            self._emit(self.pending, self.clock())
        self.pending = None

    def _emit(self, state: str, now: float) -> None:
        self.stream.write(state + "\n")
        self.stream.flush()
        self.written, self.written_at, self.pending = state, now, None

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", stream: IO[str] | None = None, interval: float = LOG_INTERVAL_S,
                 disable: bool = False, **kwargs: Any):  # -> tqdm.tqdm
    """A tqdm bar on ``stream`` (default: stderr at call time): live on a terminal, a line at
    most every ``interval`` seconds otherwise. ``kwargs`` go to tqdm (``bar_format``, …)."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    if is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, disable=disable,
                    **kwargs)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=LogLines(stream, interval), ascii=True,
                mininterval=min(interval, 1.0), disable=disable, **kwargs)
