"""Kernel calibration end to end: time the grid and the runtime's fixed costs, fit, report.

Prints the fitted compute terms (peak, bandwidth, dispatch cost, composition, executor fixed
costs), the wall time of the measurement, and the held-out report per op family and per
executor piece (goal: median error ≤ 10 %). ``--csv`` keeps the raw rows; ``--from-csv`` refits
rows measured earlier.

    python benchmarks/bench_kernels.py --level quick                 # ≈1 min on 2 cores
    python benchmarks/bench_kernels.py --level full --csv raw.csv
    python benchmarks/bench_kernels.py --from-csv raw.csv --stat p10_s --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import pandas as pd

from calibration.fit_compute import STATS, fit_compute
from calibration.kernels import LEVELS, grid, measure
from calibration.overheads import MICRO_BATCHES, measure_overheads
from estimator.base.errors import cli_guard
from estimator.base.io import atomic_write_text
from estimator.base.progress import progress_bar


def run(level: str, device: str, experiment: str | None) -> tuple[pd.DataFrame, float]:
    cases = grid(level, experiment=experiment)
    t0 = time.perf_counter()
    with progress_bar(total=len(cases) + 1 + 2 * len(MICRO_BATCHES), desc="kernels", unit="case") as bar:
        kernels = measure(cases, device=device, level=level, progress=bar.update)
        overheads = measure_overheads(device=device, repeats=LEVELS[level].repeats, progress=bar.update)
    return pd.concat([kernels, overheads], ignore_index=True), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--level", choices=sorted(LEVELS), default="quick")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--experiment", help="add this experiment's models and shapes to the grid")
    ap.add_argument("--stat", choices=STATS, default="median_s", help="the statistic fitted (default median)")
    ap.add_argument("--csv", help="write the raw rows here")
    ap.add_argument("--from-csv", help="fit these raw rows instead of measuring")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.from_csv:
        raw, wall = pd.read_csv(args.from_csv), float("nan")
    else:
        raw, wall = run(args.level, args.device, args.experiment)
    if args.csv:
        atomic_write_text(args.csv, raw.to_csv(index=False))
    command = "python benchmarks/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections, report = fit_compute(raw, command=command, stat=args.stat)
    if args.json:
        print(json.dumps({"wall_s": wall, "sections": sections, "report": report.to_dict(orient="records")}))
        return 0
    c, m, e = sections["compute"], sections["memory"], sections.get("executor", {})
    print(f"measured {len(raw)} rows in {wall:.1f} s; fitted on {args.stat}")
    peak, bw = c["peak"]["flops_per_s"] / 1e9, m["bandwidth"]["bytes_per_s"] / 1e9
    print(f"peak {peak:.1f} GFLOP/s, bandwidth {bw:.1f} GB/s, "
          f"dispatch {c['launch']['overhead_s'] * 1e6:.2f} us/aten op, compose {c['compose']['mode']}")
    if e:
        print(f"executor: {e['call_overhead_s'] * 1e6:.0f} us per call, "
              f"{e['micro_batch_overhead_s'] * 1e6:.0f} us per micro-batch")
    print(report.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return 0


if __name__ == "__main__":
    sys.exit(cli_guard(main, None))
