"""Validations of one experiment at several staleness bounds, side by side: which (plan, η) is
fastest, predicted and measured.

Usage::

    python -m analysis.staleness analysis/results/grpo-longtail-tiny-2xcpu-async/eta0 \\
        analysis/results/grpo-longtail-tiny-2xcpu-async/eta1 analysis/results/grpo-longtail-tiny-2xcpu-async/eta2

Each directory is one ``python -m analysis.validate … --max-staleness η [--streaming MODE]``
output (its ``plans.csv`` and ``summary.json``); validations of one η with and without
streaming rollouts are told apart. Throughput is tokens trained per second, the tokens an
iteration trains on over its time — those it draws, or under streaming those the stream hands
the trainer, the same in the prediction and the run (the executor follows the predicted switch
points) — so its error is ``|measured time / predicted time − 1|``. Prints per η the median absolute error of the
iteration time and of the throughput, the fastest plan predicted and measured, and over
all (plan, η) whether the predicted best is the measured best, or how far behind it is measured
and whether that is within the measured runs' spread. ``--json`` prints the same as one object.

Exit codes: 0 done; 2 a directory that is not a validation output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from estimator.base.errors import ConfigError, cli_guard
from estimator.base.loading import load_json
from estimator.base.tables import format_table


def load(dirs: list[str]) -> pd.DataFrame:
    """Every plan of every validation, with its η (``settings.max_staleness``, 0 when absent) and
    streaming mode (``settings.streaming``, off when absent)."""
    frames = []
    for d in dirs:
        path = Path(d)
        if not (path / "plans.csv").is_file() or not (path / "summary.json").is_file():
            raise ConfigError(f"{d}: not a validation output (needs plans.csv and summary.json)")
        settings = load_json(path / "summary.json", "validation summary").get("settings", {})
        df = pd.read_csv(path / "plans.csv")
        df.insert(0, "eta", int(settings.get("max_staleness", 0) or 0))
        df.insert(1, "streaming", str(settings.get("streaming") or "off"))
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    return out.dropna(subset=["predicted_iteration_s", "measured_iteration_s"])


def _throughput_ape(df: pd.DataFrame) -> pd.Series:
    return (df["measured_iteration_s"] / df["predicted_iteration_s"] - 1.0).abs()


def report(df: pd.DataFrame) -> dict:
    per_eta = []
    for (eta, streaming), g in df.groupby(["eta", "streaming"], sort=True):
        per_eta.append({"eta": int(eta), "streaming": streaming, "plans": len(g),
                        "median_ape": float(g["ape"].median()),
                        "throughput_median_ape": float(_throughput_ape(g).median()),
                        "predicted_best": g.loc[g["predicted_iteration_s"].idxmin(), "plan"],
                        "predicted_best_s": float(g["predicted_iteration_s"].min()),
                        "measured_best": g.loc[g["measured_iteration_s"].idxmin(), "plan"],
                        "measured_best_s": float(g["measured_iteration_s"].min())})
    pick = df.loc[df["predicted_iteration_s"].idxmin()]
    best = df.loc[df["measured_iteration_s"].idxmin()]
    behind = float(pick["measured_iteration_s"] / best["measured_iteration_s"] - 1.0)
    within = bool(pick["measured_min_s"] <= best["measured_max_s"])
    return {"per_eta": per_eta, "median_ape": float(df["ape"].median()),
            "throughput_median_ape": float(_throughput_ape(df).median()),
            "predicted_best": {"plan": pick["plan"], "eta": int(pick["eta"]), "streaming": pick["streaming"],
                               "predicted_s": float(pick["predicted_iteration_s"]),
                               "measured_s": float(pick["measured_iteration_s"])},
            "measured_best": {"plan": best["plan"], "eta": int(best["eta"]), "streaming": best["streaming"],
                              "measured_s": float(best["measured_iteration_s"])},
            "predicted_best_behind": behind, "within_spread": within}


def render(r: dict) -> str:
    rows = [("η", "streaming", "plans", "median |err|", "throughput |err|", "predicted best", "s", "measured best",
             "s")]
    rows += [(str(e["eta"]), e["streaming"], str(e["plans"]), f"{100 * e['median_ape']:.1f}%",
              f"{100 * e['throughput_median_ape']:.1f}%", e["predicted_best"],
              f"{e['predicted_best_s']:.3f}", e["measured_best"], f"{e['measured_best_s']:.3f}") for e in r["per_eta"]]
    p, m = r["predicted_best"], r["measured_best"]
    same = (p["plan"], p["eta"], p["streaming"]) == (m["plan"], m["eta"], m["streaming"])
    verdict = ("the predicted best is the measured best" if same else
               f"the predicted best is measured {100 * r['predicted_best_behind']:.1f} % behind the measured best"
               f"{', within the runs spread' if r['within_spread'] else ''}")
    return "\n".join([format_table(rows), "",
                      f"over all (plan, η): median |err| {100 * r['median_ape']:.1f} %, of throughput "
                      f"{100 * r['throughput_median_ape']:.1f} %; predicted best {p['plan']} at "
                      f"η={p['eta']}{_mode(p)} ({p['predicted_s']:.3f} s predicted, {p['measured_s']:.3f} s measured), "
                      f"measured best {m['plan']} at η={m['eta']}{_mode(m)} ({m['measured_s']:.3f} s): {verdict}"])


def _mode(best: dict) -> str:
    return f", streaming {best['streaming']}" if best["streaming"] != "off" else ""


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.staleness", description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="validation output directories, one per η")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    r = report(load(args.dirs))
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
