"""Cost model: the work of every op as a pure function of shapes, and its time on a profile.

Each op declares its :class:`Work` — FLOPs, bytes read and written in device memory (bf16
activations and weights), and kernels issued — for one device of a tensor-parallel group of
``tp`` (Megatron splits: q/k/v, gate and up by output rows, o and down by input columns,
embedding and LM head by vocabulary). FLOP counts follow :mod:`estimator.ops` (``2·m·n·k`` per
product; ``4·h`` per attended key). A profile turns work into seconds with a roofline
(:meth:`Profile.op_s`): the longest of FLOPs at the fitted efficiency, bytes at the fitted
bandwidth, and the host-side launch cost of its kernels. No other constant enters.

Per stage of a pipeline, :func:`forward_stage` sums the ops of the layers it holds, plus the
embedding on the first stage and the final norm and head on the last, and returns compute time
and tensor-parallel communication separately: two all-reduces of ``b·s·h`` per layer forward
(after o_proj and down_proj), one after the vocab-parallel embedding, and an all-gather of
the logits over the vocabulary (the executor gathers them before the loss or sampling).
Backward is twice the forward compute (gradients w.r.t. inputs and weights, each a product
of the forward's size: ``ops.BACKWARD_FACTOR``) with two all-reduces per layer (Megatron's f
operators) plus one for the LM head's input.

Decoding (:func:`decode_stage`) is vectorised over steps: everything but the attention core
is the same every step; the attention core reads the KV cache, which grows by one token a
step, so its FLOPs and bytes are evaluated per step, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estimator.models import ModelSpec
from estimator.ops import BACKWARD_FACTOR, attended_keys
from estimator.profiles import Profile

BF16 = 2  # bytes per bf16 element
FP32 = 4
INT64 = 8
NORM_LAUNCHES = 5  # eager RMSNorm: square, mean, rsqrt, scale, weight
ROTARY_LAUNCHES = 6  # rotate-half (slice, neg, cat) and multiply-add, for q and k
ATTENTION_LAUNCHES = 2  # causal mask + fused attention kernel
LOGP_LAUNCHES = 4  # promote to fp32, log-softmax, gather, reduce
ADAM_LAUNCHES = 12  # multi-tensor Adam: moments, bias corrections, update, bf16 copy


@dataclass(frozen=True)
class Work:
    """What one op asks of a device."""

    flops: float  # floating-point operations
    bytes: float  # bytes read + written in device memory
    launches: int = 1  # kernels issued


def gemm(m: float, n: float, k: float) -> Work:
    """(m×k)·(k×n) in bf16: ``2·m·n·k`` FLOPs; reads both operands, writes the product."""
    return Work(2.0 * m * n * k, BF16 * (m * k + k * n + m * n))


def elementwise(elems: float, tensors: int, launches: int = 1, width: int = BF16) -> Work:
    """A memory-bound op touching ``tensors`` arrays of ``elems`` elements (reads + writes)."""
    return Work(float(elems), float(width * elems * tensors), launches)


def rms_norm(tokens: float, h: int) -> Work:
    """Read x, write the normalised x; FLOPs are a handful per element."""
    return Work(4.0 * tokens * h, BF16 * (2 * tokens * h + h), NORM_LAUNCHES)


def attention_core(model: ModelSpec, tp: int, batch: float, new: int, cached: float) -> Work:
    """FlashAttention-style kernel on ``heads/tp`` heads: ``4·(h/tp)`` FLOPs per attended key;
    reads Q and the K/V of every attended position once, writes O and the new K/V."""
    hq, kvt = model.hidden // tp, model.kv_dim // tp
    n = batch * new
    flops = 4.0 * hq * batch * attended_keys(new, cached)
    nbytes = BF16 * (2 * n * hq + batch * (cached + new) * 2 * kvt + 2 * n * kvt)
    return Work(flops, nbytes, ATTENTION_LAUNCHES)


def layer_ops(model: ModelSpec, tp: int, batch: float, new: int, cached: float,
              attention: bool = True) -> list[Work]:
    """One transformer block's forward on one tensor-parallel rank, in execution order."""
    h, hq, kvt, ft = model.hidden, model.hidden // tp, model.kv_dim // tp, model.ffn // tp
    n = batch * new
    ops = [rms_norm(n, h), gemm(n, hq, h), gemm(n, kvt, h), gemm(n, kvt, h),
           elementwise(n * (hq + kvt), 3, ROTARY_LAUNCHES)]
    if attention:
        ops.append(attention_core(model, tp, batch, new, cached))
    ops += [gemm(n, h, hq), elementwise(n * h, 3), rms_norm(n, h), gemm(n, ft, h), gemm(n, ft, h),
            elementwise(n * ft, 5, 2), gemm(n, h, ft), elementwise(n * h, 3)]
    return ops


def embedding_ops(model: ModelSpec, tp: int, tokens: float) -> list[Work]:
    """Row gather from this rank's vocabulary slice (masked when split)."""
    return [Work(0.0, BF16 * 2 * tokens * model.hidden + INT64 * tokens, 1 if tp == 1 else 4)]


def head_ops(model: ModelSpec, tp: int, tokens: float, head_tokens: float) -> list[Work]:
    """Final norm over every position, then the head on ``head_tokens`` positions: the LM head
    on ``V/tp`` rows and log-probabilities over the gathered fp32 logits, or a scalar value."""
    h = model.hidden
    ops = [rms_norm(tokens, h)]
    if model.head == "value":
        return ops + [gemm(head_tokens, 1, h), elementwise(head_tokens, 2, 1, FP32)]
    v = model.vocab
    ops.append(gemm(head_tokens, v // tp, h))
    # promote (r2 w4), log-softmax (r4 w4), gather of the chosen tokens
    ops.append(Work(5.0 * head_tokens * v, head_tokens * v * (BF16 + 3 * FP32), LOGP_LAUNCHES))
    return ops


def ops_s(profile: Profile, ops: list[Work]) -> float:
    return sum(profile.op_s(w.flops, w.bytes, w.launches) for w in ops)


@dataclass(frozen=True)
class StageTime:
    """One micro-batch through one pipeline stage on one tensor-parallel rank."""

    compute_s: float  # kernels
    comm_s: float  # tensor-parallel collectives (on the critical path: Megatron does not overlap them)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s


def tp_allreduce_s(profile: Profile, tp: int, tokens: float, h: int) -> float:
    """One all-reduce of the ``tokens × h`` bf16 activations over the tensor-parallel group."""
    return profile.collective_s("all_reduce", tokens * h * BF16, tp, "intra")


def head_comm_s(profile: Profile, model: ModelSpec, tp: int, head_tokens: float) -> float:
    """All-gather of the LM head's logits over the vocabulary (none for a value head)."""
    if model.head == "value" or tp == 1:
        return 0.0
    return profile.collective_s("all_gather", head_tokens * model.vocab * BF16, tp, "intra")


def forward_stage(profile: Profile, model: ModelSpec, tp: int, layers: int, first: bool, last: bool,
                  batch: float, new: int, cached: float = 0, head_tokens: float | None = None) -> StageTime:
    """Forward of ``batch`` sequences over ``new`` tokens after ``cached`` ones through a stage
    of ``layers`` blocks; the head runs on ``head_tokens`` positions (default: all)."""
    n = batch * new
    head_tokens = n if head_tokens is None else head_tokens
    compute = layers * ops_s(profile, layer_ops(model, tp, batch, new, cached))
    comm = 2 * layers * tp_allreduce_s(profile, tp, n, model.hidden)
    if first:
        compute += ops_s(profile, embedding_ops(model, tp, n))
        comm += tp_allreduce_s(profile, tp, n, model.hidden) if tp > 1 else 0.0
    if last:
        compute += ops_s(profile, head_ops(model, tp, n, head_tokens))
        comm += head_comm_s(profile, model, tp, head_tokens)
    return StageTime(compute, comm)


def backward_stage(profile: Profile, model: ModelSpec, tp: int, layers: int, last: bool,
                   batch: float, new: int, fwd: StageTime) -> StageTime:
    """Backward of the same micro-batch: ``BACKWARD_FACTOR`` × forward compute, two all-reduces
    per layer, one more for the LM head's input on the last stage."""
    n = batch * new
    ars = 2 * layers + (1 if last and model.head == "lm" else 0)
    return StageTime(BACKWARD_FACTOR * fwd.compute_s, ars * tp_allreduce_s(profile, tp, n, model.hidden))


def ops_s_many(profile: Profile, flops: np.ndarray, nbytes: np.ndarray, launches: int) -> np.ndarray:
    """Vectorised :meth:`Profile.op_s` over ops of varying size."""
    flops = np.asarray(flops, dtype=float)
    nbytes = np.asarray(nbytes, dtype=float)
    compute = np.where(flops > 0, flops / (profile.peak_flops * profile.flops_efficiency.many(flops)), 0.0)
    memory = np.where(nbytes > 0, nbytes / (profile.mem_bandwidth_Bps * profile.mem_efficiency.many(nbytes)), 0.0)
    return np.maximum(np.maximum(compute, memory), launches * profile.launch_overhead_s)


def decode_stage(profile: Profile, model: ModelSpec, tp: int, layers: int, first: bool, last: bool,
                 batch: float, cached: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per decode step (one new token per sequence after ``cached[i]`` ones): (compute_s,
    comm_s) arrays of one micro-batch through the stage. The last stage also samples: logits
    gathered over the vocabulary, log-softmax, and the chosen token broadcast over the group."""
    cached = np.asarray(cached, dtype=float)
    fixed = layers * ops_s(profile, layer_ops(model, tp, batch, 1, 0.0, attention=False))
    hq, kvt = model.hidden // tp, model.kv_dim // tp
    keys = batch * (cached + 1.0)  # attended_keys(1, c) = c + 1 per sequence
    att_flops = 4.0 * hq * keys
    att_bytes = BF16 * (2 * batch * hq + keys * 2 * kvt + 2 * batch * kvt)
    compute = fixed + layers * ops_s_many(profile, att_flops, att_bytes, ATTENTION_LAUNCHES)
    comm = 2 * layers * tp_allreduce_s(profile, tp, batch, model.hidden)
    if first:
        compute = compute + ops_s(profile, embedding_ops(model, tp, batch))
        comm += tp_allreduce_s(profile, tp, batch, model.hidden) if tp > 1 else 0.0
    if last:
        compute = compute + ops_s(profile, head_ops(model, tp, batch, batch))
        comm += head_comm_s(profile, model, tp, batch)
        comm += profile.collective_s("broadcast", batch * INT64, tp, "intra")
    return compute, np.full_like(compute, comm)


# ---- parameters per device, optimizer -------------------------------------------------------


def layer_split_params(model: ModelSpec) -> int:
    """Parameters of one block that tensor parallelism splits (all but the two norms)."""
    return model.params_per_layer - 2 * model.hidden


def stage_params(model: ModelSpec, tp: int, pp: int, stage: int, stage_layers: int) -> float:
    """Parameters one device of pipeline stage ``stage`` holds (see :func:`sharding.shard`):
    its blocks split over ``tp`` (norms replicated), the vocab-split embedding on the first
    stage, and on the last the final norm and the head (a second embedding copy when tied)."""
    h = model.hidden
    n = stage_layers * (layer_split_params(model) / tp + 2 * h)
    embed = model.vocab * h / tp
    if stage == 0:
        n += embed
    if stage == pp - 1:
        n += h  # final norm
        if model.head == "value":
            n += h
        elif not model.tied_embeddings:
            n += embed  # LM head
        elif stage != 0:
            n += embed  # the tied embedding's copy that serves as the head
    return n


def optimizer_work(params: float) -> Work:
    """Mixed-precision Adam over ``params``: reads bf16 grad and fp32 master, m, v; writes fp32
    master, m, v and the bf16 weight (28 bytes per parameter); ~12 FLOPs per parameter."""
    return Work(12.0 * params, (BF16 + 3 * FP32 + 3 * FP32 + BF16) * params, ADAM_LAUNCHES)
