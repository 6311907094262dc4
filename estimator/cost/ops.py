"""Work of transformer ops as pure functions of shapes: FLOPs, each citing its formula.

Conventions: one multiply-add is 2 FLOPs (``2·m·n·k`` for an m×k by k×n product, as in
Calculon's ``Linear``). Symbols: h hidden, f ffn, V vocab, L layers,
``kv = g·d`` width of K (or V). Attention is causal: query position i attends to i+1 keys
(its own and every earlier one), so a forward over ``s`` new tokens after ``c`` cached ones
attends ``s·c + s(s+1)/2`` keys; each attended key costs ``4·h`` FLOPs (QKᵀ and the weighted
sum of V, 2·d each per head; Korthikanti et al. 2022 count ``4·s²·h`` for the non-causal
square).
"""

from __future__ import annotations

import numpy as np

from estimator.spec.models import ModelSpec
from estimator.spec.workflow import Call

# Model FLOPs for MFU (PaLM Appendix B convention): backward = 2 × forward (gradients w.r.t.
# inputs and weights). The cost model does not use it: it charges the census's backward.
BACKWARD_FACTOR = 2.0


def linear_flops(m: int, n: int, k: int) -> float:
    """(m×k)·(k×n): ``2·m·n·k``."""
    return 2.0 * m * n * k


def projection_flops_per_token(model: ModelSpec) -> float:
    """Per layer and token: q, k, v, o projections ``2·(2h·q + 2·h·kv)`` (``q = a·d``, ``h``
    unless a head is wider than h/a) + SwiGLU ``2·3·h·f`` (a GELU / ReLU MLP: ``2·2·h·f``).
    Biases, norms and activations are elementwise: no matrix-product FLOPs (``FlopCounterMode``
    counts ``addmm`` as its product alone)."""
    h = model.hidden
    return 2.0 * (2 * h * model.q_dim + 2 * h * model.kv_dim) + 2.0 * model.mlp_matrices * h * model.ffn


def attended_keys(new: int, cached: int = 0) -> float:
    """Causal (query, key) pairs when ``new`` tokens follow ``cached`` ones."""
    return new * cached + new * (new + 1) / 2.0


def attention_core_flops(model: ModelSpec, new: int, cached: int = 0) -> float:
    """Per layer and sequence: ``4·a·d`` per attended key (scores + weighted sum; ``4·h``
    where heads are h/a wide)."""
    return 4.0 * model.q_dim * attended_keys(new, cached)


def head_flops_per_token(model: ModelSpec) -> float:
    """LM head ``2·h·V`` or scalar value head ``2·h``."""
    return 2.0 * model.hidden * (model.vocab if model.head == "lm" else 1)


def forward_flops(model: ModelSpec, batch: int, new: int, cached: int = 0,
                  head_tokens: int | None = None) -> float:
    """One forward of ``batch`` sequences over ``new`` tokens after ``cached`` ones; the head
    runs on ``head_tokens`` positions per sequence (default: all ``new``)."""
    head_tokens = new if head_tokens is None else head_tokens
    per_seq = model.layers * (new * projection_flops_per_token(model)
                              + attention_core_flops(model, new, cached))
    return batch * (per_seq + head_tokens * head_flops_per_token(model))


def generate_flops(model: ModelSpec, batch: int, prompt_len: int, gen_len: int) -> float:
    """Prefill of the prompt plus ``gen_len − 1`` one-token decode steps; the head runs once
    per generated token. Equal to a forward over ``prompt + gen − 1`` tokens."""
    return forward_flops(model, batch, prompt_len + gen_len - 1, head_tokens=gen_len)


def call_flops(call: Call, model: ModelSpec, lengths: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """FLOPs of one execution of ``call`` (all minibatches; no activation recompute).
    ``lengths``: (prompt, response) tokens per row where they vary (the caps otherwise); the
    FLOPs are then summed row by row, padding excluded."""
    w = call.workload
    if lengths is not None and w.lengths_vary:
        p, g = (np.asarray(x, dtype=float) for x in lengths)
        if call.kind == "generate":
            return float(np.sum(forward_flops(model, 1, p + g - 1, head_tokens=g)))
        fwd = float(np.sum(forward_flops(model, 1, p + g)))
        return fwd * (1.0 + BACKWARD_FACTOR) if call.kind == "train" else fwd
    if call.kind == "generate":
        return generate_flops(model, w.seqs, w.prompt_len, w.gen_len)
    fwd = forward_flops(model, w.seqs, w.seq_len)
    return fwd * (1.0 + BACKWARD_FACTOR) if call.kind == "train" else fwd
