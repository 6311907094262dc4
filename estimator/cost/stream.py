"""A streaming rollout priced: each engine replica's stream (:mod:`estimator.spec.stream`) as
ops with seconds, and the events the simulator stops it at.

An engine replica's stream is one :class:`~estimator.spec.batching.EngineRun` over consecutive
iterations' requests; its ops — prefills and decode steps — are priced exactly as a rollout's
(:mod:`estimator.cost.rollout`: the same stage costs, segment interpolation and round rule, one
virtual engine per replica). Laid end to end they give the stream's time on idle weights; the
simulator (:class:`estimator.sim.simulator.Simulation`) cuts it at two kinds of event:

- **emit** ``j``: after the op that finishes the replica's share of iteration ``j`` — its
  rollouts go to the calls that read them;
- **gate** ``v``: before the first op run under weights version ``v`` — the replica waits there
  until the push of version ``v`` has reached it (with ``recompute``, the ops after it begin with
  the re-prefill of the requests the switch evicted).

At equal positions emits come first (the rule lets the switch to ``v`` happen only after the
share of iteration ``v − 1`` is done).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estimator.cost.rollout import _engine_ops, _op_costs, _rounds, _Segments, _StageCosts, engine_cap
from estimator.profile.profiles import Profile
from estimator.spec.batching import PREFILL_TOKENS
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Plan
from estimator.spec.stream import EngineStream, call_streams

EMIT, GATE = 0, 1  # event kinds, in the order they run at one position


@dataclass(frozen=True)
class ReplicaStream:
    """One replica's stream priced: its ops' seconds in order, and where it stops."""

    stream: EngineStream
    op_s: np.ndarray  # seconds of each op (a round through the stages)
    prefill: np.ndarray  # per op: whether it is a prefill
    # (position, kind, index): before op ``position`` (= after ``position`` ops), an emit of
    # iteration ``index`` or a gate of version ``index``; sorted
    events: tuple[tuple[int, int, int], ...]

    def span_s(self, a: int, b: int) -> tuple[float, float]:
        """(prefill, decode) seconds of ops ``a .. b − 1``."""
        s, p = self.op_s[a:b], self.prefill[a:b]
        return float(s[p].sum()), float(s[~p].sum())


@dataclass(frozen=True)
class StreamCost:
    """A streaming generate call priced over the unrolled iterations."""

    call: str
    replicas: tuple[ReplicaStream, ...]
    tokens: tuple[float, ...]  # per iteration: prompt + response tokens of the trajectories its train call takes
    staleness: tuple[np.ndarray, ...]  # per iteration: the versions each consumed trajectory lags
    recomputed_tokens: int  # tokens prefilled again (switches under recompute, preemptions)

    def blend(self, alone: StreamCost, weight: float) -> StreamCost:
        """The stream with every op's seconds between ``alone``'s (weight 0) and these (1): a
        CPU host whose other devices are busy that share of the time
        (:mod:`estimator.sim.hostshare`)."""
        reps = tuple(ReplicaStream(b.stream, a.op_s + weight * (b.op_s - a.op_s), b.prefill, b.events)
                     for a, b in zip(alone.replicas, self.replicas))
        return StreamCost(self.call, reps, self.tokens, self.staleness, self.recomputed_tokens)


def _replica(profile: Profile, experiment: Experiment, plan: Plan, call: str, stream: EngineStream,
             devices_per_node: int) -> ReplicaStream:
    layout, c = plan[call], experiment.workflow[call]
    model = experiment.models[c.role]
    choose = ("greedy" if c.workload.greedy else "sample") + ("_ending" if c.workload.lengths_vary else "")
    stages = [_StageCosts(profile, model, layout, k, choose, devices_per_node) for k in range(layout.pp)]
    segments = _Segments()
    ops = _engine_ops(stream.run, segments)
    steps = np.array(segments.steps, dtype=np.int64)
    comp = np.zeros((1, layout.pp, len(ops.kind)))
    comm = np.zeros_like(comp)
    for k, st in enumerate(stages):
        ends = segments.step_costs(st) if len(steps) else ()
        comp[0, k], comm[0, k] = _op_costs(ops, st, ends, steps)
    op_s = _rounds(comp, comm) if len(ops.kind) else np.zeros(0)
    before = np.concatenate(([0], ops.seg_end + 1))  # ops run before each segment (and after the last)
    n = len(stream.run.segments)
    events = [(int(before[k + 1]), EMIT, j) for j, k in enumerate(stream.emit_segment)]
    events += [(int(before[min(k, n)]), GATE, v + 1) for v, k in enumerate(stream.switch_segment)]
    return ReplicaStream(stream, op_s, ops.kind == 0, tuple(sorted(events)))


def stream_cost(profile: Profile, experiment: Experiment, plan: Plan, call: str, iterations: int,
                kv_tokens: int, devices_per_node: int) -> StreamCost:
    """Streaming generate call ``call`` of ``plan`` over ``iterations`` unrolled iterations, its
    engines' KV pools ``kv_tokens`` each (0: unlimited) and their caps as a rollout's
    (the layout's ``max_concurrency``, else a serving engine's ``max_num_seqs``)."""
    layout, engine = plan[call], profile.engine
    cap = engine_cap(layout) or (engine.max_num_seqs if engine else 0)
    prefill = engine.prefill_chunk_tokens if engine else PREFILL_TOKENS
    streams = call_streams(experiment, plan, call, iterations, cap, kv_tokens, prefill)
    replicas = tuple(_replica(profile, experiment, plan, call, s, devices_per_node) for s in streams)
    wf = experiment.workflow
    drawn = [experiment.lengths(wf.draw_iteration(b)) for b in range(iterations)]
    tokens, stale, recomputed = [], [], 0
    for j in range(iterations):
        total = 0.0
        for s in streams:
            q = np.array(s.consumed[j], dtype=np.int64)
            total += sum(float(drawn[b][0][r] + drawn[b][1][r]) for b, r in zip(s.batch[q], s.row[q]))
        tokens.append(total)
        stale.append(np.concatenate([s.staleness(j) for s in streams]))
    for s in streams:
        for seg in s.run.segments:
            recomputed += sum(t - int(drawn[s.batch[r]][0][s.row[r]]) for r, t in zip(seg.prefill, seg.prefill_tokens))
    return StreamCost(call, replicas, tuple(tokens), tuple(stale), recomputed)
