"""Measured spans of one device: a call, its reallocation, data movement and compute, and
within the compute each micro-batch's ops (see :class:`Recorder`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from estimator.spec.timeline import Sample, Span


class Recorder:
    """Spans of one device on a clock that starts at a common barrier.

    Coarse spans (:meth:`span`: a call, its compute, reallocation, data) wait for the device's
    compute stream to finish before they close. Fine spans (:meth:`fine`: one micro-batch's
    forward or backward, one decode step) must not stall the host, which keeps a GPU's queue
    full: on a GPU they are timed with CUDA events on the compute stream, read once at the
    end (:meth:`finish`); on a CPU the host clock is exact."""

    def __init__(self, device: int, torch_device: torch.device):
        self.device = device
        self.cuda = torch_device.type == "cuda"
        self.stream = torch.cuda.current_stream(torch_device) if self.cuda else None
        self.spans: list[Span] = []
        self.counters: list[Sample] = []
        self._events: list[tuple[Any, Any, Span]] = []  # (start, end, span with placeholder times)
        # Only the compute stream: a device-wide synchronize would also wait for pushed sends
        # whose receivers have not posted yet (see executor.dataflow) and could deadlock.
        self.sync()
        self.t0 = time.perf_counter()
        self._ref = self._event() if self.cuda else None  # device time of t0

    def sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def _event(self) -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.stream)
        return ev

    @contextmanager
    def span(self, iteration: int, call: str, op: str, stage: int = -1) -> Iterator[None]:
        start = time.perf_counter() - self.t0
        yield
        self.sync()  # GPU work is asynchronous: close the span when it is done
        end = time.perf_counter() - self.t0
        self.spans.append(Span(start, end, self.device, iteration, call, op, -1, stage))

    def now(self) -> float:
        """Seconds on this recorder's clock."""
        return time.perf_counter() - self.t0

    def close(self, start: float, iteration: int, call: str, op: str, stage: int = -1) -> None:
        """A coarse span that began at ``start`` (:meth:`now`) and ends now: one that no block
        of code encloses (a streaming rollout's share of an iteration, :mod:`executor.stream`)."""
        self.sync()
        self.spans.append(Span(start, self.now(), self.device, iteration, call, op, -1, stage))

    def sample(self, iteration: int, call: str, name: str, value: float) -> None:
        """A counter's value from now on (e.g. a generate call's running batch). On a GPU the
        host clock runs ahead of the queued work, so the value is placed at the host's time."""
        self.counters.append(Sample(time.perf_counter() - self.t0, self.device, iteration, call, name, value))

    @contextmanager
    def fine(self, iteration: int, call: str, op: str, micro_batch: int, stage: int) -> Iterator[None]:
        if not self.cuda:
            start = time.perf_counter() - self.t0
            yield
            end = time.perf_counter() - self.t0
            self.spans.append(Span(start, end, self.device, iteration, call, op, micro_batch, stage))
            return
        begin = self._event()
        yield
        self._events.append((begin, self._event(), Span(0.0, 0.0, self.device, iteration, call, op, micro_batch,
                                                        stage)))

    def finish(self) -> list[Span]:
        """Every span, fine spans placed on the host clock."""
        if self._events:
            self.sync()
            for begin, end, s in self._events:
                start = self._ref.elapsed_time(begin) / 1e3
                self.spans.append(dataclasses.replace(s, start_s=start, end_s=start + begin.elapsed_time(end) / 1e3))
            self._events.clear()
        return self.spans
