"""The fused-kernel op set: what a fused GPU training / serving stack dispatches per piece.

Megatron-LM (training) and vLLM (serving) run a transformer block as a handful of fused
kernels in bf16 — a fused RMSNorm (or LayerNorm), one GEMM for q/k/v, a fused rotary kernel,
flash attention, one GEMM for o, the residual add, one GEMM for gate+up, a fused SwiGLU (or
GELU), one GEMM for down, the second residual add — instead of the eager executor's dozens of
aten ops with float32 norm upcasts. This module writes that op set as a census document
(``calibration/census/fused.json``, format ``rlhf-plan/census-v1``, the same piece names and
shape symbols as the executor's census, so :mod:`estimator.cost.pieces` charges either unchanged; a
profile selects it with ``compute.ops: "fused"``). Every entry is one kernel with its minimal
work, from formulas:

- GEMM (``x·Wᵀ``, m tokens, k in, n out): ``2·m·n·k`` FLOPs; bytes: input ``2·m·k``, weight
  ``2·n·k`` read once, output ``2·m·n`` (bf16); a bias (``+bias``) is added in the epilogue
  and read once (``2·n``).
- elementwise / norm kernels: their activations in and out once (norm: ``x`` in, ``y`` out,
  the weight; residual add: two in, one out; SwiGLU: gate and up in, one out; rotary: q and k
  in and out, the cos/sin tables); no FLOPs (memory-bound).
- flash attention (FlashAttention-2, Dao 2023): causal ``4·b·heads·d·s²/2`` FLOPs (masked
  blocks skipped); bytes q, k, v in, o out and the fp32 log-sum-exp for the backward; at decode
  ``4·b·heads·d·kv_len`` FLOPs reading the whole KV cache.

Backward (what I chose): every GEMM has two gradient GEMMs (input and weight, ``2×`` the
forward FLOPs in two kernels, each reading its two operands and writing its result, the
weight gradient accumulated in fp32 as Megatron's main_grad does); flash attention's backward
is ``2.5×`` the forward FLOPs (FlashAttention-2: 5 matmuls against 2, recomputing the scores)
and reads q, k, v, o, do, lse and writes dq, dk, dv; a norm's backward reads x, dy and the
weight and writes dx (``3×`` the forward's activation bytes, plus the weight gradient); an
elementwise kernel's backward reads its inputs and the output gradient and writes the input
gradients (SwiGLU: gate, up, dy in; dgate, dup out — ``5/3×`` the forward); a residual add's
backward is free (the gradient passes through).

Variants are parameters (:func:`block_kernels`: ``norm_kind`` rms | layer, ``mlp`` swiglu |
gelu, ``bias`` q/k/v bias, ``linear_bias`` every projection's, ``positions`` rope | learned;
:func:`embed`: ``learned_positions``; :func:`head`: ``norm_kind``);
the pieces written are every block variant the executor's census records
(:data:`estimator.cost.census.BLOCK_VARIANTS`, named by :func:`estimator.cost.census.block_piece`:
LLaMA, Qwen2's q/k/v bias, GPT-2, OPT, GPT-NeoX), Qwen3's ``+qknorm`` block (q/k norms, which
the executor does not have: :data:`estimator.cost.census.FUSED_VARIANTS`), and the ``+learned``
embedding and ``+layernorm`` head of GPT-style models.

Usage::

    python -m calibration.fused            # rewrite calibration/census/fused.json
    python -m calibration.fused --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from estimator.base.errors import cli_guard
from estimator.base.io import atomic_write_text
from estimator.cost.census import BLOCK_VARIANTS, CENSUS_FORMAT, FUSED_VARIANTS, OP_SET_PATHS

Mono = tuple[float, dict[str, int]]  # c·Π symbol^e
BF16, FP32, INT64 = 2, 4, 8


def mono(c: float, *symbols: str) -> Mono:
    """``c`` times the product of ``symbols`` (repeats raise the power)."""
    exps: dict[str, int] = {}
    for s in symbols:
        exps[s] = exps.get(s, 0) + 1
    return (float(c), exps)


def times(m: Mono, c: float, *symbols: str) -> Mono:
    """``m · c · Π symbols``."""
    k = mono(c, *symbols)
    exps = dict(m[1])
    for s, e in k[1].items():
        exps[s] = exps.get(s, 0) + e
    return (m[0] * k[0], exps)


@dataclass(frozen=True)
class Kernel:
    """One kernel launch: its name (selects the profile's per-kernel figures), FLOPs and bytes."""

    op: str
    flops: list[Mono] = field(default_factory=list)
    bytes: list[Mono] = field(default_factory=list)
    count: float = 1

    def entry(self) -> dict:
        """The census entry: FLOPs one monomial, or a list of them where they are a sum."""
        terms = [[c, e] for c, e in self.flops]
        flops = terms[0] if len(terms) == 1 else (terms or [0.0, {}])
        return {"op": self.op, "count": [self.count, {}], "flops": flops,
                "bytes": [[c, e] for c, e in self.bytes]}


# ---- shapes on one tensor-parallel rank (the census's symbols) ------------------------------
# tokens of a pass: rows·tokens (forward, prefill, backward) or rows (decode)
# q width: kv_heads·group·2·half_head_dim; k (and v) width: kv_heads·2·half_head_dim


def q_width(c: float = 1.0) -> Mono:
    return mono(2 * c, "kv_heads", "group", "half_head_dim")


def kv_width(c: float = 1.0) -> Mono:
    return mono(2 * c, "kv_heads", "half_head_dim")


def gemm(op: str, m: Mono, k: list[Mono], n: list[Mono], bias: bool = False) -> Kernel:
    """``(m × k)·(k × n)``, ``k`` and ``n`` sums of monomials (q, k, v widths): ``2·m·n·k``
    FLOPs; input, weight and output once in bf16, and the bias where there is one."""
    flops = [times(times(m, 2.0 * a[0], *_syms(a)), b[0], *_syms(b)) for a in k for b in n]
    nbytes = ([times(m, BF16 * a[0], *_syms(a)) for a in k]
              + [times(a, BF16 * b[0], *_syms(b)) for a in k for b in n]
              + [times(m, BF16 * b[0], *_syms(b)) for b in n]
              + ([mono(BF16 * b[0], *_syms(b)) for b in n] if bias else []))
    return Kernel(op, flops, nbytes)


def _syms(m: Mono) -> list[str]:
    return [s for s, e in m[1].items() for _ in range(e)]


def gemm_backward(op: str, m: Mono, k: list[Mono], n: list[Mono], bias: bool = False) -> list[Kernel]:
    """The two gradient GEMMs of :func:`gemm`: dX = dY·W (``m × n`` by ``n × k``) and
    dW = dYᵀ·X (``n × m`` by ``m × k``, accumulated in an fp32 gradient buffer; a bias gradient
    is reduced in its epilogue)."""
    dx = gemm(op + "_dgrad", m, n, k)
    flops = dx.flops
    nbytes = ([times(m, BF16 * b[0], *_syms(b)) for b in n] + [times(m, BF16 * a[0], *_syms(a)) for a in k]
              + [times(a, 2 * FP32 * b[0], *_syms(b)) for a in k for b in n]  # read-modify-write fp32
              + ([mono(FP32 * b[0], *_syms(b)) for b in n] if bias else []))
    return [dx, Kernel(op + "_wgrad", flops, nbytes)]


def norm(t: Mono, kind: str = "rms") -> Kernel:
    """Fused RMSNorm / LayerNorm over the full hidden width: x in, y out, weight (and bias)."""
    weights = 1 if kind == "rms" else 2
    return Kernel(f"{kind}_norm", [], [times(t, 2 * BF16, "hidden"), mono(BF16 * weights, "hidden")])


def norm_backward(t: Mono, kind: str = "rms") -> Kernel:
    """x, dy in, dx out, the weight read and its fp32 gradient written (and the bias's)."""
    weights = 1 if kind == "rms" else 2
    return Kernel(f"{kind}_norm_backward", [], [times(t, 3 * BF16, "hidden"),
                                                mono((BF16 + FP32) * weights, "hidden")])


def add(t: Mono) -> Kernel:
    """Residual add: two activations in, one out."""
    return Kernel("add", [], [times(t, 3 * BF16, "hidden")])


def rotary(t: Mono) -> Kernel:
    """Fused rotary on q and k in place (in and out once) and the cos/sin tables of the pass."""
    qk = [times(t, 2 * BF16 * w[0], *_syms(w)) for w in (q_width(), kv_width())]
    return Kernel("rope", [], qk + [mono(2 * BF16 * 2, "tokens", "half_head_dim")])


def rotary_backward(t: Mono) -> Kernel:
    """The inverse rotation of dq and dk: the same traffic as the forward."""
    return Kernel("rope_backward", [], rotary(t).bytes)


def activation(t: Mono, kind: str = "swiglu") -> Kernel:
    """SwiGLU (silu(gate)·up: two in, one out of ffn width) or GELU (one in, one out)."""
    width = 3 if kind == "swiglu" else 2
    return Kernel(kind, [], [times(t, width * BF16, "ffn")])


def activation_backward(t: Mono, kind: str = "swiglu") -> Kernel:
    """Inputs and dy in, input gradients out: SwiGLU gate, up, dy → dgate, dup; GELU x, dy → dx."""
    width = 5 if kind == "swiglu" else 3
    return Kernel(kind + "_backward", [], [times(t, width * BF16, "ffn")])


def flash_attention(rows: str, q: str, kv: str | None) -> Kernel:
    """Flash attention forward: causal over ``q`` new tokens (``kv`` None) or ``q`` = 1 token
    against ``kv`` cached ones (decode); q, k, v in, o out, fp32 log-sum-exp out."""
    if kv is None:  # causal square: s²/2 attended pairs
        flops = [times(q_width(), 2.0, rows, q, q)]  # 4·heads·d·s²/2 = 2·q_width·s²
        k_tokens = mono(1, rows, q)
    else:
        flops = [times(q_width(), 4.0, rows, kv)]
        k_tokens = mono(1, rows, kv)
    t = mono(1, rows, q) if q != "1" else mono(1, rows)
    nbytes = [times(t, 2 * BF16 * q_width()[0], *_syms(q_width())),
              times(k_tokens, 2 * BF16 * kv_width()[0], *_syms(kv_width())),
              times(t, FP32, "kv_heads", "group")]
    return Kernel("flash_attention", flops, nbytes)


def flash_attention_backward(rows: str, q: str) -> Kernel:
    """2.5× the forward's FLOPs; q, k, v, o, do, lse in, dq, dk, dv out."""
    fwd = flash_attention(rows, q, None)
    t = mono(1, rows, q)
    nbytes = [times(t, 4 * BF16 * q_width()[0], *_syms(q_width())),  # q, o, do in; dq out
              times(t, 4 * BF16 * kv_width()[0], *_syms(kv_width())),  # k, v in; dk, dv out
              times(t, FP32, "kv_heads", "group")]
    return Kernel("flash_attention_backward", [times(f, 2.5) for f in fwd.flops], nbytes)


# ---- pieces ---------------------------------------------------------------------------------

QKV = (q_width(), kv_width(2.0))  # q + k + v output width


def qk_norms(t: Mono, backward: bool = False) -> list[Kernel]:
    """Qwen3's RMSNorm of every head's q and of every head's k (one kernel each, over the
    rank's q and k widths): rows in and out once and the ``d``-wide weight; backward: x, dy in,
    dx out (3× the rows) and the weight read and its fp32 gradient written."""
    out = []
    for width in (q_width(), kv_width()):  # q, then k
        rows = times(t, (3 if backward else 2) * BF16 * width[0], *_syms(width))
        weight = mono((BF16 + FP32 if backward else BF16) * 2, "half_head_dim")
        out.append(Kernel("rms_norm" + ("_backward" if backward else ""), [], [rows, weight]))
    return out


def block_kernels(phase: str, norm_kind: str = "rms", mlp: str = "swiglu", bias: bool = False,
                  positions: str = "rope", linear_bias: bool = False, qk_norm: bool = False) -> list[Kernel]:
    """One block's kernels in ``phase`` (forward | prefill | decode | backward) on one rank.
    ``bias``: a q/k/v bias (Qwen2); ``linear_bias``: every projection has one (GPT);
    ``positions``: rope (a rotary kernel per block) | learned (added once, in the embedding);
    ``qk_norm``: an RMSNorm on q and on k before rotary (Qwen3)."""
    t = mono(1, "rows") if phase == "decode" else mono(1, "rows", "tokens")
    h = [mono(1, "hidden")]
    up_n = [mono(2 if mlp == "swiglu" else 1, "ffn")]
    qkv_b, lin_b = bias or linear_bias, linear_bias
    rope = positions == "rope"
    qk = qk_norms(t, phase == "backward") if qk_norm else []
    if phase == "backward":
        return ([norm_backward(t, norm_kind), *gemm_backward("qkv_proj", t, h, list(QKV), qkv_b), *qk,
                 *([rotary_backward(t)] if rope else []), flash_attention_backward("rows", "tokens"),
                 *gemm_backward("o_proj", t, [q_width()], h, lin_b), norm_backward(t, norm_kind),
                 *gemm_backward("up_proj", t, h, up_n, lin_b), activation_backward(t, mlp),
                 *gemm_backward("down_proj", t, [mono(1, "ffn")], h, lin_b), add(t), add(t)])
    attn = flash_attention("rows", "1", "kv_len") if phase == "decode" else flash_attention("rows", "tokens", None)
    out = [norm(t, norm_kind), gemm("qkv_proj", t, h, list(QKV), qkv_b), *qk, *([rotary(t)] if rope else []), attn]
    if phase == "prefill":  # the KV cache write (vLLM reshape_and_cache): k, v in and out
        out.append(Kernel("kv_cache_write", [], [times(t, 2 * 2 * BF16 * kv_width()[0], *_syms(kv_width()))]))
    if phase == "decode":  # the new token's k, v appended
        out.append(Kernel("kv_cache_write", [], [times(t, 2 * 2 * BF16 * kv_width()[0], *_syms(kv_width()))]))
    return out + [gemm("o_proj", t, [q_width()], h, lin_b), add(t), norm(t, norm_kind),
                  gemm("up_proj", t, h, up_n, lin_b), activation(t, mlp),
                  gemm("down_proj", t, [mono(1, "ffn")], h, lin_b), add(t)]


def embed(tp: bool, backward: bool = False, learned_positions: bool = False) -> list[Kernel]:
    """Embedding gather (ids in, rows of the table out; vocab-parallel: masked, zeros outside
    the rank's slice) and, backward, the scatter-add of dy into the fp32 table gradient; with
    ``learned_positions`` (GPT-style) the position rows are gathered and added in the same
    kernel (one more row read per token) and their gradient accumulated."""
    t = mono(1, "rows", "tokens")
    pos = [times(t, BF16 if not backward else 2 * FP32, "hidden")] if learned_positions else []
    if backward:
        return [Kernel("embedding_backward", [], [times(t, BF16 + 2 * FP32, "hidden"), times(t, INT64)] + pos)]
    return [Kernel("embedding", [], [times(t, 2 * BF16, "hidden"), times(t, INT64 * (2 if tp else 1))] + pos)]


def head(kind: str, backward: bool = False, norm_kind: str = "rms") -> list[Kernel]:
    """Final norm and the head GEMM (lm: vocab slice; value: one output)."""
    t = mono(1, "rows", "tokens")
    out_n = [mono(1, "vocab_local")] if kind == "lm" else [mono(1)]
    h = [mono(1, "hidden")]
    if backward:
        return [*gemm_backward("head", t, h, out_n), norm_backward(t, norm_kind)]
    return [norm(t, norm_kind), gemm("head", t, h, out_n)]


def loss(name: str, backward: bool = False) -> list[Kernel]:
    """A fused cross-entropy / log-prob kernel over the response's logits (Megatron's fused
    vocab-parallel cross entropy: logits in once, per-token fp32 results out) and the loss's
    per-token arithmetic; backward: logits in, dlogits out (bf16)."""
    r = mono(1, "rows", "response")
    if name == "ppo_critic" or name == "rw_reward":
        per = mono(1, "rows", "response") if name == "ppo_critic" else mono(1, "rows")
        k = Kernel("loss_elementwise", [], [times(per, 6 * FP32)])
        if backward:
            return [Kernel("loss_elementwise_backward", [], [times(per, 4 * FP32)])]
        return [k]
    if name == "ref_logp":
        return [Kernel("cross_entropy", [], [times(r, BF16, "vocab"), times(r, FP32)])]
    if backward:
        return [Kernel("cross_entropy_backward", [], [times(r, 2 * BF16, "vocab"), times(r, 2 * FP32)]),
                Kernel("loss_elementwise_backward", [], [times(r, 4 * FP32)])]
    return [Kernel("cross_entropy", [], [times(r, BF16, "vocab"), times(r, FP32)]),
            Kernel("loss_elementwise", [], [times(r, 6 * FP32)])]


def sampler(greedy: bool) -> list[Kernel]:
    """Token choice over the gathered logits: a softmax / top-k sampling kernel (logits in,
    probabilities out and read back) or an argmax, then the chosen token's log-probability."""
    r = mono(1, "rows", "vocab")
    if greedy:
        return [Kernel("argmax", [], [times(r, BF16)]), Kernel("log_softmax_gather", [], [times(r, BF16)])]
    return [Kernel("softmax", [], [times(r, BF16 + FP32)]), Kernel("sample", [], [times(r, FP32)]),
            Kernel("log_softmax_gather", [], [times(r, BF16)])]


def optimizer(tensors: int) -> list[Kernel]:
    """Megatron's fused multi-tensor Adam over ``tensors`` tensors of ``numel`` elements: fp32
    grad, master, m, v in; master, m, v out; the bf16 weight copy out (30 bytes per element);
    then zeroing the contiguous fp32 gradient buffer."""
    return [Kernel("fused_adam", [], [mono(30 * tensors, "numel")]),
            Kernel("zero_grad", [], [mono(FP32 * tensors, "numel")])]


def shard_flatten(tensors: int) -> list[Kernel]:
    """FSDP2's copy of a group's bf16 gradients into its reduce-scatter input (one
    ``_chunk_cat`` kernel reading and writing every element once)."""
    return [Kernel("chunk_cat", [], [mono(2 * BF16 * tensors, "numel")])]


LOSSES = ("dpo_actor", "grpo_actor", "ppo_actor", "ppo_critic", "remax_actor", "rw_reward", "sft_actor")
PHASES = ("forward", "prefill", "decode", "backward")


def block_arguments(fields: dict) -> dict:
    """:func:`block_kernels` arguments of a block variant given by its ModelSpec fields (an
    :data:`estimator.cost.census.BLOCK_VARIANTS` entry). A parallel residual and partial rotary
    change no kernel's work here: the fused rotary kernel's traffic is the q/k rows either way,
    and a parallel block still adds each branch's output once."""
    return {"norm_kind": "layer" if fields.get("norm") == "layernorm" else "rms",
            "mlp": fields.get("mlp", "swiglu"), "bias": bool(fields.get("qkv_bias", False)),
            "linear_bias": bool(fields.get("bias", False)), "qk_norm": bool(fields.get("qk_norm", False)),
            "positions": "learned" if fields.get("positions") == "learned" else "rope"}


# piece-name suffix → block_kernels arguments: every block variant the executor's census records,
# and those only a fused stack runs (Qwen3's q/k norms)
VARIANTS = {tag: block_arguments(fields) for tag, fields in {**BLOCK_VARIANTS, **FUSED_VARIANTS}.items()}


def pieces() -> dict[str, list[Kernel]]:
    """Every piece :mod:`estimator.cost.pieces` asks for, by its census name."""
    out: dict[str, list[Kernel]] = {}
    for phase in PHASES:
        for suffix, kw in VARIANTS.items():
            for tp in ("", "@tp"):  # same kernels; the tp split is in the symbols
                out[f"block_{phase}{tp}{suffix}"] = block_kernels(phase, **kw)
                if phase == "backward":  # full recompute: the block's forward kernels again, then its backward
                    out[f"block_backward_recompute{tp}{suffix}"] = (block_kernels("forward", **kw)
                                                                    + block_kernels("backward", **kw))
    for tp in ("", "@tp"):
        out[f"embed{tp}"] = embed(bool(tp))
        out[f"embed_backward{tp}"] = embed(bool(tp), backward=True)
        out[f"embed{tp}+learned"] = embed(bool(tp), learned_positions=True)
        out[f"embed_backward{tp}+learned"] = embed(bool(tp), backward=True, learned_positions=True)
        for kind in ("lm", "value"):
            out[f"head_{kind}{tp}"] = head(kind)
            out[f"head_{kind}_backward{tp}"] = head(kind, backward=True)
            out[f"head_{kind}{tp}+layernorm"] = head(kind, norm_kind="layer")
            out[f"head_{kind}_backward{tp}+layernorm"] = head(kind, backward=True, norm_kind="layer")
    for name in LOSSES:
        out[f"loss_{name}"] = loss(name)
        out[f"loss_{name}_backward"] = loss(name, backward=True)
    # continuous batching: a serving stack prefills and decodes its running batch with the same
    # kernels (paged attention reads each row's own KV; at the padded kv_len an upper bound)
    for suffix in VARIANTS:
        for tp in ("", "@tp"):
            out[f"block_prefill_batched{tp}{suffix}"] = out[f"block_prefill{tp}{suffix}"]
            out[f"block_decode_batched{tp}{suffix}"] = out[f"block_decode{tp}{suffix}"]
    out["loss_ref_logp"] = loss("ref_logp")
    out["sample"], out["greedy"] = sampler(False), sampler(True)
    out["sample_ending"], out["greedy_ending"] = sampler(False), sampler(True)  # EOS forced in the sampling kernel
    out["rotary"], out["rotary_decode"] = [], []  # cos/sin come with the fused rotary kernel
    out["rotary_decode_batched"] = []
    for n in (2, 3):
        out[f"optimizer_{n}"] = optimizer(n)
        out[f"dp_allreduce_{n}"] = []  # a contiguous gradient buffer: reduced in place, no copies
        out[f"shard_flatten_{n}"] = shard_flatten(n)
    return out


def build() -> dict:
    """The fused op set's census document."""
    return {"format": CENSUS_FORMAT, "torch": "", "command": "python -m calibration.fused",
            "dtypes": {"bfloat16": {name: [k.entry() for k in ks] for name, ks in sorted(pieces().items())}}}


def render() -> str:
    return json.dumps(build(), indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.fused", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    ap.add_argument("--out", default=str(OP_SET_PATHS["fused"]), help="census file to write")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        try:
            current = open(args.out).read() == text
        except OSError:
            current = False
        print(f"{args.out} is {'current' if current else 'stale; regenerate with: python -m calibration.fused'}")
        return 0 if current else 1
    atomic_write_text(args.out, text)
    print(f"wrote {args.out} ({len(pieces())} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(cli_guard(main, None))
