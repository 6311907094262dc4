"""A streaming rollout priced: an engine replica's stream (:mod:`estimator.spec.stream`) as ops
with seconds, and what the trainer gets from it.

An engine replica's stream is one :class:`~estimator.spec.batching.EngineRun` over consecutive
iterations' requests; its ops — prefills and decode steps — are priced exactly as a rollout's
(:mod:`estimator.cost.rollout`: the same stage costs, segment interpolation and round rule, one
virtual engine per replica). The simulator (:class:`estimator.sim.simulator.Simulation`) walks
them in time, stopping where the replica's share of an iteration is done (an *emit*) and where a
push arrives; each switch it learns reschedules the stream from there (the ops before a switch
point do not change).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from estimator.cost.rollout import _engine_ops, _rounds, _Segments, engine_op_costs, generation_stages, serving_limits
from estimator.profile.profiles import Profile
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout
from estimator.spec.stream import EngineStream, replica_stream, request_lengths


@dataclass(frozen=True)
class PricedStream:
    """One replica's stream and its ops' seconds."""

    stream: EngineStream
    op_s: np.ndarray  # seconds of each op (a round through the stages)
    prefill: np.ndarray  # per op: whether it is a prefill

    @cached_property
    def ends(self) -> np.ndarray:
        """Seconds from the stream's start to the end of each op, on weights that never wait."""
        return np.cumsum(self.op_s)

    def span_s(self, a: int, b: int) -> tuple[float, float]:
        """(prefill, decode) seconds of ops ``a .. b − 1``."""
        s, p = self.op_s[a:b], self.prefill[a:b]
        return float(s[p].sum()), float(s[~p].sum())

    def blend(self, alone: PricedStream, weight: float) -> PricedStream:
        """Every op's seconds between ``alone``'s (weight 0) and these (1): a CPU host whose other
        devices are busy that share of the time (:mod:`estimator.sim.hostshare`)."""
        return PricedStream(self.stream, alone.op_s + weight * (self.op_s - alone.op_s), self.prefill)


def price_stream(profile: Profile, experiment: Experiment, layout: Layout, call: str, stream: EngineStream,
                 devices_per_node: int) -> PricedStream:
    """The seconds of every op of ``stream``, replica of ``call`` on ``layout``."""
    c = experiment.workflow[call]
    segments = _Segments()
    ops = _engine_ops(stream.run, segments)
    if not len(ops.kind):
        return PricedStream(stream, np.zeros(0), np.zeros(0, dtype=bool))
    steps = np.array(segments.steps, dtype=np.int64)
    stages = generation_stages(profile, c, experiment.models[c.role], layout, devices_per_node)
    ends = [segments.step_costs(st) if len(steps) else () for st in stages]
    comp, comm = engine_op_costs([ops], stages, ends, steps)
    return PricedStream(stream, _rounds(comp, comm), ops.kind == 0)


def stream_replica(profile: Profile, experiment: Experiment, layout: Layout, call: str, iterations: int,
                   replica: int, kv_tokens: int, devices_per_node: int, switch_at: Sequence[int] = ()) -> PricedStream:
    """Replica ``replica`` of streaming ``call`` with these switch points, scheduled and priced."""
    cap, prefill = serving_limits(profile, layout)
    stream = replica_stream(experiment, layout, call, iterations, replica, cap, kv_tokens, prefill, switch_at)
    return price_stream(profile, experiment, layout, call, stream, devices_per_node)


@dataclass(frozen=True)
class StreamSummary:
    """What a streaming call's replicas gave the trainer, iteration by iteration."""

    call: str
    streams: tuple[EngineStream, ...]  # per replica, as run (its switch points included)
    tokens: tuple[float, ...]  # per iteration: prompt + response tokens of the trajectories trained on
    staleness: tuple[np.ndarray, ...]  # per iteration: the versions each of them lags
    recomputed_tokens: int  # tokens prefilled again (at switches under recompute, after preemptions)

    @property
    def switch_at(self) -> list[list[int]]:
        """Per replica, its switch points (ops run when it took each version)."""
        return [list(s.switch_at) for s in self.streams]


def summarize(experiment: Experiment, call: str, streams: Sequence[EngineStream]) -> StreamSummary:
    iterations = min(len(s.consumed) for s in streams)
    lengths = [request_lengths(experiment, s.batch, s.row) for s in streams]  # per replica, per request
    tokens = tuple(float(sum((p[list(s.consumed[j])] + g[list(s.consumed[j])]).sum()
                             for s, (p, g) in zip(streams, lengths))) for j in range(iterations))
    stale = tuple(np.concatenate([s.staleness(j) for s in streams]) for j in range(iterations))
    recomputed = sum(t - int(p[r]) for s, (p, _) in zip(streams, lengths) for seg in s.run.segments
                     for r, t in zip(seg.prefill, seg.prefill_tokens))
    return StreamSummary(call, tuple(streams), tokens, stale, recomputed)
