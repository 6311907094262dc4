"""Pictures of timelines and of predicted against measured (matplotlib, Agg: no display needed).

Usage::

    python -m estimator.predict examples/ppo-tiny-2xcpu.yaml --plan examples/plans/ppo-tiny-2xcpu/pp2.json \\
        --trace predicted.json
    python -m analysis.plot predicted.json --out predicted.png
    python -m executor.run examples/ppo-tiny-2xcpu.yaml --plan examples/plans/ppo-tiny-2xcpu/pp2.json \\
        --timeline measured.json
    python -m analysis.plot measured.json --out measured.png --iterations 1

The input is a Chrome trace (``--trace`` of ``estimator.predict`` or ``executor.run``) or a
timeline (``--timeline``, ``rlhf-plan/timeline-v1``). :func:`gantt` draws one row per device;
above 16 devices one row per group of devices that run the same pipeline stages of the same
calls (from the plan the timeline records: :func:`device_groups`), each stage's spans on
every row its devices make up, so a call on 32 devices shows on all of them; compute coloured by call with the
same colour for a call in every figure (:func:`call_color`), reallocation hatched, and
communication and data movement in a thin lane under each row; spans that occupy only a link
get rows of their own at the bottom. The validation figures: :func:`scatter` (measured on x,
predicted on y — as :mod:`analysis.published` draws them — with y = x and ±10 % bands),
:func:`error_bars` (per call and per op kind) and :func:`stacked` (a plan's predicted and
measured timelines on one time axis).
"""

from __future__ import annotations

import argparse
import sys
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

from analysis.compare import KIND_ORDER  # noqa: E402
from estimator.base import rules  # noqa: E402
from estimator.base.errors import ConfigError, cli_guard  # noqa: E402
from estimator.base.io import check_output_dir, check_output_path  # noqa: E402
from estimator.base.loading import MAX_DATA_BYTES, load_json  # noqa: E402
from estimator.spec.cluster import DeviceMesh  # noqa: E402
from estimator.spec.timeline import TIMELINE_FORMAT, Span, Timeline, check_source, span_from_dict  # noqa: E402

PER_DEVICE_MAX = 16  # above this many devices, one row per group of devices running the same stages
COMM_OPS = {"tp_allreduce", "dp_allreduce", "dp_reduce_scatter", "dp_allgather", "dp_shard_comm", "pp_send", "data",
            "offload"}
WRAPPERS = {"call", "compute"}
DPI = 130
HATCH = "0.3"  # hatch lines of communication (no outline: dense traffic would turn black)


@cache
def _known_calls() -> tuple[str, ...]:
    """Every call name of the workflow presets, in a fixed order: each gets its own colour."""
    from estimator.spec.workflow import ALGORITHMS, GENERATING, WorkflowParams, build

    names: dict[str, None] = {}
    for algo in ALGORITHMS:
        names.update(dict.fromkeys(build(algo, WorkflowParams(2, 2, 2)).call_names))
    for algo in GENERATING:  # calls an option adds (actor_inf) come after, so the others keep their colours
        names.update(dict.fromkeys(build(algo, WorkflowParams(2, 2, 2, old_logprobs="recompute")).call_names))
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
    """One complete event as a span (:func:`estimator.spec.timeline.span_from_dict` checks it)."""
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
    """A timeline file or a Chrome trace file, read strictly (:mod:`estimator.base.loading`)."""
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
    return df


def stage_ranges(tl: Timeline) -> dict[tuple[str, int], range]:
    """(call, pipeline stage) → its devices, from the plan in the timeline's metadata (the
    simulator and the executor record it); empty when there is none."""
    plan = (tl.meta or {}).get("plan")
    out: dict[tuple[str, int], range] = {}
    if not isinstance(plan, dict):
        return out
    for call, lay in plan.items():
        try:
            mesh = DeviceMesh.parse(lay["mesh"])
            block, pp = int(lay["dp"]) * int(lay["tp"]), int(lay["pp"])
        except (KeyError, TypeError, ValueError):  # ConfigError is a ValueError
            return {}
        for k in range(pp):
            out[(str(call), k)] = range(mesh.first + k * block, mesh.first + (k + 1) * block)
    return out


def _compressed(tl: Timeline) -> bool:
    """Whether the timeline keeps one device per pipeline stage (a large predicted cluster)."""
    return (tl.meta or {}).get("spans") == "one device per pipeline stage"


def device_groups(tl: Timeline, devices: set[int]) -> list[range]:
    """The chart's rows of devices: one per device up to :data:`PER_DEVICE_MAX` devices;
    beyond, one per group of devices that run the same pipeline stages of the same calls (the
    finest split of the plan's stage ranges), so a call on 32 devices is drawn on every row
    those devices make up; without the plan, one row per device that has spans."""
    ranges = stage_ranges(tl)
    covered = {d for r in ranges.values() for d in r}
    everything = devices | covered
    if not ranges or (len(everything) <= PER_DEVICE_MAX and not _compressed(tl)):
        return [range(d, d + 1) for d in sorted(devices)]
    cuts = {r.start for r in ranges.values()} | {r.stop for r in ranges.values()}
    for d in everything - covered:
        cuts |= {d, d + 1}
    bounds = sorted(cuts)
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if any(d in everything for d in range(a, b))]


def _place(tl: Timeline, df: pd.DataFrame, groups: list[range]) -> pd.DataFrame:
    """The device spans of ``df`` with a ``row`` column: the index of each group the span's
    device stands for — in a timeline with one device per stage, every group of the stage's
    devices; otherwise the group of the span's device, drawn from its first device only (the
    others run the same ops)."""
    spans = df[df["device"] >= 0]
    if all(len(g) == 1 for g in groups):
        index = {g.start: i for i, g in enumerate(groups)}
        return spans.assign(row=spans["device"].map(index))
    ranges = stage_ranges(tl)
    compressed = _compressed(tl)
    of_device = {d: i for i, g in enumerate(groups) for d in g}

    def rows(device: int, call: str, stage: int) -> list[int]:
        if not compressed:
            i = of_device[device]
            return [i] if groups[i].start == device else []
        rng = ranges.get((call, stage)) if stage >= 0 else None
        if rng is None or device not in rng:
            rng = next((r for (c, _), r in ranges.items() if c == call and device in r), range(device, device + 1))
        return [i for i, g in enumerate(groups) if g.start >= rng.start and g.stop <= rng.stop]

    keys = list(zip(spans["device"], spans["call"], spans["stage"]))
    memo = {k: rows(*k) for k in set(keys)}
    return spans.assign(row=[memo[k] for k in keys]).explode("row").dropna(subset=["row"]).astype({"row": int})


def _group_label(g: range) -> str:
    return f"dev {g.start}" if len(g) == 1 else f"dev {g.start}-{g.stop - 1} ({len(g)})"


def gantt(tl: Timeline, ax: Axes, iterations: int | None = None, title: str | None = None,
          legend: bool = True) -> Axes:
    """Draw ``tl`` (its last ``iterations`` iterations, default all) on ``ax``."""
    df = _rows(tl, iterations)
    groups = device_groups(tl, {int(d) for d in df.loc[df["device"] >= 0, "device"].unique()})
    placed = _place(tl, df, groups)
    links = sorted({r.split(" ")[0] for r in df.loc[df["device"] < 0, "resource"]})
    link_y = {name: len(groups) + i * 0.5 for i, name in enumerate(links)}
    for (row, call, op), g in placed.groupby(["row", "call", "op"], sort=True):
        bars = list(zip(g["start_s"], g["duration_s"]))
        color = call_color(call)
        if op in WRAPPERS:
            if op == "compute":  # the executor's whole compute window, faint behind its ops
                ax.broken_barh(bars, (row - 0.3, 0.6), facecolors=color, alpha=0.18, linewidth=0)
        elif op in COMM_OPS:
            ax.broken_barh(bars, (row + 0.3, 0.15), facecolors=color, edgecolor=HATCH, linewidth=0, hatch="xx")
        elif op == "realloc":
            ax.broken_barh(bars, (row - 0.3, 0.6), facecolors="white", edgecolor=color, linewidth=0.8, hatch="////")
        else:
            ax.broken_barh(bars, (row - 0.3, 0.6), facecolors=color, linewidth=0)
    for (resource, call), g in df[df["device"] < 0].groupby(["resource", "call"], sort=True):
        ax.broken_barh(list(zip(g["start_s"], g["duration_s"])), (link_y[resource.split(" ")[0]] - 0.15, 0.3),
                       facecolors=call_color(call), edgecolor=HATCH, linewidth=0, hatch="xx")
    grouped = any(len(g) > 1 for g in groups)
    ax.set_yticks(list(range(len(groups))) + list(link_y.values()),
                  [_group_label(g) for g in groups] + [f"link: {n}" for n in links],
                  fontsize=None if len(groups) <= PER_DEVICE_MAX else 7)
    ax.set_ylim(max([len(groups) - 0.4] + [y + 0.4 for y in link_y.values()]), -0.6)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("device group (same stages)" if grouped else "device")
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
    :func:`_save` does) and ``path`` is no directory (:mod:`estimator.base.io`'s rules)."""
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
    groups = device_groups(tl, {int(d) for d in df.loc[df["device"] >= 0, "device"].unique()})
    per_row = 0.5 if len(groups) <= PER_DEVICE_MAX else 0.25  # many ungrouped devices: thin rows
    return 1.4 + per_row * len(groups) + 0.3 * len(links)


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


def running_curves(tl: Timeline, call: str, iteration: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per device that recorded it, the running batch of ``call`` in ``iteration`` as a step
    function: (times from the call's start, requests running from then on)."""
    out: dict[int, tuple[list[float], list[float]]] = {}
    samples = [c for c in tl.counters if c.call == call and c.iteration == iteration and c.name == "running"]
    if not samples:
        return {}
    start = min(c.t_s for c in samples)
    for c in samples:
        ts, vs = out.setdefault(c.device, ([], []))
        ts.append(c.t_s - start)
        vs.append(c.value)
    return {d: (np.array(ts), np.array(vs)) for d, (ts, vs) in out.items()}


def running_batch(predicted: Timeline, measured: Timeline, call: str, iteration: int, out: str | Path,
                  title: str = "") -> Path | None:
    """A generate call's running batch over time, predicted against measured, each from the
    call's first counter sample (the predicted curve is the slowest replica's). None when
    either timeline recorded no running batch for ``call``."""
    pred, meas = running_curves(predicted, call, iteration), running_curves(measured, call, iteration)
    if not pred or not meas:
        return None
    fig, ax = plt.subplots(figsize=(10, 4))
    for d, (ts, vs) in pred.items():
        ax.step(ts, vs, where="post", color="tab:blue", lw=2, label=f"predicted (device {d})")
    for d, (ts, vs) in meas.items():
        ax.step(ts, vs, where="post", lw=1, alpha=0.8, label=f"measured (device {d})")
    ax.set_xlabel(f"seconds from the start of {call}, iteration {iteration}")
    ax.set_ylabel("requests running")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{call}: running batch, predicted vs measured")
    return _save(fig, out)


# ---- validation figures -------------------------------------------------------------------------


def log_ticks(ax: Axes, lo: float, hi: float) -> None:
    """Log x and y axes over [lo, hi] with plain-number labels at 1, 2 and 5 of each decade
    (at each power of ten over more than three decades), so even a range inside one decade
    gets several labelled ticks; other minor ticks unlabelled."""
    import math

    from matplotlib.ticker import LogLocator

    subs = (1.0, 2.0, 5.0) if math.log10(hi / lo) <= 3 else (1.0,)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=subs))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_locator(LogLocator(base=10, subs=[s for s in range(1, 10) if s not in subs]))
        axis.set_minor_formatter(NullFormatter())  # labelled minor ticks would overlap


LABEL_GAP_PT = 9.0  # vertical room one 7-point label takes, points
LABEL_WIDTH_PT = 110.0  # horizontal room a plan's label takes, about (its length varies)


def _label_points(ax: Axes, xs: list[float], ys: list[float], labels: list[str]) -> None:
    """Name each point beside it, labels that would overlap their neighbours' pushed up in
    3-point steps (the axes' scales and limits must be set first: the gap is measured on the
    page)."""
    to_pt = 72.0 / ax.figure.dpi
    page = [ax.transData.transform((x, y)) * to_pt for x, y in zip(xs, ys)]
    placed: list[tuple[float, float]] = []  # (x, y) of each label placed, points
    for i in sorted(range(len(xs)), key=lambda i: (page[i][1], page[i][0])):
        # offsets in whole steps, so the same points redrawn from a table's rounded values
        # give the same figure
        lift = 0
        while any(abs(px - page[i][0] - 4.0) < LABEL_WIDTH_PT and abs(py - page[i][1] - 3.0 - lift) < LABEL_GAP_PT
                  for px, py in placed):
            lift += 3
        placed.append((page[i][0] + 4.0, page[i][1] + 3.0 + lift))
        ax.annotate(labels[i], (xs[i], ys[i]), fontsize=7, xytext=(4, 3 + lift), textcoords="offset points")


def scatter(plans: pd.DataFrame, out: str | Path, title: str = "") -> Path:
    """Predicted (y) against measured (x) iteration time per plan — the measured median with
    the runs' min..max as horizontal bars — with y = x and ±10 % bands; log axes when the
    plans span a decade or more."""
    df = plans.dropna(subset=["predicted_s", "measured_s"])
    if df.empty:
        raise ValueError("scatter: no plan with both a predicted and a measured time")
    fig, ax = plt.subplots(figsize=(6.5, 6))
    lo = min(df["predicted_s"].min(), df["measured_min_s"].min()) * 0.8
    hi = max(df["predicted_s"].max(), df["measured_max_s"].max()) * 1.25
    xs = pd.Series([lo, hi])
    ax.plot(xs, xs, color="black", linewidth=1, label="y = x")
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="tab:green", alpha=0.15, label="±10 %")
    xerr = [df["measured_s"] - df["measured_min_s"], df["measured_max_s"] - df["measured_s"]]
    ax.errorbar(df["measured_s"], df["predicted_s"], xerr=xerr, fmt="o", color="tab:blue", capsize=3,
                label="plan (measured median, min–max over runs)")
    values = pd.concat([df["predicted_s"], df["measured_s"]])
    if values.max() / values.min() > 10:  # plans a decade apart: log axes, plain-number ticks
        ax.set_xscale("log")
        ax.set_yscale("log")
        log_ticks(ax, lo, hi)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    if len(df) <= 30:
        _label_points(ax, df["measured_s"].tolist(), df["predicted_s"].tolist(), [str(p) for p in df["plan"]])
    ax.set_xlabel("measured iteration time (s), median of the runs")
    ax.set_ylabel("predicted iteration time (s)")
    ax.set_title(title or "measured (x) vs predicted (y) iteration time", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax.grid(which="minor", alpha=0.12)
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
