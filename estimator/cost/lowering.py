"""Lowering: a call under a layout becomes per-stage task costs; moves become per-pair bytes.

Data-parallel replicas and the tensor-parallel ranks of a stage run in lock step (same work,
same time), so a pipeline stage is one simulated entity holding all ``dp·tp`` of its devices.
Per stage, :class:`StageCost` holds one micro-batch's forward and backward (compute and
tensor-parallel communication apart), the activation send to the next stage, the gradient
all-reduce over data-parallel replicas and the optimizer step; for generation, the prefill
forward and the decode steps grouped into chunks (:mod:`estimator.cost.decode`).

Each stage's task costs come from the executor's op census (:mod:`estimator.cost.pieces`): on the last
stage the head is followed by the token choice (generation), the response log-probs of a
``ref_logp`` or ``old_logp`` inference (one census piece, ``loss_ref_logp``: the same
``response_logp`` at the policy temperature, whichever policy's weights) or the call's loss
and its backward (training, named by algorithm and role). The profile's per-call executor
overhead is spread evenly over the call's forward passes.

A generate call that writes rewards (a verifier, ``models.reward: rule``) ends with the
verifier on its last stage's hosts: :attr:`CallCost.reward_s`, the experiment's
``reward_s_per_sample`` × the sequences of one data-parallel replica (the replicas check their
own sequences side by side), after the call's last decode step.

:class:`Costs` caches all of it per (call, layout) and transfers per pair of layouts, so the
simulator and the evaluator pay for lowering once.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.cost.decode import DecodeChunk, decode_chunks
from estimator.cost.pieces import (
    PAIRED_LOSSES,
    Extra,
    StageTime,
    backward_stage,
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
    realloc_bytes,
    stage_send,
)
from estimator.profile.profiles import Profile
from estimator.spec.experiment import Experiment
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import box_numel, shard
from estimator.spec.workflow import Call


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
    reward_s: float = 0.0  # generation under a verifier: the host scoring its sequences, at the end

    @property
    def pp(self) -> int:
        return len(self.stages)


def _rows(call: Call, layout: Layout) -> float:
    """Sequences per data-parallel rank and micro-batch."""
    w = call.workload
    if call.kind == "train":
        return w.units_per_minibatch * (2 if w.paired else 1) / layout.dp / layout.micro_batches
    return w.seqs / layout.dp / layout.micro_batches


# inference outputs that are response log-probs of a language model (rlhf.response_logp)
LOGP_OUTPUTS = frozenset({"ref_logp", "old_logp"})
REWARD_OUTPUTS = frozenset({"rewards", "rewards_greedy"})


def verifier_s(call: Call, layout: Layout, reward_s_per_sample: float) -> float:
    """Host seconds a generate call spends scoring its sequences with a verifier: the sequences
    of one data-parallel replica (the replicas score theirs at the same time) × the seconds per
    sample; 0 for a call that writes no rewards."""
    if call.kind != "generate" or not REWARD_OUTPUTS & set(call.outputs):
        return 0.0
    return reward_s_per_sample * call.workload.seqs / layout.dp


def _tail(call: Call, algorithm: str, b: float) -> tuple[tuple[Extra, ...], tuple[Extra, ...]]:
    """Census pieces the last stage runs after the head, forward and backward: the token
    choice of generation, the log-probs of a ``ref_logp`` or ``old_logp`` inference, a train call's loss."""
    w = call.workload
    if call.kind == "generate":
        return (("greedy" if w.greedy else "sample", {}),), ()
    if call.kind == "inference":
        logp = LOGP_OUTPUTS & set(call.outputs)
        return ((("loss_ref_logp", {"response": w.gen_len}),) if logp else ()), ()
    objective = f"{algorithm}_{call.role}"
    over = {"response": w.gen_len, "rows": b / 2 if objective in PAIRED_LOSSES else b}
    return ((f"loss_{objective}", over),), ((f"loss_{objective}_backward", over),)


def _passes(call: Call, layout: Layout) -> int:
    """Forward passes per stage in one execution of the call (micro-batches × minibatches)."""
    return layout.micro_batches * (call.workload.minibatches if call.kind == "train" else 1)


def lower_call(call: Call, model: ModelSpec, layout: Layout, devices_per_node: int, profile: Profile,
               algorithm: str = "ppo", reward_s_per_sample: float = 0.0) -> CallCost:
    """Per-stage task costs of ``call`` under ``layout`` (``algorithm`` names a train call's loss;
    ``reward_s_per_sample``: a verifier's host seconds per sequence, :func:`verifier_s`)."""
    w, dpn, p = call.workload, devices_per_node, layout.pp
    b = _rows(call, layout)
    decode, feedback = ([() for _ in range(p)], 0.0)
    if call.kind == "generate":
        new, head, phase = w.prompt_len, b, "prefill"  # prefill: the head runs on the last position only
        decode, feedback = decode_chunks(profile, call, model, layout, b, dpn)
    else:
        new, head, phase = w.seq_len, None, "forward"
    tail_f, tail_b = _tail(call, algorithm, b)
    spread = profile.call_overhead_s / _passes(call, layout)  # the call's bookkeeping, over its passes
    stages = []
    for k in range(p):
        layers = len(layout.stage_layers(model.layers, k))
        first, last = k == 0, k == p - 1
        devices = tuple(layout.stage_devices(k))
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
        send_s, send_ports, recv_ports, cls = stage_send(profile, layout, k, act_bytes, dpn)
        stages.append(StageCost(k, devices, fwd, bwd, send_s, send_ports, recv_ports, ar, dp_ports, opt, cls,
                                decode[k], ports if layout.tp > 1 else ()))
    return CallCost(call.name, call.kind, layout, tuple(stages), layout.micro_batches,
                    w.minibatches if call.kind == "train" else 1, feedback,
                    verifier_s(call, layout, reward_s_per_sample))


class Costs:
    """Lowered calls and transfer bytes of one experiment on one profile, computed once each."""

    def __init__(self, experiment: Experiment, profile: Profile):
        self.experiment = experiment
        self.profile = profile
        self.workflow = experiment.workflow
        self.dpn = experiment.cluster.devices_per_node
        self.num_devices = experiment.cluster.num_devices
        self.homes = self.workflow.home_calls()
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
            self._calls[key] = lower_call(call, model, layout, self.dpn, self.profile, self.experiment.algorithm,
                                          self.experiment.reward_s_per_sample)
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
        if home.same_placement(layout):
            return {}
        model = self.experiment.models[role]
        key = (model, home.placement, layout.placement)
        if key not in self._realloc:
            self._realloc[key] = realloc_bytes(model, home, layout, self.dpn, self.profile.elem_bytes)
        return self._realloc[key]

    def realloc_s(self, role: str, home: Layout, layout: Layout) -> float:
        """Reallocation time on otherwise idle links, local copies included."""
        if home.same_placement(layout):
            return 0.0
        key = ("realloc", self.experiment.models[role], home.placement, layout.placement)
        if key not in self._times:
            pairs = self.realloc_pairs(role, home, layout)
            self._times[key] = isolated_transfer_s(pairs, self.profile, self.num_devices, self.dpn, True)
        return self._times[key]

    def data_pairs(self, producer: str, src: Layout, consumer: str, dst: Layout) -> dict[Pair, int]:
        """Bytes per pair bringing ``producer``'s outputs to ``consumer`` (rows depend on the
        placements only, not on micro-batches)."""
        key = (producer, src.placement, consumer, dst.placement)
        if key not in self._data:
            wf = self.workflow
            self._data[key] = data_bytes(self.experiment.algorithm, wf[producer], src, wf[consumer], dst,
                                         self.edge_data[(producer, consumer)], self.dpn)
        return self._data[key]

    def data_s(self, producer: str, src: Layout, consumer: str, dst: Layout) -> float:
        key = ("data", producer, src.placement, consumer, dst.placement)
        if key not in self._times:
            pairs = self.data_pairs(producer, src, consumer, dst)
            self._times[key] = isolated_transfer_s(pairs, self.profile, self.num_devices, self.dpn)
        return self._times[key]
