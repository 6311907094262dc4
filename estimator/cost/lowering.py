"""Lowering: a call under a layout becomes per-stage task costs; moves become per-pair bytes.

Data-parallel replicas and the tensor-parallel ranks of a stage run in lock step (same work,
same time), so a pipeline stage is one simulated entity holding all ``dp·tp`` of its devices.
Per stage, :class:`StageCost` holds one micro-batch's forward and backward (compute and
tensor-parallel communication apart), the activation send to the next stage, the gradient
all-reduce over data-parallel replicas and the optimizer step — or, for a train layout that
shards its data parallelism (:mod:`estimator.cost.dpshard`), the gradients' reduce-scatter,
the step on this rank's chunk and the parameters' all-gather (``optimizer``), or the
all-gathers and reduce-scatters each forward and backward exposes (``full``); for generation, the prefill
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

import dataclasses
from dataclasses import dataclass

import numpy as np

from estimator.cost.decode import DecodeChunk, decode_chunks
from estimator.cost.dpshard import full_optimizer_s, full_shard_pass, optimizer_shard_step
from estimator.cost.engine import NONE as NO_MOVES
from estimator.cost.engine import (
    Moves,
    generate_moves,
    inference_moves,
    production,
    refit_fixed_s,
    refit_pairs,
)
from estimator.cost.memory import call_bytes, colocated
from estimator.cost.offload import NONE, OffloadCost, offload_cost
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
from estimator.cost.rollout import RolloutCost, continuous, engine_tokens, kv_free_bytes, rollout_cost
from estimator.cost.stream import PricedStream, stream_replica
from estimator.cost.transfers import (
    Pair,
    data_bytes,
    group_ports,
    group_shape,
    isolated_transfer_s,
    sharded_realloc_bytes,
    stage_send,
)
from estimator.profile.pricing import micro_batching
from estimator.profile.profiles import Profile
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import (
    box_numel,
    budget_micro_batches,
    dp_rows,
    fullest_engine_rows,
    micro_batch_rows,
    most_rows,
    shard,
)
from estimator.spec.stack import DYNAMIC_ROUND, priced_stack
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
    # shard="optimizer": the all-gather of the updated parameters after each optimizer step
    # (on dp_ports); dp_allreduce_s is then the gradients' reduce-scatter
    dp_gather_s: float = 0.0
    # shard="full": the data-parallel gathers and reduce-scatters one micro-batch's forward and
    # backward expose beyond the compute they overlap (on dp_ports, after the pass's compute)
    fwd_shard_s: float = 0.0
    bwd_shard_s: float = 0.0

    @property
    def fwd_s(self) -> float:
        """One micro-batch forward with all its communication."""
        return self.fwd.total_s + self.fwd_shard_s

    @property
    def bwd_s(self) -> float:
        """One micro-batch backward with all its communication."""
        return self.bwd.total_s + self.bwd_shard_s

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
    # generation as continuous-batching engines (estimator.cost.rollout); None: the fixed-length
    # model of the stages' prefill and decode chunks
    rollout: RolloutCost | None = None
    reward_s: float = 0.0  # generation under a verifier: the host scoring its sequences, at the end

    @property
    def pp(self) -> int:
        return len(self.stages)


def _rows(call: Call, layout: Layout) -> float:
    """Sequences per data-parallel rank and micro-batch."""
    w = call.workload
    if call.kind == "train":
        return w.units_per_minibatch * (2 if w.paired else 1) / layout.dp / layout.micro_batches
    if call.kind == "generate":  # the fullest engine (requests dealt unevenly), which ends the call
        return fullest_engine_rows(call, layout)
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
    return reward_s_per_sample * most_rows(call, layout)


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


def micro_batch_shapes(call: Call, layout: Layout, tokens: np.ndarray,
                       batching: str = "padded") -> list[list[tuple[int, int]]]:
    """Per data-parallel rank, (rows, tokens each row is charged) of every micro-batch of every
    minibatch: ``micro_batches`` equal splits, or cut by the layout's token budget as
    ``batching`` says (:data:`estimator.spec.stack.MICRO_BATCHING`); ``tokens`` per global row.

    - ``padded`` (the executor's): rows in order, padded to the longest
      (:func:`estimator.spec.sharding.budget_micro_batches`);
    - ``packed`` (sequence packing): the budget counts the rows' summed tokens and a
      micro-batch is charged at its rows' mean length, nothing padded;
    - ``dynamic`` (NeMo-RL's dynamic batching): each minibatch share of a rank sorted by length,
      every row rounded up to :data:`~estimator.spec.stack.DYNAMIC_ROUND` tokens, cut so that
      rows × the longest stay within the budget, and charged at the longest."""
    per_unit = 2 if call.workload.paired else 1
    packed = batching == "packed"
    out = []
    for r in range(layout.dp):
        if layout.token_budget and batching == "dynamic":
            shapes = []
            for lo, hi in dp_rows(call, layout, r):
                units = np.sort(np.asarray(tokens[lo:hi]).reshape(-1, per_unit).max(axis=1))
                units = np.ceil(units / DYNAMIC_ROUND) * DYNAMIC_ROUND
                rows = np.repeat(units, per_unit)
                cut = budget_micro_batches((0, len(rows)), rows, max(layout.max_tokens_per_micro_batch,
                                                                     int(rows.max())))
                shapes += [(b - a, int(rows[a:b].max())) for a, b in cut if b > a]
            out.append(shapes)
            continue
        if layout.token_budget:
            ranges = [mb for rows in dp_rows(call, layout, r)
                      for mb in budget_micro_batches(rows, tokens[rows[0]:rows[1]], layout.max_tokens_per_micro_batch,
                                                     per_unit, packed)]
        else:
            ranges = [mb for step in micro_batch_rows(call, layout, r) for mb in step]
        length = (lambda a: int(np.ceil(a.mean()))) if packed else (lambda a: int(a.max()))
        out.append([(hi - lo, length(tokens[lo:hi])) for lo, hi in ranges if hi > lo])
    return out


def _drawn_shape(call: Call, layout: Layout, tokens: np.ndarray,
                 batching: str = "padded") -> tuple[list[tuple[int, int]], int]:
    """The micro-batches of the slowest data-parallel rank (by padded tokens; replicas run in
    lock step, so it sets the pace) and its micro-batches per minibatch."""
    shapes = micro_batch_shapes(call, layout, tokens, batching)
    worst = max(shapes, key=lambda mbs: sum(rows * n for rows, n in mbs))
    steps = call.workload.minibatches if call.kind == "train" else 1
    return worst, max(1, round(len(worst) / steps))


def _mean_time(t: StageTime) -> StageTime:
    """The mean of a stage time evaluated over arrays of micro-batch shapes."""
    return StageTime(float(np.mean(t.compute_s)), float(np.mean(t.comm_s)))


def lower_call(call: Call, model: ModelSpec, layout: Layout, devices_per_node: int, profile: Profile,
               algorithm: str = "ppo", reward_s_per_sample: float = 0.0,
               lengths: tuple[np.ndarray, np.ndarray] | None = None, kv_tokens: int = 0,
               rollout: RolloutCost | None = None, batching: str | None = None) -> CallCost:
    """Per-stage task costs of ``call`` under ``layout`` (``algorithm`` names a train call's loss;
    ``reward_s_per_sample``: a verifier's host seconds per sequence, :func:`verifier_s`).

    ``lengths``: (prompt, response) tokens per global row of the iteration when they vary. A
    generate call then runs as continuous batching (:mod:`estimator.cost.rollout`, with a KV
    pool of ``kv_tokens`` per engine, 0 unlimited); an inference or train call charges each
    micro-batch padded to its longest row, as the executor batches (equal splits or the
    layout's token budget), every micro-batch at the slowest rank's mean. ``rollout``: the
    generate call's rollout where it was priced already. ``batching``: how the trainer cuts a
    token budget (:func:`micro_batch_shapes`; None: as the profile's stack does)."""
    w, dpn, p = call.workload, devices_per_node, layout.pp
    if continuous(call, layout):
        prompt, gen = lengths if lengths is not None else (np.full(w.seqs, w.prompt_len), np.full(w.seqs, w.gen_len))
        ro = rollout or rollout_cost(profile, call, model, layout, prompt, gen, kv_tokens, dpn)
        zero = StageTime(0.0, 0.0)
        stages = tuple(StageCost(k, tuple(layout.stage_devices(k)), zero, zero, 0.0, (), (), 0.0, (), 0.0)
                       for k in range(p))
        return CallCost(call.name, call.kind, layout, stages, layout.micro_batches, 1, 0.0, ro,
                        verifier_s(call, layout, reward_s_per_sample))
    shapes, given = None, layout
    if batching is None:
        batching = priced_stack(profile.stack).micro_batching
    if call.kind != "generate" and (lengths is not None or layout.token_budget):
        tokens = lengths[0] + lengths[1] if lengths is not None else np.full(w.seqs, w.seq_len)
        shapes, m = _drawn_shape(call, layout, tokens, batching)
        layout = dataclasses.replace(layout, micro_batches=m)
    b = _rows(call, layout)
    decode, feedback = ([() for _ in range(p)], 0.0)
    if call.kind == "generate":
        new, head, phase = w.prompt_len, b, "prefill"  # prefill: the head runs on the last position only
        decode, feedback = decode_chunks(profile, call, model, layout, b, dpn)
    else:
        new, head, phase = w.seq_len, None, "forward"
    tail_f, tail_b = _tail(call, algorithm, b)
    spread = profile.call_overhead_s / _passes(call, layout)  # the call's bookkeeping, over its passes
    if profile.terms is not None:  # a production trainer's own cost per micro-batch pass
        spread += profile.terms.trainer_micro_batch_s
    recompute = layout.recompute == "full"
    tp_nodes = layout.tp_span(dpn)[1]  # nodes one tensor-parallel group spans (tp_across_nodes)

    def passes(n_layers: int, at_first: bool, at_last: bool) -> tuple[StageTime, StageTime]:
        """Forward and backward of a micro-batch through ``n_layers`` blocks and the ends."""
        train = call.kind == "train"
        if shapes is None:
            f = forward_stage(profile, model, layout.tp, n_layers, at_first, at_last, b, new, head, phase,
                              tail_f, grad=train, recompute=recompute, tp_nodes=tp_nodes)
            bw = (backward_stage(profile, model, layout.tp, n_layers, at_first, at_last, b, new, tail_b,
                                 recompute=recompute, tp_nodes=tp_nodes) if train else StageTime(0.0, 0.0))
            return f, bw
        rows, n = (np.array(x, dtype=float) for x in zip(*shapes))
        extra_f, extra_b = _tail(call, algorithm, rows)
        f = _mean_time(forward_stage(profile, model, layout.tp, n_layers, at_first, at_last, rows, n, None, phase,
                                     extra_f, grad=train, recompute=recompute, tp_nodes=tp_nodes))
        bw = (_mean_time(backward_stage(profile, model, layout.tp, n_layers, at_first, at_last, rows, n, extra_b,
                                        recompute=recompute, tp_nodes=tp_nodes)) if train else StageTime(0.0, 0.0))
        return f, bw

    stages = []
    for k in range(p):
        layers = len(layout.stage_layers(model.layers, k))
        first, last = k == 0, k == p - 1
        devices = tuple(layout.stage_devices(k))
        ports = tuple(group_ports(devices, dpn))  # every port of the stage's devices (group_ports)
        fwd, bwd = passes(layers, first, last)
        ar, opt, dp_ports, gather, exposed = 0.0, 0.0, (), 0.0, (0.0, 0.0)
        if call.kind == "train":
            params = stage_params(model, layout.tp, layout.pp, k, layers)
            numels = [box_numel(box) for box in shard(model, layout, layout.device(0, 0, k)).values()]
            group = [layout.device(i, 0, k) for i in range(layout.dp)]
            if layout.dp > 1 and layout.shard == "none":
                ar = profile.group_collective_s("all_reduce", params * profile.elem_bytes, *group_shape(group, dpn))
                ar += profile.collective_overhead_s  # issued between computations (Profile.in_call_s)
                ar += dp_flatten_s(profile, numels)  # the executor's flatten copies, on the same devices
                dp_ports = ports
            elif layout.dp > 1 and layout.shard == "optimizer":
                step = optimizer_shard_step(profile, model, layout, k, dpn)
                ar, gather, dp_ports = step.reduce_s, step.gather_s, ports
            elif layout.sharded:
                bwd, exposed = _full_shard(profile, model, layout, k, dpn, fwd, bwd, passes)
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
            if layout.dp > 1 and layout.shard == "optimizer":
                opt = step.optimizer_s
            elif layout.sharded:
                opt = full_optimizer_s(profile, model, layout, k)
            else:
                opt = optimizer_s(profile, numels)
        fwd = StageTime(fwd.compute_s + spread, fwd.comm_s)
        # one micro-batch's activations (the largest one's, where lengths vary)
        act_bytes = (b * new if shapes is None else max(r * n for r, n in shapes)) * model.hidden * profile.elem_bytes
        send_s, send_ports, recv_ports, cls = stage_send(profile, layout, k, act_bytes, dpn)
        stages.append(StageCost(k, devices, fwd, bwd, send_s, send_ports, recv_ports, ar, dp_ports, opt, cls,
                                decode[k], ports if layout.tp > 1 else (), gather, *exposed))
    return CallCost(call.name, call.kind, given, tuple(stages), layout.micro_batches,
                    w.minibatches if call.kind == "train" else 1, feedback, None,
                    verifier_s(call, layout, reward_s_per_sample))


def _full_shard(profile: Profile, model: ModelSpec, layout: Layout, k: int, dpn: int, fwd: StageTime,
                bwd: StageTime, passes) -> tuple[StageTime, tuple[float, float]]:  # noqa: ANN001
    """A ``shard="full"`` stage's backward with the gradient flatten copies added to its
    compute, and the gathers and reduce-scatters its forward and backward expose
    (:func:`estimator.cost.dpshard.full_shard_pass`). A block's time (compute and
    tensor-parallel communication) is the stage's less its ends, over its blocks; the
    embedding's is the first stage's ends less a middle stage's, the head's backward the last
    stage's ends less the embedding's."""
    layers = len(layout.stage_layers(model.layers, k))
    first, last = k == 0, k == layout.pp - 1
    ends_f, ends_b = passes(0, first, last)
    bare_f, bare_b = passes(0, False, False)
    block_f = (fwd.total_s - ends_f.total_s) / layers if layers else 0.0
    block_b = (bwd.total_s - ends_b.total_s) / layers if layers else 0.0
    embed_f = embed_b = 0.0
    if first:
        emb_f, emb_b = passes(0, True, False)
        embed_f, embed_b = emb_f.total_s - bare_f.total_s, emb_b.total_s - bare_b.total_s
    head_b = ends_b.total_s - embed_b if last else 0.0
    cost = full_shard_pass(profile, model, layout, k, dpn, block_f, block_b, embed_f, embed_b, head_b,
                           priced_stack(profile.stack).reduce_bytes)
    return StageTime(bwd.compute_s + cost.copies_s, bwd.comm_s), (cost.forward_s, cost.backward_s)


def node_offset(mesh: DeviceMesh, devices_per_node: int) -> int:
    """Where ``mesh`` lies against node boundaries as far as link classes go: -1 inside one
    node (every pair of its devices on NVLink, wherever it starts), else its first device's
    place in its node (the same on every node: moving a mesh by whole nodes keeps each pair's
    link class)."""
    if mesh.first // devices_per_node == mesh.last // devices_per_node:
        return -1
    return mesh.first % devices_per_node


class Costs:
    """Lowered calls and transfer bytes of one experiment on one profile, computed once each."""

    def __init__(self, experiment: Experiment, profile: Profile):
        self.experiment = experiment
        self.profile = profile
        self.workflow = experiment.workflow
        self.dpn = experiment.cluster.devices_per_node
        self.num_devices = experiment.cluster.num_devices
        self.homes = self.workflow.home_calls()
        self._calls: dict[tuple, CallCost] = {}
        self._lengths: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rollouts: dict[tuple, RolloutCost] = {}
        self._streams: dict[tuple, PricedStream] = {}
        self._schedules: dict[tuple[str, int], dict] = {}  # (call, iteration) → engine schedules
        self._realloc: dict[tuple, dict[Pair, int]] = {}
        self._data: dict[tuple, dict[Pair, int]] = {}
        self._times: dict[tuple, float] = {}
        self._offloads: dict[tuple, OffloadCost] = {}
        self.trained = set(self.workflow.trained_roles())
        self._alone: Costs | None = None
        self._moves: dict[tuple, Moves] = {}
        self.trained = set(self.workflow.trained_roles())
        self.production = production(profile)
        self.batching = micro_batching(experiment, profile)
        # data names each consumer reads from each producer
        self.edge_data: dict[tuple[str, str], tuple[str, ...]] = {}
        for prod, cons, data in self.workflow.edges():
            self.edge_data[(prod, cons)] = self.edge_data.get((prod, cons), ()) + (data,)

    def call(self, name: str, layout: Layout, iteration: int = 0) -> CallCost:
        """``name`` lowered on ``layout`` in ``iteration`` (whose drawn lengths it charges where
        lengths vary; every iteration alike otherwise). An asynchronous unroll's warm-up
        iterations charge iteration 0's lengths (:meth:`Workflow.draw_iteration`)."""
        iteration = self.workflow.draw_iteration(iteration)
        call = self.workflow[name]
        vary = call.workload.lengths_vary
        key = (name, layout, iteration) if vary else (name, layout)
        if key not in self._calls:
            model = self.experiment.models[call.role]
            lengths = self.lengths(iteration) if vary else None
            ro = self._rollout(name, layout, iteration if vary else 0) if continuous(call, layout) else None
            self._calls[key] = lower_call(call, model, layout, self.dpn, self.profile, self.experiment.algorithm,
                                          self.experiment.reward_s_per_sample, lengths, ro.kv_tokens if ro else 0, ro,
                                          self.batching)
        return self._calls[key]

    def _rollout(self, name: str, layout: Layout, iteration: int) -> RolloutCost:
        """A generate call's rollout, cached by what it depends on: the mesh's size and where it
        lies against node boundaries (which link classes its messages take,
        :func:`node_offset`), not which node it starts on."""
        key = (name, layout.mesh.size, node_offset(layout.mesh, self.dpn), layout.dp, layout.tp, layout.pp,
               layout.micro_batches,
               layout.max_concurrency, iteration)
        if key not in self._rollouts:
            call = self.workflow[name]
            w = call.workload
            prompt, gen = (self.lengths(iteration) if w.lengths_vary
                           else (np.full(w.seqs, w.prompt_len), np.full(w.seqs, w.gen_len)))
            schedules = self._schedules.setdefault((name, iteration), {})
            self._rollouts[key] = rollout_cost(self.profile, call, self.experiment.models[call.role], layout, prompt,
                                               gen, self.kv_tokens(name, layout), self.dpn, schedules)
        return self._rollouts[key]

    def stream(self, name: str, layout: Layout, iterations: int, replica: int,
               switch_at: tuple[int, ...] = ()) -> PricedStream:
        """Replica ``replica`` of generate call ``name`` streaming on ``layout`` over
        ``iterations`` unrolled iterations with these switch points, scheduled and priced
        (:mod:`estimator.cost.stream`; whether it may stream is
        :func:`estimator.spec.stream.streaming_calls`'s to say)."""
        key = (name, layout, iterations, replica, switch_at)
        if key not in self._streams:
            self._streams[key] = stream_replica(self.profile, self.experiment, layout, name, iterations, replica,
                                                self.kv_tokens(name, layout), self.dpn, switch_at)
        return self._streams[key]

    @property
    def varying(self) -> bool:
        """Whether calls cost differently from iteration to iteration (lengths are drawn)."""
        return self.experiment.params.variable

    def lengths(self, iteration: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, response) tokens per generated row of ``iteration``, drawn once."""
        if iteration not in self._lengths:
            self._lengths[iteration] = self.experiment.lengths(iteration)
        return self._lengths[iteration]

    def kv_tokens(self, name: str, layout: Layout) -> int:
        """The KV pool of one virtual engine of generate call ``name`` on ``layout``, tokens
        (:mod:`estimator.cost.rollout`: the engine holds ``kv_fraction`` of each device)."""
        call = self.workflow[name]
        model = self.experiment.models[call.role]
        engine = self.experiment.kv_fraction * self.profile.capacity_bytes
        acts = [parts.get("activations", 0.0) for parts in call_bytes(call, model, layout, at_home=True)]
        return engine_tokens(kv_free_bytes(model, layout, engine, acts), model, layout)

    @property
    def alone(self) -> Costs:
        """The same experiment on :meth:`Profile.alone` — a device whose host-mates idle
        (:mod:`estimator.sim.hostshare`) —, built once; these costs themselves when the profile
        says nothing about sharing a host."""
        if self._alone is None:
            self._alone = self if self.profile.host is None else Costs(self.experiment, self.profile.alone())
        return self._alone

    def refits(self, call: str | None) -> bool:
        """Whether ``call`` refits a serving engine: a generate call of a trained role on a
        production stack, whose engine holds a copy of its own even where its layout places the
        weights as the trainer does (:func:`estimator.cost.engine.refit_pairs`)."""
        if call is None or not self.production:
            return False
        c = self.workflow[call]
        return c.kind == "generate" and c.role in self.trained

    def realloc_pairs(self, role: str, home: Layout, layout: Layout, call: str | None = None) -> dict[Pair, int]:
        """Bytes per pair moving ``role``'s parameters from its home layout to ``layout``
        (cached per model and pair of placements, so roles sharing a model share it); for a
        call that refits an engine (:meth:`refits`), the refit's."""
        refit = self.refits(call)
        if home.same_placement(layout) and not refit:
            return {}
        model = self.experiment.models[role]
        key = (model, home.placement, layout.placement, refit)
        if key not in self._realloc:
            self._realloc[key] = (refit_pairs(model, home, layout, self.dpn, self.profile.elem_bytes,
                                              priced_stack(self.profile.stack).refit_bytes) if refit else
                                  sharded_realloc_bytes(model, home, layout, self.dpn, self.profile.elem_bytes))
        return self._realloc[key]

    def refit_fixed_s(self, role: str, call: str | None) -> float:
        """The refit's fixed cost (per parameter tensor) for a call that refits, else 0."""
        return refit_fixed_s(self.profile, self.experiment.models[role]) if self.refits(call) else 0.0

    def realloc_s(self, role: str, home: Layout, layout: Layout, call: str | None = None) -> float:
        """Reallocation time on otherwise idle links, local copies included (and a refit's
        fixed cost for a call that refits)."""
        refit = self.refits(call)
        if home.same_placement(layout) and not refit:
            return 0.0
        key = ("realloc", self.experiment.models[role], home.placement, layout.placement, refit)
        if key not in self._times:
            pairs = self.realloc_pairs(role, home, layout, call)
            self._times[key] = isolated_transfer_s(pairs, self.profile, self.num_devices, self.dpn, True)
        return self._times[key] + self.refit_fixed_s(role, call)

    def shares(self, layouts: dict[str, Layout]) -> bool:
        """Whether a plan's engine shares devices with a trained role's home (every call of the
        production stacks then moves state over the host link, :mod:`estimator.cost.engine`)."""
        if not self.production:
            return False
        homes = {r: layouts[c] for r, c in self.homes.items()}
        return colocated({n: self.workflow[n] for n in layouts}, layouts, homes, self.trained)

    def moves(self, name: str, layouts: dict[str, Layout], shares: bool) -> Moves:
        """The host copies ``name`` pays on a production stack (:mod:`estimator.cost.engine`)
        under a plan's ``layouts`` (``shares``: :meth:`shares` of the plan); none elsewhere."""
        if not shares:
            return NO_MOVES
        call = self.workflow[name]
        home = layouts[self.homes[call.role]]
        policy = next((r for r in sorted(self.trained) if r != call.role), None)
        policy_home = layouts[self.homes[policy]] if policy is not None else None
        key = (name, layouts[name], home, policy_home)
        if key not in self._moves:
            model, lay = self.experiment.models[call.role], layouts[name]
            trained = call.role in self.trained
            if call.kind == "generate":
                out = generate_moves(self.profile, model, lay, True) if trained else NO_MOVES
            elif call.kind == "inference":
                out = inference_moves(self.profile, model, lay, trained, True,
                                      (self.experiment.models[policy], policy_home) if policy else None)
            else:
                out = NO_MOVES  # the trainer's offload is its layout's (offload)
            self._moves[key] = out
        return self._moves[key]

    def offload(self, name: str, layout: Layout, home: Layout) -> OffloadCost:
        """Host transfers of call ``name`` on ``layout`` when its role's home is ``home``
        (:mod:`estimator.cost.offload`), cached per (call, layout, home)."""
        if home.offload == "none":
            return NONE
        key = ("offload", name, layout, home)
        if key not in self._offloads:
            call = self.workflow[name]
            self._offloads[key] = offload_cost(call, self.experiment.models[call.role], layout, home,
                                               call.role in self.trained, self.profile)
        return self._offloads[key]

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
