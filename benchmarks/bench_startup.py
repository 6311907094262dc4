"""Time from command to first call of ``python -m executor.run``, and to its first refusal.

Each repeat starts the command as a user would (a fresh interpreter) on a tiny example and
reads its progress lines on stderr: the first iteration's line says how long after the first
call it ended, so the first call started at (arrival of that line) − (what it says). The
command's parsing, validation, worker start-up (interpreter, torch import, gloo rendezvous)
and initial weights all fall before it. Also timed: how long an invalid plan takes to be
refused (exit 2, before torch is imported)::

    python benchmarks/bench_startup.py                    # ppo, grpo, dpo tiny examples, 3 repeats
    python benchmarks/bench_startup.py --repeats 5 --json

Goal: ≤ 5 s to the first call on a 2-core machine. Run it on an otherwise idle machine; the
table gives the load average it ran under.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from estimator.base.progress import progress_bar

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CASES = {"ppo": "ppo-tiny-2xcpu", "grpo": "grpo-tiny-2xcpu", "dpo": "dpo-tiny-2xcpu"}
DONE = re.compile(r"iteration 1/\d+ done after ([0-9.]+) s")


def first_call_s(example: str, plan: str) -> float:
    """Seconds from starting the command to the start of its first call."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "executor.run", str(EXAMPLES / f"{example}.yaml"), "--plan",
                             plan, "--iterations", "1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    found = None
    for line in proc.stderr:
        m = DONE.search(line)
        if m and found is None:
            found = time.monotonic() - start - float(m.group(1))
    if proc.wait() != 0 or found is None:
        raise SystemExit(f"error: executor.run {example} failed (exit {proc.returncode})")
    return found


def refusal_s(example: str) -> float:
    """Seconds until an invalid plan is refused (exit 2)."""
    plan = json.loads((EXAMPLES / "plans" / example / "dp2.json").read_text())
    plan["calls"][next(iter(plan["calls"]))]["dp"] = 3
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.json"
        path.write_text(json.dumps(plan))
        start = time.monotonic()
        code = subprocess.run([sys.executable, "-m", "executor.run", str(EXAMPLES / f"{example}.yaml"), "--plan",
                               str(path)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True).returncode
        elapsed = time.monotonic() - start
    if code != 2:
        raise SystemExit(f"error: the invalid plan for {example} exited {code}, not 2")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per example (default 3)")
    ap.add_argument("--algorithms", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        print(f"error: --repeats={args.repeats} must be at least 1", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    out = {}
    jobs = [(a, r) for a in args.algorithms for r in range(args.repeats)]
    times: dict[str, dict[str, list[float]]] = {a: {"first_call_s": [], "refusal_s": []} for a in args.algorithms}
    for algorithm, _ in progress_bar(jobs, desc="executor.run", unit="run"):
        example = CASES[algorithm]
        times[algorithm]["first_call_s"].append(first_call_s(example, str(EXAMPLES / "plans" / example / "dp2.json")))
        times[algorithm]["refusal_s"].append(refusal_s(example))
    for algorithm, t in times.items():
        out[algorithm] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                          for k, v in t.items()}
    load = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps({"cases": out, "load_average_1min": load}, indent=2))
        return 0
    from estimator.base.tables import format_table

    rows = [("example", "first call s (median)", "min", "max", "invalid plan refused s (median)", "min", "max")]
    for algorithm, v in out.items():
        f, r = v["first_call_s"], v["refusal_s"]
        rows.append((CASES[algorithm], f"{f['median']:.2f}", f"{f['min']:.2f}", f"{f['max']:.2f}",
                     f"{r['median']:.2f}", f"{r['min']:.2f}", f"{r['max']:.2f}"))
    print(format_table(rows))
    print(f"\n{args.repeats} run(s) each; 1-minute load average {load['before']:.2f} before, {load['after']:.2f} "
          f"after, on {load['cpus']} CPUs; goal: first call within 5 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
