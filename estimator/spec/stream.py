"""Streaming rollouts: a standing rollout copy serves consecutive iterations' requests as one
stream, and the trainer consumes trajectories as they finish — the rule the estimator prices and
the executor follows.

Under ``async: {max_staleness: η, streaming: recompute | keep}``
(:data:`estimator.spec.workflow.STREAMING`), the
actor's generate call streams where its plan gives it a standing copy
(:func:`estimator.spec.plan.standing_copies`) that runs nothing else, one virtual engine per
replica (``micro_batches`` 1), and a share of every batch that whole groups make
(:func:`stream_problems` says why not otherwise; such a plan runs as plain asynchronous
training). Each engine replica then follows :func:`stream_engine`:

1. **Requests.** It serves its rows of iteration 0, then its rows of iteration 1, … (the rows
   :func:`estimator.spec.sharding.dp_rows` deals it each iteration) as one queue, by
   :func:`estimator.spec.batching.schedule`: continuous batching does not wait for a batch's
   longest responses before it admits the next batch's prompts.
2. **Admission under η.** A request of iteration ``b`` is admitted under weights version
   ``b − η`` or newer (version ``v``: the weights after ``v`` updates; a rollout trained on in
   iteration ``b`` is at most η versions old when admitted — AReaL's admission rule). When the
   next request needs a newer version the engine admits nothing until it has it, and keeps
   decoding what runs.
3. **The switch.** The engine takes version ``v`` at a segment boundary, once it has finished
   its share of every iteration before ``v`` (so the update that makes version ``v`` never waits
   for this engine), and then waits — running nothing — until the push of version ``v`` has
   reached it (:mod:`estimator.sim.simulator`; the executor receives it there). Deciding the
   switch by the engine's own progress, not by when the weights happen to arrive, makes which
   weights generated every token a function of the lengths alone: the executor is
   deterministic and tested against a single-process replay. With ``recompute`` (AReaL's
   interruptible generation) the running requests are evicted at the switch and prefilled
   again under the new weights, keeping their tokens; with ``keep`` (PipelineRL's) they go on
   with the keys and values they have.
4. **Consumption.** The train call of iteration ``j`` takes from each engine the next
   ``n_e(j)`` units it finished — its share of the batch, in the order they finished, a GRPO
   group (``group_size`` rows of one prompt) finishing with its last member. A trajectory's
   staleness is ``j`` less the version it was admitted under; the bound of step 2 holds at
   admission, so a response overtaken by shorter ones can be older than η when consumed
   (reported, :mod:`estimator.sim.asynchrony`). No trajectory is discarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from estimator.base.errors import ConfigError
from estimator.spec.batching import PREFILL_TOKENS, EngineRun, schedule
from estimator.spec.plan import Plan, standing_copies
from estimator.spec.sharding import split_range

if TYPE_CHECKING:
    from estimator.spec.experiment import Experiment


@dataclass(frozen=True)
class EngineStream:
    """One engine replica's stream over iterations ``0 .. K−1`` (:func:`stream_engine`)."""

    run: EngineRun  # the schedule over every iteration's requests, with its version switches
    batch: np.ndarray  # per request: the iteration whose prompt it serves
    row: np.ndarray  # per request: its row in that iteration's batch (global)
    admitted_version: np.ndarray  # per request: the weights version it was (first) admitted under
    consumed: tuple[tuple[int, ...], ...]  # per iteration j: the requests its train call takes from here
    emit_segment: tuple[int, ...]  # per iteration j: the segment at whose end the engine's share is done
    switch_segment: tuple[int, ...]  # per version v ≥ 1 (index v − 1): the segment that takes it
    # (len(segments): the stream ended first)

    def staleness(self, j: int) -> np.ndarray:
        """Policy versions between each trajectory consumed in iteration ``j`` and the update."""
        return j - self.admitted_version[list(self.consumed[j])]


def needed_version(batch: int, eta: int) -> int:
    """The oldest weights version a request of iteration ``batch`` may be admitted under."""
    return max(0, batch - eta)


def stream_engine(prompts: Sequence[np.ndarray], gens: Sequence[np.ndarray], rows: Sequence[tuple[int, int]],
                  eta: int, group: int = 1, max_running: int = 0, kv_tokens: int = 0,
                  prefill_tokens: int = PREFILL_TOKENS, recompute: bool = True) -> EngineStream:
    """The stream of one engine: ``prompts[b]``, ``gens[b]`` are iteration ``b``'s prompt and
    response tokens by global row, ``rows[b]`` the engine's row range of it (a multiple of
    ``group`` rows), ``eta`` the staleness bound, ``max_running`` / ``kv_tokens`` /
    ``prefill_tokens`` the engine's limits as in :func:`~estimator.spec.batching.schedule`."""
    if eta < 1:
        raise ConfigError(f"a streaming rollout needs max_staleness ≥ 1, not {eta}: with 0 no request of the next "
                          "iteration may start before the update")
    sizes = [hi - lo for lo, hi in rows]
    bad = [(b, n) for b, n in enumerate(sizes) if n <= 0 or n % group]
    if bad:
        b, n = bad[0]
        raise ConfigError(f"iteration {b}: an engine's share of {n} rows must be a positive multiple of the "
                          f"group size {group}")
    batch = np.repeat(np.arange(len(rows)), sizes)
    row = np.concatenate([np.arange(lo, hi) for lo, hi in rows]).astype(np.int64)
    prompt = np.concatenate([np.asarray(p)[lo:hi] for p, (lo, hi) in zip(prompts, rows)])
    gen = np.concatenate([np.asarray(g)[lo:hi] for g, (lo, hi) in zip(gens, rows)])
    units_before = np.cumsum([0] + [n // group for n in sizes])  # units of the iterations before b
    needs = [needed_version(int(b), eta) for b in batch]

    def units_done(finished: list[int]) -> int:
        """Groups finished: a group is done when all of its members are."""
        per = np.bincount(np.asarray(finished, dtype=np.int64) // group, minlength=len(batch) // group)
        return int(np.sum(per == group))

    def may_switch(v: int, finished: list[int]) -> bool:
        return units_done(finished) >= units_before[min(v, len(rows))]

    run = schedule(prompt, gen, max_running, kv_tokens, prefill_tokens, needs, may_switch, recompute)
    # the order units finished, the segment each did, and the version each request was admitted under
    seen = np.zeros(len(batch) // group, dtype=np.int64)
    unit_order, unit_segment = [], []
    admitted = np.full(len(batch), -1, dtype=np.int64)
    version, switches = 0, []
    for k, seg in enumerate(run.segments):
        if seg.switch >= 0:
            switches += [k] * (seg.switch - version)
            version = seg.switch
        for r in seg.prefill:
            if admitted[r] < 0:
                admitted[r] = version
        for r in seg.finished:
            u = r // group
            seen[u] += 1
            if seen[u] == group:
                unit_order.append(u)
                unit_segment.append(k)
    last_needed = needed_version(len(rows) - 1, eta)
    switches += [len(run.segments)] * (last_needed - version)
    consumed, emits = [], []
    for j in range(len(rows)):
        units = unit_order[units_before[j]:units_before[j + 1]]
        consumed.append(tuple(int(u * group + m) for u in units for m in range(group)))
        emits.append(int(max(unit_segment[units_before[j]:units_before[j + 1]])))
    return EngineStream(run, batch, row, admitted, tuple(consumed), tuple(emits), tuple(switches))


def stream_problems(experiment: Experiment, plan: Plan, call: str) -> list[str]:
    """Why generate call ``call`` does not stream under ``plan`` (empty: it streams). It needs
    the experiment's ``async.streaming``, a standing copy
    (:func:`~estimator.spec.plan.standing_copies`), its devices to itself, one virtual engine
    per replica, and whole GRPO groups on every replica."""
    wf = experiment.workflow
    if wf.streaming == "off":
        return ["the experiment sets no async.streaming"]
    if call not in standing_copies(wf, plan):
        return [f"{call} has no standing copy: its mesh shares devices with the actor's home"]
    layout, out = plan[call], []
    others = [c for c in wf.call_names if c != call and plan[c].mesh.overlaps(layout.mesh)]
    if others:
        out.append(f"{', '.join(others)} also run on {call}'s devices")
    if layout.micro_batches != 1:
        out.append(f"{call} runs {layout.micro_batches} virtual engines per replica; a stream needs 1")
    group = experiment.params.group_size
    shares = sorted({hi - lo for lo, hi in split_range(0, wf[call].workload.seqs, layout.dp)})
    if any(n % group for n in shares):
        out.append(f"{call}'s replicas take {'/'.join(map(str, shares))} rows an iteration, not whole groups of "
                   f"{group}")
    return out


def streaming_calls(experiment: Experiment, plan: Plan) -> frozenset[str]:
    """The generate calls that stream under ``plan`` (:func:`stream_problems`)."""
    wf = experiment.workflow
    if wf.streaming == "off":
        return frozenset()
    return frozenset(c.name for c in wf.calls if c.kind == "generate" and not stream_problems(experiment, plan, c.name))


def call_streams(experiment: Experiment, plan: Plan, call: str, iterations: int, max_running: int = 0,
                 kv_tokens: int = 0, prefill_tokens: int = PREFILL_TOKENS) -> list[EngineStream]:
    """Per data-parallel replica of streaming generate call ``call``, its stream over
    ``iterations`` unrolled iterations: iteration ``b``'s lengths are those the unroll draws for
    it (:meth:`~estimator.spec.workflow.Workflow.draw_iteration`), the limits those of one engine."""
    wf, layout = experiment.workflow, plan[call]
    drawn = [experiment.lengths(wf.draw_iteration(b)) for b in range(iterations)]
    prompts, gens = [d[0] for d in drawn], [d[1] for d in drawn]
    rows = split_range(0, wf[call].workload.seqs, layout.dp)
    return [stream_engine(prompts, gens, [rows[r]] * iterations, wf.staleness, experiment.params.group_size,
                          max_running, kv_tokens, prefill_tokens, wf.streaming == "recompute")
            for r in range(layout.dp)]
