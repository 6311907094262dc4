"""Predict published training iterations: vTrain's measured Megatron-DeepSpeed runs on A100s.

Usage::

    python -m analysis.published vtrain analysis/data/vtrain/ground_truth_single.csv \\
        --out analysis/results/published/vtrain-single
    python -m analysis.published vtrain analysis/data/vtrain/ground_truth_multi.csv --profile a100-vtrain-fit \\
        --out analysis/results/published/vtrain-multi
    python -m analysis.published vtrain TABLE.csv --profile a100-80g --json
    python -m analysis.published make-profile --base a100-80g --name a100-vtrain
    python -m analysis.published fit-profile analysis/data/vtrain/ground_truth_single.csv \
        --base a100-vtrain --name a100-vtrain-fit --fit-layers 12,20
    python -m analysis.published vtrain TABLE.csv --profile a100-vtrain-fit --held-out-layers 16,24

``vtrain`` reads a table in vTrain's column format (:mod:`analysis.vtrain`: vTrain, Bang et
al., MICRO 2024, github.com/VIA-Research/vTrain) and predicts every row as one SFT train call of
the GPT-3-style model it describes (:func:`analysis.vtrain.row_experiment` has the mapping), with
the fast evaluator (``--engine evaluator``, the default; it agrees with the simulator on these
single-call plans, which a test holds) or the simulator. It prints MAPE, the largest absolute
percentage error, Spearman's rank correlation (scipy), the busiest stage's work by kind, the
ten worst rows and the error per model size and per parallel layout, and writes into ``--out``
``predictions.csv`` (per row: configuration, ``predicted_s``, ``measured_s``, ``ape``, whether
it fits in memory, the busiest stage's work), ``scatter.png`` and ``summary.json``. ``--json``
prints the summary with every row. Rows predicted not to fit in memory are counted and named,
never dropped: each of them ran. A row the command cannot express — a value that does not
parse, a layout the plan rules refuse — is skipped, never fatal to the table: the table output
lists it with the reason and the JSON has it in ``skipped[]`` (``{row, reason}``); only a table
with no row left exits 2. No constant is fitted to the rows: the profile is the only source
of time. ``summary.model_features`` says how each feature of vTrain's setting is expressed.

``fit-profile`` fits four numbers of a profile (:mod:`analysis.vtrain_fit`: the optimizer
step's bytes per parameter and the bookkeeping per call, from the step each row with one stage
and one data-parallel rank takes beyond its micro-batches; the host cost per op dispatched and
the bookkeeping per micro-batch stage pass, by least squares) to the rows of the layer counts
``--fit-layers`` only — a disjoint part of the table, as a user would fit their own cluster's
runs — and records in every fitted number's ``cite`` which rows it was fitted on; ``vtrain
--held-out-layers`` then reports the other rows apart.

``rl`` and ``rl-fit`` predict published RL steps of other people's runs and fit the production
stacks' own numbers on some of them (:mod:`analysis.published_rl` has both)::

    python -m analysis.published rl analysis/data/published/nemo_rl_v03_blog.csv --out DIR

``make-profile`` writes the profile of vTrain's cluster (:func:`analysis.vtrain.vtrain_profile`):
``--base`` (default ``a100-80g``) with vTrain's stated 150 GB/s intra-node and 800 Gb/s per node
inter-node figures and the trainer vTrain measured (Megatron-DeepSpeed's unfused attention,
vocab-parallel loss, contiguous gradient buffer and fused optimizer, :mod:`estimator.profile.trainer`),
the command recorded in its ``notes``.

Exit codes: 0 done (rows skipped, if any, listed); 2 invalid table (header, CSV, no row that
can be predicted), profile or option (one line).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from analysis import published_rl
from analysis.vtrain import DEFAULT_PROFILE, Skipped, VTrainRow, load_rows, load_table, row_experiment, vtrain_profile
from analysis.vtrain_fit import TERMS, fit_profile
from estimator.base.errors import ConfigError, cli_guard
from estimator.base.io import atomic_write_json, atomic_write_text, check_output_path
from estimator.base.progress import progress_bar
from estimator.base.tables import format_table
from estimator.cost.memory import GiB, plan_memory
from estimator.profile.profiles import PROFILE_DIR, Profile, load_profile, op_set
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Plan

ENGINES = ("evaluator", "simulator")


# ---- prediction ---------------------------------------------------------------------------

COMPONENTS = ("forward_s", "backward_s", "tp_comm_s", "dp_allreduce_s", "optimizer_s")


def components(experiment: Experiment, plan: Plan, profile: Profile) -> dict[str, float]:
    """What the busiest pipeline stage spends one iteration on, by kind of work: kernels of
    every micro-batch's forward and backward, their tensor-parallel collectives, the gradient
    all-reduce and the Adam step (the rest of an iteration is pipeline fill and drain, sends)."""
    from estimator.cost.lowering import Costs

    cc = Costs(experiment, profile).call("actor_train", plan["actor_train"])
    st = max(cc.stages, key=lambda s: s.fwd.total_s + s.bwd.total_s)
    m = cc.micro_batches
    return {"forward_s": m * st.fwd.compute_s, "backward_s": m * st.bwd.compute_s,
            "tp_comm_s": m * (st.fwd.comm_s + st.bwd.comm_s), "dp_allreduce_s": st.dp_allreduce_s,
            "optimizer_s": st.optimizer_s}


def predict_row(row: VTrainRow, profile: Profile, engine: str = "evaluator") -> dict[str, Any]:
    """Predicted iteration time, memory and the busiest stage's work (:func:`components`) of
    one row on ``profile``."""
    from estimator.sim.evaluator import Evaluator
    from estimator.sim.simulate import simulate

    experiment, plan, _ = row_experiment(row, profile.name)
    memory = plan_memory(experiment, plan, profile.capacity_bytes, profile.stack)
    if engine == "simulator":
        predicted = simulate(experiment, plan, profile, iterations=2).iteration_s
    else:
        predicted = Evaluator(experiment, profile, iterations=2).evaluate(plan).iteration_s
    ape = abs(predicted - row.measured_s) / row.measured_s
    return {"row": row.row, **row.config(), "micro_batches": row.micro_batches, "predicted_s": predicted,
            "measured_s": row.measured_s, "ape": ape, "fits": memory.feasible,
            "peak_memory_gib": memory.peak.peak_bytes / GiB,
            "model_params_billion": experiment.models["actor"].params / 1e9,
            **({"table_params_billion": row.params_billion} if row.params_billion is not None else {}),
            **components(experiment, plan, profile)}


def predict_table(rows: list[VTrainRow], profile: Profile, engine: str = "evaluator",
                  progress: bool = True) -> Any:  # -> pandas.DataFrame
    import pandas as pd

    it = progress_bar(rows, desc="vTrain rows", unit="row", disable=not progress)
    return pd.DataFrame([predict_row(r, profile, engine) for r in it])


def breakdown(df: Any, keys: list[str]) -> list[dict[str, Any]]:
    """MAPE, largest error and mean predicted/measured ratio per group of ``keys``."""
    g = df.assign(ratio=df.predicted_s / df.measured_s).groupby(keys)
    out = g.agg(n=("ape", "size"), mape=("ape", "mean"), max_ape=("ape", "max"), ratio=("ratio", "mean"))
    return [{**dict(zip(keys, (k if isinstance(k, tuple) else (k,)))), **{c: v for c, v in rec.items()}}
            for k, rec in zip(out.index, out.to_dict("records"))]


BREAKDOWNS = {"model": ["hidden", "layers"], "parallelism": ["tp", "pp", "dp"], "tp": ["tp"], "pp": ["pp"],
              "dp": ["dp"], "gpus": ["gpus"], "micro_batch": ["hidden", "micro_batch"]}


def summarize(df: Any, profile: Profile, engine: str, notes: dict[str, str], worst: int = 10) -> dict[str, Any]:
    from scipy.stats import spearmanr

    rho = float(spearmanr(df.predicted_s, df.measured_s).statistic) if len(df) > 1 else float("nan")
    unfit = df[~df.fits]
    return {
        "n": int(len(df)), "mape": float(df.ape.mean()), "median_ape": float(df.ape.median()),
        "max_ape": float(df.ape.max()), "spearman": rho,
        "mean_ratio": float((df.predicted_s / df.measured_s).mean()),
        "within_10pct": float((df.ape <= 0.10).mean()),
        "engine": engine, "profile": profile.name, "profile_source": profile.source,
        "trainer": profile.trainer.words(),
        "profile_path": _shown(profile.path),
        "op_set": {k: v for k, v in op_set(profile).items() if k != "text"},
        "model_features": notes,
        "predicted_share": {c: float((df[c] / df.predicted_s).mean()) for c in COMPONENTS},
        "not_fitting": int(len(unfit)), "not_fitting_rows": [int(r) for r in unfit.row],
        "worst": df.nlargest(worst, "ape").to_dict("records"),
        "breakdown": {name: breakdown(df, keys) for name, keys in BREAKDOWNS.items()},
    }


def _shown(path: str) -> str:
    """``path`` relative to the repository when inside it (so committed summaries hold no
    machine's absolute paths)."""
    root = PROFILE_DIR.parent.parent
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(summary: dict[str, Any]) -> str:
    s = summary
    lines = [f"{s['n']} rows on profile {s['profile']} ({s['profile_source']}), {s['engine']}; priced for "
             f"{s['op_set']['stack']} (compute.ops={s['op_set']['ops']})",
             f"trainer: {s['trainer']}",
             f"MAPE {_pct(s['mape'])}   median {_pct(s['median_ape'])}   max {_pct(s['max_ape'])}   "
             f"Spearman {s['spearman']:.3f}   predicted/measured {s['mean_ratio']:.3f}   "
             f"within 10 %: {_pct(s['within_10pct'])}",
             f"predicted not to fit in memory: {s['not_fitting']} rows"
             + (f" ({s['not_fitting_rows'][:20]})" if s["not_fitting"] else ""),
             f"skipped (cannot be expressed): {len(s.get('skipped', []))} rows",
             *[f"  row {k['row']}: {k['reason']}" for k in s.get("skipped", [])],
             *[f"{name.replace('_', '-')} rows (layers {p['layers']}): n {p['n']}, MAPE {_pct(p['mape'])}, "
               f"median {_pct(p['median_ape'])}, max {_pct(p['max_ape'])}, Spearman {p['spearman']:.3f}; "
               + "; ".join(", ".join(f"{k} {b[k]} {_pct(b['mape'])}" for b in p[f"by_{k}"]) for k in ("tp", "pp"))
               for name, p in s.get("parts", {}).items() if p["n"]], "",
             "busiest stage's share of the predicted time: " + ", ".join(
                 f"{k.removesuffix('_s')} {_pct(v)}" for k, v in s["predicted_share"].items()),
             "model features: " + "; ".join(f"{k}: {v}" for k, v in s["model_features"].items()), ""]
    cols = ("row", "gpus", "global_batch", "micro_batch", "hidden", "layers", "tp", "dp", "pp")
    rows = [(*cols, "predicted ms", "measured ms", "error")]
    rows += [(*(str(w[c]) for c in cols), f"{1e3 * w['predicted_s']:.1f}", f"{1e3 * w['measured_s']:.1f}",
              _pct(w["ape"])) for w in s["worst"]]
    lines += ["worst rows:", format_table(rows, right=set(range(len(rows[0])))), ""]
    for name in ("model", "parallelism", "micro_batch"):
        keys = BREAKDOWNS[name]
        table = [(*keys, "n", "MAPE", "max", "pred/meas")]
        table += [(*(str(b[k]) for k in keys), str(b["n"]), _pct(b["mape"]), _pct(b["max_ape"]), f"{b['ratio']:.3f}")
                  for b in s["breakdown"][name]]
        lines += [f"by {name}:", format_table(table, right=set(range(len(table[0])))), ""]
    return "\n".join(lines).rstrip()


MARKERS = "os^Dvp*hX"  # one per pipeline degree, in increasing order


def scatter(df: Any, out: Path, title: str) -> Path:
    """Predicted (y) against measured (x) iteration time per row, coloured by tensor-parallel
    degree and shaped by pipeline degree, with y = x, ±10 % bands and plain-number log ticks
    (the validation scatter's convention, :func:`analysis.plot.scatter`); written atomically."""
    from matplotlib.lines import Line2D

    from analysis.plot import _save, log_ticks, plt

    fig, ax = plt.subplots(figsize=(6.4, 6.2))
    tps, pps = sorted(df.tp.unique()), sorted(df.pp.unique())
    colour = {tp: plt.cm.tab10(i % 10) for i, tp in enumerate(tps)}
    marker = {pp: MARKERS[i % len(MARKERS)] for i, pp in enumerate(pps)}
    for (tp, pp), g in df.groupby(["tp", "pp"]):
        ax.scatter(1e3 * g.measured_s, 1e3 * g.predicted_s, s=11, alpha=0.7, color=colour[tp], marker=marker[pp])
    lo = 0.8 * 1e3 * min(df.measured_s.min(), df.predicted_s.min())
    hi = 1.25 * 1e3 * max(df.measured_s.max(), df.predicted_s.max())
    xs = [lo, hi]
    ax.plot(xs, xs, color="black", lw=1)
    ax.fill_between(xs, [0.9 * x for x in xs], [1.1 * x for x in xs], color="grey", alpha=0.2)
    ax.set(xscale="log", yscale="log", xlim=xs, ylim=xs, xlabel="measured iteration time (ms), vTrain's table",
           ylabel="predicted iteration time (ms)")
    log_ticks(ax, lo, hi)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.grid(which="minor", alpha=0.12)
    handles = ([Line2D([], [], ls="", marker="o", color=colour[tp], label=f"tp {tp}") for tp in tps]
               + [Line2D([], [], ls="", marker=marker[pp], color="dimgrey", label=f"pp {pp}") for pp in pps]
               + [Line2D([], [], color="black", lw=1, label="y = x"),
                  plt.Rectangle((0, 0), 1, 1, color="grey", alpha=0.2, label="±10 %")])
    ax.legend(handles=handles, fontsize=7, loc="upper left", ncol=2)
    return _save(fig, out)


def scatter_title(table: str, rows: int, profile: Profile, summary: dict[str, Any],
                  gpus: tuple[int, int] = (1, 8)) -> str:
    """Experiment (the table, its runs' GPU counts), plan (one SFT train call per row, on the
    row's layout) and profile, with the headline errors."""
    where = "one-node" if gpus[1] <= 8 else f"{gpus[0]}–{gpus[1]}-GPU"
    trainer = f"; trainer {profile.trainer.name}" if profile.trainer.departs else ""
    return (f"vTrain {Path(table).name}: {rows:,} {where} A100 runs, each one SFT train call on its row's "
            f"tp/pp/dp\nprofile {profile.name} ({op_set(profile)['stack']}{trainer})\n"
            f"MAPE {_pct(summary['mape'])}, Spearman {summary['spearman']:.3f}; measured (x) vs predicted (y)")


# ---- the commands ------------------------------------------------------------------------


def make_profile(args: argparse.Namespace) -> int:
    from estimator.profile.profiles import profile_from_dict

    out = check_output_path(args.out if args.out is not None else PROFILE_DIR / f"{args.name}.json", "--out")
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



def _layers(text: str, flag: str) -> set[int]:
    try:
        out = {int(v) for v in text.split(",") if v.strip()}
    except ValueError:
        raise ConfigError(f"{flag}={text!r} must be layer counts separated by commas, e.g. 12,20") from None
    if not out or min(out) < 1:
        raise ConfigError(f"{flag}={text!r} must name at least one positive layer count")
    return out


def run_fit(args: argparse.Namespace) -> int:
    out = check_output_path(args.out if args.out is not None else PROFILE_DIR / f"{args.name}.json", "--out")
    base = load_profile(args.base, key="--base")
    rows = load_table(args.table)
    layers = _layers(args.fit_layers, "--fit-layers")
    fit_rows = [r for r in rows if r.layers in layers]
    if not fit_rows:
        raise ConfigError(f"--fit-layers={args.fit_layers}: no row of {args.table} has those layer counts "
                          f"(the table has {sorted({r.layers for r in rows})})")
    command = (f"python -m analysis.published fit-profile {args.table} --base {args.base} --name {args.name} "
               f"--fit-layers {args.fit_layers}")
    cite = (f"fitted by `{command}` on the {len(fit_rows)} rows with {sorted(layers)} layers; "
            f"rows of other layer counts are held out")
    doc, result = fit_profile(fit_rows, base, args.name, cite, _predicted, progress=not args.json)
    fitted = [k for k in TERMS if k in result]
    doc["notes"] = f"{base.name} with {len(fitted)} numbers {cite}: " + ", ".join(
        f"{k} {result[k]:.4g}" for k in fitted)
    from estimator.profile.profiles import profile_from_dict

    profile_from_dict(doc, where=f"profile {out}")
    atomic_write_text(out, json.dumps(doc, indent=2) + "\n", "--out")
    result.update(profile=str(out), fit_layers=sorted(layers))
    print(json.dumps(result, indent=2) if args.json else
          f"wrote {out}: " + ", ".join(f"{k} {result[k]:.4g}" for k in fitted)
          + f" (fit on {result['fit_rows']} rows, MAPE there {_pct(result['fit_mape'])}, "
            f"{result['evaluations']} evaluations)")
    return 0


def _predicted(rows: list[VTrainRow], profile: Profile) -> Any:  # -> numpy array
    return predict_table(rows, profile, progress=False)["predicted_s"].to_numpy()


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


def _part(df: Any) -> dict[str, Any]:
    from scipy.stats import spearmanr

    if df.empty:
        return {"n": 0}
    rho = float(spearmanr(df.predicted_s, df.measured_s).statistic) if len(df) > 1 else float("nan")
    return {"n": int(len(df)), "mape": float(df.ape.mean()), "median_ape": float(df.ape.median()),
            "max_ape": float(df.ape.max()), "spearman": rho, "layers": sorted(int(v) for v in df.layers.unique()),
            "by_tp": breakdown(df, ["tp"]), "by_pp": breakdown(df, ["pp"])}


def expressible(rows: list[VTrainRow], skipped: list[Skipped], profile: Profile
                ) -> tuple[list[VTrainRow], list[Skipped], dict[str, str]]:
    """The rows that map to a valid experiment and plan, the rows skipped (those that did not
    parse, then those the plan rules refuse, each with its reason, in row order) and the
    model-feature notes of the first row mapped."""
    keep, notes = [], {}
    skipped = list(skipped)
    for r in rows:
        try:
            row_notes = row_experiment(r, profile.name)[2]
        except ConfigError as exc:
            skipped.append(Skipped(r.row, str(exc).removeprefix(f"row {r.row}: ")))
            continue
        notes = notes or row_notes
        keep.append(r)
    return keep, sorted(skipped, key=lambda s: s.row), notes


def run_vtrain(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.profile, key="--profile")
    except ConfigError as exc:
        hint = (f" (make it with: python -m analysis.published make-profile --base a100-80g --name {args.profile})"
                if args.profile == DEFAULT_PROFILE else "")
        raise ConfigError(f"{exc}{hint}") from None
    rows, skipped, notes = expressible(*load_rows(args.table), profile)
    if not rows:
        raise ConfigError(f"{args.table}: no row can be predicted; " + "; ".join(
            f"row {s.row}: {s.reason}" for s in skipped[:3]) + (" …" if len(skipped) > 3 else ""))
    out = _out_dir(args.out) / "summary.json" if args.out else None
    df = predict_table(rows, profile, args.engine, progress=not args.json)
    summary = {"table": str(args.table), **summarize(df, profile, args.engine, notes),
               "skipped": [s.to_dict() for s in skipped]}
    if args.held_out_layers:
        held = df.layers.isin(_layers(args.held_out_layers, "--held-out-layers"))
        summary["parts"] = {name: _part(df[mask]) for name, mask in (("held_out", held), ("fitted", ~held))}
    if out is not None:
        atomic_write_text(out.parent / "predictions.csv", df.to_csv(index=False, float_format="%.6g"))
        scatter(df, out.parent / "scatter.png", scatter_title(args.table, len(df), profile, summary,
                                                              (int(df.gpus.min()), int(df.gpus.max()))))
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
    v.add_argument("--held-out-layers", help="also report the rows of these layer counts (e.g. 16,24: those a "
                                             "fit-profile run held out) and the others apart")
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
    f = sub.add_parser("fit-profile", help="fit a profile's optimizer bytes per parameter, per-call and "
                                           "per-micro-batch bookkeeping and host cost per op to the rows of some "
                                           "layer counts, holding the rest out")
    f.add_argument("table", help="CSV in vTrain's column format")
    f.add_argument("--base", default=DEFAULT_PROFILE, help=f"profile to start from (default {DEFAULT_PROFILE})")
    f.add_argument("--name", required=True, help="name of the fitted profile")
    f.add_argument("--fit-layers", required=True, help="layer counts whose rows are fitted, e.g. 12,20")
    f.add_argument("--out", help="profile file to write (default calibration/profiles/<name>.json)")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    published_rl.add_parsers(sub)  # rl, rl-fit: published RL steps (analysis/published_rl.py)
    return ap


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command in published_rl.COMMANDS:
        return published_rl.COMMANDS[args.command](args)
    if args.command == "make-profile":
        for flag, value in (("--intra-GBps", args.intra_GBps), ("--inter-Gbps", args.inter_Gbps)):
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{flag}={value:g} must be a positive number")
        return make_profile(args)
    if args.command == "fit-profile":
        return run_fit(args)
    return run_vtrain(args)


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
