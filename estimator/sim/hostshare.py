"""Simulated devices that share one host: how busy a call's host-mates are, and what it costs.

On a CPU the executor runs one single-threaded process per simulated device, and on a small
host those processes share more than cores (memory bandwidth, caches, on a virtual machine the
physical cores behind its vCPUs): an op takes longer while the other devices of its host
compute too. A profile that measured this carries a ``host`` section
(:class:`estimator.profile.profiles.HostSharing`): its compute figures hold with every device of the
host busy, and ``host.alone`` says how much faster each cost term is with the device alone.

A call's cost is then a blend of its cost lowered on the profile (every device busy) and on
:meth:`~estimator.profile.profiles.Profile.alone` (its host-mates idle), weighted by how busy the host
is while it computes: ``k`` = the call's own devices on the host plus, for every other device of
the host, the fraction of the call's compute window that device spends computing for other
calls; the weight is :meth:`~estimator.profile.profiles.HostSharing.weight` of ``k`` (0 alone, 1 every
device busy), the largest over the hosts the call spans, since its stages run in lock step.

How busy the host-mates are depends on the schedule, and the schedule on the costs, so the
weights are a fixed point (:func:`fixed_point`): schedule with every call at weight 1 (the
profile as measured), read each call's weight off that schedule, schedule again with them, and
repeat :data:`ROUNDS` times. The schedule is the fast evaluator's list schedule
(:meth:`estimator.sim.evaluator.Evaluator.call_weights`); the simulator is given the weights it
finds (:func:`estimator.sim.simulate.simulate`), so both engines charge the same blended costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from estimator.cost.decode import DecodeChunk
from estimator.cost.lowering import CallCost, Costs, StageCost, StageTime
from estimator.profile.profiles import HostSharing
from estimator.spec.plan import Layout

ROUNDS = 2  # schedule → weights rounds after the first schedule at weight 1
WEIGHT_STEP = 1e-3  # weights are rounded to this, so blended costs cache well

Window = tuple[float, float]  # one call's compute window, seconds


def _mix(a: float, b: float, w: float) -> float:
    return a + w * (b - a)


def _mix_time(a: StageTime, b: StageTime, w: float) -> StageTime:
    return StageTime(_mix(a.compute_s, b.compute_s, w), _mix(a.comm_s, b.comm_s, w))


def _mix_chunk(a: DecodeChunk, b: DecodeChunk, w: float) -> DecodeChunk:
    return dataclasses.replace(b, duration_s=_mix(a.duration_s, b.duration_s, w),
                               compute_s=_mix(a.compute_s, b.compute_s, w), comm_s=_mix(a.comm_s, b.comm_s, w),
                               lag_s=_mix(a.lag_s, b.lag_s, w))


def _mix_stage(a: StageCost, b: StageCost, w: float) -> StageCost:
    return dataclasses.replace(
        b, fwd=_mix_time(a.fwd, b.fwd, w), bwd=_mix_time(a.bwd, b.bwd, w),
        dp_allreduce_s=_mix(a.dp_allreduce_s, b.dp_allreduce_s, w), optimizer_s=_mix(a.optimizer_s, b.optimizer_s, w),
        dp_gather_s=_mix(a.dp_gather_s, b.dp_gather_s, w), fwd_shard_s=_mix(a.fwd_shard_s, b.fwd_shard_s, w),
        bwd_shard_s=_mix(a.bwd_shard_s, b.bwd_shard_s, w),
        decode=tuple(_mix_chunk(x, y, w) for x, y in zip(a.decode, b.decode)))


def blend(alone: CallCost, shared: CallCost, weight: float) -> CallCost:
    """The call lowered on the same layout with its host ``weight`` busy: every time of its
    stages interpolated linearly between ``alone`` (0) and ``shared`` (1). Messages between
    stages keep the shared figures: the links are not part of the host sharing."""
    if weight >= 1.0:
        return shared
    if shared.rollout is not None:  # a rollout's every op scales alike: blend its times
        a, b = alone.rollout, shared.rollout
        scale = _mix(a.duration_s, b.duration_s, weight) / b.duration_s if b.duration_s > 0 else 1.0
        return dataclasses.replace(shared, rollout=dataclasses.replace(
            b, duration_s=b.duration_s * scale, compute_s=b.compute_s * scale, comm_s=b.comm_s * scale,
            replica_s=tuple(x * scale for x in b.replica_s), tail_s=b.tail_s * scale,
            running=tuple((t * scale, n) for t, n in b.running),
            windows=tuple((s * scale, e * scale, op, j) for s, e, op, j in b.windows)))
    return dataclasses.replace(shared, stages=tuple(_mix_stage(a, b, weight)
                                                    for a, b in zip(alone.stages, shared.stages)))


def call_cost(costs: Costs, call: str, layout: Layout, weight: float = 1.0, iteration: int = 0) -> CallCost:
    """``call`` lowered on ``layout`` (in ``iteration``) with its host ``weight`` busy:
    :func:`blend` of the profile's and the alone profile's lowering
    (:attr:`estimator.cost.lowering.Costs.alone`)."""
    shared = costs.call(call, layout, iteration)
    if weight >= 1.0 or costs.alone is costs:
        return shared
    return blend(costs.alone.call(call, layout, iteration), shared, weight)


def rounded(weight: float) -> float:
    return round(min(max(weight, 0.0), 1.0) / WEIGHT_STEP) * WEIGHT_STEP


def _overlap(busy: list[Window], window: Window) -> float:
    lo, hi = window
    return sum(max(0.0, min(hi, e) - max(lo, s)) for s, e in busy)


def _union(windows: list[Window]) -> list[Window]:
    out: list[list[float]] = []
    for s, e in sorted(windows):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def busy_weights(spans: Sequence[tuple[int, int]], windows: Sequence[Sequence[Window]], devices_per_node: int,
                 num_devices: int, weight_of: object, iterations: Sequence[int]) -> list[float]:
    """Per call: its host weight, averaged over ``iterations`` of ``windows``.

    ``spans[c]`` is call ``c``'s devices as a half-open range, ``windows[i][c]`` its compute
    window in iteration ``i``, ``weight_of(k)`` maps a busy-device count to a weight
    (:meth:`~estimator.profile.profiles.HostSharing.weight`)."""
    n = len(spans)
    busy: list[list[Window]] = [[] for _ in range(num_devices)]
    for per_call in windows:
        for c, w in enumerate(per_call):
            if w[1] > w[0]:
                for d in range(*spans[c]):
                    busy[d].append(w)
    busy = [_union(b) for b in busy]
    out = []
    for c in range(n):
        a, b = spans[c]
        hosts = range(a // devices_per_node, (b - 1) // devices_per_node + 1)
        total = 0.0
        for i in iterations:
            lo, hi = windows[i][c]
            if hi <= lo:
                total += 1.0
                continue
            worst = 0.0
            for h in hosts:
                first, last = h * devices_per_node, min((h + 1) * devices_per_node, num_devices)
                own = min(b, last) - max(a, first)
                # the other devices' busy time inside this call's window, less the call's own
                # share (a device of another call of this mesh never overlaps it: calls on one
                # device run one after the other)
                others = sum(_overlap(busy[d], (lo, hi)) for d in range(first, last) if not a <= d < b)
                worst = max(worst, weight_of(own + others / (hi - lo)))
            total += worst
        out.append(total / len(iterations))
    return out


def fixed_point(schedule: Callable[[list[float]], Sequence[Sequence[Window]]], spans: Sequence[tuple[int, int]],
                devices_per_node: int, num_devices: int, host: HostSharing | None, iterations: int) -> list[float]:
    """Per call: its host weight, the fixed point of schedule → weights, :data:`ROUNDS` rounds
    after a first schedule at weight 1; every call 1 when ``host`` is None (nothing is known
    about sharing a host).

    ``schedule(weights)`` gives every iteration's compute window per call with those weights;
    ``spans[c]`` is call ``c``'s devices as a half-open range. The first iteration is left out
    of the average when there are more (it starts on an idle host)."""
    weights = [1.0] * len(spans)
    if host is None:
        return weights
    steady = list(range(1, iterations)) or [0]
    for _ in range(ROUNDS):
        windows = schedule(weights)
        weights = [rounded(w) for w in busy_weights(spans, windows, devices_per_node, num_devices, host.weight,
                                                     steady)]
    return weights
