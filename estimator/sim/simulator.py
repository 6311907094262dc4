"""Discrete-event simulation of a plan (simpy): devices compute, links carry, iterations overlap.

Lowering (:mod:`estimator.cost.lowering`) turns each call under its layout into per-stage tasks.
Here every call instance of ``K`` unrolled iterations is a simpy process that

1. waits for its devices (each device runs its calls in (iteration, topological) order; an
   instance that reallocates also needs its home's devices, which are free again once it has
   reallocated: :func:`estimator.sim.instances.device_preds`) and for the weights it needs (its
   role's train call of the previous iteration: version edges);
2. reallocates its role's parameters from their home layout when it runs elsewhere
   (point-to-point messages, one per (sender, receiver) pair, on the links they use);
3. waits for its input data, which each producer sends the moment it ends;
4. runs one process per pipeline stage — forward passes per micro-batch for inference,
   1F1B for training followed by the gradient all-reduce and the optimizer step per
   minibatch, micro-batched prefill then chunked decoding for generation — exchanging
   activations and gradients as messages between stages;
5. for a generate call under a verifier, scores its sequences on the last stage's hosts once
   every stage is done: a ``reward`` span of :attr:`CallCost.reward_s`.

Host transfers of an offloading home (:mod:`estimator.cost.offload`) are ``offload`` spans on
every stage: the upload once the inputs are in (before step 4), the download after step 5, and
— for a call that reallocates from a home that offloads its weights — the upload on each of the
home's devices before they send (step 2). Each device has a host link of its own that nothing
else uses, so they hold no port of the :class:`LinkBook`.

A stage process stands for all ``dp·tp`` devices of its stage, which run in lock step; spans
are recorded on the stage's first device. Devices are claimed call by call in a fixed order
(step 1) rather than through a ``simpy.Resource`` queue, so whichever call becomes ready first
cannot overtake an earlier one on a shared device: the order is each device's program, the same
one the fast evaluator schedules. Links are the device ports of
:class:`estimator.cost.transfers.LinkBook`, shared first come, first served: concurrent messages on
one port queue behind each other. Tensor-parallel collectives hold the NVLink ports of their
stage for their total time at the end of each task (see :meth:`Simulation._tp_comm`).

Determinism: one environment per run, nothing global; processes start in instance order and
stages in pipeline order, and simpy breaks ties in time by scheduling order, so equal inputs
give identical timelines, and link requests made at the same instant are served in the order
the requesting processes run.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from estimator.cost.lowering import CallCost, Costs, StageCost
from estimator.cost.stream import PricedStream, StreamSummary, summarize
from estimator.cost.transfers import LinkBook, local_copy_s
from estimator.profile.profiles import Profile
from estimator.sim import hostshare
from estimator.sim.instances import device_preds, instance_graph
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout, Plan, standing_copies
from estimator.spec.schedule import FORWARD, generation_rounds, schedule_1f1b
from estimator.spec.stream import streaming_calls
from estimator.spec.timeline import Sample, Span, Timeline
from estimator.spec.workflow import PUSH, push_target, steady_iterations

SpanRow = tuple[float, float, int, int, str, str, int, int, str]  # Span's fields, in order


class Mailbox:
    """Arrival times of messages between the stage processes of one call instance."""

    def __init__(self, env: simpy.Environment):
        self.env = env
        self.times: dict[tuple, float] = {}
        self.waiting: dict[tuple, simpy.Event] = {}

    def put(self, key: tuple, arrival_s: float) -> None:
        self.times[key] = arrival_s
        ev = self.waiting.pop(key, None)
        if ev is not None:
            ev.succeed()

    def wait(self, key: tuple) -> Generator[simpy.Event, Any, None]:
        if key not in self.times:
            ev = self.waiting[key] = self.env.event()
            yield ev
        delay = self.times[key] - self.env.now
        if delay > 0:
            yield self.env.timeout(delay)


@dataclass(frozen=True)
class CallRecord:
    """One call instance as simulated."""

    iteration: int
    call: str
    start_s: float  # its mesh is free and its weights are ready: reallocation may start
    compute_start_s: float  # parameters and inputs are in place
    end_s: float
    realloc_s: float  # time spent reallocating parameters
    data_s: float  # time from the end of reallocation until the inputs arrived
    # of data_s, the time until the last producer had finished (waiting for inputs to exist,
    # not moving them); the rest is the transfer still under way once they did
    wait_s: float = 0.0

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class SimResult:
    """What a simulation produced; the full timeline is built on demand."""

    iterations: int
    records: dict[tuple[int, str], CallRecord]
    rows: list[SpanRow] = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict)
    # (call, pipeline stage) → its devices; the simulation runs each stage's dp·tp devices in
    # lock-step and records one of them, the timeline repeats its spans on all of them.
    stage_devices: dict[tuple[str, int], range] = field(default_factory=dict, repr=False)
    counters: list[tuple[float, int, int, str, str, float]] = field(default_factory=list, repr=False)
    # (update's iteration, generate call) → the push of that update to the call's standing copy
    pushes: dict[tuple[int, str], CallRecord] = field(default_factory=dict, repr=False)
    warmup: int = 1  # iterations before the steady state (Workflow.warmup)
    drain: int = 0  # iterations after it (Workflow.drain)
    # streaming generate call → what its replicas gave the trainer (their switch points included)
    streams: dict[str, StreamSummary] = field(default_factory=dict, repr=False)
    # device of a streaming call → the intervals its stream computed
    stream_busy: dict[int, list[tuple[float, float]]] = field(default_factory=dict, repr=False)
    _timelines: dict[bool, Timeline] = field(default_factory=dict, repr=False)

    def iteration_ends(self) -> list[float]:
        ends: dict[int, float] = {}
        for (it, _), r in self.records.items():
            ends[it] = max(ends.get(it, 0.0), r.end_s)
        return [ends[i] for i in sorted(ends)]

    @property
    def iteration_s(self) -> float:
        """Steady-state period: :meth:`Timeline.steady_state_s` of one span per call instance."""
        spans = [Span(r.start_s, r.end_s, -1, r.iteration, r.call, "call") for r in self.records.values()]
        return Timeline.of(spans).steady_state_s(self.warmup, self.drain)

    def timeline(self, per_device: bool = True) -> Timeline:
        """The predicted timeline: a device span on every device of its stage (``per_device``),
        or on one device per stage (smaller, for large clusters)."""
        if per_device not in self._timelines:
            spans = [Span(*row) for row in self._rows(per_device)]
            meta = {**self.meta, "spans": "every device" if per_device else "one device per pipeline stage"}
            self._timelines[per_device] = Timeline(tuple(spans), "predicted", meta,
                                                   tuple(Sample(*c) for c in self.counters))
        return self._timelines[per_device]

    def _rows(self, per_device: bool) -> list[SpanRow]:
        if not per_device:
            return self.rows
        out = []
        for row in self.rows:
            devices = self.stage_devices.get((row[4], row[7])) if row[2] >= 0 else None
            if devices:
                out.extend((row[0], row[1], d, *row[3:]) for d in devices)
            else:
                out.append(row)
        return out


class Simulation:
    """One simulation of ``plan`` for ``K`` iterations."""

    def __init__(self, experiment: Experiment, plan: Plan, profile: Profile, iterations: int = 3,
                 costs: Costs | None = None, progress: Callable[[str], None] | None = None,
                 env: simpy.Environment | None = None, weights: dict[str, float] | None = None):
        self.experiment, self.plan, self.profile = experiment, plan, profile
        self.costs = costs if costs is not None else Costs(experiment, profile)
        # host sharing: each call's host weight (estimator.sim.hostshare); a call not named is
        # charged as profiled (weight 1)
        self.weights = weights or {}
        wf = experiment.workflow
        self.standing = standing_copies(wf, plan)
        self.iterations = steady_iterations(wf, iterations)
        self.graph = instance_graph(wf, self.iterations, self.standing)
        homes = {c: plan[self.costs.homes[wf[c].role]] for c in wf.call_names}
        self.homes = homes  # call → its role's home layout
        self.streaming = streaming_calls(experiment, plan)
        self.dev_preds = device_preds(self.graph, plan, homes, self.standing, self.streaming)
        self.progress = progress
        self.env = env if env is not None else simpy.Environment()
        self.book = LinkBook(experiment.cluster.num_devices)
        self.done = [self.env.event() for _ in self.graph.nodes]
        self.reallocated = [self.env.event() for _ in self.graph.nodes]  # home devices free again
        self.arrivals: dict[tuple[int, int], float] = {}
        self.rows: list[SpanRow] = []
        self.counters: list[tuple[float, int, int, str, str, float]] = []  # Sample's fields, in order
        self.records: dict[tuple[int, str], CallRecord] = {}
        self.pushes: dict[tuple[int, str], CallRecord] = {}  # (update's iteration, generate call) → its push
        # a production stack's host copies around each call (estimator.cost.engine)
        shares = self.costs.shares(plan.layouts)
        self.moves = {c: self.costs.moves(c, plan.layouts, shares) for c in wf.call_names}
        # streaming generate calls (estimator.spec.stream): per iteration and replica the event of
        # its share emitted; per version the push offered, and each replica's taking it
        self.index = {(n.iteration, n.call): i for i, n in enumerate(self.graph.nodes)}
        self.emitted: dict[str, list[list[simpy.Event]]] = {}
        self.offered: dict[str, dict[int, simpy.Event]] = {}
        self.accepted: dict[str, dict[int, list[simpy.Event]]] = {}
        for g in sorted(self.streaming):
            dp = plan[g].dp
            versions = [n.iteration + 1 for n in self.graph.nodes if n.call == PUSH + g]
            self.emitted[g] = [[self.env.event() for _ in range(dp)] for _ in range(self.iterations)]
            self.offered[g] = {v: self.env.event() for v in versions}
            self.accepted[g] = {v: [self.env.event() for _ in range(dp)] for v in versions}
        self.final_streams: dict[str, list] = {g: [None] * plan[g].dp for g in self.streaming}
        self.stream_busy: dict[int, list[tuple[float, float]]] = {}
        self.emit_at: dict[tuple[int, str], float] = {}  # when every replica had emitted an iteration

    def _priced(self, call: str, replica: int, switch_at: tuple[int, ...]) -> PricedStream:
        """A streaming replica's ops priced, blended by the call's host weight as any call's are."""
        layout = self.plan[call]
        shared = self.costs.stream(call, layout, self.iterations, replica, switch_at)
        weight = self.weights.get(call, 1.0)
        if weight >= 1.0 or self.costs.alone is self.costs:
            return shared
        return shared.blend(self.costs.alone.stream(call, layout, self.iterations, replica, switch_at), weight)

    def run(self) -> SimResult:
        for i in range(len(self.graph.nodes)):
            self.env.process(self._instance(i))
        for g in sorted(self.streaming):
            for r in range(self.plan[g].dp):
                self.env.process(self._stream(g, r))
        self.env.run()
        streams = {g: summarize(self.experiment, g, self.final_streams[g]) for g in sorted(self.streaming)}
        meta = {"plan": {c: lay.to_dict() for c, lay in self.plan.layouts.items()},
                "profile": self.profile.name, "iterations": self.iterations}
        stages = {(c, k): lay.stage_devices(k)
                  for c, lay in self.plan.layouts.items() for k in range(lay.pp)}
        return SimResult(self.iterations, self.records, self.rows, meta, stages, self.counters, self.pushes,
                         self.experiment.workflow.warmup, self.experiment.workflow.drain, streams,
                         self.stream_busy)

    # -- one call instance

    def _after(self, indices: tuple[int, ...], events: list[simpy.Event] | None = None
               ) -> Generator[simpy.Event, Any, None]:
        for j in indices:
            ev = (events or self.done)[j]
            if not ev.processed:
                yield ev

    def _instance(self, i: int) -> Generator[simpy.Event, Any, None]:
        env, node = self.env, self.graph.nodes[i]
        if node.call in self.streaming:
            yield from self._emit(i)
            return
        yield from self._after(self.dev_preds.ended[i] + self.graph.version_preds[i])
        yield from self._after(self.dev_preds.reallocated[i], self.reallocated)
        if push_target(node.call) is not None:
            yield from self._push(i)
            return
        start = env.now
        cc = hostshare.call_cost(self.costs, node.call, self.plan[node.call], self.weights.get(node.call, 1.0),
                                 node.iteration)
        off = self.costs.offload(node.call, self.plan[node.call], self.homes[node.call])
        yield from self._realloc(node.iteration, cc, off.source_s)
        realloc_end = env.now
        self.reallocated[i].succeed()
        yield from self._after(self.graph.data_preds[i])
        produced = env.now
        arrival = max((self.arrivals[(j, i)] for j in self.graph.data_preds[i]), default=env.now)
        if arrival > env.now:
            yield env.timeout(arrival - env.now)
        yield from self._offload(node.iteration, cc, "upload", off.upload_s)
        compute_start = env.now
        moves = self.moves[node.call]
        yield from self._host(node.iteration, cc, moves.inside_s, "host_copy", moves.parts)
        box = Mailbox(env)
        run = {"generate": self._generate, "inference": self._inference, "train": self._train}[cc.kind]
        yield env.all_of([env.process(run(node.iteration, cc, st, box)) for st in cc.stages])
        yield from self._verify(node.iteration, cc)
        yield from self._host(node.iteration, cc, moves.after_s, "host_copy", moves.parts)
        yield from self._offload(node.iteration, cc, "download", off.download_s)
        self.records[(node.iteration, node.call)] = CallRecord(
            node.iteration, node.call, start, compute_start, env.now, realloc_end - start, compute_start - realloc_end,
            produced - realloc_end)
        self._send_outputs(i)
        self.done[i].succeed()
        if self.progress is not None:
            self.progress(f"iteration {node.iteration} {node.call} done at {env.now:.3f} s simulated")

    def _offload(self, it: int, cc: CallCost, what: str, seconds: float) -> Generator[simpy.Event, Any, None]:
        """A host transfer of the call's offloaded state (:mod:`estimator.cost.offload`) on every
        stage at once (``what``: upload or download); the call goes on when the slowest stage's
        is done."""
        yield from self._host(it, cc, seconds, "offload", ((f"host {what}", seconds),))

    def _upload_to_send(self, it: int, call: str, role: str, source_s: float) -> Generator[simpy.Event, Any, None]:
        """The home's devices upload the weights they are about to send (``offload="all"``)."""
        if source_s <= 0:
            return
        now = self.env.now
        home = self.plan[self.costs.homes[role]]
        self.rows += [(now, now + source_s, d, it, call, "offload", -1, -1, f"host upload {role} to send")
                      for d in home.mesh.devices]
        yield self.env.timeout(source_s)

    def _realloc(self, it: int, cc: CallCost, source_s: float = 0.0) -> Generator[simpy.Event, Any, None]:
        """Move the role's parameters from home (:meth:`_send_weights`; nothing for a call whose
        standing copy was pushed them) — first uploading them on the home's devices where it
        offloads them (``source_s``) —, then the host copies a production stack makes before the
        call (:mod:`estimator.cost.engine`)."""
        role = self.experiment.workflow[cc.call].role
        if cc.call not in self.standing:
            yield from self._upload_to_send(it, cc.call, role, source_s)
        end = None if cc.call in self.standing else self._send_weights(role, cc.layout, cc.call)
        if end is not None:
            for st in cc.stages:
                self.rows.append((self.env.now, end, st.rep, it, cc.call, "realloc", -1, st.index, f"realloc {role}"))
            if end > self.env.now:
                yield self.env.timeout(end - self.env.now)
        moves = self.moves[cc.call]
        yield from self._host(it, cc, moves.before_s, "host_copy", moves.parts)

    def _host(self, it: int, cc: CallCost, seconds: float, op: str, parts: tuple) -> Generator[simpy.Event, Any, None]:
        """A host-side span of ``seconds`` on every stage of the call (host copies over each
        device's own link), named by what moves."""
        if seconds <= 0:
            return
        now = self.env.now
        what = ", ".join(name for name, _ in parts)
        for st in cc.stages:
            self.rows.append((now, now + seconds, st.rep, it, cc.call, op, -1, st.index, what))
        yield self.env.timeout(seconds)

    def _send_weights(self, role: str, layout: Layout, call: str | None = None) -> float | None:
        """Book the messages that bring ``role``'s weights from its home to ``layout`` now; when
        the last one lands (None if nothing moves). For a generate call that refits a serving
        engine (``call``, :meth:`Costs.refits`) the refit's messages and its fixed cost."""
        home = self.plan[self.costs.homes[role]]
        pairs = self.costs.realloc_pairs(role, home, layout, call)
        if not pairs:
            return None
        now = self.env.now
        _, end = self.book.send_all(pairs, now, self.profile, self.costs.dpn)
        return max(end, now + local_copy_s(pairs, self.profile)) + self.costs.refit_fixed_s(role, call)

    def _push(self, i: int) -> Generator[simpy.Event, Any, None]:
        """A weight push: the update's new weights from the home to the standing rollout copy
        of the generate call it feeds (:mod:`estimator.sim.instances`; on a production stack the
        engine's refit), a span ``push`` on every stage of both."""
        env, node = self.env, self.graph.nodes[i]
        target = push_target(node.call)
        role = self.experiment.workflow[target].role
        layout, home, begin = self.plan[target], self.plan[self.costs.homes[role]], env.now
        if target in self.streaming:  # offered: every replica takes it at the end of the op it runs
            self.offered[target][node.iteration + 1].succeed()
            yield env.all_of(self.accepted[target][node.iteration + 1])
        yield from self._upload_to_send(node.iteration, node.call, role,
                                        self.costs.offload(target, layout, home).source_s)
        start = env.now
        end = self._send_weights(role, layout, target) or start
        for lay in (home, layout):
            for k in range(lay.pp):
                self.rows.append((start, end, lay.stage_devices(k).start, node.iteration, node.call, "push", -1, k,
                                  f"push {role} to {target}"))
        if end > start:
            yield env.timeout(end - start)
        self.pushes[(node.iteration, target)] = CallRecord(node.iteration, node.call, begin, start, end,
                                                           end - begin, 0.0)
        self.reallocated[i].succeed()
        self.done[i].succeed()

    # -- streaming rollouts

    def _stream(self, call: str, r: int) -> Generator[simpy.Event, Any, None]:
        """Replica ``r`` of a streaming generate call (:mod:`estimator.spec.stream`): its ops in
        time, as ``prefill`` and ``decode`` spans per stretch between stops. Where its share of an
        iteration is done it signals the emit; when the push of the next version is offered it
        takes it at the end of the op in progress (at once if idle), waits for the transfer, and
        schedules its stream again with that switch point; with nothing it may run, it waits."""
        env, layout = self.env, self.plan[call]
        devices = [layout.device(r, t, k) for k in range(layout.pp) for t in range(layout.tp)]
        switch_at: tuple[int, ...] = ()
        ps = self._priced(call, r, switch_at)
        pos = emitted = 0
        while True:
            st = ps.stream
            while emitted < len(st.emit_op) and st.emit_op[emitted] <= pos:
                self.emitted[call][emitted][r].succeed()
                emitted += 1
            v = len(switch_at) + 1
            offer = self.offered[call].get(v)
            if offer is not None and offer.triggered:  # take version v here
                self.accepted[call][v][r].succeed()
                push = self.done[self.index[(v - 1, PUSH + call)]]
                if not push.processed:
                    yield push
                switch_at += (pos,)
                ps = self._priced(call, r, switch_at)
                continue
            if pos >= len(ps.op_s):
                if offer is None:
                    if not st.complete:
                        raise AssertionError(f"{call} replica {r} waits for version {st.run.waiting}, which no push "
                                             "of the run brings")
                    self.final_streams[call][r] = st
                    return
                yield offer  # idle until the weights it needs are offered
                continue
            later = [e for e in st.emit_op if e > pos]
            target = min(later) if later else len(ps.op_s)
            ends = ps.ends
            base = ends[pos - 1] if pos else 0.0
            start = env.now
            if offer is None:
                yield env.timeout(ends[target - 1] - base)
            else:
                yield env.timeout(ends[target - 1] - base) | offer
                if offer.triggered and env.now - start < ends[target - 1] - base:
                    # the op in progress ends, then the replica stops for the push
                    q = pos + int(np.searchsorted(ends[pos:target] - base, env.now - start, side="left"))
                    target = min(q + 1, target)
                    if ends[target - 1] - base > env.now - start:
                        yield env.timeout(ends[target - 1] - base - (env.now - start))
            self._stream_spans(call, ps, pos, target, start, devices)
            pos = target

    def _stream_spans(self, call: str, ps: PricedStream, a: int, b: int, start: float, devices: list[int]) -> None:
        """Ops ``a .. b − 1`` of a replica's stream, run from ``start``: a ``prefill`` and a
        ``decode`` span on each of its devices, labelled with the iteration whose share comes next."""
        pre, dec = ps.span_s(a, b)
        label = sum(1 for e in ps.stream.emit_op if e < b)
        layout = self.plan[call]
        for d in devices:
            k = layout.coords(d)[2]
            if pre > 0:
                self.rows.append((start, start + pre, d, label, call, "prefill", -1, k, "stream"))
            if dec > 0:
                self.rows.append((start + pre, start + pre + dec, d, label, call, "decode", -1, k, "stream"))
            self.stream_busy.setdefault(d, []).append((start, start + pre + dec))

    def _emit(self, i: int) -> Generator[simpy.Event, Any, None]:
        """A streaming call's instance of iteration ``j``: it ends when every replica has done
        its share of ``j`` (and a verifier has scored it), and began where iteration ``j − 1``'s
        ended."""
        node = self.graph.nodes[i]
        yield self.env.all_of(self.emitted[node.call][node.iteration])
        start = self.emit_at.get((node.iteration - 1, node.call), 0.0)
        self.emit_at[(node.iteration, node.call)] = self.env.now
        cc = self.costs.call(node.call, self.plan[node.call], node.iteration)
        yield from self._verify(node.iteration, cc)
        self.records[(node.iteration, node.call)] = CallRecord(node.iteration, node.call, start, start,
                                                               self.env.now, 0.0, 0.0)
        self._send_outputs(i)
        self.done[i].succeed()

    def _verify(self, it: int, cc: CallCost) -> Generator[simpy.Event, Any, None]:
        """A verifier scoring a generate call's sequences on the hosts of its last stage (every
        data-parallel replica its own rows, side by side): one host span."""
        if cc.reward_s <= 0:
            return
        now, last = self.env.now, cc.stages[-1]
        self.rows.append((now, now + cc.reward_s, last.rep, it, cc.call, "reward", -1, last.index, ""))
        yield self.env.timeout(cc.reward_s)

    def _send_outputs(self, i: int) -> None:
        """Send this instance's outputs to each consumer's devices now."""
        node = self.graph.nodes[i]
        for j in self.graph.data_succs[i]:
            consumer = self.graph.nodes[j].call
            pairs = self.costs.data_pairs(node.call, self.plan[node.call], consumer, self.plan[consumer])
            start, end = self.book.send_all(pairs, self.env.now, self.profile, self.costs.dpn)
            self.arrivals[(i, j)] = end
            if end > start:
                self.rows.append((start, end, -1, node.iteration, consumer, "data", -1, -1,
                                  f"data {node.call}->{consumer}"))

    # -- stage processes

    def _compute(self, it: int, cc: CallCost, st: StageCost, op: str, mb: int,
                 compute_s: float, comm_s: float, shard_s: float = 0.0) -> simpy.Timeout:
        now = self.env.now
        self.rows.append((now, now + compute_s, st.rep, it, cc.call, op, mb, st.index, ""))
        end = self._tp_comm(it, cc, st, mb, now + compute_s, comm_s)
        if shard_s > 0:  # a fully sharded pass's exposed gathers and reduce-scatters
            start, end = self.book.reserve(st.dp_ports, end, shard_s)
            self.rows.append((start, end, st.rep, it, cc.call, "dp_shard_comm", mb, st.index,
                              f"dp dev{st.devices[0]}-{st.devices[-1]}"))
        return self.env.timeout(end - now)

    def _tp_comm(self, it: int, cc: CallCost, st: StageCost, mb: int, at: float, comm_s: float) -> float:
        """Book a task's tensor-parallel collectives on the stage's NVLink ports, from ``at`` (the
        end of its compute) or as soon as the ports are free after it; returns their end. They
        interleave with the layers from the task's start, so they are booked when the task
        starts: a transfer requested while it computes queues behind them, one requested before
        it delays them. The ports are held for their total time once the compute is done."""
        if comm_s <= 0:
            return at
        start, end = self.book.reserve(st.tp_ports, at, comm_s)
        self.rows.append((start, end, st.rep, it, cc.call, "tp_allreduce", mb, st.index,
                          f"nvlink dev{st.devices[0]}-{st.devices[-1]}"))
        return end

    def _send(self, it: int, cc: CallCost, st: StageCost, ports: tuple[int, ...], mb: int,
              duration_s: float) -> float:
        """Book a message between stages on its ports now; returns its arrival."""
        start, end = self.book.reserve(ports, self.env.now, duration_s)
        self.rows.append((start, end, -1, it, cc.call, "pp_send", mb, st.index, f"pp dev{ports[0] // 4}"))
        return end

    def _forwards(self, it: int, cc: CallCost, st: StageCost, box: Mailbox, tag: str, op: str,
                  on_last_first: Callable[[], None] | None = None, order: list[int] | None = None) -> Generator:
        """Every micro-batch's forward on this stage (in ``order``, default 0, 1, …): wait for the
        previous stage's activations, compute, send them on; the last stage calls
        ``on_last_first`` once micro-batch 0 is done."""
        k, last = st.index, st.index == cc.pp - 1
        for j in order if order is not None else range(cc.micro_batches):
            if k > 0:
                yield from box.wait((tag, k, j))
            yield self._compute(it, cc, st, op, j, st.fwd.compute_s, st.fwd.comm_s)
            if not last:
                box.put((tag, k + 1, j), self._send(it, cc, st, st.send_ports, j, st.send_s))
            elif j == 0 and on_last_first is not None:
                on_last_first()

    def _inference(self, it: int, cc: CallCost, st: StageCost, box: Mailbox) -> Generator:
        yield from self._forwards(it, cc, st, box, "f", "forward")

    def _train(self, it: int, cc: CallCost, st: StageCost, box: Mailbox) -> Generator:
        k, last = st.index, st.index == cc.pp - 1
        for step in range(cc.minibatches):
            for op, j in schedule_1f1b(cc.pp, k, cc.micro_batches):
                if op == FORWARD:
                    if k > 0:
                        yield from box.wait(("f", step, k, j))
                    yield self._compute(it, cc, st, "forward", j, st.fwd.compute_s, st.fwd.comm_s, st.fwd_shard_s)
                    if not last:
                        box.put(("f", step, k + 1, j), self._send(it, cc, st, st.send_ports, j, st.send_s))
                else:
                    if not last:
                        yield from box.wait(("b", step, k, j))
                    yield self._compute(it, cc, st, "backward", j, st.bwd.compute_s, st.bwd.comm_s, st.bwd_shard_s)
                    if k > 0:
                        prev = cc.stages[k - 1]
                        box.put(("b", step, k - 1, j), self._send(it, cc, prev, prev.recv_ports, j, prev.send_s))
            reduce_op = "dp_allreduce" if st.dp_gather_s <= 0 else "dp_reduce_scatter"
            yield from self._dp_collective(it, cc, st, reduce_op, st.dp_allreduce_s)
            now = self.env.now
            self.rows.append((now, now + st.optimizer_s, st.rep, it, cc.call, "optimizer", -1, k, ""))
            yield self.env.timeout(st.optimizer_s)
            yield from self._dp_collective(it, cc, st, "dp_allgather", st.dp_gather_s)

    def _dp_collective(self, it: int, cc: CallCost, st: StageCost, op: str, duration_s: float) -> Generator:
        """A data-parallel collective of a stage, holding its ports (gradients before the step,
        parameters after it under ``shard="optimizer"``)."""
        if duration_s <= 0:
            return
        start, end = self.book.reserve(st.dp_ports, self.env.now, duration_s)
        self.rows.append((start, end, st.rep, it, cc.call, op, -1, st.index,
                          f"dp dev{st.devices[0]}-{st.devices[-1]}"))
        yield self.env.timeout(end - self.env.now)

    def _rollout(self, it: int, cc: CallCost, st: StageCost) -> Generator:
        """A continuous-batching rollout (:mod:`estimator.cost.rollout`): every stage busy for
        the slowest replica's rollout, the stage's prefill and decode time as spans, and the
        running batch of the slowest replica's first device as a counter (stage 0 records it)."""
        ro, now = cc.rollout, self.env.now
        for start, end, op, stage in ro.windows:
            if stage == st.index:
                self.rows.append((now + start, now + end, st.rep, it, cc.call, op, -1, st.index, ""))
        if st.index == 0:
            device = cc.layout.device(ro.slowest, 0, 0)
            self.counters += [(now + t, device, it, cc.call, "running", n) for t, n in ro.running]
        yield self.env.timeout(ro.duration_s)

    def _generate(self, it: int, cc: CallCost, st: StageCost, box: Mailbox) -> Generator:
        if cc.rollout is not None:
            yield from self._rollout(it, cc, st)
            return
        k, last = st.index, st.index == cc.pp - 1

        def first_token() -> None:  # the first sampled token heads back to the first stage
            box.put(("token",), self.env.now + cc.feedback_s)

        # Round 0 of the generation schedule the executor follows: every micro-batch's prefill.
        prefill = [mb for _, mb in generation_rounds(cc.micro_batches, 1)[0]]
        yield from self._forwards(it, cc, st, box, "p", "prefill", first_token, prefill)
        for q, chunk in enumerate(st.decode):
            if k > 0:
                yield from box.wait(("c", k, q))
            elif q == 0:
                yield from box.wait(("token",))
            now = self.env.now
            self.rows.append((now, now + chunk.compute_s, st.rep, it, cc.call, "decode", -1, k, ""))
            at = now + chunk.compute_s
            delay = self._tp_comm(it, cc, st, -1, at, chunk.comm_s) - (at + chunk.comm_s)  # busy ports
            if not last:
                box.put(("c", k + 1, q), now + chunk.lag_s + delay)
                # the chunk's activations occupy the link; the round time already counts their latency
                self._send(it, cc, st, st.send_ports, -1, self.profile.p2p_s(chunk.send_bytes, st.send_class))
            yield self.env.timeout(chunk.duration_s + delay)
