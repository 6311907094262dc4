"""Timeline: what happened (measured) or will happen (predicted), span by span.

The estimator and the executor produce the same type, so analysis compares them row by row.
A span is one op of one call on one device: ``(device, iteration, call, op, micro_batch,
stage, start_s, end_s)``. Communication spans also name the link they used in ``resource``
(compute spans leave it empty); a span that occupies only a link has ``device = -1``.
A timeline may also hold counter samples (:class:`Sample`): a quantity over time on one device,
e.g. a generate call's running batch (``running``) at every decode step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from estimator.base import rules
from estimator.base.errors import ConfigError
from estimator.base.io import atomic_write_json
from estimator.base.loading import MAX_DATA_BYTES, load_json

TIMELINE_FORMAT = "rlhf-plan/timeline-v1"


@dataclass(frozen=True, order=True)
class Span:
    """One op of one call on one device, in seconds from the start of the run."""

    start_s: float  # seconds since the run started
    end_s: float  # seconds since the run started
    device: int  # global device id; -1 for a span on a link only
    iteration: int
    call: str  # call name, e.g. "actor_gen"
    op: str  # e.g. "forward", "backward", "decode", "realloc", "tp_allreduce", "call"
    micro_batch: int = -1  # -1 when the op is not per micro-batch
    stage: int = -1  # pipeline stage, -1 when not pipelined
    resource: str = ""  # link name for communication spans ("" for device compute)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, order=True)
class Sample:
    """A counter's value on one device from ``t_s`` until its next sample."""

    t_s: float  # seconds since the run started
    device: int  # global device id (a data-parallel replica's first device)
    iteration: int
    call: str
    name: str  # e.g. "running": requests a generate call's engine replica runs in this step
    value: float


def steady_window(iterations: int, warmup: int = 1, drain: int = 0) -> tuple[int, int]:
    """``(w, last)``: the steady state runs from the end of iteration ``w − 1`` (the start when
    ``w`` is 0) to the end of iteration ``last`` — after ``warmup`` iterations and before the last
    ``drain`` where there are enough of them, over every iteration where there are not."""
    last = iterations - 1 - (drain if iterations > warmup + drain else 0)
    return (warmup if last + 1 > warmup else 0), last


def steady_period(ends: list[float], warmup: int = 1, drain: int = 0) -> float:
    """Mean period over the :func:`steady_window` of iterations ending at ``ends``."""
    w, last = steady_window(len(ends), warmup, drain)
    return (ends[last] - (ends[w - 1] if w else 0.0)) / (last + 1 - w)


@dataclass(frozen=True)
class Timeline:
    """Spans of one run plus where they come from (``predicted`` or ``measured``)."""

    spans: tuple[Span, ...]
    source: str = "predicted"  # predicted | measured
    meta: dict[str, Any] | None = None  # free-form provenance (plan, profile, host, …)
    counters: tuple[Sample, ...] = ()  # counter samples, in time order

    def __post_init__(self) -> None:
        object.__setattr__(self, "spans", tuple(sorted(self.spans)))
        object.__setattr__(self, "counters", tuple(sorted(self.counters)))

    @classmethod
    def of(cls, spans: Iterable[Span], source: str = "predicted", counters: Iterable[Sample] = (),
           **meta: Any) -> Timeline:
        return cls(tuple(spans), source, meta or None, tuple(counters))

    @property
    def iterations(self) -> list[int]:
        return sorted({s.iteration for s in self.spans})

    @property
    def makespan_s(self) -> float:
        return max((s.end_s for s in self.spans), default=0.0)

    def call_intervals(self) -> dict[tuple[int, str], tuple[float, float]]:
        """(iteration, call) → (first start, last end) over all its spans."""
        out: dict[tuple[int, str], tuple[float, float]] = {}
        for s in self.spans:
            key = (s.iteration, s.call)
            lo, hi = out.get(key, (s.start_s, s.end_s))
            out[key] = (min(lo, s.start_s), max(hi, s.end_s))
        return out

    def iteration_ends(self) -> list[float]:
        ends: dict[int, float] = {}
        for s in self.spans:
            ends[s.iteration] = max(ends.get(s.iteration, 0.0), s.end_s)
        return [ends[i] for i in sorted(ends)]

    def iteration_times(self) -> list[float]:
        """Time between consecutive iteration ends (the first from time 0)."""
        ends = self.iteration_ends()
        return [e - (ends[i - 1] if i else 0.0) for i, e in enumerate(ends)]

    def steady_state_s(self, warmup: int = 1, drain: int = 0) -> float:
        """Mean iteration period after ``warmup`` iterations and before the last ``drain`` (all of
        them if too few): :func:`steady_period`."""
        ends = self.iteration_ends()
        return steady_period(ends, warmup, drain) if ends else 0.0

    def per_call(self, iteration: int | None = None) -> dict[str, dict[str, float]]:
        """call → {start_s, end_s, duration_s} (in ``iteration``; default: the last one)."""
        its = self.iterations
        if not its:
            return {}
        it = its[-1] if iteration is None else iteration
        return {c: {"start_s": lo, "end_s": hi, "duration_s": hi - lo}
                for (i, c), (lo, hi) in self.call_intervals().items() if i == it}

    def to_dataframe(self):  # -> pandas.DataFrame (imported lazily: pandas is slow to import)
        import pandas as pd

        cols = [f.name for f in fields(Span)]
        df = pd.DataFrame([asdict(s) for s in self.spans], columns=cols)
        df["duration_s"] = df["end_s"] - df["start_s"]
        return df

    def chrome_trace(self) -> dict[str, Any]:
        """Chrome trace-event JSON (opens in Perfetto / chrome://tracing); one track per device
        and one per link, times in microseconds."""
        events: list[dict[str, Any]] = []
        tracks: dict[str, int] = {}

        def tid(name: str) -> int:
            if name not in tracks:
                tracks[name] = len(tracks)
                events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": tracks[name],
                               "args": {"name": name}})
            return tracks[name]

        for s in self.spans:
            track = s.resource if s.resource else f"device {s.device}"
            events.append({
                "name": f"{s.call}:{s.op}", "cat": s.call, "ph": "X", "pid": 0, "tid": tid(track),
                "ts": s.start_s * 1e6, "dur": max(s.duration_s, 0.0) * 1e6,
                "args": {"iteration": s.iteration, "micro_batch": s.micro_batch, "stage": s.stage,
                         "device": s.device},
            })
        for c in self.counters:
            events.append({"name": f"{c.call}:{c.name} dev{c.device}", "ph": "C", "pid": 0, "ts": c.t_s * 1e6,
                           "args": {c.name: c.value}})
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"source": self.source, **(self.meta or {})}}

    def write_chrome_trace(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.chrome_trace())

    def to_dict(self) -> dict[str, Any]:
        out = {"format": TIMELINE_FORMAT, "source": self.source, "meta": self.meta or {},
               "spans": [asdict(s) for s in self.spans]}
        return out | ({"counters": [asdict(c) for c in self.counters]} if self.counters else {})

    @classmethod
    def from_dict(cls, data: Any, where: str = "timeline") -> Timeline:
        """A timeline document, every span checked (:func:`span_from_dict`)."""
        if not isinstance(data, dict) or data.get("format") != TIMELINE_FORMAT:
            raise ConfigError(f"{where}: not a {TIMELINE_FORMAT} document")
        unknown = sorted(set(data) - {"format", "source", "meta", "spans", "counters"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: format, source, meta, spans, counters")
        if not isinstance(data.get("spans"), list):
            raise ConfigError(f"{where}: spans must be a list of span objects, got {type(data.get('spans')).__name__}")
        spans = tuple(span_from_dict(s, f"{where}: spans[{i}]") for i, s in enumerate(data["spans"]))
        counters = data.get("counters", [])
        if not isinstance(counters, list):
            raise ConfigError(f"{where}: counters must be a list of sample objects, got {type(counters).__name__}")
        samples = tuple(sample_from_dict(c, f"{where}: counters[{i}]") for i, c in enumerate(counters))
        return cls(spans, check_source(data.get("source", "predicted"), where), check_meta(data.get("meta"), where),
                   samples)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Timeline:
        data = load_json(path, "timeline", expect=dict, max_bytes=MAX_DATA_BYTES)
        return cls.from_dict(data, where=f"timeline {path}")


SPAN_REQUIRED = ("start_s", "end_s", "device", "iteration", "call", "op")
SPAN_OPTIONAL = {"micro_batch": -1, "stage": -1, "resource": ""}  # key → value when absent
SOURCES = ("predicted", "measured")


def span_from_dict(raw: Any, where: str = "span") -> Span:
    """One span of a timeline document with every field checked: times finite, from 0 and in
    order, device ≥ -1 (-1: a link), iteration ≥ 0, micro-batch and stage ≥ -1 (-1: none), call
    and op non-empty names, resource a link name or "". The message names the field and its value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object with keys {', '.join(SPAN_REQUIRED)}, got {raw!r:.60}")
    unknown = sorted(set(raw) - set(SPAN_REQUIRED) - set(SPAN_OPTIONAL))
    missing = [k for k in SPAN_REQUIRED if k not in raw]
    if unknown or missing:
        raise ConfigError(f"{where}: " + "; ".join(([f"unknown key(s) {unknown}"] if unknown else [])
                                                  + ([f"missing key(s) {missing}"] if missing else []))
                          + f"; allowed: {', '.join((*SPAN_REQUIRED, *SPAN_OPTIONAL))}")
    v = {**SPAN_OPTIONAL, **raw}
    start = rules.real(f"{where}.start_s", v["start_s"], lo=0.0)
    end = rules.real(f"{where}.end_s", v["end_s"], lo=0.0)
    if end < start:
        raise ConfigError(f"{where}: end_s={end!r} is before start_s={start!r}; a span ends after it starts")
    ints = {"device": rules.integer(f"{where}.device", v["device"], lo=-1),
            "iteration": rules.integer(f"{where}.iteration", v["iteration"], lo=0),
            "micro_batch": rules.integer(f"{where}.micro_batch", v["micro_batch"], lo=-1),
            "stage": rules.integer(f"{where}.stage", v["stage"], lo=-1)}
    for key in ("call", "op"):
        if not isinstance(v[key], str) or not v[key]:
            raise ConfigError(f"{where}.{key}={v[key]!r:.60} must be a non-empty name")
    if not isinstance(v["resource"], str):
        raise ConfigError(f"{where}.resource={v['resource']!r:.60} must be a link name or \"\"")
    return Span(start, end, call=v["call"], op=v["op"], resource=v["resource"], **ints)


SAMPLE_KEYS = ("t_s", "device", "iteration", "call", "name", "value")


def sample_from_dict(raw: Any, where: str = "sample") -> Sample:
    """One counter sample with every field checked, as :func:`span_from_dict` checks spans."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object with keys {', '.join(SAMPLE_KEYS)}, got {raw!r:.60}")
    unknown = sorted(set(raw) - set(SAMPLE_KEYS))
    missing = [k for k in SAMPLE_KEYS if k not in raw]
    if unknown or missing:
        raise ConfigError(f"{where}: " + "; ".join(([f"unknown key(s) {unknown}"] if unknown else [])
                                                  + ([f"missing key(s) {missing}"] if missing else []))
                          + f"; allowed: {', '.join(SAMPLE_KEYS)}")
    for key in ("call", "name"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ConfigError(f"{where}.{key}={raw[key]!r:.60} must be a non-empty name")
    return Sample(rules.real(f"{where}.t_s", raw["t_s"], lo=0.0), rules.integer(f"{where}.device", raw["device"], lo=0),
                  rules.integer(f"{where}.iteration", raw["iteration"], lo=0), raw["call"], raw["name"],
                  rules.real(f"{where}.value", raw["value"], lo=None))


def check_source(source: Any, where: str) -> str:
    if source not in SOURCES:
        raise ConfigError(f"{where}: source={source!r:.60} must be one of {', '.join(SOURCES)}")
    return source


def check_meta(meta: Any, where: str) -> dict[str, Any] | None:
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"{where}: meta={meta!r:.60} must be an object (or absent)")
    return meta or None
