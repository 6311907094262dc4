"""A fused-kernel GPU profile from vidur's public per-op tables, and its check against them.

vidur (microsoft/vidur, commit 7d475133, ``data/profiling``; MIT licence, beside the copy in
``calibration/vidur/``) timed each op of a LLaMA-family layer with CUDA events on one GPU:
``compute/<gpu>/<org>/<model>/mlp.csv``, one row per (num_tokens 1…4096+, tensor-parallel
degree 1/2/4/8), ``time_stats.<op>.median`` in milliseconds (kernel time on a quiet GPU, no
host launch). Each op is one kernel of :mod:`calibration.fused`, so its FLOPs and bytes come
from the same formulas the fused op set charges (:data:`VIDUR_OPS`):

- GEMMs (attn_pre_proj = fused q/k/v, attn_post_proj = o, mlp_up_proj = gate+up when gated,
  mlp_down_proj): the profile's FLOPs-efficiency curve (log-linear knots in log FLOPs), its
  by-bytes bandwidth curve and one floor, fitted with :func:`scipy.optimize.least_squares` on
  log time so that ``max(floor, F/(peak·eff(F)), B/(bw·eff_b(B)))`` reproduces both the
  weight-bandwidth-bound rows (few tokens: they give the bandwidth curve and the floor) and the
  compute-bound ones (many tokens: the FLOPs curve, with the other two held);
- memory-bound ops (input_layernorm and post_attention_layernorm → rms_norm, attn_rope → rope,
  mlp_act → swiglu, add, emb → embedding): a bandwidth efficiency and a floor per kernel
  (``compute.kernels.by_kernel``), the same model without the FLOPs term;
- the by-bytes memory curve (GEMMs, and kernels vidur did not time: attention, losses, Adam,
  backward elementwise kernels) is the GEMMs' weight-streaming efficiency by bytes; the floor of
  every kernel without its own is the GEMMs'.

Fit on some models' tables, report on the others (:func:`check`): median and max absolute
percentage error per op.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from calibration import fused as F
from calibration.fit_links import apply_links, fit_links, load_vidur_network
from estimator.base.errors import ConfigError
from estimator.cost.census import compile_piece
from estimator.profile.profiles import Profile, profile_from_dict

VIDUR = "microsoft/vidur commit 7d475133, data/profiling"
FIT_MODELS = ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf")
# base profile → (vidur GPU folder, vidur network topology of 8-GPU NVSwitch nodes)
GPUS = {"h100-sxm": ("h100", "h100_dgx"), "a100-80g": ("a100", "a100_dgx")}
# attention cores (not in vidur's tables): FlashAttention-2's measured fwd+bwd throughput, causal,
# head dim 128, sequence 4k (Dao 2023, arXiv:2307.08691, Fig. 4 A100 80GB SXM4 and Fig. 7 H100 SXM5)
# over the dense bf16 peak; Megatron on H100 may use cuDNN's fused attention, faster than this
ATTENTION = {"h100-sxm": (0.30, "FlashAttention-2 fwd+bwd, causal, head dim 128, seq 4k: about 300 TFLOP/s "
                                "on H100 SXM5 (Dao 2023, arXiv:2307.08691, Fig. 7) / 989.4 TFLOP/s peak"),
             "a100-80g": (0.57, "FlashAttention-2 fwd+bwd, causal, head dim 128, seq 4k: about 178 TFLOP/s "
                                "on A100 80GB SXM4 (Dao 2023, arXiv:2307.08691, Fig. 4) / 312 TFLOP/s peak")}
GEMM_KNOTS = np.logspace(6, 13, 15)  # FLOPs at which the efficiency curve is fitted
MEMORY_KNOTS = np.logspace(3, 9, 13)  # bytes at which the by-bytes curve is read off
SHAPE_COLUMNS = ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp",
                 "num_tokens", "num_tensor_parallel_workers"]


def _up(t: F.Mono, gated: bool) -> F.Kernel:
    return F.gemm("up_proj", t, [F.mono(1, "hidden")], [F.mono(2 if gated else 1, "ffn")])


T = F.mono(1, "rows", "tokens")
# vidur op → the fused kernel it times (gated: SwiGLU MLP, else GELU)
VIDUR_OPS = {
    "emb": lambda tp, gated: F.embed(tp)[0],
    "input_layernorm": lambda tp, gated: F.norm(T),
    "attn_pre_proj": lambda tp, gated: F.gemm("qkv_proj", T, [F.mono(1, "hidden")], list(F.QKV)),
    "attn_rope": lambda tp, gated: F.rotary(T),
    "attn_post_proj": lambda tp, gated: F.gemm("o_proj", T, [F.q_width()], [F.mono(1, "hidden")]),
    "post_attention_layernorm": lambda tp, gated: F.norm(T),
    "mlp_up_proj": lambda tp, gated: _up(T, gated),
    "mlp_act": lambda tp, gated: F.activation(T, "swiglu" if gated else "gelu"),
    "mlp_down_proj": lambda tp, gated: F.gemm("down_proj", T, [F.mono(1, "ffn")], [F.mono(1, "hidden")]),
    "add": lambda tp, gated: F.add(T),
}
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")


# ---- tables ---------------------------------------------------------------------------------


def load_compute(directory: str | Path) -> pd.DataFrame:
    """Every ``mlp.csv`` under ``directory`` as long rows: model, tp, tokens, op, time_s, the
    kernel's FLOPs and bytes and name (medians over duplicate rows)."""
    root = Path(directory)
    paths = sorted(root.rglob("mlp.csv")) if root.is_dir() else []
    if not paths:
        raise ConfigError(f"{directory}: no vidur compute table (compute/<gpu>/<org>/<model>/mlp.csv) under it")
    gpus = sorted({p.parent.parent.parent for p in paths})  # compute/<gpu>/<org>/<model>/mlp.csv
    if len(gpus) > 1:
        raise ConfigError(f"{directory}: holds the tables of {len(gpus)} GPUs ({', '.join(g.name for g in gpus)}); "
                          f"one profile is one GPU: give one of {', '.join(str(g) for g in gpus)}")
    frames = []
    for path in paths:
        df = pd.read_csv(path)
        missing = sorted(set(SHAPE_COLUMNS) - set(df.columns))
        if missing:
            raise ConfigError(f"{path}: missing column(s) {missing} of vidur's compute table")
        model = f"{path.parent.parent.name}/{path.parent.name}"
        for op in VIDUR_OPS:
            col = f"time_stats.{op}.median"
            if col in df.columns:
                part = df[SHAPE_COLUMNS + [col]].rename(columns={col: "time_ms"})
                frames.append(part.assign(op=op, model=model, table=str(path.relative_to(root))))
    rows = pd.concat(frames, ignore_index=True).dropna(subset=["time_ms"])
    rows = rows[rows.time_ms > 0]
    keys = ["model", "table", "op"] + SHAPE_COLUMNS
    rows = rows.groupby(keys, as_index=False).time_ms.median()
    return _with_work(rows.rename(columns={"num_tokens": "tokens", "num_tensor_parallel_workers": "tp"}))


def _with_work(rows: pd.DataFrame) -> pd.DataFrame:
    """Each row's kernel work from :mod:`calibration.fused` at the row's shapes on one rank."""
    out = []
    for (op, tp_split, gated), part in rows.groupby(["op", rows.tp > 1, "use_gated_mlp"]):
        kernel = VIDUR_OPS[op](bool(tp_split), bool(gated))
        tp = part.tp.to_numpy(float)
        sym = {"rows": np.ones(len(part)), "tokens": part.tokens.to_numpy(float),
               "hidden": part.n_embd.to_numpy(float), "kv_heads": part.n_kv_head.to_numpy(float) / tp,
               "group": (part.n_head / part.n_kv_head).to_numpy(float),
               "half_head_dim": (part.n_embd / part.n_head / 2).to_numpy(float),
               "ffn": part.n_expanded_embd.to_numpy(float) / tp, "vocab_local": part.vocab_size.to_numpy(float) / tp}
        w = compile_piece([kernel.entry()])(sym)
        out.append(part.assign(flops=w.flops[0], bytes=w.bytes[0], kernel=kernel.op))
    rows = pd.concat(out).sort_index()
    return rows.assign(time_s=rows.time_ms * 1e-3)


# ---- fitting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """What the tables say about one GPU."""

    gemm_points: list[tuple[float, float]]  # (FLOPs, efficiency)
    gemm_bandwidth: list[tuple[float, float]]  # (bytes, efficiency) of a weight-bound GEMM
    gemm_floor_s: float
    kernels: dict[str, tuple[float, float]]  # memory-bound kernel → (bandwidth efficiency, floor_s)
    rows: int  # rows fitted


def _log_eff(flops: np.ndarray, logeff: np.ndarray) -> np.ndarray:
    return np.interp(np.log(flops), np.log(GEMM_KNOTS), logeff)


def _knots(x: np.ndarray, knots: np.ndarray, logeff: np.ndarray) -> list[tuple[float, float]]:
    """The knots within a factor 4 of the data, as (size, efficiency) points."""
    seen = (knots >= x.min() / 4) & (knots <= x.max() * 4)
    return [(float(k), round(float(min(np.exp(e), 1.0)), 4)) for k, e, s in zip(knots, logeff, seen) if s]


def _smooth(p: np.ndarray) -> np.ndarray:
    # a small penalty on the curvature keeps knots no row pins (beyond the data) near their neighbours
    return 0.05 * np.diff(p, 2)


def fit_gemms(rows: pd.DataFrame, peak: float, bw: float) -> tuple[list, list, float]:
    """FLOPs-efficiency knots, by-bytes bandwidth-efficiency knots and the floor of the GEMM rows,
    each regime from its own rows: the weight-streaming curve and the floor from the
    weight-bound rows (arithmetic intensity under an eighth of the machine balance peak/bw:
    a handful of tokens), then the FLOPs curve from every row with those held."""
    f, b, t = rows.flops.to_numpy(), rows.bytes.to_numpy(), rows.time_s.to_numpy()
    bound = f / b < peak / bw / 8
    if bound.sum() < 3 or (~bound).sum() < 3:
        raise ConfigError("vidur tables: the GEMM rows need both few-token (weight-bound) and many-token rows")
    lb, lm = np.log(b[bound]), np.log(MEMORY_KNOTS)

    def memory(p: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        return nbytes / (bw * np.exp(np.interp(np.log(nbytes), lm, p)))

    m = len(MEMORY_KNOTS)
    mem = least_squares(lambda p: np.concatenate([
        np.log(np.maximum(b[bound] / (bw * np.exp(np.interp(lb, lm, p[:m]))), np.exp(p[m])) / t[bound]),
        _smooth(p[:m])]), np.concatenate([np.full(m, np.log(0.7)), [np.log(t.min())]]),
        bounds=(np.concatenate([np.full(m, np.log(1e-3)), [np.log(1e-7)]]),
                np.concatenate([np.zeros(m), [np.log(1e-3)]])))
    floor = np.exp(mem.x[m])
    held = np.maximum(memory(mem.x[:m], b), floor)
    k = len(GEMM_KNOTS)
    comp = least_squares(lambda p: np.concatenate([
        np.log(np.maximum(f / (peak * np.exp(_log_eff(f, p))), held) / t), _smooth(p)]),
        np.full(k, np.log(0.5)), bounds=(np.full(k, np.log(1e-4)), np.zeros(k)))
    return _knots(f, GEMM_KNOTS, comp.x), _knots(b[bound], MEMORY_KNOTS, mem.x[:m]), float(floor)


def fit_memory_kernel(rows: pd.DataFrame, bw: float) -> tuple[float, float]:
    """(bandwidth efficiency, floor_s) of one memory-bound kernel: ``max(floor, B/(bw·eff))``."""
    b, t = rows.bytes.to_numpy(), rows.time_s.to_numpy()

    def resid(p: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(b / (bw * np.exp(p[0])), np.exp(p[1])) / t)

    fit = least_squares(resid, [np.log(0.5), np.log(t.min())],
                        bounds=([np.log(0.01), np.log(1e-7)], [np.log(1.5), np.log(1e-3)]))
    return float(np.exp(fit.x[0])), float(np.exp(fit.x[1]))


def fit_tables(rows: pd.DataFrame, peak: float, bw: float) -> Fit:
    """Every figure the profile takes from the tables."""
    if rows.empty:
        raise ConfigError("vidur tables: no rows of the models to fit")
    gemm = rows[rows.op.isin(GEMM_OPS)]
    if gemm.empty:
        raise ConfigError("vidur tables: no GEMM rows (attn_pre_proj, attn_post_proj, mlp_up_proj, mlp_down_proj)")
    points, gemm_bw, gemm_floor = fit_gemms(gemm, peak, bw)
    mem = rows[~rows.op.isin(GEMM_OPS)]
    kernels = {k: fit_memory_kernel(part, bw) for k, part in mem.groupby("kernel")}
    return Fit(points, gemm_bw, gemm_floor, kernels, len(rows))


# ---- the profile ----------------------------------------------------------------------------


def build_profile(base: dict, directory: str | Path, name: str, command: str,
                  fit_models: tuple[str, ...] = FIT_MODELS
                  ) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The profile document (``compute.ops: fused``), the links' raw rows and their report, and
    the compute rows it was fitted on and judged with (:func:`load_compute`)."""
    gpu, topo = _gpu(base)
    root = Path(directory)
    rows = load_compute(root / "compute" / gpu)
    fit_rows = rows[rows.model.isin(fit_models)]
    missing = sorted(set(fit_models) - set(rows.model))
    if missing:
        raise ConfigError(f"--import-vidur: no table for fit model(s) {missing} under {root / 'compute' / gpu}; "
                          f"present: {sorted(rows.model.unique())}")
    peak = float(base["compute"]["peak"]["flops_per_s"])
    bw = float(base["memory"]["bandwidth"]["bytes_per_s"])
    fit = fit_tables(fit_rows, peak, bw)
    held = sorted(set(rows.model) - set(fit_models))
    src = (f"vidur per-op CUDA-event timings ({VIDUR}/compute/{gpu}; median ms, kernel time, no host launch; "
           f"MIT licence, copy in calibration/vidur/) of {', '.join(fit_models)}; "
           f"held out: {', '.join(held) or 'none'}")
    doc = copy.deepcopy(base)
    doc.update(name=name, source="measured", date=datetime.date.today().isoformat(),
               notes=(f"Fused-kernel GPU profile built by: {command}. Compute and memory fitted on vidur's "
                      f"per-op tables; peak, bandwidth, capacity, host launch and inter-node links from the "
                      f"{base['name']} datasheet profile. Check: python -m estimator.calibrate --check-vidur "
                      f"calibration/vidur/compute/{gpu} --profile {name}"))
    c = doc["compute"]
    c["ops"] = "fused"
    c["efficiency"] = {"by": "flops", "interpolation": "log-linear", "points": [list(p) for p in fit.gemm_points],
                       "cite": f"{src}: rows attn_pre_proj, attn_post_proj, mlp_up_proj, mlp_down_proj, "
                               "FLOPs 2·m·n·k of the layer shapes, fitted jointly with the weight-bandwidth "
                               "bound (scipy least_squares on log time) by calibration/vidur.py"}
    by_kernel = {k: {"bandwidth_efficiency": round(e, 4), "floor_s": round(f, 9)} for k, (e, f) in fit.kernels.items()}
    eff, why = ATTENTION[base["name"]]
    for k in ("flash_attention", "flash_attention_backward"):
        by_kernel[k] = {"bandwidth_efficiency": fit.gemm_bandwidth[-1][1], "floor_s": round(fit.gemm_floor_s, 9),
                        "flops_efficiency": eff,
                        "cite": f"{why}; bandwidth (decode's KV-cache reads): the by-bytes curve's largest point"}
    c["kernels"] = {"floor_s": round(fit.gemm_floor_s, 9), "by_kernel": dict(sorted(by_kernel.items())),
                    "cite": f"{src}: memory-bound rows (input_layernorm, post_attention_layernorm → rms_norm; "
                            "attn_rope → rope; mlp_act → swiglu; add; emb → embedding) fitted as max(floor, "
                            "bytes/(bw·eff)) per kernel; floor_s (every other kernel): the GEMM rows' fitted "
                            "floor; attention kernels cite their own source"}
    doc["memory"]["efficiency"] = {
        "by": "bytes", "interpolation": "log-linear", "points": [list(p) for p in fit.gemm_bandwidth],
        "cite": f"{src}: the weight-bandwidth bound of the GEMM rows (few tokens), fitted with the GEMM "
                "efficiency; streaming bandwidth for GEMMs and every kernel the tables do not time "
                "(attention, losses, Adam, backward)"}
    raw = load_vidur_network(root / "network" / topo)
    raw = raw[raw.link_class == "intra"]
    cite = (f"vidur NCCL timings on 8-GPU nodes ({VIDUR}/network/{topo}; sizes in bytes, median NCCL kernel "
            f"times on a quiet GPU, no host launch cost; MIT licence, vidur.LICENSE), raw rows in {name}.links.csv; "
            f"curves fitted on 75% of the sizes by calibration.fit_links, held-out error in {name}.links.report.csv")
    links, report = fit_links(raw, 0.25, cite=cite)
    doc = apply_links(doc, links, raw_csv=f"{name}.links.csv")
    profile_from_dict(doc, where=f"imported profile {name}")
    return doc, raw, report, rows


def _gpu(base: dict) -> tuple[str, str]:
    if base.get("name") not in GPUS:
        raise ConfigError(f"--base {base.get('name')!r}: vidur has tables for the bases {sorted(GPUS)} only")
    return GPUS[base["name"]]


# ---- checking -------------------------------------------------------------------------------


def predict(profile: Profile, rows: pd.DataFrame) -> np.ndarray:
    """Each row's kernel time on ``profile``: the cost path of a census entry
    (:meth:`Profile.ops_s_many` of its FLOPs and bytes under its kernel name), device time only
    (vidur's times hold no host launch)."""
    kinds = tuple(rows.kernel)
    return profile.ops_s_many(rows.flops.to_numpy(), rows.bytes.to_numpy(), 0.0, "nograd", kinds)


def check(profile: Profile, rows: pd.DataFrame, fitted: tuple[str, ...] = ()) -> dict:
    """Absolute percentage error per op and per model: median, max, rows."""
    ape = np.abs(predict(profile, rows) / rows.time_s.to_numpy() - 1.0) * 100.0
    rows = rows.assign(ape=ape)

    def stats(df: pd.DataFrame) -> dict:
        return {"n": int(len(df)), "median_ape": round(float(df.ape.median()), 2),
                "max_ape": round(float(df.ape.max()), 2)}

    return {"profile": profile.name, "median_ape": round(float(np.median(ape)), 2),
            "max_ape": round(float(ape.max()), 2), "n": int(len(rows)),
            "ops": {op: stats(part) for op, part in rows.groupby("op")},
            "models": {m: {**stats(part), "fitted": m in fitted} for m, part in rows.groupby("model")},
            "by_model_op": {f"{m}:{op}": stats(part) for (m, op), part in rows.groupby(["model", "op"])}}


def fitted_models(profile: Profile, models: list[str]) -> tuple[str, ...]:
    """Which of ``models`` the profile's compute was fitted on (its citation names them before
    the held-out ones)."""
    cite = str(profile.raw.get("compute", {}).get("efficiency", {}).get("cite", "")).split("; held out")[0]
    return tuple(m for m in models if m in cite)


def slim_tables(src: str | Path, dst: str | Path) -> list[Path]:
    """Copy vidur's compute and network tables keeping the medians and the shape columns only
    (min, max, mean and std dropped), so the repository stays small."""
    src, dst = Path(src), Path(dst)
    written = []
    for path in sorted(src.rglob("*.csv")):
        df = pd.read_csv(path)
        keep = [c for c in df.columns if not c.startswith("time_stats.") or c.endswith(".median")]
        keep = [c for c in keep if not c.startswith("Unnamed")]
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        df[keep].to_csv(out, index=False)
        written.append(out)
    return written
