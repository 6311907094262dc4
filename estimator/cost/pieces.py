"""Cost model: the executor's op census at a call's shapes, timed on a profile.

Every piece a call runs on one device — a block's forward, prefill, decode step or backward,
the rotary tables of each stage pass, the (vocab-parallel) embedding, the final norm and
head, the token choice, the loss and its backward, Adam per parameter tensor, the flatten
copies around the data-parallel gradient sum — is charged exactly the aten ops the executor
dispatches for it (:mod:`estimator.cost.census`; counted from the executor's code by
``python -m calibration.census``), each op at :meth:`Profile.op_s` of its FLOPs, bytes and one
dispatch: device time (the longer of compute and memory traffic) plus host dispatch on a
``serial`` profile (CPU), the longer of the two on an ``overlap`` one (CUDA), the device part
scaled by the profile's measured ``compute.in_model`` factor for the dispatch mode (ops inside
the model's code; not the optimizer's or the gradient copies'). Backward is its own census
piece, not a multiple of the forward. A recomputing layout also pays activation
checkpointing's measured cost per block (``executor.checkpoint_*_s``). No other constant
enters.

Per stage of a pipeline, :func:`forward_stage` returns compute time and tensor-parallel
communication separately: two all-reduces of ``b·s·h`` per layer forward (after o_proj and
down_proj), one after the vocab-parallel embedding, and an all-gather of the logits over the
vocabulary. A tensor-parallel group of whole nodes (``tp_nodes`` > 1, a layout's
``tp_across_nodes``) runs each of them across the nodes (:meth:`Profile.in_call_group_s`: its
ranks on a node over NVLink, then across nodes on the NICs, or a measured multi-node curve).
:func:`backward_stage` has two all-reduces per layer (Megatron's f operators) plus one for
the LM head's input, and one more per layer when the layout recomputes activations (the re-run
forward's g operator after o_proj; recomputing stops before down_proj and its all-reduce, see
:func:`backward_stage`). The profile's ``executor.micro_batch_overhead_s`` is added to every
stage pass; the lowering spreads ``call_overhead_s`` over a call's passes.

Decoding (:func:`decode_stage`) is vectorised over steps: the census pieces are evaluated
with the KV length as an array, so each step's attention is charged exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estimator.cost.census import block_piece, end_piece, load_op_set, model_symbols, rotary_piece, tensors_work
from estimator.cost.trainer import fused_optimizer_s, unfused_attention_s
from estimator.profile.profiles import Profile
from estimator.spec.models import ModelSpec

BF16 = 2  # bytes per bf16 element
FP32 = 4
INT64 = 8
PAIRED_LOSSES = ("dpo_actor", "rw_reward")  # the census records these on 2·rows rows

Extra = tuple[str, dict]  # a census piece on the last stage and its symbols beyond the model's


def piece_s(profile: Profile, name: str, values: dict, mode: str = "nograd") -> np.ndarray | float:
    """Seconds of one census piece at ``values`` (arrays give an array), its ops dispatched in
    ``mode`` (nograd | grad: autograd records them | backward: the autograd engine runs them)."""
    piece = load_op_set(profile.ops).compiled(profile.dtype, name)
    w = piece(values)
    if not len(w.count):
        return 0.0
    if profile.ops == "fused" and profile.compose == "overlap":
        # a fused stack launches a piece's few kernels back to back, asynchronously: the piece
        # takes the longer of its kernels' device time and its launches' host time
        device = (w.count * profile.ops_s_many(w.flops, w.bytes, 0.0, mode, piece.kinds)).sum(axis=0)
        t = np.maximum(device, w.count.sum(axis=0) * profile.dispatch_s(mode))
    else:
        t = (w.count * profile.ops_s_many(w.flops, w.bytes, 1.0, mode, piece.kinds)).sum(axis=0)
    return float(t) if np.ndim(t) == 0 else t


def piece_launches(profile: Profile, name: str, values: dict) -> np.ndarray | float:
    """Kernels (or aten ops) one census piece launches at ``values`` (arrays give an array)."""
    w = load_op_set(profile.ops).compiled(profile.dtype, name)(values)
    if not len(w.count):
        return 0.0
    t = w.count.sum(axis=0)
    return float(t) if np.ndim(t) == 0 else t


@dataclass(frozen=True)
class StageTime:
    """One micro-batch through one pipeline stage on one tensor-parallel rank."""

    compute_s: float  # kernels
    comm_s: float  # tensor-parallel collectives (on the critical path: Megatron does not overlap them)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s


EACH_POINTS = 48  # distinct sizes a scalar cost is evaluated at for an array (each_distinct)


def each_distinct(fn, x):  # noqa: ANN001, ANN202
    """A scalar cost function (a collective's time against its size) over an array of sizes:
    exactly at up to :data:`EACH_POINTS` distinct sizes, beyond that interpolated log-log
    between that many log-spaced ones (the collective curves are log-log interpolations)."""
    if np.ndim(x) == 0:
        return fn(float(x))
    uniq, inv = np.unique(np.asarray(x, dtype=float), return_inverse=True)
    if len(uniq) <= EACH_POINTS or uniq[0] <= 0:
        return np.array([fn(float(u)) for u in uniq])[inv]
    grid = np.geomspace(uniq[0], uniq[-1], EACH_POINTS)
    values = np.array([fn(float(g)) for g in grid])
    if (values <= 0).any():
        return np.interp(uniq, grid, values)[inv]
    return np.exp(np.interp(np.log(uniq), np.log(grid), np.log(values)))[inv]


def tp_collective_s(profile: Profile, kind: str, size_bytes: float, tp: int, nodes: int = 1) -> float:
    """One collective a tensor-parallel group of ``tp`` ranks over ``nodes`` whole nodes (1:
    inside a node) issues between computations."""
    return profile.in_call_group_s(kind, size_bytes, tp // nodes, nodes)


def tp_allreduce_s(profile: Profile, tp: int, tokens: float, h: int, nodes: int = 1) -> float:
    """One all-reduce of the ``tokens × h`` activations (run dtype) over the tensor-parallel group
    of ``tp`` ranks on ``nodes`` nodes (``tokens`` may be an array)."""
    if tp == 1:
        return 0.0
    return each_distinct(lambda n: tp_collective_s(profile, "all_reduce", n * h * profile.elem_bytes, tp, nodes),
                         tokens)


def head_comm_s(profile: Profile, model: ModelSpec, tp: int, head_tokens: float, nodes: int = 1) -> float:
    """All-gather of the LM head's logits over the vocabulary (none for a value head)."""
    if model.head == "value" or tp == 1:
        return 0.0
    return each_distinct(lambda n: tp_collective_s(profile, "all_gather", n * model.vocab * profile.elem_bytes, tp,
                                                   nodes), head_tokens)


# Megatron's vocab-parallel cross entropy all-reduces these per token over the tensor-parallel
# group: the max logit, the target's logit, the sum of exponentials (Shoeybi et al. 2019 §3,
# megatron/core/tensor_parallel/cross_entropy.py)
LOSS_ALLREDUCES = 3


def loss_comm_s(profile: Profile, tp: int, tokens: float, nodes: int = 1) -> float:
    """The vocab-parallel loss's all-reduces, one fp32 number per token each (``tokens`` may
    be an array), where the executor all-gathers the logits instead (:func:`head_comm_s`)."""
    if tp == 1:
        return 0.0
    return LOSS_ALLREDUCES * each_distinct(lambda n: tp_collective_s(profile, "all_reduce", n * FP32, tp, nodes),
                                           tokens)


def _vocab_parallel(profile: Profile, model: ModelSpec, phase: str) -> bool:
    """Whether a pass's loss is the trainer's vocab-parallel cross entropy (train and inference
    passes of a language model under a trainer that says so)."""
    return profile.trainer.cross_entropy == "vocab_parallel" and phase == "forward" and model.head == "lm"


def _rotary_s(profile: Profile, model: ModelSpec, sym: dict, decode: bool = False) -> np.ndarray | float:
    """The rotary tables of one stage pass (none for learned positions)."""
    piece = rotary_piece(model, decode)
    return 0.0 if piece is None else piece_s(profile, piece[0], sym | piece[1])


def _extras_s(profile: Profile, sym: dict, extras: tuple[Extra, ...], mode: str) -> float:
    return sum(piece_s(profile, name, sym | over, mode) for name, over in extras)


def forward_stage(profile: Profile, model: ModelSpec, tp: int, layers: int, first: bool, last: bool,
                  batch: float, new: int, head_tokens: float | None = None, phase: str = "forward",
                  extras: tuple[Extra, ...] = (), grad: bool = False, recompute: bool = False,
                  tp_nodes: int = 1) -> StageTime:
    """Forward of ``batch`` sequences over ``new`` tokens through a stage of ``layers`` blocks
    (``phase`` forward, or prefill into a KV cache); the head runs on ``head_tokens`` positions
    (default: all), then the last stage runs ``extras`` (token choice, loss). ``grad``: a
    training forward, whose ops autograd records; ``recompute``: its blocks run under activation
    checkpointing, which costs the profile's ``checkpoint_s[0]`` per block beyond their ops;
    ``tp_nodes``: nodes one tensor-parallel group spans."""
    n = batch * new
    head_tokens = n if head_tokens is None else head_tokens
    mode = "grad" if grad else "nograd"
    sym = model_symbols(model, tp) | {"rows": batch, "tokens": new}
    compute = (layers * piece_s(profile, block_piece(phase, model, tp), sym, mode)
               + _rotary_s(profile, model, sym))  # the rotary tables need no gradient
    if profile.trainer.attention == "unfused" and phase == "forward":
        compute += layers * unfused_attention_s(profile, model, tp, batch, new, False, mode)
    if recompute:
        compute += layers * profile.checkpoint_s[0]
    comm = 2 * layers * tp_allreduce_s(profile, tp, n, model.hidden, tp_nodes)
    if first:
        compute += piece_s(profile, end_piece("embed", tp, model), sym, mode)
        comm += tp_allreduce_s(profile, tp, n, model.hidden, tp_nodes) if tp > 1 else 0.0
    if last:
        head = end_piece(f"head_{model.head}", tp, model)
        if _vocab_parallel(profile, model, phase):
            # the logits stay split: the head's gathered copy is the rank's own shard, the loss
            # runs on it, and three per-token all-reduces replace the logits' all-gather
            compute += piece_s(profile, head, sym | {"tokens": head_tokens / batch, "tp": 1.0}, mode)
            compute += _extras_s(profile, sym | {"vocab": sym["vocab_local"]}, extras, mode)
            comm += loss_comm_s(profile, tp, head_tokens, tp_nodes)
        else:
            compute += piece_s(profile, head, sym | {"tokens": head_tokens / batch}, mode)
            compute += _extras_s(profile, sym, extras, mode)
            comm += head_comm_s(profile, model, tp, head_tokens, tp_nodes)
    return StageTime(compute + profile.micro_batch_overhead_s, comm)


def backward_stage(profile: Profile, model: ModelSpec, tp: int, layers: int, first: bool, last: bool,
                   batch: float, new: int, extras: tuple[Extra, ...] = (), recompute: bool = False,
                   tp_nodes: int = 1) -> StageTime:
    """Backward of the same micro-batch: the loss's backward (``extras``) and the head's on
    the last stage, each block's, the embedding's on the first; two all-reduces per layer,
    one more for the LM head's input on the last stage. ``recompute``: each block's forward
    runs again inside its backward (the census's checkpointed block backward: the forward's
    ops up to the block's last saved tensor, where torch's non-reentrant checkpoint stops
    recomputing — so not down_proj —, the checkpoint's detaches, the backward's), with the
    re-run forward's one all-reduce per layer (after o_proj; the one after down_proj is not
    re-run), and the checkpoint's own cost per block beyond its ops (``checkpoint_s[1]``)."""
    n = batch * new
    sym = model_symbols(model, tp) | {"rows": batch, "tokens": new}
    block = block_piece("backward_recompute" if recompute else "backward", model, tp)
    compute = layers * (piece_s(profile, block, sym, "backward") + (profile.checkpoint_s[1] if recompute else 0.0))
    if profile.trainer.attention == "unfused":  # the backward's, and the re-run forward's
        compute += layers * unfused_attention_s(profile, model, tp, batch, new, True, "backward")
        if recompute:
            compute += layers * unfused_attention_s(profile, model, tp, batch, new, False, "backward")
    if first:
        compute += piece_s(profile, end_piece("embed_backward", tp, model), sym, "backward")
    if last:
        compute += piece_s(profile, end_piece(f"head_{model.head}_backward", tp, model), sym, "backward")
        loss_sym = sym | {"vocab": sym["vocab_local"]} if _vocab_parallel(profile, model, "forward") else sym
        compute += _extras_s(profile, loss_sym, extras, "backward")
    ars = (3 if recompute else 2) * layers + (1 if last and model.head == "lm" else 0)
    return StageTime(compute + profile.micro_batch_overhead_s, ars * tp_allreduce_s(profile, tp, n, model.hidden,
                                                                                     tp_nodes))


def decode_stage(profile: Profile, model: ModelSpec, tp: int, layers: int, first: bool, last: bool,
                 batch: float, cached: np.ndarray, choose: str = "sample") -> tuple[np.ndarray, np.ndarray]:
    """Per decode step (one new token per sequence after ``cached[i]`` ones): (compute_s,
    comm_s) arrays of one micro-batch through the stage. The last stage also chooses the
    token (``choose``: sample | greedy): logits gathered over the vocabulary, the choice,
    its log-probability and its broadcast over the group."""
    cached = np.asarray(cached, dtype=float)
    sym = model_symbols(model, tp) | {"rows": batch, "tokens": 1.0, "kv_len": cached + 1.0}
    compute = layers * piece_s(profile, block_piece("decode", model, tp), sym)
    compute = compute + _rotary_s(profile, model, sym, decode=True) + profile.micro_batch_overhead_s
    comm = 2 * layers * tp_allreduce_s(profile, tp, batch, model.hidden)
    if first:
        compute = compute + piece_s(profile, end_piece("embed", tp, model), sym)
        comm += tp_allreduce_s(profile, tp, batch, model.hidden) if tp > 1 else 0.0
    if last:
        compute = compute + piece_s(profile, end_piece(f"head_{model.head}", tp, model), sym)
        compute = compute + piece_s(profile, choose, sym)
        comm += head_comm_s(profile, model, tp, batch)
        comm += profile.in_call_s("broadcast", batch * INT64, tp, "intra")
    compute = np.broadcast_to(np.asarray(compute, dtype=float), cached.shape).copy()
    return compute, np.full_like(compute, comm)


# ---- parameters per device, optimizer -------------------------------------------------------


def layer_split_params(model: ModelSpec) -> int:
    """Parameters of one block that tensor parallelism splits (all but the norms and the
    row-parallel biases)."""
    return model.params_per_layer - model.replicated_params_per_layer


def stage_params(model: ModelSpec, tp: int, pp: int, stage: int, stage_layers: int) -> float:
    """Parameters one device of pipeline stage ``stage`` holds (see :func:`sharding.shard`):
    its blocks split over ``tp`` (norms and row-parallel biases replicated), the vocab-split
    embedding (and the whole learned position table) on the first stage, and on the last the
    final norm and the head (a second embedding copy when tied)."""
    h = model.hidden
    n = stage_layers * (layer_split_params(model) / tp + model.replicated_params_per_layer)
    embed = model.vocab * h / tp
    if stage == 0:
        n += embed + model.position_params
    if stage == pp - 1:
        n += model.norm_params  # final norm
        if model.head == "value":
            n += h
        elif not model.tied_embeddings:
            n += embed  # LM head
        elif stage != 0:
            n += embed  # the tied embedding's copy that serves as the head
    return n


def optimizer_s(profile: Profile, numels: list[int]) -> float:
    """One ``ShardAdam`` step and ``zero_grad`` over parameter tensors of ``numels`` elements:
    the census's multi-tensor ops, each over all the tensors' bytes, plus its per-tensor ops;
    under a trainer with a fused optimizer, its step instead (:func:`fused_optimizer_s`)."""
    if profile.trainer.fused_optimizer:
        return fused_optimizer_s(profile, float(sum(numels)))
    census = load_op_set(profile.ops)
    flops, nbytes, launches = tensors_work(census, profile.dtype, "optimizer", len(numels), float(sum(numels)))
    return profile.op_s(flops, nbytes, launches, in_model=False) if numels else 0.0


def dp_flatten_s(profile: Profile, numels: list[int]) -> float:
    """The local copies that flatten ``numels`` gradients into one data-parallel all-reduce
    and back (none for a single tensor, which is reduced in place, or under a trainer whose
    gradients live in one contiguous buffer), as one memory-bound pass."""
    if len(numels) <= 1 or profile.trainer.grad_buffer == "contiguous":
        return 0.0
    census = load_op_set(profile.ops)
    _, nbytes, launches = tensors_work(census, profile.dtype, "dp_allreduce", len(numels), float(sum(numels)))
    return profile.op_s(0.0, nbytes, launches, in_model=False)
