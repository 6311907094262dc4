"""Work of a trainer's departures from the executor's op census, from formulas.

A profile's ``trainer`` section (:mod:`estimator.profile.trainer`) names the training software
it prices; where that software does other work than the executor's census records, the work
is written here from its shapes and timed by the profile like any op (:meth:`Profile.op_s`:
FLOPs at the efficiency curve, bytes at the memory curve, one dispatch per kernel):

- Megatron's unfused core attention (Shoeybi et al. 2019, ``megatron/model/transformer.py``
  CoreAttention; the same path in vTrain's traced model, ``src/model/gpt_modeling.py``), per
  block pass on one tensor-parallel rank with ``E = rows·heads/tp·s²`` scores of head width
  ``d``, in the run dtype (``e`` bytes):

  ========================  ==========  ===========================================
  kernel                     FLOPs       bytes
  ========================  ==========  ===========================================
  baddbmm  q·kᵀ              2·E·d       q, k in; ``e·E`` scores out
  scale-mask-softmax         —           ``2·e·E`` (scores in, probabilities out)
  dropout                    —           ``2·e·E`` + a one-byte mask per score
  bmm  p·v                   2·E·d       ``e·E`` probabilities, v in; the context out
  ========================  ==========  ===========================================

  and its backward: the two gradients of each product (``2·E·d`` FLOPs each, reading or
  writing ``e·E``), dropout's (``2·e·E`` + the mask) and the softmax's (``3·e·E``). The census
  charges one fused attention kernel instead (causal ``2·E·d`` FLOPs forward, ``2.5×`` that
  backward, only q, k, v and o in memory), so the difference is what is added.
- (Megatron's vocab-parallel cross entropy is :func:`estimator.cost.pieces.loss_comm_s` and
  the loss's census piece on the rank's shard of the vocabulary.)
- A fused multi-tensor optimizer step (apex / DeepSpeed FusedAdam under the mixed-precision
  optimizer): ``bytes_per_param`` bytes per parameter through device memory in a few kernels.
"""

from __future__ import annotations

import numpy as np

from estimator.profile.profiles import Profile
from estimator.spec.models import ModelSpec


def _attention_ops(E: float, qkv: float, d: float, e: int, backward: bool) -> list[tuple[float, float]]:
    """(FLOPs, bytes) of each kernel of the unfused attention, one pass."""
    if not backward:
        return [(2 * E * d, 2 * qkv + e * E), (0.0, 2 * e * E), (0.0, 2 * e * E + E), (2 * E * d, e * E + 2 * qkv)]
    return [(2 * E * d, e * E + 2 * qkv), (2 * E * d, e * E + 2 * qkv),  # bmm's: d probabilities, d v
            (0.0, 2 * e * E + E), (0.0, 3 * e * E),  # dropout's, softmax's
            (2 * E * d, e * E + 2 * qkv), (2 * E * d, e * E + 2 * qkv)]  # baddbmm's: d q, d k


def unfused_attention_s(profile: Profile, model: ModelSpec, tp: int, rows, tokens, backward: bool,  # noqa: ANN001
                        mode: str = "nograd"):  # -> float | np.ndarray
    """Seconds the unfused attention of one block pass adds over the census's fused kernel
    (``rows`` may be an array): its kernels' time less one fused attention of the same shapes."""
    heads = model.heads / tp
    d = model.head_dim
    e = profile.elem_bytes
    E = np.asarray(rows, dtype=float) * heads * np.asarray(tokens, dtype=float) ** 2
    qkv = np.asarray(rows, dtype=float) * np.asarray(tokens, dtype=float) * heads * d * e  # one of q, k, v, o
    ops = _attention_ops(E, qkv, d, e, backward)
    flops = np.stack([np.broadcast_to(f, np.shape(E)) for f, _ in ops])
    nbytes = np.stack([np.broadcast_to(b, np.shape(E)) for _, b in ops])
    added = profile.ops_s_many(flops, nbytes, 1.0, mode).sum(axis=0)
    fused_flops = (2.5 if backward else 1.0) * 2 * E * d  # causal: half of 4·E·d, backward 2.5×
    fused = profile.ops_s_many(fused_flops[None], ((8 if backward else 4) * qkv)[None], 1.0, mode).sum(axis=0)
    out = added - fused
    return float(out) if np.ndim(out) == 0 else out


def fused_optimizer_s(profile: Profile, numel: float) -> float:
    """One fused optimizer step over ``numel`` parameters: memory-bound, the trainer's bytes per
    parameter in its few launches."""
    t = profile.trainer
    if numel <= 0:
        return 0.0
    return profile.op_s(0.0, t.optimizer_bytes_per_param * numel, t.optimizer_launches, in_model=False)
