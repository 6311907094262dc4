"""Streaming rollouts: a standing rollout copy serves consecutive iterations' requests as one
stream, and the trainer consumes trajectories as they finish — the rule the estimator prices and
the executor follows.

Under ``async: {max_staleness: η, streaming: recompute | keep}``
(:data:`estimator.spec.workflow.STREAMING`), the
actor's generate call streams where its plan gives it a standing copy
(:func:`estimator.spec.plan.standing_copies`) that runs nothing else, one virtual engine per
replica (``micro_batches`` 1), and at least one prompt per replica (:func:`stream_problems`
says why not otherwise; such a plan runs as plain asynchronous training). Its replicas are dealt
whole GRPO groups (``Workload.group``). Each engine replica then follows :func:`stream_engine`:

1. **Requests.** It serves its rows of iteration 0, then its rows of iteration 1, … (the rows
   :func:`estimator.spec.sharding.dp_rows` deals it each iteration) as one queue, by
   :func:`estimator.spec.batching.schedule`: continuous batching does not wait for a batch's
   longest responses before it admits the next batch's prompts.
2. **Admission under η.** A request of iteration ``b`` is admitted under weights version
   ``b − η`` or newer (version ``v``: the weights after ``v`` updates; a rollout trained on in
   iteration ``b`` is at most η versions old when admitted — AReaL's admission rule). While the
   next request needs a version the engine has not taken, it admits nothing and keeps decoding
   what runs; with nothing left running it waits for the version.
3. **The switch.** The engine takes version ``v`` after a given number of ops (prefills and
   decode steps, ``switch_at``), cutting a run of decode steps there. The estimator finds the
   number as AReaL's rollout workers do: the push of version ``v`` is offered once the update is
   done, every replica takes it at the end of the op it is running (or at once, idle), the
   weights move, and generation resumes under them (:class:`estimator.sim.simulator.Simulation`).
   The executor follows the switch points it is given (the prediction's), so which weights
   generated every token is fixed before the run: it is deterministic and tested against a
   single-process replay. With ``recompute`` (AReaL's interruptible generation) the running
   requests are evicted at the switch and prefilled again under the new weights, keeping their
   tokens; with ``keep`` (PipelineRL's) they go on with the keys and values they have. A switch
   cannot come before the engine has done its share of iteration ``v − 1`` (that update would
   wait for it).
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
from estimator.spec.plan import Layout, Plan, standing_copies
from estimator.spec.sharding import dp_rows

if TYPE_CHECKING:
    from estimator.spec.experiment import Experiment


@dataclass(frozen=True)
class EngineStream:
    """One engine replica's stream over iterations ``0 .. K−1`` (:func:`stream_engine`)."""

    run: EngineRun  # the schedule over every iteration's requests, with its version switches
    batch: np.ndarray  # per request: the iteration whose prompt it serves
    row: np.ndarray  # per request: its row in that iteration's batch (global)
    admitted_version: np.ndarray  # per request: the weights version it was (first) admitted under (-1: not yet)
    # per iteration j whose share is done: the requests its train call takes from here, in order
    consumed: tuple[tuple[int, ...], ...]
    emit_op: tuple[int, ...]  # per such iteration: the ops run when the share was done
    switch_at: tuple[int, ...]  # per version v ≥ 1 taken (index v − 1): the ops run when it was

    @property
    def complete(self) -> bool:
        """Whether the stream served every request (else it waits for ``run.waiting``)."""
        return self.run.waiting < 0

    def staleness(self, j: int) -> np.ndarray:
        """Policy versions between each trajectory consumed in iteration ``j`` and the update."""
        return j - self.admitted_version[list(self.consumed[j])]


def needed_version(batch: int, eta: int) -> int:
    """The oldest weights version a request of iteration ``batch`` may be admitted under."""
    return max(0, batch - eta)


def stream_engine(prompts: Sequence[np.ndarray], gens: Sequence[np.ndarray], rows: Sequence[tuple[int, int]],
                  eta: int, group: int = 1, max_running: int = 0, kv_tokens: int = 0,
                  prefill_tokens: int = PREFILL_TOKENS, recompute: bool = True,
                  switch_at: Sequence[int] = ()) -> EngineStream:
    """The stream of one engine: ``prompts[b]``, ``gens[b]`` are iteration ``b``'s prompt and
    response tokens by global row, ``rows[b]`` the engine's row range of it (a multiple of
    ``group`` rows), ``eta`` the staleness bound, ``max_running`` / ``kv_tokens`` /
    ``prefill_tokens`` the engine's limits as in :func:`~estimator.spec.batching.schedule`, and
    ``switch_at[v − 1]`` the ops after which it takes version ``v`` (those not given: the
    stream stops, idle, where it first needs one). A switch before the engine has done its
    share of iteration ``v − 1`` is refused: that update would wait for this very engine."""
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
    run = schedule(prompt, gen, max_running, kv_tokens, prefill_tokens, needs, switch_at, recompute)
    # the order units finished and the ops run by then; the version each request was admitted
    # under; the ops run at each switch
    seen = np.zeros(len(batch) // group, dtype=np.int64)
    unit_order, unit_ops = [], []
    admitted = np.full(len(batch), -1, dtype=np.int64)
    version = ops = 0
    taken = []
    for seg in run.segments:
        if seg.switch >= 0:
            taken += [ops] * (seg.switch - version)
            version = seg.switch
            if len(unit_order) < units_before[min(version, len(rows))]:
                share = units_before[min(version, len(rows))]
                raise ConfigError(f"switch to version {version} after {ops} ops: the engine has finished "
                                  f"{len(unit_order)} units, fewer than its share of the iterations before "
                                  f"({share}), so the update it waits for would wait for it")
        ops += 1 if seg.prefill else 0
        for r in seg.prefill:
            if admitted[r] < 0:
                admitted[r] = version
        for i, r in enumerate(seg.finished):
            u = r // group
            seen[u] += 1
            if seen[u] == group:
                unit_order.append(u)
                unit_ops.append(ops + (seg.steps if i >= seg.leaving else 0))
        ops += seg.steps
    consumed, emits = [], []
    for j in range(len(rows)):
        if len(unit_order) < units_before[j + 1]:
            break
        units = unit_order[units_before[j]:units_before[j + 1]]
        consumed.append(tuple(int(u * group + m) for u in units for m in range(group)))
        emits.append(int(unit_ops[units_before[j + 1] - 1]))
    return EngineStream(run, batch, row, admitted, tuple(consumed), tuple(emits), tuple(taken))


def request_lengths(experiment: Experiment, batch: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, response) tokens of row ``row[i]`` of iteration ``batch[i]``: the lengths the
    unroll draws for that iteration (:meth:`~estimator.spec.workflow.Workflow.draw_iteration`),
    as a stream's requests carry them."""
    prompt, gen = np.zeros(len(batch), dtype=np.int64), np.zeros(len(batch), dtype=np.int64)
    for b in np.unique(batch):
        at = batch == b
        p, g = experiment.lengths(experiment.workflow.draw_iteration(int(b)))
        prompt[at], gen[at] = p[row[at]], g[row[at]]
    return prompt, gen


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
    units = wf[call].workload.seqs // wf[call].workload.group
    if units < layout.dp:
        out.append(f"{call} has {layout.dp} replicas for {units} prompts an iteration: some would serve none")
    return out


def streaming_calls(experiment: Experiment, plan: Plan) -> frozenset[str]:
    """The generate calls that stream under ``plan`` (:func:`stream_problems`)."""
    wf = experiment.workflow
    if wf.streaming == "off":
        return frozenset()
    return frozenset(c.name for c in wf.calls if c.kind == "generate" and not stream_problems(experiment, plan, c.name))


def replica_stream(experiment: Experiment, layout: Layout, call: str, iterations: int, replica: int,
                   max_running: int = 0, kv_tokens: int = 0, prefill_tokens: int = PREFILL_TOKENS,
                   switch_at: Sequence[int] = ()) -> EngineStream:
    """Replica ``replica`` of streaming generate call ``call`` on ``layout``: its stream over
    ``iterations`` unrolled iterations (:func:`stream_engine`). Iteration ``b``'s lengths are
    those the unroll draws for it (:meth:`~estimator.spec.workflow.Workflow.draw_iteration`), its
    rows those :func:`~estimator.spec.sharding.dp_rows` deals the replica (whole groups), the
    limits those of one engine."""
    wf = experiment.workflow
    drawn = [experiment.lengths(wf.draw_iteration(b)) for b in range(iterations)]
    (rows,) = dp_rows(wf[call], layout, replica)
    return stream_engine([d[0] for d in drawn], [d[1] for d in drawn], [rows] * iterations, wf.staleness,
                         experiment.params.group_size, max_running, kv_tokens, prefill_tokens,
                         wf.streaming == "recompute", switch_at)


def call_streams(experiment: Experiment, plan: Plan, call: str, iterations: int, max_running: int = 0,
                 kv_tokens: int = 0, prefill_tokens: int = PREFILL_TOKENS,
                 switch_at: Sequence[Sequence[int]] | None = None) -> list[EngineStream]:
    """Every replica's :func:`replica_stream` of ``call`` under ``plan``, ``switch_at[r]``
    replica ``r``'s switch points (none given: each stream stops where it first needs an
    update)."""
    layout = plan[call]
    if switch_at is not None and len(switch_at) != layout.dp:
        raise ConfigError(f"{call}: switch points for {len(switch_at)} replicas, but the layout has dp={layout.dp}")
    return [replica_stream(experiment, layout, call, iterations, r, max_running, kv_tokens, prefill_tokens,
                           switch_at[r] if switch_at is not None else ())
            for r in range(layout.dp)]
