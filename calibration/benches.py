"""What each kernel case runs: inputs of the case's shapes and the executor code that uses them.

:func:`build` turns a :class:`calibration.kernels.Case` into a :class:`Bench`: ``args()``
makes one fresh set of inputs (the timing loop makes several and rotates among them),
``prepare(args)`` does untimed set-up before one timed call (the forward whose graph a
backward consumes, a fresh KV cache for a prefill) and ``run(args, state)`` is the timed call.
Single ops call exactly what :mod:`executor.model` calls (``F.linear``, ``rms_norm``,
``apply_rotary``, ``scaled_dot_product_attention`` on the repeated K/V heads, …); pieces call
the executor's functions themselves on one block's shard of the tensor-parallel layout
(:func:`estimator.spec.sharding.shard` of rank 0), with the tensor-parallel hooks left as the
identity, so collectives stay out of kernel times.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from estimator.spec.cluster import DeviceMesh
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import box_shape, shard
from executor import model as M
from executor.comm import vocab_parallel_embed
from executor.optim import ShardAdam

Args = dict[str, Any]


@dataclass
class Bench:
    """One case, ready to run."""

    args: Callable[[], Args]  # a fresh set of inputs
    run: Callable[[Args, Any], Any]  # the timed call
    prepare: Callable[[Args], Any] | None = None  # untimed, before each timed call
    grad: bool = False  # run with autograd recording (training forward)


class Maker:
    """Seeded tensors on one device and dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int):
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.randn(shape, generator=self.gen, dtype=torch.float32) * scale
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def tokens(self, b: int, s: int, vocab: int) -> torch.Tensor:
        return torch.randint(0, vocab, (b, s), generator=self.gen).to(self.device)

    def block_params(self, m: ModelSpec, tp: int, with_ends: bool = True) -> M.Params:
        """Layer 0 of tensor-parallel rank 0's shard (and the embedding, final norm, head)."""
        boxes = shard(m, Layout(DeviceMesh(0, tp), 1, tp, 1), 0)
        keep = {n: b for n, b in boxes.items() if n.startswith("layers.0.") or (with_ends and "layers." not in n)}
        return {n: (torch.ones(box_shape(b), dtype=self.dtype, device=self.device) if n.endswith("norm.weight")
                    else self.randn(*box_shape(b), scale=M.INIT_STD)) for n, b in keep.items()}


def dims(m: ModelSpec, tp: int) -> dict[str, int]:
    """Widths on one rank of ``tp``: query, key/value, MLP, embedding rows, head outputs."""
    return {"h": m.hidden, "hq": m.heads // tp * m.head_dim, "kv": m.kv_dim // tp, "f": m.ffn // tp,
            "nh": m.heads // tp, "g": m.kv_heads // tp, "hd": m.head_dim, "ve": m.vocab // tp,
            "vh": 1 if m.head == "value" else m.vocab // tp, "V": m.vocab}


GEMM_SHAPES = {  # op → (in, out) widths
    "q_proj": ("h", "hq"), "kv_proj": ("h", "kv"), "o_proj": ("hq", "h"),
    "gate_up": ("h", "f"), "down": ("f", "h"), "head": ("h", "vh"),
}


def _single(case: Any, mk: Maker) -> Bench:
    m, b, s, kv = case.spec, case.batch, case.seq, case.kv
    d = dims(m, case.tp) if m is not None else {}
    fam, op = case.family, case.op
    if fam == "gemm":
        i, o = (d[k] for k in GEMM_SHAPES[op])
        return Bench(lambda: {"x": mk.randn(b, s, i), "w": mk.randn(o, i, scale=M.INIT_STD)},
                     lambda a, _: F.linear(a["x"], a["w"]))
    if fam == "attention":
        q_len = 1 if op == "decode" else s
        return Bench(lambda: {k: mk.randn(b, d["nh"], q_len if k == "q" else kv, d["hd"]) for k in "qkv"},
                     lambda a, _: F.scaled_dot_product_attention(a["q"], a["k"], a["v"], is_causal=q_len > 1))
    if fam == "elementwise":
        width = d["h"] if op == "add" else d["f"]
        if op == "copy":  # (B, nh, T, hs) → (B, T, nh·hs) after attention
            return Bench(lambda: {"x": mk.randn(b, d["nh"], s, d["hd"])},
                         lambda a, _: a["x"].transpose(1, 2).reshape(b, s, -1))
        fn = {"add": torch.add, "mul": torch.mul}.get(op)
        if fn is None:
            return Bench(lambda: {"x": mk.randn(b, s, width)}, lambda a, _: F.silu(a["x"]))
        return Bench(lambda: {"x": mk.randn(b, s, width), "y": mk.randn(b, s, width)},
                     lambda a, _: fn(a["x"], a["y"]))
    if fam == "norm":
        return Bench(lambda: {"x": mk.randn(b, s, d["h"]), "w": mk.randn(d["h"])},
                     lambda a, _: M.rms_norm(a["x"], a["w"], m.norm_eps))
    if fam == "rotary":
        start = kv - s
        return Bench(lambda: {"x": mk.randn(b, d["nh"], s, d["hd"]),
                              "cs": M.rotary(torch.arange(start, start + s, device=mk.device), d["hd"],
                                             m.rope_theta, mk.dtype)},
                     lambda a, _: M.apply_rotary(a["x"], *a["cs"]))
    if fam == "embedding":
        def embed(a: Args, _: Any) -> torch.Tensor:
            if case.tp == 1:
                return F.embedding(a["t"], a["w"])
            return vocab_parallel_embed(a["w"], a["t"], 0, None)
        return Bench(lambda: {"t": mk.tokens(b, s, m.vocab), "w": mk.randn(d["ve"], d["h"])}, embed)
    if fam == "softmax":  # generation and log-probs promote logits to float32 first
        wide = torch.promote_types(mk.dtype, torch.float32)
        return Bench(lambda: {"x": mk.randn(b * s, d["V"], dtype=wide)}, lambda a, _: torch.log_softmax(a["x"], -1))
    if fam == "adam":
        rows = {"q_proj": d["hq"], "gate_up": d["f"], "head": d["ve"]}[op]

        def adam_args() -> Args:
            p = mk.randn(rows, d["h"], scale=M.INIT_STD).requires_grad_(True)
            p.grad = mk.randn(rows, d["h"], scale=1e-3)
            return {"opt": torch.optim.Adam([p], lr=1e-3), "p": p}
        return Bench(adam_args, lambda a, _: a["opt"].step())
    if fam in ("stream", "dispatch"):
        return Bench(lambda: {"x": mk.randn(case.size), "y": mk.randn(case.size)},
                     lambda a, _: torch.add(a["x"], a["y"]))
    raise ValueError(f"no bench for family {fam!r}")


def _ctx(m: ModelSpec, mk: Maker, start: int, length: int, cache: M.KVCache | None = None) -> M.Context:
    return M.context(m, start, length, mk.dtype, mk.device, cache)


def _piece(case: Any, mk: Maker) -> Bench:
    m, b, s, kv, tp, op = case.spec, case.batch, case.seq, case.kv, case.tp, case.op
    h = m.hidden
    if case.family == "context":
        start = kv - s
        return Bench(lambda: {}, lambda a, _: _ctx(m, mk, start, s))
    if case.family == "optimizer":
        def opt_args() -> Args:
            params = mk.block_params(m, tp, with_ends=False)
            for p in params.values():
                p.grad = torch.randn_like(p) * 1e-3
            return {"opt": ShardAdam(params, 1e-3)}
        return Bench(opt_args, lambda a, _: a["opt"].step())
    if case.family == "block_fwd":
        if op == "decode":
            def decode_args() -> Args:
                cache = M.KVCache(kv)
                k = mk.randn(b, dims(m, tp)["g"], kv - 1, m.head_dim)
                cache.update(0, 0, k, k.clone())
                return {"p": mk.block_params(m, tp, False), "x": mk.randn(b, 1, h),
                        "ctx": _ctx(m, mk, kv - 1, 1, cache)}
            return Bench(decode_args, lambda a, _: M.block(a["p"], 0, a["x"], a["ctx"]))
        def args() -> Args:
            p = mk.block_params(m, tp, False)
            if op == "train":  # the training forward records the graph its backward needs
                p = {n: t.requires_grad_(True) for n, t in p.items()}
            return {"p": p, "x": mk.randn(b, s, h), "ctx": _ctx(m, mk, 0, s)}
        if op == "prefill":  # generation's first pass fills a fresh cache
            return Bench(args, lambda a, c: M.block(a["p"], 0, a["x"], c),
                         prepare=lambda a: _ctx(m, mk, 0, s, M.KVCache(s + 1)))
        return Bench(args, lambda a, _: M.block(a["p"], 0, a["x"], a["ctx"]), grad=op == "train")
    if case.family == "head":
        t = 1 if op == "last" else s
        return Bench(lambda: {"p": mk.block_params(m, tp), "x": mk.randn(b, t, h)},
                     lambda a, _: M.final(a["p"], a["x"], m))
    if case.family in ("block_bwd", "head_bwd"):
        def train_args() -> Args:
            p = mk.block_params(m, tp, with_ends=case.family == "head_bwd")
            return {"p": {n: t.requires_grad_(True) for n, t in p.items()}, "x": mk.randn(b, s, h),
                    "ctx": _ctx(m, mk, 0, s)}

        def forward(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
            for t in a["p"].values():
                t.grad = None  # one micro-batch's gradients, as the engine starts each pass
            x = a["x"].detach().requires_grad_(True)
            with torch.enable_grad():
                out = (M.block(a["p"], 0, x, a["ctx"]) if case.family == "block_bwd"
                       else M.final(a["p"], x, m))
            return out, torch.randn_like(out)
        return Bench(train_args, lambda a, st: torch.autograd.backward(*st), prepare=forward)
    if case.family == "pass":
        return _pass(case, mk)
    raise ValueError(f"no bench for piece {case.family!r}")


def _pass(case: Any, mk: Maker) -> Bench:
    """One whole stage pass of the model as the engine's ``_stage`` runs it on one device: the
    embedding, the rotary tables, every block and the final norm and head — ``forward``
    (inference), ``prefill`` (into a fresh cache, head on the last position), ``decode`` (one
    token against a cache of ``kv − 1`` positions), ``train`` (the forward autograd records)
    and ``backward`` (that forward's backward); ``train_recompute`` and ``backward_recompute``
    the same with every block under activation checkpointing."""
    m, b, s, kv, op = case.spec, case.batch, case.seq, case.kv, case.op
    layers = range(m.layers)

    def model_params(grad: bool) -> M.Params:
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=mk.gen))
        return {n: t.to(mk.device).requires_grad_(grad) for n, t in M.init_params(m, seed, mk.dtype).items()}

    recompute = op.endswith("_recompute")
    op = op.removesuffix("_recompute")

    def stage(p: M.Params, tokens: torch.Tensor, start: int, cache: M.KVCache | None, last: bool) -> torch.Tensor:
        x = M.embed(p, tokens, start)
        x = M.blocks(p, layers, x, _ctx(m, mk, start, tokens.shape[1], cache), recompute)
        return M.final(p, x[:, -1:] if last else x, m)

    if op == "decode":
        def decode_args() -> Args:
            p, cache = model_params(False), M.KVCache(kv)
            for layer in layers:
                k = mk.randn(b, m.kv_heads, kv - 1, m.head_dim)
                cache.update(layer, 0, k, k.clone())
            return {"p": p, "tokens": mk.tokens(b, 1, m.vocab), "cache": cache}
        return Bench(decode_args, lambda a, _: stage(a["p"], a["tokens"], kv - 1, a["cache"], True))

    def args(grad: bool = False) -> Callable[[], Args]:
        return lambda: {"p": model_params(grad), "tokens": mk.tokens(b, s, m.vocab)}
    if op == "forward":
        return Bench(args(), lambda a, _: stage(a["p"], a["tokens"], 0, None, False))
    if op == "prefill":
        return Bench(args(), lambda a, c: stage(a["p"], a["tokens"], 0, c, True), prepare=lambda a: M.KVCache(s + 1))
    if op == "train":
        return Bench(args(True), lambda a, _: stage(a["p"], a["tokens"], 0, None, False), grad=True)
    if op == "backward":
        def forward(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
            for t in a["p"].values():
                t.grad = None
            with torch.enable_grad():
                out = stage(a["p"], a["tokens"], 0, None, False)
            return out, torch.randn_like(out)
        return Bench(args(True), lambda a, st: torch.autograd.backward(*st), prepare=forward)
    raise ValueError(f"no pass {op!r}")


def build(case: Any, mk: Maker) -> Bench:
    return _piece(case, mk) if case.piece else _single(case, mk)


def grad_mode(bench: Bench) -> Any:
    """Inference ops run under ``no_grad`` as the executor's generation and inference do."""
    return nullcontext() if bench.grad else torch.no_grad()
