"""What an asynchronous (or synchronous) plan does with its devices: throughput, idle, staleness.

From a simulated run (:class:`estimator.sim.simulator.SimResult`) over its steady-state
iterations — after the warm-up and before the drain of :class:`~estimator.spec.workflow.Workflow`:

- **effective throughput**: tokens (prompt + response) of the samples the actor's train call
  consumes per iteration, over the steady-state period — the figure AReaL's and verl's
  asynchronous results report;
- **idle fractions** of the rollout devices (the meshes of the actor's generate calls) and of
  the trainer devices (the actor's home mesh), as verl logs ``rollouter/idle_ratio`` and
  ``trainer/idle_ratio``: the share of the steady-state window a device is neither computing,
  reallocating nor pushing weights (waiting for inputs counts as idle), averaged over the
  devices; in a colocated plan both name the same devices;
- **staleness of consumed samples**: the train call of iteration ``j`` consumes the rollouts of
  iteration ``j``; they were generated with the weights of version ``v`` — the number of updates
  whose weights had reached the generate call when it started (by a push to its standing copy,
  or by reallocation from the home) — so their staleness is ``j − v`` (0 in synchronous
  training, at most η). A streaming rollout (:mod:`estimator.spec.stream`) hands the trainer
  the first trajectories to finish, each as old as the version it was admitted under: a
  response overtaken by shorter ones can be older than η;
- **discarded tokens**: always 0 here — a push waits for the generate call in progress to end,
  or, streaming, the running requests keep their tokens across it (under ``recompute`` their
  keys and values are prefilled again: **recomputed tokens**).

A streaming rollout's devices are busy while its stream computes and while pushes reach them
(the stream is one process across iterations, so its instances' extents say nothing of idling).
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from estimator.spec.experiment import Experiment
from estimator.spec.plan import Plan
from estimator.spec.timeline import steady_window
from estimator.spec.workflow import push_target

if TYPE_CHECKING:
    from estimator.sim.simulator import SimResult


@dataclass(frozen=True)
class AsyncReport:
    max_staleness: int  # η the experiment allows
    iteration_s: float  # steady-state period, seconds
    tokens_per_s: float  # prompt + response tokens trained per second
    rollout_idle: float  # share of the window the rollout devices idle, 0..1
    trainer_idle: float  # share of the window the trainer devices idle, 0..1
    staleness_mean: float  # policy versions, over the consumed samples of the steady state
    staleness_max: int
    discarded_tokens: int  # tokens generated and thrown away (none: no request is dropped)
    push_s: float  # mean seconds of one weight push to a standing copy (0: none)
    standing: tuple[str, ...]  # generate calls with a standing rollout copy
    streaming: tuple[str, ...] = ()  # of them, those that stream (estimator.spec.stream)
    recomputed_tokens: int = 0  # tokens prefilled again by the streams (switches under recompute, preemptions)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["standing"] = list(self.standing)
        out["streaming"] = list(self.streaming)
        return out


def _busy(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of [lo, hi] covered by the union of ``intervals``."""
    total, reach = 0.0, lo
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, hi)
        if b > a:
            total += b - a
            reach = b
    return total


def _idle(devices: set[int], spans: dict[int, list[tuple[float, float]]], lo: float, hi: float) -> float:
    if not devices or hi <= lo:
        return 0.0
    return float(np.mean([1.0 - _busy(spans.get(d, []), lo, hi) / (hi - lo) for d in sorted(devices)]))


def async_report(experiment: Experiment, plan: Plan, result: SimResult) -> AsyncReport:
    wf = experiment.workflow
    homes = wf.home_calls()
    gens = [c.name for c in wf.calls if c.kind == "generate" and c.role == "actor"]
    train = wf.trained_roles().get("actor")
    ends = result.iteration_ends()
    first, last = steady_window(len(ends), wf.warmup, wf.drain)  # the window the period is taken over
    lo, hi = (ends[first - 1] if first else 0.0), ends[last]
    spans: dict[int, list[tuple[float, float]]] = {d: list(b) for d, b in result.stream_busy.items()}
    for r in list(result.records.values()) + list(result.pushes.values()):
        target = push_target(r.call)  # a push holds the copy's and the home's devices
        if r.call in result.streams:
            continue  # a stream's busy time is its own
        layouts = [plan[r.call]] if target is None else [plan[target], plan[homes[wf[target].role]]]
        for lay in layouts:
            busy = [(r.start_s, r.start_s + r.realloc_s), (r.compute_start_s, r.end_s)]
            for d in lay.mesh.devices:
                spans.setdefault(d, []).extend(busy)
    rollout = {d for g in gens for d in plan[g].mesh.devices}
    trainer = set(plan[homes["actor"]].mesh.devices) if "actor" in homes else set()
    standing = tuple(sorted({c for _, c in result.pushes}))
    # when each version reached each generate call: its pushes, else the updates it reallocates from
    arrivals = {g: sorted(p.end_s for (_, c), p in result.pushes.items() if c == g) if g in standing else
                sorted(r.end_s for (_, c), r in result.records.items() if c == train) for g in gens}
    stale, tokens = [], []
    for j in range(first, last + 1):
        for g in gens:
            if g in result.streams:
                stale += [int(x) for x in result.streams[g].staleness[j]]
            else:
                version = bisect.bisect_right(arrivals[g], result.records[(j, g)].start_s)
                stale.append(j - version)
        streamed = [result.streams[g] for g in gens if g in result.streams]
        if streamed:  # the trajectories the stream handed the trainer
            tokens.append(streamed[0].tokens[j])
        else:
            prompt, gen = experiment.lengths(wf.draw_iteration(j))
            tokens.append(float(prompt.sum() + gen.sum()))
    period = result.iteration_s
    pushes = [p.end_s - p.start_s for p in result.pushes.values()]
    return AsyncReport(wf.staleness, period, float(np.mean(tokens)) / period if period > 0 else 0.0,
                       _idle(rollout, spans, lo, hi), _idle(trainer, spans, lo, hi),
                       float(np.mean(stale)) if stale else 0.0, int(max(stale, default=0)), 0,
                       float(np.mean(pushes)) if pushes else 0.0, standing, tuple(sorted(result.streams)),
                       sum(s.recomputed_tokens for s in result.streams.values()))
