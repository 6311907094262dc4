"""Kernel microbenchmarks: the executor's own ops and pieces over the shapes plans produce.

The grid (:func:`grid`) covers, for each model and every tensor-parallel shard width that
divides its heads, key/value heads, MLP width and vocabulary: tokens per micro-batch for
prefill and training (batch × sequence) and decoding (batch × 1 against a KV cache of a given
length). For each it builds

(a) single op families — ``gemm`` (``F.linear`` of every projection and the LM head on this
    rank's shard), ``attention`` (``scaled_dot_product_attention``, prefill and decode),
    ``elementwise`` (residual add, SwiGLU product, SiLU, copy), ``norm`` (the executor's
    RMSNorm), ``rotary``, ``embedding``, ``softmax`` (log-softmax over the vocabulary),
    ``adam`` (one tensor's ``torch.optim.Adam`` step), and shape sweeps that pin the ends of
    the memory curve: ``stream`` (adds from 16 elements to millions) and ``dispatch``
    (one- and four-element adds: host cost alone);
(b) the executor's whole pieces — ``block_fwd`` (:func:`executor.model.block` at prefill with
    its KV cache, at decode, and the inference/training forward), ``block_bwd``, ``head``
    (final norm + head) and its backward, ``context`` (rotary tables of one pass) and
    ``optimizer`` (:class:`executor.optim.ShardAdam` over one block's shards);
(c) whole stage passes of the unsharded model (tensor-parallel width 1) — ``pass``: the
    embedding, rotary tables, every block, final norm and head as the engine's ``_stage`` runs
    them, at ``forward`` (inference), ``prefill``, ``decode``, ``train`` (the forward autograd
    records) and ``backward``, and both training ones with every block under activation
    checkpointing (``train_recompute``, ``backward_recompute``).

Tensor-parallel collectives are not part of these pieces (``executor.comm`` hooks are left as
the identity): they are measured by the collective benchmarks. :mod:`calibration.timing` runs
the cases and returns one raw row per case.

Usage::

    python -m calibration.kernels --quick            # table of the quick grid (≈1 min here)
    python -m calibration.kernels --tiny --json      # the test grid, machine-readable
    python -m calibration.kernels --quick --csv raw.csv --experiment examples/ppo-tiny-2xcpu.yaml

Library::

    from calibration.kernels import grid, measure
    raw = measure(grid(level="quick"), device="cpu", progress=bar.update)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from estimator.base.errors import ConfigError, cli_guard
from estimator.base.io import atomic_write_text
from estimator.base.progress import progress_bar
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.models import PRESETS, ModelSpec

DEFAULT_MODELS = ("tiny-2l-128h", "tiny-4l-256h")
PIECES = ("block_fwd", "block_bwd", "head", "head_bwd", "context", "optimizer", "pass")
PASSES = {"decode": ("decode",), "prefill": ("prefill", "forward"),
          "train": ("train", "backward", "train_recompute", "backward_recompute")}


@dataclass(frozen=True)
class Level:
    """How much of the shape space one grid covers, and how hard each case is timed."""

    decode_batches: tuple[int, ...]
    kv_lengths: tuple[int, ...]  # keys attended by a decode step
    prefill: tuple[tuple[int, int], ...]  # (batch, prompt length)
    train: tuple[tuple[int, int], ...]  # (batch, sequence length)
    stream: tuple[int, ...]  # elements of the ``stream`` adds
    repeats: int  # timed samples per case (median and spread over these)
    warmup: int  # untimed calls first
    sample_s: float  # a sample runs back-to-back calls for at least this long
    models: tuple[str, ...] = DEFAULT_MODELS


LEVELS = {
    "tiny": Level((2,), (8,), ((2, 8),), ((2, 8),), (16, 4096, 65536), 5, 2, 1e-4,
                  models=("tiny-2l-128h",)),
    "quick": Level((1, 4, 16), (16, 48), ((1, 16), (4, 16), (8, 32)), ((2, 32), (8, 32)),
                   tuple(4 ** k for k in range(2, 12)), 15, 3, 4e-4),
    "full": Level((1, 2, 4, 8, 16, 32), (16, 32, 64, 128), ((1, 16), (2, 16), (4, 16), (8, 16), (4, 64), (8, 64)),
                  ((1, 32), (2, 32), (4, 32), (8, 32), (16, 32), (8, 64)),
                  tuple(2 ** k for k in range(4, 25)), 31, 5, 1e-3),
}


@dataclass(frozen=True)
class Case:
    """One thing to time. Shape fields not used by a family are 0."""

    family: str  # op family (see the module docstring)
    op: str  # which op or piece of the family, e.g. "q_proj", "decode"
    model: str  # model preset (or name) the shapes come from; "" for sweeps
    tp: int  # tensor-parallel shard width
    batch: int  # rows
    seq: int  # new tokens per row (1 for decode)
    kv: int  # keys attended (decode: cache length; prefill/train: seq)
    phase: str  # prefill | decode | train | "" (sweeps)
    size: int = 0  # elements or n of the sweeps
    spec: ModelSpec | None = field(default=None, compare=False, repr=False)

    @property
    def piece(self) -> bool:
        return self.family in PIECES

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def tp_widths(model: ModelSpec, max_tp: int = 8) -> list[int]:
    """Shard widths the sharding rules allow: tp divides heads, kv heads, ffn and vocabulary."""
    return [t for t in range(1, max_tp + 1)
            if not (model.heads % t or model.kv_heads % t or model.ffn % t or model.vocab % t)]


def _phases(level: Level, extra: dict[str, set]) -> list[tuple[str, int, int, int]]:
    """(phase, batch, seq, kv) of every token shape."""
    out = [("decode", b, 1, kv) for b in sorted(set(level.decode_batches) | extra.get("decode_batches", set()))
           for kv in sorted(set(level.kv_lengths) | extra.get("kv_lengths", set()))]
    out += [("prefill", b, s, s) for b, s in sorted(set(level.prefill) | extra.get("prefill", set()))]
    out += [("train", b, s, s) for b, s in sorted(set(level.train) | extra.get("train", set()))]
    return out


def _model_cases(m: ModelSpec, tp: int, phases: list[tuple[str, int, int, int]]) -> Iterable[Case]:
    name = m.name if m.head == "lm" else f"{m.name}+value"  # critic / reward trunks share the preset name

    def case(family: str, op: str, phase: str, b: int, s: int, kv: int) -> Case:
        return Case(family, op, name, tp, b, s, kv, phase, spec=m)

    seen_tokens: set[int] = set()
    for phase, b, s, kv in phases:
        if b * s not in seen_tokens:  # these ops depend on tokens only
            seen_tokens.add(b * s)
            for op in ("q_proj", "kv_proj", "o_proj", "gate_up", "down", "head"):
                yield case("gemm", op, phase, b, s, kv)
            for op in ("add", "mul", "silu", "copy"):
                yield case("elementwise", op, phase, b, s, kv)
            for fam in ("norm", "embedding", "softmax"):
                yield case(fam, fam, phase, b, s, kv)
        yield case("rotary", "rotary", phase, b, s, kv)
        yield case("attention", phase, phase, b, s, kv)
        yield case("context", phase, phase, b, s, kv)
        if phase == "train":
            yield case("block_fwd", "train", phase, b, s, kv)
            yield case("block_bwd", "train", phase, b, s, kv)
            yield case("head_bwd", "train", phase, b, s, kv)
        else:
            yield case("block_fwd", phase, phase, b, s, kv)
            yield case("head", "last" if phase == "decode" else "all", phase, b, s, kv)
        if phase == "prefill":
            yield case("block_fwd", "forward", phase, b, s, kv)  # inference: no cache
        if tp == 1:  # whole stage passes, as the engine runs them (the unsharded model)
            for op in PASSES[phase]:
                yield case("pass", op, phase, b, s, kv)
    for op in ("q_proj", "gate_up", "head"):
        yield Case("adam", op, name, tp, 0, 0, 0, "train", spec=m)
    yield Case("optimizer", "block", name, tp, 0, 0, 0, "train", spec=m)


def _sweeps(level: Level) -> Iterable[Case]:
    for n in level.stream:
        yield Case("stream", "add", "", 1, 1, 0, 0, "", size=n)
    for n in (1, 4):
        yield Case("dispatch", "add", "", 1, 1, 0, 0, "", size=n)


def experiment_shapes(exp: Experiment) -> tuple[list[ModelSpec], dict[str, set], int]:
    """An experiment's models, the token shapes its calls produce, and its widest tp."""
    p = exp.params
    seqs = p.batch_size * max(p.group_size, 1)
    per_minibatch = max(seqs // max(p.ppo_minibatches, 1), 1)
    batches = {1, min(seqs, 16)}
    extra = {"decode_batches": batches, "kv_lengths": {p.prompt_len + 1, p.prompt_len + p.gen_len},
             "prefill": {(b, p.prompt_len) for b in batches},
             "train": {(b, p.prompt_len + p.gen_len) for b in {1, min(per_minibatch, 16)}}}
    models = list({(m.name, m.head): m for m in exp.models.values()}.values())
    return models, extra, exp.cluster.devices_per_node


def grid(level: str = "quick", models: Iterable[str | ModelSpec] | None = None,
         experiment: Experiment | str | None = None, max_tp: int = 8) -> list[Case]:
    """Every case of grid ``level`` (tiny | quick | full) for ``models`` (default: the level's
    tiny CPU presets), plus an experiment's models and shapes."""
    if level not in LEVELS:
        raise ConfigError(f"grid level {level!r} must be one of {sorted(LEVELS)}")
    lv = LEVELS[level]
    specs = [_spec(m) for m in (models if models is not None else lv.models)]
    extra: dict[str, set] = {}
    if experiment is not None:
        exp = load_experiment(experiment) if isinstance(experiment, str) else experiment
        more, extra, max_tp = experiment_shapes(exp)
        specs += [m for m in more if (m.name, m.head) not in {(s.name, s.head) for s in specs}]
    phases = _phases(lv, extra)
    lm_trunks = {m.name for m in specs if m.head == "lm"}
    cases = [c for m in specs for t in tp_widths(m, max_tp) for c in _model_cases(m, t, phases)
             if m.head == "lm" or m.name not in lm_trunks or _head_case(c)]
    return list(dict.fromkeys(cases + list(_sweeps(lv))))


def _head_case(c: Case) -> bool:
    """What a value-head model runs differently from its LM trunk: the head."""
    return c.family in ("head", "head_bwd") or (c.family == "gemm" and c.op == "head")


def _spec(m: str | ModelSpec) -> ModelSpec:
    if isinstance(m, ModelSpec):
        return m
    if m not in PRESETS:
        raise ConfigError(f"model {m!r} is not a preset; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[m]


def measure(cases: list[Case], device: str = "cpu", dtype: str = "float32", level: str = "quick",
            progress: Callable[[int], object] | None = None, seed: int = 0,
            again: Callable[[Callable[[], list[dict]]], None] | None = None):
    """Time ``cases`` (see :func:`calibration.timing.measure`): one raw row per case."""
    from calibration.timing import measure as _measure

    return _measure(cases, LEVELS[level], device=device, dtype=dtype, progress=progress, seed=seed, again=again)


# ---- optional command line ------------------------------------------------------------------------


TABLE = ["family", "op", "model", "tp", "batch", "seq", "kv", "launches", "flops", "bytes",
         "median_s", "p10_s", "p90_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.kernels", description=__doc__.split("\n\n")[0])
    lv = ap.add_mutually_exclusive_group()
    lv.add_argument("--quick", action="store_const", dest="level", const="quick", help="the quick grid (default)")
    lv.add_argument("--full", action="store_const", dest="level", const="full", help="the full grid")
    lv.add_argument("--tiny", action="store_const", dest="level", const="tiny", help="the test grid")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32")
    ap.add_argument("--experiment", help="add this experiment's models and shapes")
    ap.add_argument("--csv", metavar="RAW.csv", help="also write the raw rows (with their aten ops) here")
    ap.add_argument("--json", action="store_true", help="print the raw rows as JSON")
    args = ap.parse_args(argv)
    from calibration.timing import torch_device

    torch_device(args.device)  # refuse a missing GPU before building the grid
    cases = grid(args.level or "quick", experiment=args.experiment)
    with progress_bar(total=len(cases), desc="kernels", unit="case") as bar:
        raw = measure(cases, args.device, args.dtype, args.level or "quick", progress=bar.update)
    if args.csv:
        atomic_write_text(args.csv, raw.to_csv(index=False))
    if args.json:
        print(json.dumps(raw.drop(columns=["ops"]).to_dict(orient="records")))
    else:
        print(raw[TABLE].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


if __name__ == "__main__":
    sys.exit(cli_guard(main, None))
