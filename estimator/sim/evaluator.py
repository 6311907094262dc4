"""Fast evaluator: call-level closed forms, list-scheduled over the unrolled dataflow.

Screens many plans a second for the search; the simulator re-ranks the best (DESIGN §4.8).
Each call's duration on its layout comes from a closed form of its lowered stage costs
(:mod:`estimator.cost.lowering`), cached per (call, layout):

- inference, ``m`` micro-batches through ``p`` stages with forward ``f_k`` and send ``s_k``:
  ``Σ f_k + Σ s_k + (m − 1)·max f_k``;
- training, per optimizer step, 1F1B: ``Σ (f_k + b_k) + 2·Σ s_k + (m − 1)·max (f_k + b_k)``,
  then each stage's gradient all-reduce and Adam step, the step ending with its slowest stage
  and the next starting as soon as each stage is free again;
- generation: the prefill pipeline, then the decode chunks stage by stage (the recurrence the
  simulator follows, chunk by chunk), then the verifier scoring the sequences on the host
  (:attr:`~estimator.cost.lowering.CallCost.reward_s`, 0 without one).

Reallocation and data transfers cost what they cost on idle links (cached per pair of
layouts). Host transfers of an offloading home (:mod:`estimator.cost.offload`) add to the
duration of the call that makes them on its devices (the upload before it computes, the
download after), and to the reallocation of a call whose home uploads the weights it sends; on
a production stack a generate call's refit and every call's host copies
(:mod:`estimator.cost.engine`) join them: the copies before a call with its reallocation, those
inside it with its duration. Call instances of ``K`` iterations are then scheduled in (iteration, topological)
order exactly as the simulator orders them (:mod:`estimator.sim.instances`): a call starts when
every device it occupies is free — its mesh, and its home's when it reallocates — and its
weights are ready, reallocates (freeing the home's devices), waits for its inputs, runs. The
steady-state period is ``(end of iteration K − end of iteration 1)/(K − 1)``. An asynchronous
workflow (staleness η > 0) is scheduled instance by instance over the same graph the simulator
runs (slot order, weight pushes to standing rollout copies: :mod:`estimator.sim.instances`),
after ``2η`` more warm-up iterations and before ``η`` more that drain. What the evaluator
leaves out is contention on shared links: between concurrent transfers, and between transfers
and tensor-parallel collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import add, itemgetter

import numpy as np

from estimator.cost.engine import Moves
from estimator.cost.lowering import CallCost, Costs
from estimator.cost.memory import (
    call_bytes,
    home_bytes,
    restored_bytes,
    source_bytes,
    swappable_roles,
    swapped_in_bytes,
    swapped_roles,
)
from estimator.profile.profiles import Profile
from estimator.sim import hostshare
from estimator.sim.instances import device_preds, instance_graph
from estimator.sim.simulator import Simulation
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout, Plan, standing_copies
from estimator.spec.stream import streaming_calls
from estimator.spec.timeline import steady_period
from estimator.spec.workflow import push_target, steady_iterations


def inference_s(cc: CallCost) -> float:
    f = [st.fwd.total_s for st in cc.stages]
    sends = sum(st.send_s for st in cc.stages)
    return sum(f) + sends + (cc.micro_batches - 1) * max(f)


def train_s(cc: CallCost) -> float:
    m, st = cc.micro_batches, cc.stages
    f = [s.fwd_s for s in st]
    b = [s.bwd_s for s in st]
    sends = [s.send_s for s in st]
    pipe = sum(f) + sum(b) + 2 * sum(sends) + (m - 1) * max(x + y for x, y in zip(f, b))
    finish, lead_b, lead_f, period = [], 0.0, 0.0, 0.0
    for k, s in enumerate(st):
        # stage k's last backward ends lead_b early
        done = pipe - lead_b + s.dp_allreduce_s + s.optimizer_s + s.dp_gather_s
        finish.append(done)
        period = max(period, done - lead_f)  # the next step reaches stage k lead_f after stage 0
        lead_b += b[k] + sends[k]
        lead_f += f[k] + sends[k]
    return (cc.minibatches - 1) * period + max(finish)


def generate_s(cc: CallCost) -> float:
    if cc.rollout is not None:
        return cc.rollout.duration_s
    st, m = cc.stages, cc.micro_batches
    f = [s.fwd.total_s for s in st]
    prefill_end, reach, peak = [], 0.0, 0.0
    for k, s in enumerate(st):
        peak = max(peak, f[k])
        reach += f[k]
        prefill_end.append(reach + (m - 1) * peak)  # stage k's last prefill
        reach += s.send_s
    token = reach - st[-1].send_s + cc.feedback_s  # micro-batch 0's first token back at stage 0
    free = list(prefill_end)
    free[0] = max(free[0], token)
    chunks = len(st[0].decode)
    for q in range(chunks):
        start_prev = 0.0
        for k, s in enumerate(st):
            start = free[k] if k == 0 else max(free[k], start_prev + st[k - 1].decode[q].lag_s)
            free[k] = start + s.decode[q].duration_s
            start_prev = start
    return max(free)


def call_s(cc: CallCost) -> float:
    """Closed-form duration of a lowered call on idle links."""
    if cc.kind == "train":
        return train_s(cc)
    if cc.kind == "generate":
        return generate_s(cc) + cc.reward_s
    return inference_s(cc)


@dataclass(frozen=True)
class Evaluation:
    iteration_s: float  # steady-state period
    feasible: bool  # fits in memory
    peak_memory_bytes: float  # the fullest device
    names: tuple[str, ...]  # calls in topological order
    starts_s: list[float]  # per call: start in the last iteration, seconds
    ends_s: list[float]  # per call: end in the last iteration, seconds

    @property
    def calls(self) -> dict[str, tuple[float, float]]:
        """call → (start, end) in the last simulated iteration."""
        return {n: (s, e) for n, s, e in zip(self.names, self.starts_s, self.ends_s)}


@dataclass(frozen=True)
class BatchEvaluation:
    iteration_s: np.ndarray  # per plan: steady-state period
    feasible: np.ndarray  # per plan: fits in memory
    peak_memory_bytes: np.ndarray  # per plan: the fullest device


KEY = 1 << 32  # packs two layout ids into one integer key
SMALL_CLUSTER = 64  # up to this many devices, memory vectors are summed as Python tuples


class Evaluator:
    """Evaluate many plans of one experiment on one profile; caches persist across plans.

    Layouts are interned to small integers the first time they are seen, so the hot path
    hashes each of a plan's layouts once and looks everything else up by integer keys."""

    def __init__(self, experiment: Experiment, profile: Profile, iterations: int = 3, costs: Costs | None = None):
        wf = experiment.workflow
        self.experiment, self.profile, self.iterations = experiment, profile, steady_iterations(wf, iterations)
        self._unrolled = iterations  # as asked: the simulator of a streaming plan unrolls it again
        self.costs = costs if costs is not None else Costs(experiment, profile)
        self.asynchronous = wf.asynchronous
        self.warmup, self.drain = wf.warmup, wf.drain
        self._graphs: dict[frozenset[str], object] = {}  # asynchronous: instance graph by standing copies
        self._last_program: tuple = (None, None)  # asynchronous: (layout ids, what _program derives)
        self.names = tuple(wf.topological_order())
        self.n = len(self.names)
        self._index = index = {n: i for i, n in enumerate(self.names)}  # call name → topological index
        graph = instance_graph(wf, 1)
        # per call (topological index): producers and version predecessors, by call index
        self.data_preds = [tuple(index[graph.nodes[j].call] for j in graph.data_preds[i]) for i in range(self.n)]
        # per call: (its role's train call, lag in iterations) it waits for (version edges)
        self.version_preds = [tuple(dict.fromkeys((index[e.train], e.lag) for e in wf.version_edges() if e.call == n))
                              for n in self.names]
        self.roles = [wf[n].role for n in self.names]
        self.home = [index[self.costs.homes[r]] for r in self.roles]
        # calls that refit a serving engine: they reallocate even onto the home's placement
        self.refit = [self.costs.refits(n) for n in self.names]
        self.trained = set(wf.trained_roles())
        # calls of frozen roles a production stack may swap in from host memory
        # (estimator.cost.memory.swapped_roles), and the calls whose layouts decide whether it
        # does (generate calls, trained homes): the swapped calls are cached by those layouts
        swappable = swappable_roles(experiment) if self.costs.production else frozenset()
        self._swappable = tuple(c for c, r in enumerate(self.roles) if r in swappable)
        sharing = sorted({c for c, n in enumerate(self.names) if wf[n].kind == "generate"}
                         | {index[self.costs.homes[r]] for r in self.trained})
        self._sharing_key = itemgetter(*sharing) if sharing else (lambda lids: ())
        self._swapped_calls: dict[object, tuple[int, ...]] = {}
        self.capacity = profile.capacity_bytes
        self.num_devices = experiment.cluster.num_devices
        # data edges as (consumer, its e-th producer, producer), and each consumer's columns
        self._edges = [(c, e, p) for c in range(self.n) for e, p in enumerate(self.data_preds[c])]
        self._edge_cols = [[i for i, (c2, _, _) in enumerate(self._edges) if c2 == c] for c in range(self.n)]
        # interned layouts: id → layout, device span, mesh id, placement id (micro-batches aside)
        self._ids: dict[Layout, int] = {}
        self._layouts: list[Layout] = []
        self._offloads: list[str] = []  # per interned layout: its offload setting
        self._span: list[tuple[int, int]] = []
        self._mesh_of: list[int] = []
        self._meshes: dict = {}
        self._place_of: list[int] = []
        self._places: dict[tuple, int] = {}
        # caches, per call: duration by layout; reallocation by home · KEY + layout; per
        # producer, data transfer by src · KEY + dst; memory vectors by layout (home) and by
        # 8·layout + 4·swapped-in + 2·weights-away + at-home (call)
        self._duration: list[dict[int, float]] = [{} for _ in range(self.n)]
        self._realloc: list[dict[int, float]] = [{} for _ in range(self.n)]
        self._data: list[list[dict[int, float]]] = [[{} for _ in p] for p in self.data_preds]
        self._static: list[dict[int, int]] = [{} for _ in range(self.n)]
        self._dynamic: list[dict[int, int]] = [{} for _ in range(self.n)]
        self._source: list[dict[int, int | None]] = [{} for _ in range(self.n)]
        self._mem_rows: list[np.ndarray] = []
        self._mem_tuples: list[tuple[float, ...]] = []
        self._mem_matrix: np.ndarray | None = None
        self._zero_row = self._row(np.zeros(self.num_devices))  # pads batches of plans to equal rows
        # host transfers (Layout.offload) by home · KEY + layout: (added to the duration, to the reallocation)
        self._offload: list[dict[int, tuple[float, float]]] = [{} for _ in range(self.n)]
        # host sharing (a CPU profile's ``host``): durations by layout and weight
        self.host = profile.host
        self.varying = self.costs.varying  # lengths drawn per iteration: durations per iteration
        self._weighted: list[dict[tuple[int, float], float]] = [{} for _ in range(self.n)]

    # -- interning and cached pieces

    def _id(self, layout: Layout) -> int:
        i = self._ids.get(layout)
        if i is None:
            i = self._ids[layout] = len(self._layouts)
            self._layouts.append(layout)
            self._offloads.append(layout.offload)
            self._span.append((layout.mesh.first, layout.mesh.first + layout.mesh.size))
            self._mesh_of.append(self._meshes.setdefault(layout.mesh, len(self._meshes)))
            self._place_of.append(self._places.setdefault(layout.placement, len(self._places)))
        return i

    def _lids(self, plan: Plan) -> list[int]:
        ids, layouts = self._ids, plan.layouts
        out = []
        for name in self.names:
            i = ids.get(layouts[name])
            out.append(self._id(layouts[name]) if i is None else i)
        return out

    def duration_s(self, c: int, lid: int, it: int = 0) -> float:
        """Call ``c`` on layout ``lid`` in iteration ``it`` (every iteration alike unless
        lengths are drawn)."""
        key = (lid, it) if self.varying else lid
        v = self._duration[c].get(key)
        if v is None:
            v = self._duration[c][key] = call_s(self.costs.call(self.names[c], self._layouts[lid], it))
        return v

    def _weighted_s(self, c: int, lid: int, weight: float, it: int = 0) -> float:
        if weight >= 1.0:
            return self.duration_s(c, lid, it)
        v = self._weighted[c].get((lid, weight, it))
        if v is None:
            cc = hostshare.call_cost(self.costs, self.names[c], self._layouts[lid], weight, it)
            v = self._weighted[c][(lid, weight, it)] = call_s(cc)
        return v

    def call_weights(self, plan: Plan) -> dict[str, float]:
        """Per call: how busy its host is while it computes, 0 (alone) … 1 (every device busy),
        the fixed point of :mod:`estimator.sim.hostshare`; every call 1 when the profile says
        nothing about sharing a host."""
        return dict(zip(self.names, self._weights(self._lids(plan))))

    def _weights(self, lids: list[int]) -> list[float]:
        return hostshare.fixed_point(lambda weights: self._schedule(lids, weights)[3],
                                     [self._span[lid] for lid in lids], self.experiment.cluster.devices_per_node,
                                     self.num_devices, self.host, self.iterations)

    def _realloc_s(self, c: int, home: int, lid: int) -> float:
        if self._place_of[home] == self._place_of[lid] and not self.refit[c]:
            return 0.0
        v = self._realloc[c].get(home * KEY + lid)
        if v is None:
            v = self._realloc[c][home * KEY + lid] = self.costs.realloc_s(
                self.roles[c], self._layouts[home], self._layouts[lid], self.names[c])
        return v

    def _moves(self, lids: list[int]) -> list[Moves]:
        """Per call, the host copies a production stack makes around it (:mod:`estimator.cost.engine`)."""
        layouts = {n: self._layouts[lid] for n, lid in zip(self.names, lids)}
        shares = self.costs.shares(layouts)
        return [self.costs.moves(n, layouts, shares) for n in self.names]

    def _data_s(self, c: int, e: int, src: int, dst: int) -> float:
        v = self._data[c][e].get(src * KEY + dst)
        if v is None:
            p = self.data_preds[c][e]
            v = self._data[c][e][src * KEY + dst] = self.costs.data_s(
                self.names[p], self._layouts[src], self.names[c], self._layouts[dst])
        return v

    def _inputs(self, lids: list[int], weights: list[float] | None = None
                ) -> tuple[list[list[float]], list[float], list[list[tuple[int, float]]]]:
        """Per iteration (one list for all of them unless lengths are drawn) the duration of
        every call (with its host ``weights`` busy; as profiled without); per call its
        reallocation time and (producer, transfer time) of its inputs."""
        dur, realloc, data = [], [], []
        place, home = self._place_of, self.home
        for c, lid in enumerate(lids):
            if weights is not None and weights[c] < 1.0:
                dur.append(self._weighted_s(c, lid, weights[c]))
            else:
                v = self._duration[c].get(lid) if not self.varying else None
                dur.append(self.duration_s(c, lid) if v is None else v)
            h = lids[home[c]]
            if place[h] == place[lid] and not self.refit[c]:
                realloc.append(0.0)
            else:
                v = self._realloc[c].get(h * KEY + lid)
                realloc.append(self._realloc_s(c, h, lid) if v is None else v)
            row = []
            for e, p in enumerate(self.data_preds[c]):
                v = self._data[c][e].get(lids[p] * KEY + lid)
                row.append((p, self._data_s(c, e, lids[p], lid) if v is None else v))
            data.append(row)
        durs = [dur]
        for it in range(1, self.iterations if self.varying else 1):
            durs.append([self._weighted_s(c, lid, weights[c], it) if weights is not None
                         else self.duration_s(c, lid, it) for c, lid in enumerate(lids)])
        offloads = self._offloads
        for c, lid in enumerate(lids):
            h = lids[home[c]]
            if offloads[h] != "none":
                extra, source = self._offload_s(c, h, lid)
                for d in durs:
                    d[c] += extra
                realloc[c] += source
        if self.costs.production:  # a production stack's host copies around its calls
            for c, mv in enumerate(self._moves(lids)):
                realloc[c] += mv.before_s
                for d in durs:
                    d[c] += mv.own_s
        return durs, realloc, data

    def _offload_s(self, c: int, home: int, lid: int) -> tuple[float, float]:
        """Call ``c``'s host transfers (:mod:`estimator.cost.offload`): the uploads and download
        on its own devices, added to its duration, and the upload on its home's devices,
        added to its reallocation."""
        v = self._offload[c].get(home * KEY + lid)
        if v is None:
            oc = self.costs.offload(self.names[c], self._layouts[lid], self._layouts[home])
            v = self._offload[c][home * KEY + lid] = (oc.upload_s + oc.download_s, oc.source_s)
        return v

    # -- memory

    def _row(self, out: np.ndarray) -> int:
        self._mem_rows.append(out)
        self._mem_tuples.append(tuple(out.tolist()))
        self._mem_matrix = None
        return len(self._mem_rows) - 1

    def _per_device(self, layout: Layout, per_stage: list[dict[str, float]]) -> int:
        out = np.zeros(self.num_devices)
        for k, parts in enumerate(per_stage):
            devices = layout.stage_devices(k)
            out[devices.start:devices.stop] = sum(parts.values())
        return self._row(out)

    def _memory_rows(self, lids: list[int]) -> tuple[list[int], list[int]]:
        """Rows of the homes' resident and the calls' per-device bytes under these layouts (a
        call reallocating from a home that offloads its weights adds a second row: its
        reallocation's, :func:`~estimator.cost.memory.source_bytes`)."""
        statics, dynamics = [], []
        place, home, static, dynamic, offloads = self._place_of, self.home, self._static, self._dynamic, self._offloads
        standing = self._standing(lids) if self.asynchronous else ()
        swapped = self._swapped(lids)
        for c, lid in enumerate(lids):
            copy = self.names[c] in standing  # its standing copy stays, like a home without training state
            swap = c in swapped  # its weights wait in host memory, on the devices only while it runs
            if (home[c] == c or copy) and not swap:
                row = static[c].get(lid)
                statics.append(self._static_row(c, lid) if row is None else row)
            h = lids[home[c]]
            at_home = copy or place[lid] == place[h]
            weights_away = offloads[h] == "all" and not copy  # a standing copy is fed by pushes instead
            key = 8 * lid + 4 * swap + 2 * weights_away + at_home
            row = dynamic[c].get(key)
            dynamics.append(self._dynamic_row(c, lid, h, key) if row is None else row)
            if weights_away and not at_home:
                row = self._source[c].get(h * KEY + lid, -1)
                row = self._source_row(c, h, lid) if row == -1 else row
                if row is not None:
                    dynamics.append(row)
        return statics, dynamics

    def _swapped(self, lids: list[int]) -> tuple[int, ...]:
        """Calls whose frozen role waits in host memory under these layouts (none unless the
        engine shares a trained home's devices on a production stack)."""
        if not self._swappable:
            return ()
        key = self._sharing_key(lids)
        calls = self._swapped_calls.get(key)
        if calls is None:
            plan = Plan({n: self._layouts[lid] for n, lid in zip(self.names, lids)})
            roles = swapped_roles(self.experiment, plan, self.costs.profile.stack)
            calls = self._swapped_calls[key] = tuple(c for c in self._swappable if self.roles[c] in roles)
        return calls

    def _static_row(self, c: int, lid: int) -> int:
        role, layout = self.roles[c], self._layouts[lid]
        parts = home_bytes(self.experiment.models[role], layout, role in self.trained and self.home[c] == c)
        row = self._static[c][lid] = self._per_device(layout, parts)
        return row

    def _dynamic_row(self, c: int, lid: int, home: int, key: int) -> int:
        call, layout = self.experiment.workflow[self.names[c]], self._layouts[lid]
        model, trained = self.experiment.models[call.role], call.role in self.trained
        parts = call_bytes(call, model, layout, at_home=bool(key & 1),
                           engine_bytes=self.experiment.kv_fraction * self.capacity)
        back = (swapped_in_bytes(model, layout) if key & 4 and key & 1 else
                restored_bytes(call, model, layout, self._layouts[home], trained))
        parts = [{**p, **{k: p.get(k, 0.0) + v for k, v in b.items()}} for p, b in zip(parts, back)]
        row = self._dynamic[c][key] = self._per_device(layout, parts)
        return row

    def _source_row(self, c: int, home: int, lid: int) -> int | None:
        call = self.experiment.workflow[self.names[c]]
        per = source_bytes(self.experiment.models[call.role], self._layouts[lid], self._layouts[home],
                           call.role in self.trained)
        row = None
        if per:
            out = np.zeros(self.num_devices)
            for d, parts in per.items():
                out[d] = sum(parts.values())
            row = self._row(out)
        self._source[c][home * KEY + lid] = row
        return row

    def _matrix(self) -> np.ndarray:
        if self._mem_matrix is None:
            self._mem_matrix = np.vstack(self._mem_rows)
        return self._mem_matrix

    def peak_memory_bytes(self, lids: list[int]) -> float:
        """The fullest device: every role's home plus the largest call on the device."""
        statics, dynamics = self._memory_rows(lids)
        if self.num_devices <= SMALL_CLUSTER:
            t = self._mem_tuples
            static = map(sum, zip(*[t[r] for r in statics]))
            dynamic = t[dynamics[0]] if len(dynamics) == 1 else map(max, *[t[r] for r in dynamics])
            return max(map(add, static, dynamic))
        rows = self._matrix()
        return float((rows[statics].sum(axis=0) + rows[dynamics].max(axis=0)).max())

    # -- scheduling

    def _schedule(self, lids: list[int], weights: list[float] | None = None
                  ) -> tuple[list[float], list[float], list[float], list[list[tuple[float, float]]]]:
        """Ends of every iteration, starts/ends of the last iteration's calls, and every
        iteration's compute windows per call. A device is free when the last call that occupies
        it ends, or has reallocated where only that call's home occupies it (calls run in
        instance order; see :mod:`estimator.sim.instances`). ``weights``: each call's host weight
        (:meth:`call_weights`); None charges every call as profiled."""
        if self.asynchronous:
            if streaming_calls(self.experiment, self._plan(lids)):
                return self._simulated(lids, weights)
            return self._schedule_graph(lids, weights)
        n, version, place, span = self.n, self.version_preds, self._place_of, self._span
        durs, realloc, data = self._inputs(lids, weights)
        spans, homes = [], []  # per call: its mesh's devices; its home's when it reallocates, else None
        for lid, h in zip(lids, self.home):
            h = lids[h]
            spans.append(span[lid])
            homes.append(span[h] if place[h] != place[lid] else None)
        free = [0.0] * self.num_devices
        last_end = [0.0] * n
        starts = [0.0] * n
        ends_per_it, windows = [], []
        history: list[list[float]] = []  # every finished iteration's call ends, for version edges
        for it in range(self.iterations):
            it_end = 0.0
            dur = durs[min(it, len(durs) - 1)]
            for c in range(n):
                a, b = spans[c]
                t = max(free[a:b])
                away = homes[c]
                if away:
                    ha, hb = away
                    t = max(t, *free[ha:hb])
                for v, lag in version[c]:
                    if it >= lag and history[it - lag][v] > t:
                        t = history[it - lag][v]
                starts[c] = t
                t += realloc[c]
                if away:
                    free[ha:hb] = [t] * (hb - ha)  # the home's devices have sent the weights
                for p, ds in data[c]:
                    if last_end[p] + ds > t:
                        t = last_end[p] + ds
                t += dur[c]
                last_end[c] = t
                free[a:b] = [t] * (b - a)
                if t > it_end:
                    it_end = t
            history.append(last_end[:])
            ends_per_it.append(it_end)
            windows.append([(e - d, e) for e, d in zip(last_end, dur)])
        return ends_per_it, starts, last_end, windows

    # -- asynchronous workflows: the instance graph itself

    def _plan(self, lids: list[int]) -> Plan:
        return Plan(dict(zip(self.names, (self._layouts[lid] for lid in lids))))

    def _standing(self, lids: list[int]) -> frozenset[str]:
        return standing_copies(self.experiment.workflow, self._plan(lids))

    def _graph(self, standing: frozenset[str]):
        g = self._graphs.get(standing)
        if g is None:
            g = self._graphs[standing] = instance_graph(self.experiment.workflow, self.iterations, standing)
        return g

    def _program(self, lids: list[int]) -> tuple:
        """The standing copies, instance graph and device predecessors of a plan, kept for the
        last plan asked (the host-sharing fixed point schedules one plan several times)."""
        key = tuple(lids)
        if self._last_program[0] != key:
            plan = self._plan(lids)
            standing = standing_copies(self.experiment.workflow, plan)
            graph = self._graph(standing)
            homes = {name: plan[self.names[self.home[c]]] for c, name in enumerate(self.names)}
            self._last_program = (key, (standing, graph, device_preds(graph, plan, homes, standing)))
        return self._last_program[1]

    def _schedule_graph(self, lids: list[int], weights: list[float] | None = None
                        ) -> tuple[list[float], list[float], list[float], list[list[tuple[float, float]]]]:
        """:meth:`_schedule` for an asynchronous workflow: list scheduling of every instance of
        the graph the simulator runs, in its order, on idle links."""
        durs, realloc, data = self._inputs(lids, weights)
        standing, graph, preds = self._program(lids)
        index = self._index
        end = [0.0] * len(graph.nodes)
        lent = [0.0] * len(graph.nodes)  # when each instance's home devices were free again
        ends = [0.0] * self.iterations
        starts = [[0.0] * self.n for _ in range(self.iterations)]
        last = [[0.0] * self.n for _ in range(self.iterations)]
        for i, node in enumerate(graph.nodes):
            t = max([end[j] for j in preds.ended[i] + graph.version_preds[i]]
                    + [lent[j] for j in preds.reallocated[i]], default=0.0)
            target = push_target(node.call)
            if target is not None:  # a push takes what a reallocation of its copy would
                g = index[target]
                h = lids[self.home[g]]
                source = self._offload_s(g, h, lids[g])[1] if self._offloads[h] != "none" else 0.0
                end[i] = lent[i] = t + source + self._realloc_s(g, h, lids[g])
                continue
            c, it = index[node.call], node.iteration
            starts[it][c] = t
            t += 0.0 if node.call in standing else realloc[c]
            lent[i] = t
            arrive = dict(data[c])
            for j in graph.data_preds[i]:
                t = max(t, end[j] + arrive[index[graph.nodes[j].call]])
            end[i] = t + durs[min(it, len(durs) - 1)][c]
            last[it][c] = end[i]
            ends[it] = max(ends[it], end[i])
        windows = [[(e - durs[min(it, len(durs) - 1)][c], e) for c, e in enumerate(last[it])]
                   for it in range(self.iterations)]
        return ends, starts[-1], last[-1], windows

    def _simulated(self, lids: list[int], weights: list[float] | None = None
                   ) -> tuple[list[float], list[float], list[float], list[list[tuple[float, float]]]]:
        """:meth:`_schedule` for a plan with a streaming rollout (:mod:`estimator.spec.stream`):
        when a push reaches the stream depends on when its replicas' ops end, which no list
        schedule of whole instances says, so the discrete-event simulator runs it."""
        named = dict(zip(self.names, weights)) if weights is not None else None
        res = Simulation(self.experiment, self._plan(lids), self.profile, self._unrolled, self.costs,
                         weights=named).run()
        index = self._index
        starts = [[0.0] * self.n for _ in range(self.iterations)]
        last = [[0.0] * self.n for _ in range(self.iterations)]
        windows = [[(0.0, 0.0)] * self.n for _ in range(self.iterations)]
        for (it, call), r in res.records.items():
            c = index[call]
            starts[it][c], last[it][c], windows[it][c] = r.start_s, r.end_s, (r.compute_start_s, r.end_s)
        return [float(e) for e in res.iteration_ends()], starts[-1], last[-1], windows

    def period_s(self, plan: Plan) -> float:
        """Steady-state iteration time of ``plan`` (no memory check)."""
        lids = self._lids(plan)
        return self._period(self._schedule(lids, self._weights(lids))[0])

    def _period(self, ends: list[float]) -> float:
        """Steady-state period from every iteration's end: ``(end of the last − end of the
        last warm-up iteration)/(iterations after it)``, the last ``drain`` iterations left out."""
        return steady_period(ends, self.warmup, self.drain)

    def evaluate(self, plan: Plan) -> Evaluation:
        lids = self._lids(plan)
        ends, starts, last, _ = self._schedule(lids, self._weights(lids))
        period = self._period(ends)
        peak = self.peak_memory_bytes(lids)
        return Evaluation(period, peak <= self.capacity, peak, self.names, starts, last)

    def evaluate_many(self, plans: list[Plan]) -> BatchEvaluation:
        """Evaluate ``plans`` together: the lookups are per plan, the scheduling and memory
        arithmetic run once over arrays of all plans (same results as :meth:`evaluate`; an
        asynchronous workflow's plans one by one)."""
        if self.asynchronous:
            evs = [self.evaluate(p) for p in plans]
            return BatchEvaluation(np.array([e.iteration_s for e in evs]), np.array([e.feasible for e in evs]),
                                   np.array([e.peak_memory_bytes for e in evs]))
        n = self.n
        rows_lids, rows_dur, rows_re, rows_data, rows_st, rows_dyn = [], [], [], [], [], []
        for plan in plans:
            lids = self._lids(plan)
            dur, realloc, data = self._inputs(lids, self._weights(lids))
            rows_lids.append(lids)
            rows_dur.append(dur)  # (iterations or 1, calls)
            rows_re.append(realloc)
            rows_data.append([ds for row in data for _, ds in row])
            st, dyn = self._memory_rows(lids)
            rows_st.append(st)
            rows_dyn.append(dyn)
        widest = max(map(len, rows_dyn), default=0)  # pad to equal rows (reallocation rows vary)
        rows_dyn = [dyn + [self._zero_row] * (widest - len(dyn)) for dyn in rows_dyn]
        lids_a = np.asarray(rows_lids)  # (plans, calls)
        homes_a = lids_a[:, self.home]
        all_spans = np.asarray(self._span)
        mesh, home = all_spans[lids_a], all_spans[homes_a]  # (plans, calls, 2)
        place = np.asarray(self._place_of)
        away = place[homes_a] != place[lids_a]  # (plans, calls): reallocates, so occupies its home too

        def meets(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # [p, c, c']: x of c overlaps y of c'
            return (x[:, :, None, 0] < y[:, None, :, 1]) & (y[:, None, :, 0] < x[:, :, None, 1])

        ended = meets(mesh, mesh) | (away[:, :, None] & meets(home, mesh))  # c occupies c''s mesh: wait for its end
        reallocated = away[:, None, :] & (meets(mesh, home) | (away[:, :, None] & meets(home, home)))
        dur, realloc = np.asarray(rows_dur), np.asarray(rows_re)
        data = np.asarray(rows_data).reshape(len(plans), -1)
        last = np.zeros((len(plans), n))
        last_re = np.zeros((len(plans), n))  # when each call's home devices were free again
        ends, history = [], []
        for it in range(self.iterations):
            for c in range(n):
                t = np.maximum(np.where(ended[:, c, :], last, 0.0).max(axis=1),
                               np.where(reallocated[:, c, :], last_re, 0.0).max(axis=1))
                for v, lag in self.version_preds[c]:
                    if it >= lag:
                        t = np.maximum(t, history[it - lag][:, v])
                t = t + realloc[:, c]
                last_re[:, c] = t
                for col in self._edge_cols[c]:
                    t = np.maximum(t, last[:, self._edges[col][2]] + data[:, col])
                last[:, c] = t + dur[:, min(it, dur.shape[1] - 1), c]
            history.append(last.copy())
            ends.append(last.max(axis=1))
        period = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else ends[0]
        rows = self._matrix()
        peak = (rows[np.asarray(rows_st)].sum(axis=1) + rows[np.asarray(rows_dyn)].max(axis=1)).max(axis=1)
        return BatchEvaluation(period, peak <= self.capacity, peak)
