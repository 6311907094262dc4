"""Calibrate a hardware profile: time what the executor runs on the devices at hand, fit the
profile the estimator reads, and report the fit on held-out shapes. Run it as
``python -m estimator.calibrate`` (which forwards here) or ``python -m calibration.pipeline``.

Usage::

    python -m estimator.calibrate --device cpu --world-size 2 --name cpu     # the shipped CPU profile
    python -m estimator.calibrate --quick --name cpu-quick --out /tmp/profiles
    python -m estimator.calibrate --experiment examples/ppo-tiny-2xcpu.yaml --name cpu-ppo
    python -m estimator.calibrate --device cuda --base h200 --name h200-measured
    python -m estimator.calibrate --import-nccl-tests all_reduce.txt all_gather.txt --base h100-sxm --name my-h100
    python -m estimator.calibrate --import-vidur calibration/vidur --base h100-sxm --name h100-vidur
    python -m estimator.calibrate --check-vidur calibration/vidur/compute/h100 --profile h100-vidur

A measurement runs three phases, each with a progress bar on stderr:

1. **kernels** (:mod:`calibration.kernels`): single aten-level op families and the executor's
   own pieces (block forward at prefill and decode shapes, backward, head, optimizer) over the
   shapes plans produce — one thread per simulated device on CPU, CUDA events on a GPU — and the
   runtime's fixed costs per call and per micro-batch (:mod:`calibration.overheads`). On CPU
   with a world size above 1, ``world`` processes time the grid in step
   (:mod:`calibration.together`), because the executor's processes compute at once and slow
   each other down on a small host; right after each case one process times it again while
   the others wait, and the profile's ``host`` section says how much faster each cost term is then
   (:mod:`calibration.fit_host`, :mod:`estimator.sim.hostshare`);
2. **collectives** (:mod:`calibration.collectives`): every collective the executor issues over
   torch.distributed (gloo on CPU, NCCL on GPUs), message sizes from bytes to tens or hundreds
   of MB, every group size the world size allows; skipped with a world size of 1 (one GPU),
   when the links come from ``--base``. On CPU also what a collective costs between
   computations, as tensor parallelism issues it, beyond its back-to-back time
   (:func:`calibration.collectives.measure_in_situ` → ``executor.collective_overhead_s``);
3. **fit** (:mod:`calibration.fit_compute`, :mod:`calibration.fit_links`): the compute and memory
   curves, the host dispatch cost and how it composes with device work, the executor's fixed
   costs, and one time curve per collective kind and group size — each fitted on part of the
   rows and reported on the rest (median and max absolute percentage error per family).

``--quick`` finishes in about three minutes on a 2-core machine, the full grid in under twenty;
``--quick`` is a smoke test of the pipeline, and the output says so, and which families and
collective curves are under-sampled (:func:`caveats`), next to their held-out errors.
What is not measured (inter-node links; intra-node links on one GPU) is kept from ``--base``
with its citation. ``--import-nccl-tests`` builds the collective curves of a profile from the
text or ``-J`` JSON output of NVIDIA's nccl-tests instead of measuring. ``--import-vidur`` builds
a fused-kernel GPU profile (``compute.ops: fused``) from vidur's public per-op and NCCL tables
(:mod:`calibration.vidur`: compute fitted on Llama-2-7B and -70B, the other models held out),
and ``--check-vidur`` prints a profile's per-op error against such tables.

Writes into ``--out`` (default ``calibration/profiles``): ``NAME.json`` (the profile, its
``command`` the exact command line), ``NAME.kernels.csv`` and ``NAME.links.csv`` (raw rows),
``NAME.kernels.report.csv`` and ``NAME.links.report.csv`` (the held-out fit report), on CPU with
a world size above 1 also ``NAME.kernels-alone.csv`` and ``NAME.host.report.csv``. Every file
is written to a temporary file and renamed, the profile last, and nothing is written before
the measurement has finished: an interrupted run leaves any previous profile byte-identical.

Exit codes: 0 written; 2 invalid arguments (one line naming the value and the rule).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from estimator.base.errors import ConfigError, cli_guard
from estimator.base.io import atomic_write_text, check_output_dir, check_output_path
from estimator.base.progress import progress_bar
from estimator.base.tables import format_table
from estimator.profile.profiles import PROFILE_DIR, load_profile, profile_from_dict
from estimator.spec.experiment import load_experiment

LEVELS = ("tiny", "quick", "full")  # tiny: the test grid (seconds)
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BASES = {"H200": "h200", "H100": "h100-sxm", "H800": "h800", "A100": "a100-80g"}  # device name → base profile
LINK_HOLDOUT = 0.25  # fraction of the message sizes held out of the collective fit


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m estimator.calibrate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="what to measure (default cpu)")
    ap.add_argument("--world-size", type=int, default=None,
                    help="simulated devices: the collectives' largest group and, on CPU, how many processes "
                         "time the kernels at once (default: 2 on CPU, every visible GPU on CUDA)")
    ap.add_argument("--experiment", help="add this experiment's models and shapes to the grid")
    level = ap.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_const", dest="level", const="quick",
                       help="the quick grid (about 3 minutes here)")
    level.add_argument("--grid", choices=LEVELS, dest="level", help="grid size (default full)")
    ap.add_argument("--name", help="profile name (default: cpu, or the base profile's name + '-measured')")
    ap.add_argument("--base", help="profile whose unmeasured numbers are kept (default: cpu, or by GPU model)")
    ap.add_argument("--out", default=str(PROFILE_DIR), help="directory to write into (default calibration/profiles)")
    ap.add_argument("--import-nccl-tests", nargs="+", metavar="FILE",
                    help="build collective curves from nccl-tests output instead of measuring")
    ap.add_argument("--ranks", type=int, metavar="N",
                    help="with --import-nccl-tests: the ranks of a run whose output has no Rank lines (an excerpt); "
                         "without it the group size is inferred from busbw/algbw")
    ap.add_argument("--import-vidur", metavar="DIR",
                    help="build a fused-kernel profile from vidur's tables under DIR (compute/, network/)")
    ap.add_argument("--check-vidur", metavar="DIR", help="per-op error of --profile against vidur tables under DIR")
    ap.add_argument("--profile", help="profile to check with --check-vidur: name or path")
    ap.add_argument("--json", action="store_true", help="print one machine-readable object")
    return ap


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments before any measurement starts."""
    if args.world_size is not None and not 1 <= args.world_size <= 1024:
        raise ConfigError(f"--world-size={args.world_size} must be between 1 and 1024")
    if args.name is not None and not NAME_RULE.fullmatch(args.name):
        raise ConfigError(f"--name={args.name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    if args.base == "":
        raise ConfigError("--base must name a profile or a profile file, not ''")
    check_output_dir(args.out, "--out")  # created when the results are written
    if args.experiment is not None:
        load_experiment(args.experiment)  # a bad experiment is refused before any measurement
    for flag, value in (("--import-vidur", args.import_vidur), ("--check-vidur", args.check_vidur)):
        if value is not None and not Path(value).is_dir():
            raise ConfigError(f"{flag}: {value!r} is not a directory of vidur tables")
    if args.import_vidur is not None and (args.base is None or args.name is None):
        raise ConfigError("--import-vidur needs --base PROFILE and --name NAME")
    if args.check_vidur is not None and not args.profile:
        raise ConfigError("--check-vidur needs --profile NAME")
    if args.ranks is not None and not args.import_nccl_tests:
        raise ConfigError("--ranks applies to --import-nccl-tests only")
    if args.ranks is not None and not 2 <= args.ranks <= 65536:
        raise ConfigError(f"--ranks={args.ranks} must be a group size between 2 and 65536")
    if args.import_nccl_tests:
        if args.base is None or args.name is None:
            raise ConfigError("--import-nccl-tests needs --base PROFILE and --name NAME")
        for f in args.import_nccl_tests:
            if not Path(f).is_file():
                raise ConfigError(f"--import-nccl-tests: {f!r} is not a readable file")


def _outputs(out: Path, name: str) -> dict[str, Path]:
    files = {"profile": out / f"{name}.json", "kernels": out / f"{name}.kernels.csv",
             "kernels_report": out / f"{name}.kernels.report.csv", "links": out / f"{name}.links.csv",
             "links_report": out / f"{name}.links.report.csv", "alone": out / f"{name}.kernels-alone.csv",
             "host_report": out / f"{name}.host.report.csv"}
    for what, path in files.items():
        check_output_path(path, f"calibration output {what}")
    return files


def _write_all(texts: dict[Path, str], profile_path: Path) -> None:
    """Every file renamed into place, the profile last, so a profile never points at missing data."""
    for path, text in texts.items():
        if path != profile_path:
            atomic_write_text(path, text)
    atomic_write_text(profile_path, texts[profile_path])


# ---- measuring ----------------------------------------------------------------------------------


def _capacity(device: str, world: int, command: str) -> dict[str, Any]:
    if device == "cuda":
        import torch

        _, total = torch.cuda.mem_get_info(0)
        return {"bytes": float(total), "command": f"{command} (torch.cuda.mem_get_info total)"}
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"bytes": float(total // max(world, 1)),
            "command": f"{command} (host memory {total} bytes shared by {max(world, 1)} processes)"}


def _default_base(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    gpu = torch.cuda.get_device_name(0)
    for key, base in BASES.items():
        if key in gpu:
            return base
    raise ConfigError(f"--device cuda: no shipped profile matches GPU {gpu!r}; give --base PROFILE")


def measure_profile(args: argparse.Namespace, base: dict, name: str, command: str) -> dict[str, Any]:
    """Run the three phases; return the profile document, raw tables and reports."""
    import pandas as pd

    from calibration import collectives, kernels, overheads
    from calibration.fit_compute import fit_compute
    from calibration.fit_links import apply_links, fit_links
    from calibration.timing import device_info, torch_device

    torch_device(args.device)  # a missing GPU is refused before any work
    level = args.level or "full"
    world = args.world_size or (_gpu_count() if args.device == "cuda" else 2)
    cases = kernels.grid(level, experiment=args.experiment)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    total = len(cases) + 1 + 2 * len(overheads.MICRO_BATCHES)  # the kernel grid, then the fixed costs
    together = args.device == "cpu" and world >= 2  # the CPU executor's processes compute at once
    raw_alone = None
    desc = "kernels" + (f" ({world} processes in step, then one alone)" if together else "")
    with progress_bar(total=total, desc=desc, unit="case") as bar:
        if together:
            from calibration.together import measure_together

            # and each case again on one process while the others wait: how much faster a
            # device is with its host idle (calibration.together says why case by case)
            raw_kernels, raw_alone = measure_together(cases, level, dtype, world, progress=bar.update, alone=True)
        else:
            raw_kernels = pd.concat([kernels.measure(cases, args.device, dtype, level, progress=bar.update),
                                     overheads.measure_overheads(args.device, dtype, progress=bar.update)],
                                    ignore_index=True)
    raw_links = None
    if world >= 2:
        grid = collectives.GRIDS[level]
        with progress_bar(total=collectives.cases(grid, world), desc="collectives", unit="case") as bar:
            raw_links = collectives.run_local(grid, world, progress=bar, device=args.device,
                                              in_situ=args.device == "cpu")
    sections, report_k = fit_compute(raw_kernels, command=command)
    doc = copy.deepcopy(base)
    info = {**device_info(args.device), "os": platform.platform()}
    what = info.get("gpu") or info.get("cpu") or args.device
    doc.update(name=name, source="measured", date=datetime.date.today().isoformat(), software=info,
               device=f"{what}, one process per device ("
               + ("CUDA)" if args.device == "cuda" else
                  f"one thread, gloo; kernels timed with {world} such processes busy at once)" if together
                  else "one thread, gloo)"))
    doc["compute"] = {**sections["compute"], "dtype": dtype}
    doc["memory"] = {"capacity": _capacity(args.device, world, command), **sections["memory"]}
    if "executor" in sections:
        doc["executor"] = sections["executor"]
    if args.device == "cpu":  # host memory is this device's memory: a copy there, at the figures just fitted
        doc["host_link"] = {"copy": "memory", "command": f"{command} (no figure of its own: the CPU executor's "
                            "device memory is host memory, so a copy to host memory is one op reading and "
                            "writing its bytes at this profile's measured memory bandwidth and launch cost)"}
    report_h = None
    if raw_alone is not None:
        from calibration.fit_host import fit_host

        doc["host"], report_h = fit_host(raw_kernels, raw_alone, sections, world, command=command)
    else:
        doc.pop("host", None)  # a base profile's host sharing says nothing of this device
    doc["notes"] = (f"Measured by `{command}` on {doc['device']}. Compute, memory, the executor's fixed costs"
                    + (" and intra-node collectives" if raw_links is not None else "")
                    + f" are fitted to the raw rows beside this file; what was not measured is kept from "
                    f"profile {base.get('name')!r} with its citation.")
    report_l = None
    if raw_links is not None:
        for kind, key in ((collectives.IN_SITU, "collective_overhead_s"), (collectives.IN_SITU_P2P, "p2p_overhead_s")):
            in_situ = collectives.in_situ_overhead_s(raw_links, kind)
            if in_situ is not None:
                doc.setdefault("executor", {"call_overhead_s": 0.0, "micro_batch_overhead_s": 0.0, "command": command})
                doc["executor"][key] = in_situ
        in_situ_kinds = (collectives.IN_SITU, collectives.IN_SITU_P2P)
        links, report_l = fit_links(raw_links[~raw_links["kind"].isin(in_situ_kinds)], LINK_HOLDOUT,
                                    command=command)
        doc = apply_links(doc, links, raw_csv=f"{name}.links.csv")
    profile_from_dict(doc, where=f"calibrated profile {name}")  # what is written must load
    return {"profile": doc, "kernels": raw_kernels, "kernels_report": report_k,
            "links": raw_links, "links_report": report_l, "alone": raw_alone, "host_report": report_h}


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# ---- reporting ----------------------------------------------------------------------------------


def _table(report: Any, keys: list[str], n: str, median: str, worst: str) -> str:
    """The held-out rows of a fit report as a table."""
    held = report[report["split"] == "held-out"] if "split" in report.columns else report
    rows = [tuple(keys) + ("n", "median |err| %", "max |err| %")]
    rows += [tuple(str(r[k]) for k in keys) + (str(r[n]), f"{r[median]:.1f}", f"{r[worst]:.1f}")
             for _, r in held.iterrows()]
    return format_table(rows, right=set(range(len(keys), len(keys) + 3)))


# A held-out figure rests on its rows: a family fitted on fewer than MIN_FIT_ROWS shapes, or
# judged on fewer than MIN_HELD_OUT_ROWS, or a collective curve fitted on fewer than
# MIN_CURVE_SIZES message sizes, says more about which few shapes were drawn than about the fit.
MIN_FIT_ROWS = 8
MIN_HELD_OUT_ROWS = 4
MIN_CURVE_SIZES = 8
SMOKE_LEVELS = ("tiny", "quick")  # grids that check the pipeline, not the profile's accuracy


def caveats(level: str, kernels_report: Any, links_report: Any = None) -> list[str]:
    """What the held-out errors of a calibration do not say: that a ``--quick`` (or tiny) grid
    is a smoke test, and which families and collective curves are under-sampled, read from the
    reports' row counts."""
    out = []
    if level in SMOKE_LEVELS:
        flag = "--quick" if level == "quick" else f"--grid {level}"
        out.append(f"{flag} is a smoke test of the calibration (few shapes per family, few repeats): its "
                   "held-out errors show the pipeline works, not how accurate the profile is; measure the full "
                   "grid (no --quick) for a profile to plan with")
    thin = []
    if kernels_report is not None and len(kernels_report):
        n = kernels_report.pivot_table(index="family", columns="split", values="n", aggfunc="sum", fill_value=0)
        for family, row in n.iterrows():
            fit, held = int(row.get("fit", 0)), int(row.get("held-out", 0))
            if fit < MIN_FIT_ROWS or held < MIN_HELD_OUT_ROWS:
                thin.append(f"{family} ({fit} fitted, {held} held out)")
    if links_report is not None and len(links_report):
        for r in links_report.itertuples():
            if r.n_fit < MIN_CURVE_SIZES:
                thin.append(f"{r.link_class} {r.kind} group {r.group} ({r.n_fit} sizes fitted)")
    if thin:
        out.append(f"under-sampled (fewer than {MIN_FIT_ROWS} fitted or {MIN_HELD_OUT_ROWS} held-out rows, or a "
                   f"collective curve on fewer than {MIN_CURVE_SIZES} sizes; their errors rest on a handful of "
                   "shapes): " + "; ".join(thin))
    return out


def _summary(result: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    def records(df: Any) -> list[dict]:
        return [] if df is None else json.loads(df.to_json(orient="records"))

    doc = result["profile"]
    return {"profile": str(files["profile"]), "name": doc["name"], "source": doc["source"],
            "device": doc["device"], "files": {k: str(v) for k, v in files.items() if k in result
                                                and result[k] is not None or k == "profile"},
            "kernels_report": records(result.get("kernels_report")),
            "host": doc.get("host"), "host_report": records(result.get("host_report")),
            "links_report": records(result.get("links_report"))}


def _import_vidur(args: argparse.Namespace, out: Path, command: str) -> int:
    from calibration import vidur

    base = load_profile(args.base).raw
    files = _outputs(out, args.name)
    doc, raw, report, rows = vidur.build_profile(base, args.import_vidur, args.name, command)
    profile = profile_from_dict(doc, where=f"imported profile {args.name}")
    result = vidur.check(profile, rows, vidur.fitted_models(profile, list(rows.model.unique())))
    per = [{"model": k.split(":")[0], "op": k.split(":")[1], **v} for k, v in result["by_model_op"].items()]
    texts = {files["profile"]: json.dumps(doc, indent=2) + "\n", files["links"]: raw.to_csv(index=False),
             files["links_report"]: report.to_csv(index=False),
             files["kernels_report"]: pd_records_csv(per)}
    _write_all(texts, files["profile"])
    if args.json:
        print(json.dumps({"profile": str(files["profile"]), "name": args.name, "check": result}, indent=2))
        return 0
    print(f"profile {args.name} (vidur tables, fused kernels) written to {files['profile']}")
    print(_vidur_table(result))
    return 0


def pd_records_csv(records: list[dict]) -> str:
    import pandas as pd

    return pd.DataFrame.from_records(records).to_csv(index=False)


def _check_vidur(args: argparse.Namespace) -> int:
    from calibration import vidur

    profile = load_profile(args.profile, "--profile")
    rows = vidur.load_compute(args.check_vidur)
    result = vidur.check(profile, rows, vidur.fitted_models(profile, list(rows.model.unique())))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "by_model_op"}, indent=2))
        return 0
    print(_vidur_table(result))
    return 0


def _vidur_table(result: dict) -> str:
    """Per-op and per-model error of a profile against vidur's tables."""
    rows = [("op", "n", "median |err| %", "max |err| %")]
    rows += [(op, str(v["n"]), f"{v['median_ape']:.1f}", f"{v['max_ape']:.1f}") for op, v in result["ops"].items()]
    models = [("model", "n", "median |err| %", "max |err| %")]
    models += [(m + (" (fitted)" if v["fitted"] else " (held out)"), str(v["n"]), f"{v['median_ape']:.1f}",
                f"{v['max_ape']:.1f}") for m, v in result["models"].items()]
    return (f"profile {result['profile']} against vidur's per-op tables ({result['n']} rows, device time only): "
            f"median |err| {result['median_ape']:.1f} %\n\n" + format_table(rows) + "\n\n" + format_table(models))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    command = "python -m estimator.calibrate " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.check_vidur is not None:
        return _check_vidur(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # checked by _check_args
    if args.import_vidur is not None:
        return _import_vidur(args, out, command)
    if args.import_nccl_tests:
        from calibration.nccl_tests import profile_from_runs, read_runs, run_line

        base = load_profile(args.base).raw
        files = _outputs(out, args.name)
        runs = read_runs(args.import_nccl_tests, args.ranks)
        doc = profile_from_runs(runs, base, args.name)
        profile_from_dict(doc, where=f"imported profile {args.name}")
        _write_all({files["profile"]: json.dumps(doc, indent=2) + "\n"}, files["profile"])
        if args.json:
            print(json.dumps({"profile": str(files["profile"]), "name": args.name,
                              "runs": [{"file": str(r.path), "kind": r.kind, "ranks": r.nranks, "nodes": r.nodes,
                                        "ranks_from": r.ranks_from} for r in runs]}))
        else:
            print("\n".join(run_line(r) for r in runs))
            print(f"wrote {files['profile']} (collective curves from {len(args.import_nccl_tests)} file(s))")
        return 0
    base_name = args.base or _default_base(args.device)
    base = load_profile(base_name).raw
    name = args.name or ("cpu" if args.device == "cpu" else f"{base['name']}-measured")
    files = _outputs(out, name)
    result = measure_profile(args, base, name, command)
    texts = {files["profile"]: json.dumps(result["profile"], indent=2) + "\n"}
    for key in ("kernels", "kernels_report", "links", "links_report", "alone", "host_report"):
        if result[key] is not None:
            texts[files[key]] = result[key].to_csv(index=False)
    _write_all(texts, files["profile"])
    if args.json:
        notes = caveats(args.level or "full", result["kernels_report"], result["links_report"])
        print(json.dumps({**_summary(result, files), "caveats": notes}, indent=2))
        return 0
    print(f"profile {name} (measured on {result['profile']['device']}) written to {files['profile']}")
    for line in caveats(args.level or "full", result["kernels_report"], result["links_report"]):
        print(f"\nnote: {line}")
    print("\nkernels and executor pieces, held-out shapes:")
    print(_table(result["kernels_report"], ["family"], "n", "median_pct", "max_pct"))
    if result["host_report"] is not None:
        alone = result["profile"]["host"]["alone"]
        print(f"\none process alone against {result['profile']['host']['devices']} busy: time factors "
              + ", ".join(f"{k} {alone[k]:.3f}" for k in ("flops", "bytes", "dispatch", "executor"))
              + "; held-out alone rows with the factors (and without):")
        held = result["host_report"][result["host_report"]["split"] == "held-out"]
        rows = [("family", "n", "median |err| %", "max |err| %", "median |err| % unscaled")]
        rows += [(r.family, str(r.n), f"{r.median_pct:.1f}", f"{r.max_pct:.1f}", f"{r.median_pct_unscaled:.1f}")
                 for r in held.itertuples()]
        print(format_table(rows, right={1, 2, 3, 4}))
    ex = result["profile"].get("executor", {})
    for key, what in (("collective_overhead_s", "a collective"), ("p2p_overhead_s", "a pipeline message")):
        if ex.get(key) is not None:
            print(f"\n{what} between computations costs {ex[key] * 1e6:.0f} us more than back to back")
    for key, where in (("checkpoint_forward_s", "forward"), ("checkpoint_backward_s", "backward")):
        if ex.get(key) is not None:
            print(f"activation checkpointing costs {ex[key] * 1e6:.0f} us per block in the {where} beyond its ops")
    if result["links_report"] is not None:
        print("\ncollectives, held-out sizes:")
        print(_table(result["links_report"], ["link_class", "kind", "group"], "n_holdout", "median_ape_pct",
                     "max_ape_pct"))
    return 0


if __name__ == "__main__":
    sys.exit(cli_guard(main, None))
