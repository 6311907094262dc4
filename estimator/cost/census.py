"""The executor's op census, read as data: what each piece of a call dispatches, for any shape.

``calibration/census/executor.json`` is written by ``python -m calibration.census``, which runs
the executor's own code under a dispatch recorder (see that module); the estimator never
imports the executor or torch. Per run dtype and piece it lists aten ops, each with a count,
its FLOPs and the bytes it reads and writes: the count a monomial ``c·Π symbol^e`` of shape
symbols, FLOPs one monomial or a list of them (summed), bytes a list of them (summed). Symbols:
``rows``, ``tokens``, ``kv_len``, ``hidden``, ``kv_heads``, ``group``, ``half_head_dim``,
``half_rot_dim``, ``positions``, ``ffn``, ``vocab_local``, ``tp``, ``vocab``, ``response``,
``numel``.

Blocks are recorded once per architecture variant (:data:`BLOCK_VARIANTS`: LLaMA, Qwen2's q/k/v
biases, GPT-2, OPT, GPT-NeoX), named ``block_<phase>[@tp]<variant>``; the embedding has a
``+learned`` variant (the position table added), the final norm and head a ``+layernorm`` one.

:func:`piece_work` evaluates one piece at concrete symbols (numpy arrays allowed, so decode
steps over a growing KV length evaluate in one call) into per-op arrays of FLOPs, bytes and
launches, which :meth:`estimator.profile.profiles.Profile.ops_s_many` turns into seconds op by op.
FLOPs and bytes follow the recorder's convention (:mod:`calibration.aten`, shared with the
kernel rows a profile is fitted on): torch's ``FlopCounterMode`` formulas (``2·m·n·k`` per
product); causal attention ``4·b·heads·d`` per attended (query, key) pair, ``s(s+1)/2`` pairs
over ``s`` tokens (``2·b·heads·d·(s² + s)``, two monomials), its backward ``2.5×``; gathers
(embedding) read the rows they return, not the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from estimator.base.errors import ConfigError
from estimator.spec.models import ModelSpec

CENSUS_FORMAT = "rlhf-plan/census-v1"
CENSUS_PATH = Path(__file__).resolve().parents[2] / "calibration" / "census" / "executor.json"
# op set → census document: the eager executor's aten ops, or what a fused GPU stack (Megatron /
# vLLM kernels, written from formulas by ``python -m calibration.fused``) dispatches per piece
OP_SET_PATHS = {"executor": CENSUS_PATH, "fused": CENSUS_PATH.with_name("fused.json")}


@dataclass(frozen=True)
class PieceWork:
    """One piece at concrete shapes: per op (row) FLOPs, bytes and dispatches."""

    flops: np.ndarray  # (ops, ...) FLOPs of one op of each entry
    bytes: np.ndarray  # (ops, ...) bytes one op reads and writes
    count: np.ndarray  # (ops, ...) how many such ops the piece dispatches

    @property
    def launches(self) -> np.ndarray:
        return self.count.sum(axis=0)


@dataclass(frozen=True)
class Census:
    """The parsed census document: dtype → piece → op entries."""

    dtypes: dict[str, dict[str, list]]
    torch: str
    _compiled: dict = field(default_factory=dict, repr=False, compare=False)

    def compiled(self, dtype: str, name: str) -> Compiled:
        """:func:`compile_piece` of one piece, compiled once."""
        key = (dtype, name)
        if key not in self._compiled:
            self._compiled[key] = compile_piece(self.piece(dtype, name))
        return self._compiled[key]

    def piece(self, dtype: str, name: str) -> list:
        try:
            return self.dtypes[dtype][name]
        except KeyError:
            fused_only = [t for t in FUSED_VARIANTS if name.endswith(t)]
            if fused_only and dtype in self.dtypes:
                raise ConfigError(f"this project's executor has no block of variant {fused_only[0]!r} "
                                  f"(q/k norms: Qwen3), so its op census cannot price piece {name!r}; price "
                                  "it on a production stack (cluster.stack: megatron-vllm or fsdp-vllm)") from None
            known = sorted(self.dtypes.get(dtype, {}))
            raise ConfigError(f"census has no piece {name!r} for dtype {dtype!r} "
                              f"(known dtypes {sorted(self.dtypes)}; pieces {known[:6]}…); "
                              "regenerate it with: python -m calibration.census") from None


@lru_cache(maxsize=4)
def load_census(path: str | None = None) -> Census:
    where = Path(path) if path else CENSUS_PATH
    try:
        data = json.loads(where.read_text())
    except OSError as exc:
        tool = "calibration.fused" if where.name == "fused.json" else "calibration.census"
        raise ConfigError(f"op census {str(where)!r}: {exc.strerror}; "
                          f"generate it with: python -m {tool}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"op census {str(where)!r}: not valid JSON: {exc}") from None
    if data.get("format") != CENSUS_FORMAT:
        raise ConfigError(f"op census {str(where)!r}: format={data.get('format')!r}, expected {CENSUS_FORMAT!r}")
    return Census(data["dtypes"], str(data.get("torch", "")))


def load_op_set(ops: str = "executor") -> Census:
    """The census of op set ``ops`` (:data:`OP_SET_PATHS`), parsed once."""
    if ops not in OP_SET_PATHS:
        raise ConfigError(f"op set {ops!r} must be one of {sorted(OP_SET_PATHS)}")
    return load_census(None if ops == "executor" else str(OP_SET_PATHS[ops]))


def _terms(node: list) -> list:
    """An entry's FLOPs: one monomial ``[c, {symbol: exp}]`` or a list of them (summed)."""
    return node if node and isinstance(node[0], list) else [node]


@dataclass(frozen=True)
class Compiled:
    """A piece's monomials as matrices, so evaluating it is a few numpy products."""

    symbols: tuple[str, ...]
    coef: np.ndarray  # (rows,): count, flops-term, bytes-term constants per row of ``exps``
    exps: np.ndarray  # (rows, symbols) exponents: counts, then flops terms, then bytes terms
    term_op: np.ndarray  # (terms,) which op each bytes term belongs to
    ops: int
    flop_op: np.ndarray | None = None  # (flops terms,) which op each flops term belongs to; None: one each
    kinds: tuple[str, ...] = ()  # each op's name (a fused kernel's name selects its profile figures)

    def __call__(self, values: dict) -> PieceWork:
        n = self.ops
        if not n:
            empty = np.zeros((0,))
            return PieceWork(empty, empty, empty)
        logs = [np.log(np.asarray(values[s], dtype=float)) for s in self.symbols]
        shape = np.broadcast_shapes(*(np.shape(v) for v in logs)) if logs else ()
        if logs:
            stacked = np.stack([np.broadcast_to(v, shape) for v in logs])  # (symbols, ...)
            rows = np.exp(np.tensordot(self.exps, stacked, axes=(1, 0)))  # (rows, ...)
        else:
            rows = np.ones((self.exps.shape[0],) + shape)
        rows = rows * self.coef.reshape(-1, *([1] * len(shape)))
        nf = n if self.flop_op is None else len(self.flop_op)
        count, flops, terms = rows[:n], rows[n:n + nf], rows[n + nf:]
        if self.flop_op is not None:
            summed = np.zeros((n,) + shape)
            np.add.at(summed, self.flop_op, flops)
            flops = summed
        nbytes = np.zeros((n,) + shape)
        np.add.at(nbytes, self.term_op, terms)
        return PieceWork(flops, nbytes, count)


def compile_piece(entries: list) -> Compiled:
    flop_terms = [_terms(e["flops"]) for e in entries]
    single = all(len(t) == 1 for t in flop_terms)
    flop_op = None if single else np.array([i for i, t in enumerate(flop_terms) for _ in t], dtype=int)
    monos = [e["count"] for e in entries] + [m for t in flop_terms for m in t]
    term_op = [i for i, e in enumerate(entries) for _ in e["bytes"]]
    monos += [t for e in entries for t in e["bytes"]]
    symbols = tuple(sorted({s for _, exps in monos for s in exps}))
    exps = np.array([[m[1].get(s, 0) for s in symbols] for m in monos], dtype=float).reshape(len(monos), len(symbols))
    coef = np.array([float(m[0]) for m in monos])
    return Compiled(symbols, coef, exps, np.array(term_op, dtype=int), len(entries), flop_op,
                    tuple(str(e.get("op", "")) for e in entries))


def piece_work(entries: list, values: dict) -> PieceWork:
    """Evaluate a piece's entries at ``values`` (symbol → positive number or array)."""
    return compile_piece(entries)(values)


def model_symbols(model: ModelSpec, tp: int) -> dict[str, float]:
    """The model's shape symbols on one rank of a tensor-parallel group of ``tp``."""
    g = model.kv_heads // tp
    return {"hidden": model.hidden, "kv_heads": g, "group": model.heads // model.kv_heads,
            "half_head_dim": model.head_dim / 2, "half_rot_dim": model.rotary_dim / 2, "ffn": model.ffn / tp,
            "vocab_local": model.vocab / tp, "vocab": model.vocab, "tp": tp,
            "positions": max(model.max_positions, 1)}


# The block architectures the census records: variant tag → the ModelSpec fields that make it.
BLOCK_VARIANTS: dict[str, dict] = {
    "": {},  # LLaMA, Mistral
    "+bias": {"qkv_bias": True},  # Qwen2
    "+layernorm+gelu+biases+learned": {"norm": "layernorm", "mlp": "gelu", "bias": True,
                                       "positions": "learned"},  # GPT-2
    "+layernorm+relu+biases+learned": {"norm": "layernorm", "mlp": "relu", "bias": True,
                                       "positions": "learned"},  # OPT
    "+layernorm+gelu+biases+partial+parallel": {"norm": "layernorm", "mlp": "gelu", "bias": True,
                                                "parallel_residual": True, "rotary_fraction": 0.5},  # GPT-NeoX
}


# Variants only the fused op set records: this project's executor has no q/k norms (Qwen3), so
# its census cannot price them; a production stack's kernels can (calibration.fused).
FUSED_VARIANTS: dict[str, dict] = {"+qknorm": {"qk_norm": True}}


def block_variant(model: ModelSpec) -> str:
    """The variant tag of ``model``'s block: one ``+`` tag per field that departs from LLaMA."""
    tags = "+layernorm" if model.norm == "layernorm" else ""
    tags += "" if model.mlp == "swiglu" else "+" + model.mlp
    tags += "+biases" if model.bias else "+bias" if model.qkv_bias else ""
    tags += "+qknorm" if model.qk_norm else ""
    tags += "+learned" if model.positions == "learned" else "+partial" if model.rotary_dim < model.head_dim else ""
    return tags + ("+parallel" if model.parallel_residual else "")


def block_piece(phase: str, model: ModelSpec, tp: int) -> str:
    """Census name of one block's ``phase`` (forward | prefill | decode | backward)."""
    tag = block_variant(model)
    if tag not in BLOCK_VARIANTS and tag not in FUSED_VARIANTS:
        raise ConfigError(
            f"model {model.name!r}: the op census records no block with norm={model.norm!r}, mlp={model.mlp!r}, "
            f"bias={model.bias}, qkv_bias={model.qkv_bias}, positions={model.positions!r}, "
            f"rotary_fraction={model.rotary_fraction:g}, parallel_residual={model.parallel_residual} "
            f"(variant {tag!r}); recorded variants: {[v or 'llama' for v in {**BLOCK_VARIANTS, **FUSED_VARIANTS}]}")
    return f"block_{phase}" + ("@tp" if tp > 1 else "") + tag


def end_piece(name: str, tp: int, model: ModelSpec | None = None) -> str:
    """Census name of a vocabulary-split piece (embed, head_lm, …) on a group of ``tp``: the
    embedding of a model with learned positions is ``+learned``, a LayerNorm model's final norm
    and head ``+layernorm``."""
    tag = ""
    if model is not None and name.startswith("embed") and model.positions == "learned":
        tag = "+learned"
    elif model is not None and name.startswith("head") and model.norm == "layernorm":
        tag = "+layernorm"
    return name + ("@tp" if tp > 1 else "") + tag


def rotary_piece(model: ModelSpec, decode: bool = False) -> tuple[str, dict] | None:
    """The rotary tables' piece of one stage pass and the symbols it is evaluated at (its
    width is the rotated part of a head), or None for learned positions."""
    if model.positions == "learned":
        return None
    return ("rotary_decode" if decode else "rotary"), {"half_head_dim": model.rotary_dim / 2}


def tensors_work(census: Census, dtype: str, piece: str, tensors: int, numel: float) -> tuple[float, float, float]:
    """(FLOPs, bytes, dispatches) of a piece over ``tensors`` parameter tensors of ``numel``
    elements in all: ``optimizer`` (foreach Adam and zero_grad) or ``dp_allreduce`` (the
    flatten copies around one data-parallel all-reduce). Both are recorded at two and three
    tensors; work is linear in the elements, dispatches in the tensors."""
    if tensors <= 0:
        return 0.0, 0.0, 0.0
    w2 = census.compiled(dtype, f"{piece}_2")({"numel": 1.0})
    w3 = census.compiled(dtype, f"{piece}_3")({"numel": 1.0})
    per_tensor = float(w3.launches - w2.launches)
    launches = float(w2.launches) + per_tensor * (tensors - 2)
    flops = float((w2.flops * w2.count).sum()) / 2.0 * numel  # per element of the two tensors
    nbytes = float((w2.bytes * w2.count).sum()) / 2.0 * numel
    return flops, nbytes, launches
