"""Predict published training iterations: vTrain's measured Megatron-DeepSpeed runs on A100s.

Usage::

    python -m analysis.published vtrain analysis/data/vtrain/ground_truth_single.csv \\
        --out analysis/results/published/vtrain-single
    python -m analysis.published vtrain TABLE.csv --profile a100-80g --json
    python -m analysis.published make-profile --base a100-80g --name a100-vtrain

``vtrain`` reads a table in vTrain's column format (VIA-Research/vTrain, commit f8dda847,
``data/ground_truth_single.csv``; Bang et al., "vTrain", MICRO 2024) — ``# GPUs, global batch,
micro batch, hidden size, attention heads, # layers, sequence length, tensor parallelism, data
parallelism, pipeline parallelism, iteration time (ms)``, optionally led by ``Parameters
(billion)``, optionally with a UTF-8 byte-order mark — and predicts every row as one SFT train
call of the GPT-3-style model it describes (:func:`row_experiment` has the mapping). It prints
MAPE, the largest absolute percentage error, Spearman's rank correlation (scipy), the worst
rows and the error per model size and per parallel layout, and writes into ``--out``
``predictions.csv``, ``scatter.png`` and ``summary.json``. ``--json`` prints the summary with
every row. No constant is fitted to the rows: the profile is the only source of time.

``make-profile`` derives the cluster profile of vTrain's setting from a base A100 profile:
vTrain's configuration defaults (``src/config.py``) state 150 GB/s intra-node and 800 Gb/s per
node inter-node bandwidth. Collectives the base holds measured curves for keep them (vTrain,
too, reads measured NCCL tables for groups of up to 8 GPUs and the 150 GB/s only beyond);
the others take 150 GB/s bus bandwidth inside a node, and 800 Gb/s shared by the node's 8 GPUs
between nodes, converted as vTrain's predictor converts (``src/predictor.py``: 1 GB = 2^30 B).
``--replace-curves`` uses the stated figures for every collective instead.

Exit codes: 0 done; 2 invalid table, profile or option (one line naming row and column).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from estimator.cluster import Cluster, DeviceMesh
from estimator.errors import ConfigError, cli_guard
from estimator.experiment import Experiment
from estimator.io import atomic_write_json, atomic_write_text, check_output_path
from estimator.loading import MAX_DATA_BYTES, read_text
from estimator.memory import GiB, plan_memory
from estimator.models import ModelSpec
from estimator.plan import Layout, Plan, check, format_table
from estimator.profiles import PROFILE_DIR, Profile, load_profile
from estimator.workflow import WorkflowParams

PARAMS_COLUMN = "Parameters (billion)"
# vTrain's header → field of VTrainRow
COLUMNS = {
    "# GPUs": "gpus", "global batch": "global_batch", "micro batch": "micro_batch",
    "hidden size": "hidden", "attention heads": "heads", "# layers": "layers",
    "sequence length": "seq_len", "tensor parallelism": "tp", "data parallelism": "dp",
    "pipeline parallelism": "pp", "iteration time (ms)": "measured_ms",
}
GPT_VOCAB = 50257  # GPT-2/GPT-3 BPE vocabulary (vTrain src/config.py vocab_size default)
# Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by (default 128)
# times the tensor-parallel degree (Megatron-LM megatron/training/tokenizer _vocab_size_with_padding)
VOCAB_MULTIPLE = 128
GPUS_PER_NODE = 8  # vTrain src/config.py node_size default
DEFAULT_PROFILE = "a100-vtrain"
ENGINES = ("evaluator", "simulator")
VTRAIN_SOURCE = ("vTrain (Bang et al., MICRO 2024), github.com/VIA-Research/vTrain commit f8dda847, "
                 "src/config.py defaults")
GiB_BINARY = 2 ** 30  # vTrain's predictor reads its GB and Gb as 2^30 (src/predictor.py)


@dataclass(frozen=True)
class VTrainRow:
    """One measured run of vTrain's table."""

    row: int  # 1-based data row (line row + 1 of the file)
    gpus: int
    global_batch: int  # sequences per iteration
    micro_batch: int  # sequences per micro-batch
    hidden: int
    heads: int
    layers: int
    seq_len: int  # tokens per sequence
    tp: int
    dp: int
    pp: int
    measured_s: float  # measured iteration time, seconds
    params_billion: float | None = None  # the table's own parameter count, when given

    @property
    def micro_batches(self) -> int:
        """Micro-batches per data-parallel rank in one iteration."""
        return self.global_batch // (self.dp * self.micro_batch)

    def config(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("gpus", "global_batch", "micro_batch", "hidden", "heads", "layers",
                                              "seq_len", "tp", "dp", "pp")}


# ---- the table ----------------------------------------------------------------------------


def _integer(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}={text!r} must be a positive integer") from None
    if not math.isfinite(value) or not value.is_integer() or value < 1:
        raise ConfigError(f"{where}={text!r} must be a positive integer")
    return int(value)


def _positive(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}={text!r} must be a positive number") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}={text!r} must be a positive number")
    return value


def parse_row(values: dict[str, str], row: int) -> VTrainRow:
    """One data row (header → text) checked: positive integers, a positive time, dp·tp·pp equal
    to the GPUs and a global batch that splits into dp·micro-batch pieces."""
    fields = {}
    for col, name in COLUMNS.items():
        where = f"row {row}: column {col!r}"
        text = str(values[col]).strip()
        fields[name] = _positive(text, where) if name == "measured_ms" else _integer(text, where)
    params = None
    if PARAMS_COLUMN in values:
        params = _positive(str(values[PARAMS_COLUMN]).strip(), f"row {row}: column {PARAMS_COLUMN!r}")
    f = fields
    if f["dp"] * f["tp"] * f["pp"] != f["gpus"]:
        raise ConfigError(f"row {row}: column '# GPUs'={f['gpus']} must equal data·tensor·pipeline parallelism "
                          f"= {f['dp']}·{f['tp']}·{f['pp']} = {f['dp'] * f['tp'] * f['pp']}")
    if f["global_batch"] % (f["dp"] * f["micro_batch"]):
        raise ConfigError(f"row {row}: column 'global batch'={f['global_batch']} must be divisible by "
                          f"data parallelism · micro batch = {f['dp']}·{f['micro_batch']} "
                          f"= {f['dp'] * f['micro_batch']}")
    measured_ms = f.pop("measured_ms")
    return VTrainRow(row=row, measured_s=measured_ms / 1e3, params_billion=params, **f)


def parse_table(text: str, where: str = "table") -> list[VTrainRow]:
    """Every row of a table in vTrain's column format (a leading byte-order mark is dropped)."""
    import pandas as pd

    text = text.removeprefix("\ufeff")
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise ConfigError(f"{where}: not a valid CSV table: {' '.join(str(exc).split())}") from None
    table.columns = [str(c).strip() for c in table.columns]
    expected = list(COLUMNS)
    if list(table.columns) not in (expected, [PARAMS_COLUMN, *expected]):
        missing = [c for c in expected if c not in table.columns]
        extra = [c for c in table.columns if c not in expected and c != PARAMS_COLUMN]
        raise ConfigError(f"{where}: columns must be vTrain's {expected} (optionally led by {PARAMS_COLUMN!r})"
                          + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else "")
                          + ("" if missing or extra else "; the order differs"))
    if table.empty:
        raise ConfigError(f"{where}: the table has no rows")
    try:
        return [parse_row(rec, i + 1) for i, rec in enumerate(table.to_dict("records"))]
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_table(path: str | Path) -> list[VTrainRow]:
    return parse_table(read_text(path, "vTrain table", MAX_DATA_BYTES), where=f"vTrain table {path}")


# ---- row → experiment and plan --------------------------------------------------------------


def padded_vocab(vocab: int, tp: int) -> int:
    """The vocabulary Megatron allocates: ``vocab`` rounded up to a multiple of 128·tp."""
    multiple = VOCAB_MULTIPLE * tp
    return -(-vocab // multiple) * multiple


def _has(cls: type, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


# the GPT-3 block's features and the ModelSpec field that expresses each
GPT_FEATURES = {"norm": "layernorm", "mlp": "gelu", "positions": "learned", "bias": True}


def gpt_model(row: VTrainRow) -> tuple[ModelSpec, dict[str, str]]:
    """The GPT-3-style model of a row and, per model feature, how it was honoured.

    Multi-head attention, GELU MLP of 4·hidden, LayerNorm, learned positions (as many as the
    sequence), biases, tied input and output embeddings (GPT-3 / Megatron GPT). A feature
    :class:`ModelSpec` cannot express yet is approximated, and the returned notes say so: a
    SwiGLU MLP in place of GELU gets inner width ≈ 8·hidden/3 (a multiple of 8), so its three
    matrices hold the parameters and GEMM FLOPs of GELU's two of width 4·hidden."""
    h = row.hidden
    kwargs: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name, value in GPT_FEATURES.items():
        if _has(ModelSpec, name):
            kwargs[name] = value
            notes[name] = f"{value} (honoured)"
    if "mlp" in kwargs:
        ffn = 4 * h
    else:
        ffn = max(8, round(8 * h / 3 / 8) * 8)
        notes["mlp"] = f"approximated: SwiGLU of width {ffn} (parameters and GEMM FLOPs of GELU 4·hidden)"
    for name, value in GPT_FEATURES.items():
        notes.setdefault(name, f"not expressible yet: the model has {_LLAMA_DEFAULT[name]}, not {value}")
    if _has(ModelSpec, "max_positions"):
        kwargs["max_positions"] = row.seq_len
    vocab = padded_vocab(GPT_VOCAB, row.tp)
    notes["vocab"] = f"{GPT_VOCAB} padded to {vocab} (Megatron: multiple of {VOCAB_MULTIPLE}·tp)"
    notes["tied_embeddings"] = "honoured"
    spec = ModelSpec(f"gpt-h{h}-l{row.layers}", row.layers, h, ffn, row.heads, row.heads, vocab,
                     tied_embeddings=True, **kwargs)
    return spec, notes


_LLAMA_DEFAULT = {"norm": "RMSNorm", "mlp": "SwiGLU", "positions": "rotary positions", "bias": "no biases"}


def row_experiment(row: VTrainRow, device: str = DEFAULT_PROFILE) -> tuple[Experiment, Plan, dict[str, str]]:
    """The SFT experiment and plan of one row, with notes on which features were honoured.

    One train call over ``global batch`` sequences of ``sequence length`` tokens (the loss on
    all but the first), one optimizer step; the cluster has nodes of 8 GPUs and the call runs
    on the row's first ``# GPUs`` devices with the row's dp/tp/pp and ``global batch / (dp ·
    micro batch)`` micro-batches per data-parallel rank, 1F1B, full activation recompute."""
    try:
        model, notes = gpt_model(row)
        nodes = -(-row.gpus // GPUS_PER_NODE)
        params = WorkflowParams(batch_size=row.global_batch, prompt_len=1, gen_len=row.seq_len - 1)
        experiment = Experiment("sft", {"actor": model}, params, Cluster(nodes, GPUS_PER_NODE, device),
                                name=f"vtrain-row-{row.row}")
        extra: dict[str, Any] = {}
        if _has(Layout, "recompute"):
            extra["recompute"] = "full"
            notes["recompute"] = "full (honoured)"
        else:
            notes["recompute"] = "not expressible yet: no recompute charged (one forward per micro-batch missing)"
        layout = Layout(DeviceMesh(0, row.gpus), row.dp, row.tp, row.pp, row.micro_batches, **extra)
        plan = check(Plan({"actor_train": layout}), experiment)
    except ConfigError as exc:
        raise ConfigError(f"row {row.row}: {exc}") from None
    notes["schedule"] = "1F1B (honoured)"
    return experiment, plan, notes


# ---- prediction ---------------------------------------------------------------------------


def predict_row(row: VTrainRow, profile: Profile, engine: str = "evaluator") -> dict[str, Any]:
    """Predicted iteration time and memory of one row on ``profile``."""
    from estimator.evaluator import Evaluator
    from estimator.simulator import simulate

    experiment, plan, _ = row_experiment(row, profile.name)
    memory = plan_memory(experiment, plan, profile.capacity_bytes)
    if engine == "simulator":
        predicted = simulate(experiment, plan, profile, iterations=2).iteration_s
    else:
        predicted = Evaluator(experiment, profile, iterations=2).evaluate(plan).iteration_s
    ape = abs(predicted - row.measured_s) / row.measured_s
    return {"row": row.row, **row.config(), "micro_batches": row.micro_batches, "predicted_s": predicted,
            "measured_s": row.measured_s, "ape": ape, "fits": memory.feasible,
            "peak_memory_gib": memory.peak.peak_bytes / GiB, "params_billion": experiment.models["actor"].params / 1e9}


def predict_table(rows: list[VTrainRow], profile: Profile, engine: str = "evaluator",
                  progress: bool = True) -> Any:  # -> pandas.DataFrame
    import pandas as pd
    from tqdm import tqdm

    it = tqdm(rows, desc="vTrain rows", unit="row", file=sys.stderr, disable=not progress)
    return pd.DataFrame([predict_row(r, profile, engine) for r in it])


def breakdown(df: Any, keys: list[str]) -> list[dict[str, Any]]:
    """MAPE, largest error and mean predicted/measured ratio per group of ``keys``."""
    g = df.assign(ratio=df.predicted_s / df.measured_s).groupby(keys)
    out = g.agg(n=("ape", "size"), mape=("ape", "mean"), max_ape=("ape", "max"), ratio=("ratio", "mean"))
    return [{**dict(zip(keys, (k if isinstance(k, tuple) else (k,)))), **{c: v for c, v in rec.items()}}
            for k, rec in zip(out.index, out.to_dict("records"))]


BREAKDOWNS = {"model": ["hidden", "layers"], "parallelism": ["tp", "pp", "dp"], "tp": ["tp"], "pp": ["pp"],
              "dp": ["dp"], "gpus": ["gpus"]}


def summarize(df: Any, profile: Profile, engine: str, notes: dict[str, str], worst: int = 10) -> dict[str, Any]:
    from scipy.stats import spearmanr

    rho = float(spearmanr(df.predicted_s, df.measured_s).statistic) if len(df) > 1 else float("nan")
    unfit = df[~df.fits]
    return {
        "n": int(len(df)), "mape": float(df.ape.mean()), "median_ape": float(df.ape.median()),
        "max_ape": float(df.ape.max()), "spearman": rho,
        "mean_ratio": float((df.predicted_s / df.measured_s).mean()),
        "within_10pct": float((df.ape <= 0.10).mean()),
        "engine": engine, "profile": profile.name, "profile_source": profile.source, "profile_path": profile.path,
        "model_features": notes,
        "not_fitting": int(len(unfit)), "not_fitting_rows": [int(r) for r in unfit.row],
        "worst": df.nlargest(worst, "ape").to_dict("records"),
        "breakdown": {name: breakdown(df, keys) for name, keys in BREAKDOWNS.items()},
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(summary: dict[str, Any]) -> str:
    s = summary
    lines = [f"{s['n']} rows on profile {s['profile']} ({s['profile_source']}), {s['engine']}",
             f"MAPE {_pct(s['mape'])}   median {_pct(s['median_ape'])}   max {_pct(s['max_ape'])}   "
             f"Spearman {s['spearman']:.3f}   predicted/measured {s['mean_ratio']:.3f}   "
             f"within 10 %: {_pct(s['within_10pct'])}",
             f"predicted not to fit in memory: {s['not_fitting']} rows"
             + (f" ({s['not_fitting_rows'][:20]})" if s["not_fitting"] else ""), "",
             "model features: " + "; ".join(f"{k}: {v}" for k, v in s["model_features"].items()), ""]
    cols = ("row", "gpus", "global_batch", "micro_batch", "hidden", "layers", "tp", "dp", "pp")
    rows = [(*cols, "predicted ms", "measured ms", "error")]
    rows += [(*(str(w[c]) for c in cols), f"{1e3 * w['predicted_s']:.1f}", f"{1e3 * w['measured_s']:.1f}",
              _pct(w["ape"])) for w in s["worst"]]
    lines += ["worst rows:", format_table(rows, right=set(range(len(rows[0])))), ""]
    for name in ("model", "parallelism"):
        keys = BREAKDOWNS[name]
        table = [(*keys, "n", "MAPE", "max", "pred/meas")]
        table += [(*(str(b[k]) for k in keys), str(b["n"]), _pct(b["mape"]), _pct(b["max_ape"]), f"{b['ratio']:.3f}")
                  for b in s["breakdown"][name]]
        lines += [f"by {name}:", format_table(table, right=set(range(len(table[0])))), ""]
    return "\n".join(lines).rstrip()


def scatter(df: Any, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 6.0))
    groups = df.assign(key="tp" + df.tp.astype(str) + " pp" + df.pp.astype(str)).groupby("key")
    for i, (key, g) in enumerate(groups):
        ax.scatter(1e3 * g.measured_s, 1e3 * g.predicted_s, s=9, alpha=0.7, label=key, color=plt.cm.tab10(i % 10))
    lo = 0.8 * 1e3 * min(df.measured_s.min(), df.predicted_s.min())
    hi = 1.25 * 1e3 * max(df.measured_s.max(), df.predicted_s.max())
    xs = [lo, hi]
    ax.plot(xs, xs, color="black", lw=1, label="y = x")
    ax.fill_between(xs, [0.9 * x for x in xs], [1.1 * x for x in xs], color="grey", alpha=0.2, label="±10 %")
    ax.set(xscale="log", yscale="log", xlim=xs, ylim=xs, xlabel="measured iteration time (ms)",
           ylabel="predicted iteration time (ms)", title=title)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out


# ---- the cluster profile of vTrain's setting -------------------------------------------------


def vtrain_profile(base: Profile, name: str, intra_GBps: float = 150.0, inter_Gbps: float = 800.0,
                   per_node: int = GPUS_PER_NODE, replace_curves: bool = False, command: str = "") -> dict[str, Any]:
    """The profile document of ``base`` with vTrain's stated link figures (see the module doc)."""
    data = copy.deepcopy(base.raw)
    intra = intra_GBps * GiB_BINARY
    per_gpu = inter_Gbps * GiB_BINARY / 8 / per_node
    cite_intra = (f"{VTRAIN_SOURCE}: intra_node_bandwidth {intra_GBps:g} GB/s, used as all-reduce bus bandwidth "
                  f"(src/predictor.py compute_comm_time, 1 GB = 2^30 B)")
    cite_inter = (f"{VTRAIN_SOURCE}: inter_node_bandwidth {inter_Gbps:g} Gb/s per node (1 Gb = 2^30 bit, "
                  f"src/predictor.py), shared by the node's {per_node} GPUs, one NIC each")
    for cls, busbw, cite in (("intra", intra, cite_intra), ("inter", per_gpu, cite_inter)):
        for kind, node in data["links"][cls].items():
            if not isinstance(node, dict) or ("curves" in node and not replace_curves):
                continue
            alpha = base.links[cls][kind].alpha_s
            data["links"][cls][kind] = {"alpha_s": alpha, "busbw_bytes_per_s": busbw,
                                        "cite": f"{cite}; latency {alpha:.3g} s kept from {base.name}"}
    kept = "measured curves replaced too" if replace_curves else "measured curves of the base kept"
    data.update(name=name, date=datetime.date.today().isoformat(),
                notes=f"{base.name} with the link figures of vTrain's A100 cluster ({VTRAIN_SOURCE}; {kept}). "
                      f"Made by: {command}")
    return data


def make_profile(args: argparse.Namespace) -> int:
    from estimator.profiles import profile_from_dict

    out = check_output_path(args.out or PROFILE_DIR / f"{args.name}.json", "--out")
    base = load_profile(args.base, key="--base")
    command = (f"python -m analysis.published make-profile --base {args.base} --name {args.name}"
               + (f" --intra-GBps {args.intra_GBps:g}" if args.intra_GBps != 150 else "")
               + (f" --inter-Gbps {args.inter_Gbps:g}" if args.inter_Gbps != 800 else "")
               + (" --replace-curves" if args.replace_curves else ""))
    data = vtrain_profile(base, args.name, args.intra_GBps, args.inter_Gbps, replace_curves=args.replace_curves,
                          command=command)
    profile_from_dict(data, where=f"profile {out}")  # the result must load
    atomic_write_text(out, json.dumps(data, indent=2) + "\n", "--out")
    print(f"wrote {out} ({args.name}: {base.name} with vTrain's link figures)")
    return 0


# ---- the command --------------------------------------------------------------------------


def _out_dir(path: str) -> Path:
    """``--out`` as a directory, made if absent, with every file it will hold writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {path!r} is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {path!r}: {exc.strerror or exc}") from None
    for name in ("predictions.csv", "scatter.png", "summary.json"):
        check_output_path(out / name, "--out")
    return out


def run_vtrain(args: argparse.Namespace) -> int:
    out = _out_dir(args.out) / "summary.json" if args.out else None
    try:
        profile = load_profile(args.profile, key="--profile")
    except ConfigError as exc:
        hint = (f" (make it with: python -m analysis.published make-profile --base a100-80g --name {args.profile})"
                if args.profile == DEFAULT_PROFILE else "")
        raise ConfigError(f"{exc}{hint}") from None
    rows = load_table(args.table)
    _, _, notes = row_experiment(rows[0], profile.name)
    df = predict_table(rows, profile, args.engine, progress=not args.json)
    summary = {"table": str(args.table), **summarize(df, profile, args.engine, notes)}
    if out is not None:
        atomic_write_text(out.parent / "predictions.csv", df.to_csv(index=False, float_format="%.6g"))
        scatter(df, out.parent / "scatter.png",
                f"vTrain one-node runs: MAPE {_pct(summary['mape'])}, Spearman {summary['spearman']:.3f}")
        atomic_write_json(out, summary)
    if args.json:
        print(json.dumps({**summary, "rows": df.to_dict("records")}, indent=2))
    else:
        print(render(summary))
        if out is not None:
            print(f"\nwrote {out.parent}/predictions.csv, scatter.png, summary.json")
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.published", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("vtrain", help="predict every row of a table in vTrain's format")
    v.add_argument("table", help="CSV in vTrain's column format")
    v.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"hardware profile name or file (default {DEFAULT_PROFILE})")
    v.add_argument("--engine", choices=ENGINES, default="evaluator",
                   help="fast evaluator (default) or the discrete-event simulator")
    v.add_argument("--out", help="directory for predictions.csv, scatter.png, summary.json")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    m = sub.add_parser("make-profile", help="derive the profile of vTrain's A100 cluster from a base profile")
    m.add_argument("--base", default="a100-80g", help="base A100 profile name or file (default a100-80g)")
    m.add_argument("--name", default=DEFAULT_PROFILE, help=f"name of the new profile (default {DEFAULT_PROFILE})")
    m.add_argument("--out", help="profile file to write (default calibration/profiles/<name>.json)")
    m.add_argument("--intra-GBps", dest="intra_GBps", type=float, default=150.0,
                   help="intra-node bus bandwidth, GB/s (vTrain's default 150)")
    m.add_argument("--inter-Gbps", dest="inter_Gbps", type=float, default=800.0,
                   help="inter-node bandwidth per node, Gb/s (vTrain's default 800)")
    m.add_argument("--replace-curves", action="store_true",
                   help="use the stated figures for collectives the base has measured curves for too")
    return ap


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "make-profile":
        for flag, value in (("--intra-GBps", args.intra_GBps), ("--inter-Gbps", args.inter_Gbps)):
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{flag}={value:g} must be a positive number")
        return make_profile(args)
    return run_vtrain(args)


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
