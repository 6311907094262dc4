"""Lowering: a call under a layout becomes per-stage task costs; moves become per-pair bytes.

Data-parallel replicas and the tensor-parallel ranks of a stage run in lock step (same work,
same time), so a pipeline stage is one simulated entity holding all ``dp·tp`` of its devices.
Per stage, :class:`StageCost` holds one micro-batch's forward and backward (compute and
tensor-parallel communication apart), the activation send to the next stage, the gradient
all-reduce over data-parallel replicas and the optimizer step; for generation, the prefill
forward and the decode steps grouped into chunks.

Decoding interleaves micro-batches through the stages (the executor's order): a step of
micro-batch j enters stage 0 once its previous token came back from the last stage. With
per-micro-batch stage times ``d_k`` and sends ``s_k`` (``s_{p−1}`` the token fed back), one
step of all ``m`` micro-batches — a round — takes the max-plus cycle time
``R = max(m·max_k d_k, Σ_k (d_k + s_k))``: either the busiest stage or one token's round trip
limits it. A chunk of steps occupies each stage for the sum of its rounds (the final round
ends after ``m·d_k``); the next stage starts a chunk one micro-batch (``d_k + s_k``) after the
previous one. This is exact for equal stages and constant step times; KV growth enters
exactly, step by step.

Each stage's task costs come from the executor's op census (:mod:`estimator.cost.pieces`): on the last
stage the head is followed by the token choice (generation), the ``ref_logp`` log-probs
(inference) or the call's loss and its backward (training, named by algorithm and role). The
profile's per-call executor overhead is spread evenly over the call's forward passes.

:class:`Costs` caches all of it per (call, layout) and transfers per pair of layouts, so the
simulator and the evaluator pay for lowering once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estimator.cost.memory import home_calls
from estimator.cost.pieces import (
    INT64,
    PAIRED_LOSSES,
    Extra,
    StageTime,
    backward_stage,
    decode_stage,
    dp_flatten_s,
    forward_stage,
    optimizer_s,
    stage_params,
)
from estimator.cost.transfers import (
    Pair,
    data_bytes,
    group_ports,
    group_shape,
    isolated_transfer_s,
    link_class,
    pair_ports,
    realloc_bytes,
)
from estimator.profile.profiles import Profile
from estimator.spec.experiment import Experiment
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import box_numel, shard
from estimator.spec.workflow import Call

MAX_DECODE_CHUNKS = 8  # decode steps are simulated in at most this many chunks per stage


@dataclass(frozen=True)
class DecodeChunk:
    """A run of decode steps on one stage, all micro-batches interleaved."""

    steps: int  # decode steps in the chunk
    duration_s: float  # the stage's busy window: sum of round periods
    compute_s: float  # of which kernels (all micro-batches)
    comm_s: float  # of which tensor-parallel collectives
    lag_s: float  # first micro-batch through this stage and its send: when the next stage may start
    send_bytes: float  # activations (or fed-back tokens) this stage sends over the chunk, per pair


@dataclass(frozen=True)
class StageCost:
    """One pipeline stage of a call: its devices and the cost of each task it runs."""

    index: int  # pipeline rank
    devices: tuple[int, ...]  # all dp·tp devices of the stage
    fwd: StageTime  # one micro-batch forward (prefill for generation)
    bwd: StageTime  # one micro-batch backward (zero unless training)
    send_s: float  # activation (or gradient) message to the neighbour stage, one micro-batch
    send_ports: tuple[int, ...]  # ports a forward send to the next stage holds
    recv_ports: tuple[int, ...]  # ports a gradient message from the next stage back to this one holds
    dp_allreduce_s: float  # gradient all-reduces per optimizer step: tied-embedding copies, then data-parallel
    dp_ports: tuple[int, ...]  # ports that all-reduce holds
    optimizer_s: float  # Adam step, per optimizer step
    send_class: str = "intra"  # link class of the sends to the next stage
    decode: tuple[DecodeChunk, ...] = ()  # generation only
    tp_ports: tuple[int, ...] = ()  # ports the tensor-parallel collectives hold (tp > 1)

    @property
    def rep(self) -> int:
        """The device whose spans stand for the whole lock-step group."""
        return self.devices[0]


@dataclass(frozen=True)
class CallCost:
    """A call lowered onto a layout."""

    call: str
    kind: str  # generate | inference | train
    layout: Layout
    stages: tuple[StageCost, ...]
    micro_batches: int
    minibatches: int  # optimizer steps (train), 1 otherwise
    feedback_s: float  # generation: last stage → first stage token message (0 without pipeline)
    decode_steps: int

    @property
    def pp(self) -> int:
        return len(self.stages)


def placement(layout: Layout) -> tuple:
    """Where a layout puts parameter shards and batch rows: its layout less micro-batches."""
    return layout.mesh, layout.dp, layout.tp, layout.pp


def same_placement(a: Layout, b: Layout) -> bool:
    return placement(a) == placement(b)


def _stage_devices(layout: Layout, k: int) -> tuple[int, ...]:
    block = layout.dp * layout.tp
    first = layout.mesh.first + k * block
    return tuple(range(first, first + block))


def _send(profile: Profile, layout: Layout, k: int, nbytes: float, dpn: int) -> tuple[float, tuple, tuple, str]:
    """Stage k → k+1 messages, one per (dp, tp) pair in parallel: time, ports both ways, and
    the slowest link class among the pairs."""
    if k >= layout.pp - 1:
        return 0.0, (), (), "intra"
    pairs = [(layout.device(i, t, k), layout.device(i, t, k + 1)) for i in range(layout.dp) for t in range(layout.tp)]
    classes = {link_class(s, d, dpn) for s, d in pairs}
    cls = "inter" if "inter" in classes else "intra"
    fwd = tuple(p for s, d in pairs for p in pair_ports(s, d, dpn))
    bwd = tuple(p for s, d in pairs for p in pair_ports(d, s, dpn))
    return profile.stage_send_s(nbytes, cls), fwd, bwd, cls


def _rows(call: Call, layout: Layout) -> float:
    """Sequences per data-parallel rank and micro-batch."""
    w = call.workload
    if call.kind == "train":
        return w.units_per_minibatch * (2 if w.paired else 1) / layout.dp / layout.micro_batches
    return w.seqs / layout.dp / layout.micro_batches


def _chunks(total: int) -> list[tuple[int, int]]:
    """Split steps ``0 .. total-1`` into at most MAX_DECODE_CHUNKS contiguous runs."""
    n = min(total, MAX_DECODE_CHUNKS)
    bounds = [round(i * total / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _decode(profile: Profile, call: Call, model: ModelSpec, layout: Layout, b: float,
            dpn: int) -> tuple[list[tuple[DecodeChunk, ...]], float]:
    """Decode chunks per stage and the fed-back token's message time."""
    w, p, m = call.workload, layout.pp, layout.micro_batches
    steps = w.gen_len - 1
    if steps <= 0:
        return [() for _ in range(p)], 0.0
    cached = w.prompt_len + np.arange(steps, dtype=float)  # tokens in the cache before each step
    d, comp, comm, sends = [], [], [], []
    choose = "greedy" if w.greedy else "sample"
    for k in range(p):
        c, a = decode_stage(profile, model, layout.tp, len(layout.stage_layers(model.layers, k)),
                            k == 0, k == p - 1, b, cached, choose)
        comp.append(c)
        comm.append(a)
        d.append(c + a)
        sends.append(_send(profile, layout, k, b * model.hidden * profile.elem_bytes, dpn)[0])
    feedback = 0.0
    if p > 1:
        feedback = profile.stage_send_s(b * INT64, link_class(layout.device(0, 0, p - 1), layout.device(0, 0, 0), dpn))
        sends[-1] = feedback
    d_arr = np.array(d)  # (stages, steps)
    rounds = np.maximum(m * d_arr.max(axis=0), d_arr.sum(axis=0) + sum(sends))
    out = []
    for k in range(p):
        busy = rounds.copy()
        busy[-1] = m * d_arr[k, -1]  # the final round ends when this stage's last micro-batch does
        per_send = b * model.hidden * profile.elem_bytes if k < p - 1 else b * INT64
        out.append(tuple(
            DecodeChunk(b1 - a1, float(busy[a1:b1].sum()), float(m * comp[k][a1:b1].sum()),
                        float(m * comm[k][a1:b1].sum()), float(d_arr[k, a1] + sends[k]),
                        per_send * m * (b1 - a1) if p > 1 else 0.0)
            for a1, b1 in _chunks(steps)))
    return out, feedback


def _tail(call: Call, algorithm: str, b: float) -> tuple[tuple[Extra, ...], tuple[Extra, ...]]:
    """Census pieces the last stage runs after the head, forward and backward: the token
    choice of generation, the log-probs of a ``ref_logp`` inference, a train call's loss."""
    w = call.workload
    if call.kind == "generate":
        return (("greedy" if w.greedy else "sample", {}),), ()
    if call.kind == "inference":
        return ((("loss_ref_logp", {"response": w.gen_len}),) if "ref_logp" in call.outputs else ()), ()
    objective = f"{algorithm}_{call.role}"
    over = {"response": w.gen_len, "rows": b / 2 if objective in PAIRED_LOSSES else b}
    return ((f"loss_{objective}", over),), ((f"loss_{objective}_backward", over),)


def _passes(call: Call, layout: Layout) -> int:
    """Forward passes per stage in one execution of the call (micro-batches × minibatches)."""
    return layout.micro_batches * (call.workload.minibatches if call.kind == "train" else 1)


def lower_call(call: Call, model: ModelSpec, layout: Layout, devices_per_node: int, profile: Profile,
               algorithm: str = "ppo") -> CallCost:
    """Per-stage task costs of ``call`` under ``layout`` (``algorithm`` names a train call's loss)."""
    w, dpn, p = call.workload, devices_per_node, layout.pp
    b = _rows(call, layout)
    decode, feedback = ([() for _ in range(p)], 0.0)
    if call.kind == "generate":
        new, head, phase = w.prompt_len, b, "prefill"  # prefill: the head runs on the last position only
        decode, feedback = _decode(profile, call, model, layout, b, dpn)
    else:
        new, head, phase = w.seq_len, None, "forward"
    tail_f, tail_b = _tail(call, algorithm, b)
    spread = profile.call_overhead_s / _passes(call, layout)  # the call's bookkeeping, over its passes
    stages = []
    for k in range(p):
        layers = len(layout.stage_layers(model.layers, k))
        first, last = k == 0, k == p - 1
        devices = _stage_devices(layout, k)
        ports = tuple(group_ports(devices, dpn))  # every port of the stage's devices (group_ports)
        fwd = forward_stage(profile, model, layout.tp, layers, first, last, b, new, head, phase, tail_f,
                            grad=call.kind == "train", recompute=layout.recompute == "full")
        fwd = StageTime(fwd.compute_s + spread, fwd.comm_s)
        bwd, ar, opt, dp_ports = StageTime(0.0, 0.0), 0.0, 0.0, ()
        if call.kind == "train":
            bwd = backward_stage(profile, model, layout.tp, layers, first, last, b, new, tail_b,
                                 recompute=layout.recompute == "full")
            params = stage_params(model, layout.tp, layout.pp, k, layers)
            numels = [box_numel(box) for box in shard(model, layout, layout.device(0, 0, k)).values()]
            group = [layout.device(i, 0, k) for i in range(layout.dp)]
            if layout.dp > 1:
                ar = profile.group_collective_s("all_reduce", params * profile.elem_bytes, *group_shape(group, dpn))
                ar += profile.collective_overhead_s  # issued between computations (Profile.in_call_s)
                ar += dp_flatten_s(profile, numels)  # the executor's flatten copies, on the same devices
                dp_ports = ports
            if model.tied_embeddings and p > 1 and (first or last):
                # the two copies of a tied embedding (first stage, last stage) sum their gradients
                # before the data-parallel all-reduce, as the executor's reduce_gradients does
                pair = [layout.device(0, 0, 0), layout.device(0, 0, p - 1)]
                embed_bytes = model.vocab * model.hidden / layout.tp * profile.elem_bytes
                ar += profile.group_collective_s("all_reduce", embed_bytes, *group_shape(pair, dpn))
                ar += profile.collective_overhead_s
                # (it holds this stage's own ports; a partner on another node also uses the NICs)
                dp_ports = ports
            opt = optimizer_s(profile, numels)
        act_bytes = b * new * model.hidden * profile.elem_bytes  # one micro-batch's activations
        send_s, send_ports, recv_ports, cls = _send(profile, layout, k, act_bytes, dpn)
        stages.append(StageCost(k, devices, fwd, bwd, send_s, send_ports, recv_ports, ar, dp_ports, opt, cls,
                                decode[k], ports if layout.tp > 1 else ()))
    steps = w.gen_len - 1 if call.kind == "generate" else 0
    return CallCost(call.name, call.kind, layout, tuple(stages), layout.micro_batches,
                    w.minibatches if call.kind == "train" else 1, feedback, max(steps, 0))


class Costs:
    """Lowered calls and transfer bytes of one experiment on one profile, computed once each."""

    def __init__(self, experiment: Experiment, profile: Profile):
        self.experiment = experiment
        self.profile = profile
        self.workflow = experiment.workflow
        self.dpn = experiment.cluster.devices_per_node
        self.num_devices = experiment.cluster.num_devices
        self.homes = home_calls(self.workflow)
        self._calls: dict[tuple[str, Layout], CallCost] = {}
        self._realloc: dict[tuple, dict[Pair, int]] = {}
        self._data: dict[tuple, dict[Pair, int]] = {}
        self._times: dict[tuple, float] = {}
        self._alone: Costs | None = None
        # data names each consumer reads from each producer
        self.edge_data: dict[tuple[str, str], tuple[str, ...]] = {}
        for prod, cons, data in self.workflow.edges():
            self.edge_data[(prod, cons)] = self.edge_data.get((prod, cons), ()) + (data,)

    def call(self, name: str, layout: Layout) -> CallCost:
        key = (name, layout)
        if key not in self._calls:
            call = self.workflow[name]
            model = self.experiment.models[call.role]
            self._calls[key] = lower_call(call, model, layout, self.dpn, self.profile, self.experiment.algorithm)
        return self._calls[key]

    @property
    def alone(self) -> Costs:
        """The same experiment on :meth:`Profile.alone` — a device whose host-mates idle
        (:mod:`estimator.sim.hostshare`) —, built once; these costs themselves when the profile
        says nothing about sharing a host."""
        if self._alone is None:
            self._alone = self if self.profile.host is None else Costs(self.experiment, self.profile.alone())
        return self._alone

    def realloc_pairs(self, role: str, home: Layout, layout: Layout) -> dict[Pair, int]:
        """Bytes per pair moving ``role``'s parameters from its home layout to ``layout``
        (cached per model and pair of placements, so roles sharing a model share it)."""
        if same_placement(home, layout):
            return {}
        model = self.experiment.models[role]
        key = (model, placement(home), placement(layout))
        if key not in self._realloc:
            self._realloc[key] = realloc_bytes(model, home, layout, self.dpn, self.profile.elem_bytes)
        return self._realloc[key]

    def realloc_s(self, role: str, home: Layout, layout: Layout) -> float:
        """Reallocation time on otherwise idle links, local copies included."""
        if same_placement(home, layout):
            return 0.0
        key = ("realloc", self.experiment.models[role], placement(home), placement(layout))
        if key not in self._times:
            pairs = self.realloc_pairs(role, home, layout)
            self._times[key] = isolated_transfer_s(pairs, self.profile, self.num_devices, self.dpn, True)
        return self._times[key]

    def data_pairs(self, producer: str, src: Layout, consumer: str, dst: Layout) -> dict[Pair, int]:
        """Bytes per pair bringing ``producer``'s outputs to ``consumer`` (rows depend on the
        placements only, not on micro-batches)."""
        key = (producer, placement(src), consumer, placement(dst))
        if key not in self._data:
            wf = self.workflow
            self._data[key] = data_bytes(self.experiment.algorithm, wf[producer], src, wf[consumer], dst,
                                         self.edge_data[(producer, consumer)], self.dpn)
        return self._data[key]

    def data_s(self, producer: str, src: Layout, consumer: str, dst: Layout) -> float:
        key = ("data", producer, placement(src), consumer, placement(dst))
        if key not in self._times:
            pairs = self.data_pairs(producer, src, consumer, dst)
            self._times[key] = isolated_transfer_s(pairs, self.profile, self.num_devices, self.dpn)
        return self._times[key]
