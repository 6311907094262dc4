"""Pictures of timelines and of predicted against measured (matplotlib, Agg: no display needed).

Usage::

    python -m estimator.predict examples/ppo-tiny-2xcpu.yaml --plan examples/plans/ppo-tiny-2xcpu/pp2.json \\
        --trace predicted.json
    python -m analysis.plot predicted.json --out predicted.png
    python -m executor.run examples/ppo-tiny-2xcpu.yaml --plan examples/plans/ppo-tiny-2xcpu/pp2.json \\
        --timeline measured.json
    python -m analysis.plot measured.json --out measured.png --iterations 1

The input is a Chrome trace (``--trace`` of ``estimator.predict`` or ``executor.run``) or a
timeline (``--timeline``, ``rlhf-plan/timeline-v1``). :func:`gantt` draws one row per device
(one per pipeline stage's first device above 16 devices), compute coloured by call with the
same colour for a call in every figure (:func:`call_color`), reallocation hatched, and
communication and data movement in a thin lane under each row; spans that occupy only a link
get rows of their own at the bottom. The validation figures: :func:`scatter` (predicted against
measured iteration times, y = x and ±10 % bands), :func:`error_bars` (per call and per op kind)
and :func:`stacked` (a plan's predicted and measured timelines on one time axis).
"""

from __future__ import annotations

import argparse
import sys
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

from analysis.compare import KIND_ORDER  # noqa: E402
from estimator import rules  # noqa: E402
from estimator.errors import ConfigError, cli_guard  # noqa: E402
from estimator.io import check_output_dir, check_output_path  # noqa: E402
from estimator.loading import MAX_DATA_BYTES, load_json  # noqa: E402
from estimator.timeline import TIMELINE_FORMAT, Span, Timeline, check_source, span_from_dict  # noqa: E402

PER_DEVICE_MAX = 16  # above this many devices, one row per pipeline stage
COMM_OPS = {"tp_allreduce", "dp_allreduce", "pp_send", "data"}
WRAPPERS = {"call", "compute"}
DPI = 130
HATCH = "0.3"  # hatch lines of communication (no outline: dense traffic would turn black)


@cache
def _known_calls() -> tuple[str, ...]:
    """Every call name of the workflow presets, in a fixed order: each gets its own colour."""
    from estimator.workflow import ALGORITHMS, WorkflowParams, build

    names: dict[str, None] = {}
    for algo in ALGORITHMS:
        names.update(dict.fromkeys(build(algo, WorkflowParams(2, 2, 2)).call_names))
    return tuple(names)


def call_color(call: str) -> Any:
    """The call's colour, the same in every figure: preset calls by their fixed index, other
    names by a hash of the name."""
    known = _known_calls()
    if call in known:
        return plt.get_cmap("tab10" if len(known) <= 10 else "tab20")(known.index(call))
    return plt.get_cmap("tab20b")(zlib.crc32(call.encode()) % 20)


# ---- reading -------------------------------------------------------------------------------------


def from_chrome_trace(data: dict[str, Any], where: str = "trace") -> Timeline:
    """The timeline a :meth:`Timeline.chrome_trace` document was made from, every event checked:
    a complete event ("ph": "X") has a ``ts`` and optional ``dur`` in microseconds (finite, not
    negative), a name, and ``args`` with the span's device, iteration, micro-batch and stage."""
    events = data.get("traceEvents")
    if not isinstance(events, list):
        raise ConfigError(f"{where}: no traceEvents list; expected a Chrome trace or a {TIMELINE_FORMAT} file")
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            raise ConfigError(f"{where}: traceEvents[{i}]={e!r:.60} must be an object")
        if not isinstance(e.get("tid", 0), (int, str)) or isinstance(e.get("tid"), bool):
            raise ConfigError(f"{where}: traceEvents[{i}].tid={e['tid']!r:.60} must be an integer or a name")
        if not isinstance(e.get("args", {}), dict):
            raise ConfigError(f"{where}: traceEvents[{i}].args={e['args']!r:.60} must be an object")
    tracks = {}
    for i, e in enumerate(events):
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            name = e.get("args", {}).get("name")
            if not isinstance(name, str):
                raise ConfigError(f"{where}: traceEvents[{i}].args.name={name!r:.60} must name the track")
            tracks[e.get("tid")] = name
    spans = []
    for i, e in enumerate(events):
        if e.get("ph") == "X":
            spans.append(_event_span(e, tracks, f"{where}: traceEvents[{i}]"))
    other = data.get("otherData") or {}
    if not isinstance(other, dict):
        raise ConfigError(f"{where}: otherData={other!r:.60} must be an object")
    other = dict(other)
    return Timeline(tuple(spans), check_source(other.pop("source", "predicted"), where), other or None)


def _event_span(e: dict[str, Any], tracks: dict[Any, str], where: str) -> Span:
    """One complete event as a span (:func:`estimator.timeline.span_from_dict` checks it)."""
    if "ts" not in e:
        raise ConfigError(f"{where}: a complete event needs ts (its start in microseconds)")
    ts = rules.real(f"{where}.ts", e["ts"], lo=0.0)
    dur = rules.real(f"{where}.dur", e.get("dur", 0.0), lo=0.0)
    name = e.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name={name!r:.60} must be a string (call:op)")
    call, _, op = name.partition(":")
    args, track = e.get("args", {}), tracks.get(e.get("tid"), "")
    raw = {"start_s": ts / 1e6, "end_s": ts / 1e6 + dur / 1e6, "call": call, "op": op or "span",
           "device": args.get("device", -1), "iteration": args.get("iteration", 0),
           "micro_batch": args.get("micro_batch", -1), "stage": args.get("stage", -1),
           "resource": "" if track.startswith("device ") else track}
    return span_from_dict(raw, where)


def load_any(path: str | Path) -> Timeline:
    """A timeline file or a Chrome trace file, read strictly (:mod:`estimator.loading`)."""
    data = load_json(path, "timeline or trace", expect=dict, max_bytes=MAX_DATA_BYTES)
    where = f"timeline or trace {str(path)!r}"
    if data.get("format") == TIMELINE_FORMAT:
        return Timeline.from_dict(data, where=where)
    return from_chrome_trace(data, where=where)


# ---- Gantt ---------------------------------------------------------------------------------------


def _rows(tl: Timeline, iterations: int | None) -> pd.DataFrame:
    df = tl.to_dataframe()
    if iterations is not None and not df.empty:
        df = df[df["iteration"] >= df["iteration"].max() - iterations + 1]
    if df["device"].nunique() > PER_DEVICE_MAX:
        # a stage's devices run in lock step: keep the first device of each repeated span
        keys = ["iteration", "call", "op", "micro_batch", "stage", "start_s", "end_s", "resource"]
        df = df.sort_values("device").drop_duplicates(keys)
    return df


def gantt(tl: Timeline, ax: Axes, iterations: int | None = None, title: str | None = None,
          legend: bool = True) -> Axes:
    """Draw ``tl`` (its last ``iterations`` iterations, default all) on ``ax``."""
    df = _rows(tl, iterations)
    devices = sorted(d for d in df["device"].unique() if d >= 0)
    links = sorted({r.split(" ")[0] for r in df.loc[df["device"] < 0, "resource"]})
    ys = {d: i for i, d in enumerate(devices)}
    link_y = {name: len(devices) + i * 0.5 for i, name in enumerate(links)}
    for (device, call, op, resource), g in df.groupby(["device", "call", "op", "resource"], sort=True):
        bars = list(zip(g["start_s"], g["duration_s"]))
        color = call_color(call)
        if device < 0:
            ax.broken_barh(bars, (link_y[resource.split(" ")[0]] - 0.15, 0.3), facecolors=color,
                           edgecolor=HATCH, linewidth=0, hatch="xx")
        elif op in WRAPPERS:
            if op == "compute":  # the executor's whole compute window, faint behind its ops
                ax.broken_barh(bars, (ys[device] - 0.3, 0.6), facecolors=color, alpha=0.18, linewidth=0)
        elif op in COMM_OPS:
            ax.broken_barh(bars, (ys[device] + 0.3, 0.15), facecolors=color, edgecolor=HATCH,
                           linewidth=0, hatch="xx")
        elif op == "realloc":
            ax.broken_barh(bars, (ys[device] - 0.3, 0.6), facecolors="white", edgecolor=color, linewidth=0.8,
                           hatch="////")
        else:
            ax.broken_barh(bars, (ys[device] - 0.3, 0.6), facecolors=color, linewidth=0)
    per = "device" if df["device"].nunique() <= PER_DEVICE_MAX else "stage (first device)"
    ax.set_yticks(list(ys.values()) + list(link_y.values()),
                  [f"dev {d}" for d in devices] + [f"link: {n}" for n in links])
    ax.set_ylim(max([len(devices) - 0.4] + [y + 0.4 for y in link_y.values()]), -0.6)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(per)
    ax.set_xlim(left=df["start_s"].min() if not df.empty else 0.0)
    ax.set_title(title or _title(tl), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if legend:
        handles = [Patch(color=call_color(c), label=c) for c in _call_order(df["call"])]
        handles += [Patch(facecolor="white", edgecolor="grey", hatch="////", label="reallocation"),
                    Patch(facecolor="lightgrey", edgecolor=HATCH, hatch="xx", label="communication / data")]
        if (df["op"] == "compute").any():
            handles.append(Patch(color="grey", alpha=0.18, label="compute window"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return ax


def _call_order(calls: pd.Series) -> list[str]:
    """Preset calls in their workflow order, then the others by name: the same legend every time."""
    known = _known_calls()
    return sorted(set(calls), key=lambda c: (known.index(c) if c in known else len(known), c))


def _title(tl: Timeline) -> str:
    meta = tl.meta or {}
    what = meta.get("experiment") or meta.get("profile") or ""
    return f"{tl.source} timeline" + (f" — {what}" if what else "")


def check_figure_path(path: str | Path, what: str) -> Path:
    """A figure file can be written at ``path``: its directory exists (or can be created, as
    :func:`_save` does) and ``path`` is no directory (:mod:`estimator.io`'s rules)."""
    parent = Path(path).parent
    check_output_dir(parent, what)
    return check_output_path(path, what) if parent.is_dir() else Path(path)


def _save(fig: Any, out: str | Path) -> Path:
    """Write atomically (temp file + rename), as every result file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out


def _height(tl: Timeline) -> float:
    df = _rows(tl, None)
    links = {r.split(" ")[0] for r in df.loc[df["device"] < 0, "resource"]}
    return 1.4 + 0.5 * df.loc[df["device"] >= 0, "device"].nunique() + 0.3 * len(links)


def write_gantt(tl: Timeline, out: str | Path, iterations: int | None = None, title: str | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(12, _height(tl)))
    gantt(tl, ax, iterations, title)
    return _save(fig, out)


def stacked(predicted: Timeline, measured: Timeline, out: str | Path, title: str = "",
            iterations: int | None = None) -> Path:
    """One plan's predicted timeline above its measured one, on one time axis from 0."""
    heights = [_height(predicted), _height(measured)]
    fig, axes = plt.subplots(2, 1, figsize=(12, sum(heights)), sharex=True, height_ratios=heights)
    gantt(predicted, axes[0], iterations, f"predicted {title}".strip())
    gantt(measured, axes[1], iterations, f"measured {title}".strip())
    axes[0].set_xlabel("")
    axes[0].set_xlim(0.0, 1.02 * max(predicted.makespan_s, measured.makespan_s))
    return _save(fig, out)


# ---- validation figures -------------------------------------------------------------------------


def scatter(plans: pd.DataFrame, out: str | Path, title: str = "") -> Path:
    """Measured against predicted iteration time per plan (bars: min..max over runs), y = x, ±10 %."""
    df = plans.dropna(subset=["predicted_s", "measured_s"])
    if df.empty:
        raise ValueError("scatter: no plan with both a predicted and a measured time")
    fig, ax = plt.subplots(figsize=(6.5, 6))
    lo = min(df["predicted_s"].min(), df["measured_min_s"].min()) * 0.8
    hi = max(df["predicted_s"].max(), df["measured_max_s"].max()) * 1.25
    xs = pd.Series([lo, hi])
    ax.plot(xs, xs, color="black", linewidth=1, label="y = x")
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="tab:green", alpha=0.15, label="±10 %")
    yerr = [df["measured_s"] - df["measured_min_s"], df["measured_max_s"] - df["measured_s"]]
    ax.errorbar(df["predicted_s"], df["measured_s"], yerr=yerr, fmt="o", color="tab:blue", capsize=3,
                label="plan (median, min–max over runs)")
    if len(df) <= 30:
        for _, r in df.iterrows():
            ax.annotate(str(r["plan"]), (r["predicted_s"], r["measured_s"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    values = pd.concat([df["predicted_s"], df["measured_s"]])
    if values.max() / values.min() > 10:  # plans a decade apart: log axes, plain-number ticks
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())  # labelled minor ticks would overlap
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted iteration time (s)")
    ax.set_ylabel("measured iteration time (s)")
    ax.set_title(title or "predicted vs measured iteration time", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def _bars(ax: Axes, df: pd.DataFrame, by: str, what: str) -> None:
    known = df.dropna(subset=["ape"])
    if known.empty:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"error per {what}", fontsize=10)
        return
    g = known.groupby(by, sort=False)
    med, top = 100 * g["ape"].median(), 100 * g["ape"].max()
    beyond = 100 * g["ape_beyond_spread"].median()
    if by == "kind":  # op kinds in the pipeline's order, not the order they were met
        order = [k for k in KIND_ORDER if k in med.index]
        med, top, beyond = med[order], top[order], beyond[order]
    x = range(len(med))
    ax.bar([i - 0.2 for i in x], med, width=0.4, yerr=[[0] * len(med), top - med], capsize=3,
           color=[call_color(k) if by == "call" else "tab:blue" for k in med.index], label="median |error| (bar: max)")
    ax.bar([i + 0.2 for i in x], beyond, width=0.4, color="white", edgecolor="black", hatch="///",
           label="median beyond the runs' spread")
    ax.axhline(10, color="tab:red", linewidth=0.8, linestyle="--", label="10 %")
    ax.set_xticks(list(x), list(med.index), rotation=30, ha="right")
    ax.set_ylabel("absolute error (%)")
    ax.set_title(f"error per {what} ({len(known)} values)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def error_bars(calls: pd.DataFrame, ops: pd.DataFrame, out: str | Path) -> Path:
    """Median and max absolute percentage error per call and per op kind, over all plans."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    _bars(axes[0], calls, "call", "call")
    _bars(axes[1], ops, "kind", "op kind")
    fig.tight_layout()
    return _save(fig, out)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("timeline", help="a Chrome trace (--trace) or timeline (--timeline) JSON file")
    ap.add_argument("--out", help="PNG to write (default: the input's name with .png)")
    ap.add_argument("--iterations", type=int, help="draw only the last N iterations")
    ap.add_argument("--title", help="figure title")
    return ap


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.iterations is not None:
        rules.integer("--iterations", args.iterations, lo=1)
    if args.out is not None:
        check_figure_path(args.out, "--out")
    tl = load_any(args.timeline)
    if not tl.spans:
        raise ConfigError(f"{args.timeline}: the timeline has no spans to draw")
    out = args.out if args.out is not None else check_figure_path(Path(args.timeline).with_suffix(".png"), "figure")
    out = write_gantt(tl, out, args.iterations, args.title)
    print(f"wrote {out} ({len(tl.spans)} spans, {len(tl.iterations)} iterations, {tl.source})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
