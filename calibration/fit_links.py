"""Fit a profile's collective curves to raw timings and report the error on held-out sizes.

Raw timings are rows ``kind, link_class, group, size_bytes, median_s`` (what
:mod:`calibration.collectives` measures, or public tables such as vidur's NCCL timings). For
each (link class, kind, group) the sizes are split into a fit part and a held-out part; the
curve is fitted on the fit part only (:func:`estimator.profile.collectives.fit_time_curve`: medians per size,
log-size bins, isotonic least squares in log time) and the report gives, per kind and group,
the absolute percentage error of the curve on the held-out sizes: n, median and max.

Refit a shipped GPU profile's intra-node curves from vidur's 8-GPU NCCL measurements
(``all_reduce.csv``, ``send_recv.csv``), keeping the raw CSV and the report beside it::

    python -m calibration.fit_links --vidur /path/to/vidur/data/profiling/network/h100_dgx \
        --profile h100-sxm --out calibration/profiles
    python -m calibration.fit_links --vidur DIR --profile a100-80g --holdout 0.25 --json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pandas as pd

from estimator.base.errors import ConfigError, cli_guard
from estimator.base.io import atomic_write_json, atomic_write_text, check_output_dir
from estimator.base.loading import is_dir, load_table
from estimator.profile.collectives import LINK_CLASSES, TimeCurve, fit_time_curve, merge_entry
from estimator.profile.profiles import PROFILE_DIR, PROFILE_FORMAT, load_profile, profile_from_dict

KEYS = ["link_class", "kind", "group"]
REPORT_COLUMNS = ["link_class", "kind", "group", "n_fit", "n_holdout", "median_ape_pct", "max_ape_pct"]


def split_holdout(raw: pd.DataFrame, holdout: float | Collection[int]) -> pd.Series:
    """True for rows held out: sizes listed in ``holdout``, or, for a fraction, every
    ``round(1/holdout)``-th interior size of each (link class, kind, group) — never its
    smallest or largest, so the held-out check interpolates as the fit is meant to."""
    if not isinstance(holdout, (int, float)):
        return raw.size_bytes.isin({int(s) for s in holdout})
    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout={holdout} must be a fraction in [0, 1) or a collection of sizes")
    mask = pd.Series(False, index=raw.index)
    if holdout == 0:
        return mask
    step = max(2, round(1 / holdout))
    for _, part in raw.groupby(KEYS):
        sizes = np.sort(part.size_bytes.unique())
        held = set(sizes[1:-1][step - 1::step])
        mask.loc[part.index] = part.size_bytes.isin(held)
    return mask


def fit_links(raw: pd.DataFrame, holdout: float | Collection[int] = 0.25, command: str = "",
              cite: str = "", max_points: int = 40) -> tuple[dict, pd.DataFrame]:
    """(``links`` entries with curves for every measured class and kind, held-out report).

    The entries carry ``command`` (a measurement here) or ``cite`` (a public table); merge
    them into a profile with :func:`apply_links`.
    """
    missing = sorted(set(KEYS + ["size_bytes", "median_s"]) - set(raw.columns))
    if missing:
        raise ConfigError(f"raw collective timings: missing column(s) {missing}")
    if not (command or cite):
        raise ConfigError("fit_links needs the command that measured the rows or a cite for them")
    raw = raw[raw.size_bytes > 0].reset_index(drop=True)
    raw["group"] = raw.group.astype(str)
    held = split_holdout(raw, holdout)
    links: dict[str, dict[str, dict]] = {}
    report = []
    for (cls, kind, group), part in raw.groupby(KEYS, sort=True):
        fit, test = part[~held.loc[part.index]], part[held.loc[part.index]]
        points = fit_time_curve(fit.size_bytes.to_numpy(), fit.median_s.to_numpy(), max_points)
        entry = links.setdefault(cls, {}).setdefault(kind, {"curves": {}, **({"command": command} if command
                                                                             else {"cite": cite})})
        entry["curves"][group] = points
        ape = _ape(TimeCurve(tuple(map(tuple, points))), test)
        report.append(dict(link_class=cls, kind=kind, group=group, n_fit=fit.size_bytes.nunique(),
                           n_holdout=len(ape), median_ape_pct=float(np.median(ape)) if len(ape) else np.nan,
                           max_ape_pct=float(np.max(ape)) if len(ape) else np.nan))
    return links, pd.DataFrame(report, columns=REPORT_COLUMNS)


def _ape(curve: TimeCurve, test: pd.DataFrame) -> np.ndarray:
    """Absolute percentage error of ``curve`` per held-out size (measured: median over rows)."""
    if test.empty:
        return np.array([])
    measured = test.groupby("size_bytes").median_s.median()
    predicted = curve.many(measured.index.to_numpy(dtype=float))
    return np.abs(predicted - measured.to_numpy()) / measured.to_numpy() * 100.0


def apply_links(profile: dict, links: dict, raw_csv: str | None = None) -> dict:
    """``profile`` (a parsed profile document) with the fitted curves merged into its entries
    (:func:`estimator.profile.collectives.merge_entry`); classes and kinds not fitted keep theirs.
    ``raw_csv`` names the raw file beside it."""
    out = copy.deepcopy(profile)
    out["format"] = PROFILE_FORMAT
    for cls, kinds in links.items():
        for kind, entry in kinds.items():
            source = {k: v for k, v in entry.items() if k in ("cite", "command")}
            merged = merge_entry(out["links"][cls][kind], entry["curves"], source)
            out["links"][cls][kind] = {**merged, **({"raw": raw_csv} if raw_csv else {})}
    profile_from_dict(out, where="profile with fitted links")  # the result must load
    return out


def load_vidur_network(directory: str | Path) -> pd.DataFrame:
    """vidur's NCCL timings (microsoft/vidur data/profiling/network/<topology>) as raw rows.

    vidur's ``size`` column is bytes: its profiler allocates ``size`` fp16 elements and
    records ``size * 2  # bytes`` (vidur/profiling/collectives/collectives_wrapper.py), and its
    times are the median kernel time in ms of the collective's NCCL kernels (kineto). A row's
    ``num_workers`` ranks span ``num_workers / devices_per_node`` nodes (at least one).
    """
    d = Path(directory)
    frames = []
    for name, kind in (("all_reduce", "all_reduce"), ("send_recv", "p2p")):
        path = d / f"{name}.csv"
        if not path.is_file():
            continue
        col = f"time_stats.{name}.median"
        df = load_table(path, "vidur network table", (col, "num_workers", "size", "devices_per_node"))
        nodes = np.maximum(1, df.num_workers // df.devices_per_node)
        per_node = df.num_workers // nodes
        group = np.where(nodes > 1, np.where(per_node > 1, nodes.astype(str) + "x" + per_node.astype(str),
                                             nodes.astype(str)), df.num_workers.astype(str))
        if kind == "p2p":
            group = np.full(len(df), "2")
        frames.append(pd.DataFrame({"kind": kind, "link_class": np.where(nodes > 1, "inter", "intra"),
                                    "group": group, "group_size": df.num_workers, "size_bytes": df["size"],
                                    "median_s": df[col] * 1e-3, "source": path.name}))
    if not frames:
        raise ConfigError(f"{d}: no all_reduce.csv or send_recv.csv of vidur's network profiling")
    return pd.concat(frames, ignore_index=True)


def format_report(report: pd.DataFrame) -> str:
    """The held-out report as a readable table."""
    if report.empty:
        return "(no collective timings)"
    return report.to_string(index=False, float_format=lambda v: f"{v:.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.fit_links", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vidur", required=True, help="a vidur network directory (all_reduce.csv, send_recv.csv)")
    ap.add_argument("--profile", required=True, help="profile to refit: name or path")
    ap.add_argument("--holdout", type=float, default=0.25, help="fraction of interior sizes held out (0.25)")
    ap.add_argument("--classes", default="intra", help="link classes to refit, comma-separated (intra)")
    ap.add_argument("--out", default=str(PROFILE_DIR),
                    help="directory for profile, raw CSV and report (created if missing)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if not (isinstance(args.holdout, float) and 0 <= args.holdout < 1):  # nan fails both comparisons
        raise ConfigError(f"--holdout={args.holdout!r} must be a fraction in [0, 1)")
    classes = args.classes.split(",")
    unknown = [c for c in classes if c not in LINK_CLASSES]
    if unknown:
        raise ConfigError(f"--classes={args.classes!r}: unknown link class(es) {unknown}; "
                          f"allowed: {', '.join(LINK_CLASSES)}")
    if not is_dir(args.vidur):
        raise ConfigError(f"--vidur={args.vidur!r} is not a directory (one of vidur's data/profiling/network/*)")
    out = check_output_dir(args.out, "--out")
    base = load_profile(args.profile, key="--profile")
    try:
        raw = load_vidur_network(args.vidur)
    except ConfigError as exc:
        raise ConfigError(f"--vidur: {exc}") from None
    found = sorted(raw.link_class.unique())
    raw = raw[raw.link_class.isin(classes)]
    if raw.empty:
        raise ConfigError(f"--classes={args.classes!r}: the tables under --vidur {args.vidur!r} have no timings of "
                          f"that class; they have {', '.join(found)}")
    stem = f"{base.name}.links"
    cite = (f"vidur NCCL timings on 8-GPU nodes (microsoft/vidur commit 7d475133, data/profiling/network/"
            f"{Path(args.vidur).name}; sizes in bytes, median NCCL kernel times on a quiet GPU, no host "
            f"launch cost; MIT licence, vidur.LICENSE), raw rows in {stem}.csv; "
            f"curves fitted on {1 - args.holdout:.0%} of the sizes by python -m calibration.fit_links, "
            f"held-out error in {stem}.report.csv")
    links, report = fit_links(raw, args.holdout, cite=cite)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.csv", raw.to_csv(index=False))
    atomic_write_text(out / f"{stem}.report.csv", report.to_csv(index=False))
    atomic_write_json(out / f"{base.name}.json", apply_links(base.raw, links, raw_csv=f"{stem}.csv"))
    if args.json:
        print(json.dumps(report.to_dict(orient="records"), indent=2))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(cli_guard(main, None))
