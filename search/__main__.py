"""Find the fastest plan that fits, beside the plans people write by hand.

Usage::

    python -m search
    python -m search examples/ppo-llama2-70b-128xh100.yaml --time-budget 30 --out plan.json
    python -m search examples/grpo-qwen2.5-7b-16xh100.yaml --max-evals 20000 --seed 1 --json
    python -m search examples/ppo-tiny-2xcpu.yaml --out plan.json --trace trace.json
    python -m search examples/dpo-llama3-8b-8xa100.yaml --profile calibration/profiles/a100-80g.json
    python -m search examples/ppo-llama2-7b-8xh100.yaml --framework verl --export verl --export-dir verl-run/
    python -m search --from verl overrides.txt --max-evals 3000

Without an experiment it searches the built-in default: PPO with four LLaMA-2 7B models on one
8×H100 node (``examples/ppo-llama2-7b-8xh100.yaml``). ``--time-budget`` (default 20 s) bounds
the search and its re-ranking; ``--max-evals N`` instead fixes how many plans the evaluator
scores, so the same seed gives the same plan on any machine (the wall clock is then not
consulted). While it runs, a progress bar on stderr shows the elapsed time, plans evaluated
and the best iteration time so far (piped into a log: one plain line every few seconds).

Prints the plan space per call, the best plan (per call: mesh, dp/tp/pp, micro-batches,
predicted start, duration, communication, waiting for inputs and reallocation), the op set
it was priced for, its predicted iteration time,
peak memory per device against capacity, MFU and the roofline bound, the fast evaluator's
figure against the simulator's, every baseline's time (or why it does not fit) with the
speed-up over it, and where the time goes. ``--out`` writes the plan file that
``estimator.predict --plan`` and ``executor.run --plan`` take; ``--trace`` the predicted
Chrome trace (Perfetto). Train calls may recompute activations where memory demands it;
``--no-recompute`` leaves that option out. The meshes searched are ReaL's aligned ones (a
power-of-two slice of a node, or whole nodes); ``--uneven-meshes`` adds every contiguous run of
devices (``0-5`` beside ``6-7`` on a node of 8, ``0-11`` beside ``12-15`` on two), the splits a
disaggregated plan wants, in a larger space. ``--json`` prints one object with ``iteration_s``, ``plan``,
``baselines.<name>.iteration_s`` (null when it does not fit), ``evaluated``, ``space_log10``,
``roofline_s``, ``peak_memory_bytes`` and more.

``--framework NAME`` (``verl``, ``openrlhf``, ``realhf``, ``areal``, ``nemo-rl``) also finds
the best plan that framework can run: every plan the search re-ranked, projected onto what the
framework runs by its exporter, simulated, the fastest that fits kept (:mod:`search.framework`;
the best projection of the search's best plans, not a search of the framework's whole space);
it prints that plan and its time against the best plan overall, and ``--out`` and ``--export``
then take it. A projection that fits and runs faster than the search's own best becomes the
best plan overall too (a candidate ``projection onto NAME`` among the re-ranked).
``--export FRAMEWORK --export-dir DIR`` writes the plan in that framework's
configuration into DIR and prints what the framework changes and what that costs, as
``python -m estimator.export`` does.

``--from FRAMEWORK CONFIG`` starts from a framework's configuration instead of an experiment
file (``python -m estimator.predict --from`` reads it: the experiment and the plan it
describes): it predicts that plan, searches with it as a start (re-ranked like a baseline, so
the best plan is never predicted slower than the config when the config fits), finds the best
plan that framework runs (``--framework``, which defaults to FRAMEWORK; the config itself is
one of the plans considered) and ends with the three times and the speed-ups over the imported
config (``--gen-mean TOKENS``: responses of that mean under the config's cap, as for
``estimator.predict --from``). ``--json`` adds ``imported`` (``framework``, ``config``, ``experiment``, ``plan``,
``notes``, ``iteration_s``, ``fits``, ``reasons``) and ``speedups`` (``overall``, ``framework``).

When no plan exists it says why: a call that fits on no layout is named with the least it
needs on a device, by part (weights, grads, optimizer, reallocated copy, activations, KV
cache); when every call fits alone but no plan fits, the tightest call of the plan tried with
the lowest peak is named with its device's bytes by part against the capacity.

Exit codes: 0 a plan was found; 2 invalid input (checked before any search work) or no plan
fits (the reason as above).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from estimator.base import rules
from estimator.base.errors import ConfigError, cli_guard
from estimator.base.io import atomic_write_text, check_output_dir
from estimator.base.tables import format_table
from estimator.export import make_export, predict_export, render, write_export
from estimator.interop import FRAMEWORKS, IMPORTERS, exporter, importer
from estimator.predict import TRACE_PER_DEVICE_MAX, import_config, predict
from estimator.profile.pricing import STACK_NAMES, experiment_profile
from estimator.profile.profiles import Profile
from estimator.sim.asynchrony import async_report
from estimator.sim.simulator import SimResult
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.plan import Plan
from estimator.spec.workflow import MAX_STALENESS, STREAMING
from search.baselines import split_starts
from search.checks import MAX_CHAINS, check_budget, check_out, check_positive
from search.framework import framework_best
from search.result import comparison_table, imported_text, render_report, result_json, speedups_over
from search.run import DEFAULT_TIME_BUDGET_S, adopt, default_experiment, run_search


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", nargs="?", help="experiment YAML file (default: PPO, 4× LLaMA-2 7B, 8×H100); "
                        "with --from, the framework's config file")
    parser.add_argument("--from", dest="source", metavar="FRAMEWORK",
                        help=f"read the experiment and a plan from this framework's config: {', '.join(IMPORTERS)}")
    parser.add_argument("--gen-mean", type=float, metavar="TOKENS",
                        help="with --from: responses of this mean length under the config's cap (default: at the cap)")
    parser.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET_S,
                        help=f"seconds for the search and its re-ranking (default {DEFAULT_TIME_BUDGET_S:g})")
    parser.add_argument("--max-evals", type=int, help="plans to evaluate, for runs that must repeat exactly")
    parser.add_argument("--profile", help="hardware profile name or file (default: the cluster's device)")
    parser.add_argument("--stack", choices=STACK_NAMES,
                        help="software stack to price (default: the experiment's cluster.stack, else megatron-vllm "
                             "on a GPU, executor on a CPU)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the chains (default 0)")
    parser.add_argument("--chains", type=int, help="parallel chains (default: one per core)")
    parser.add_argument("--out", help="write the best plan (JSON) here")
    parser.add_argument("--trace", help="write the best plan's predicted Chrome trace (JSON) here")
    parser.add_argument("--no-recompute", action="store_true",
                        help="leave activation recompute of train calls out of the search")
    parser.add_argument("--uneven-meshes", action="store_true",
                        help="also search meshes that are any contiguous run of devices (e.g. 0-5 and 6-7)")
    parser.add_argument("--framework", help=f"also the best plan this framework can run: {', '.join(FRAMEWORKS)}")
    parser.add_argument("--export", help=f"write the plan in this framework's configuration: {', '.join(FRAMEWORKS)}")
    parser.add_argument("--export-dir", help="directory the --export files go into")
    parser.add_argument("--max-staleness", type=int,
                        help="asynchronous RL: search plans whose rollouts may lag up to this many policy versions "
                             "(every contiguous run of devices in the space), beside the best synchronous plan "
                             "(default: the experiment's async.max_staleness)")
    parser.add_argument("--streaming", choices=STREAMING,
                        help="asynchronous RL: how a rollout on devices of its own serves — off, or one stream of "
                             "consecutive iterations trained on as trajectories finish, switching weights with a "
                             "re-prefill (recompute, AReaL's) or keeping the KV (keep, PipelineRL's) (default: the "
                             "experiment's async.streaming)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.source is not None:
        importer(args.source)
        if args.experiment is None:
            raise ConfigError(f"--from {args.source} needs the config file: python -m search --from {args.source} "
                              "CONFIG")
        args.framework = args.framework or args.source
    elif args.gen_mean is not None:
        raise ConfigError("--gen-mean goes with --from FRAMEWORK CONFIG; an experiment file gives gen_len itself")
    for name in (args.framework, args.export):
        if name is not None:
            exporter(name)
    if (args.export is None) != (args.export_dir is None):
        raise ConfigError("--export FRAMEWORK and --export-dir DIR go together")
    export_dir = check_output_dir(args.export_dir, "--export-dir") if args.export_dir is not None else None
    check_budget(args.time_budget)
    if args.max_evals is not None:
        check_positive(args.max_evals, "--max-evals")
    if args.chains is not None:
        check_positive(args.chains, "--chains", hi=MAX_CHAINS)
    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed} must be a non-negative integer")
    for flag, path in (("--out", args.out), ("--trace", args.trace)):
        if path is not None:
            check_out(path, flag)
    imported = None
    if args.source is not None:
        experiment, config_plan, imported = import_config(args.source, args.experiment, args.profile, args.gen_mean)
    else:
        experiment = load_experiment(args.experiment) if args.experiment else default_experiment()
    if args.max_staleness is not None or args.streaming is not None:
        eta = (rules.integer("--max-staleness", args.max_staleness, lo=0, hi=MAX_STALENESS)
               if args.max_staleness is not None else experiment.max_staleness)
        if args.streaming not in (None, "off") and eta < 1:
            raise ConfigError(f"--streaming {args.streaming} needs a max staleness of 1 or more (--max-staleness), "
                              f"not {eta}")
        experiment = experiment.with_staleness(eta, args.streaming)
    profile = experiment_profile(experiment, args.profile, args.stack)
    if imported is not None:
        _, _, config_summary = predict(experiment, config_plan, profile)
        imported |= {"config": args.experiment, "iteration_s": config_summary["iteration_s"],
                     "fits": config_summary["feasible"], "reasons": config_summary["reasons"]}

    sync = None
    if experiment.workflow.asynchronous:  # the synchronous best first: the asynchronous search starts from it too
        sync = run_search(experiment.with_staleness(0), profile, time_budget_s=args.time_budget,
                          max_evals=args.max_evals, seed=args.seed, chains=args.chains, progress=not args.json,
                          recompute=not args.no_recompute, uneven=args.uneven_meshes)
    starts = {"synchronous best": sync.plan} if sync is not None else {}
    if sync is not None:  # and disaggregated splits: the asynchronous best often lies far from the synchronous
        starts |= split_starts(experiment, profile)
    if imported is not None and imported["fits"]:  # the config the user runs: a start, and re-ranked
        starts[f"imported {args.source} config"] = config_plan
    result = run_search(experiment, profile, time_budget_s=args.time_budget, max_evals=args.max_evals,
                        seed=args.seed, chains=args.chains, progress=not args.json,
                        recompute=not args.no_recompute, uneven=args.uneven_meshes or sync is not None,
                        extra_starts=starts or None)
    also = [config_plan] if imported is not None else []
    best = framework_best(experiment, profile, result, args.framework, also=also) if args.framework else None
    if best is not None and best.fits and best.stack is None and best.iteration_s < result.iteration_s:
        # a projection beat the search's own best: it is the best plan overall too
        result = adopt(experiment, profile, result, best.plan, best.iteration_s, f"projection onto {args.framework}")
        best = dataclasses.replace(best, overall_s=result.iteration_s)
    plan = best.plan if best is not None else result.plan
    sim, memory, summary = predict(experiment, result.plan, profile)
    asynchrony = compare_synchronous(experiment, profile, sim, result.plan, sync.plan) if sync is not None else None
    if best is not None and args.trace is not None:
        sim = predict(experiment, plan, profile)[0]
    if args.out is not None:
        atomic_write_text(args.out, plan.to_json())
    record, written = None, []
    if args.export is not None:
        export = make_export(args.export, experiment, plan)
        record = predict_export(export, experiment, profile)
        written = write_export(export, record, export_dir)
    per_device = experiment.cluster.num_devices <= TRACE_PER_DEVICE_MAX
    if args.trace is not None:
        sim.timeline(per_device).write_chrome_trace(args.trace)
    if args.json:
        extra = {"framework": best.to_json()} if best is not None else {}
        extra |= {"export": record} if record is not None else {}
        extra |= {"asynchrony": asynchrony} if asynchrony is not None else {}
        extra |= {"imported": imported, "speedups": speedups_over(imported, result, best)} if imported else {}
        print(json.dumps(result_json(result, summary) | extra, indent=2))
        return 0
    if imported is not None:
        print(imported_text(imported) + "\n")
    print(render_report(result, summary, memory))
    if asynchrony is not None:
        print("\n" + render_asynchrony(asynchrony))
    if best is not None:
        print(f"\n{best.line()}\n{plan.table()}")
    if imported is not None:
        print("\n" + comparison_table(imported, result, best))
    if record is not None:
        print(f"\nexport to {args.export}:\n{render(record, written)}")
    if args.out:
        which = f"the {args.framework} " if best else ""
        use = (f"add --export {args.framework} --export-dir DIR for {args.framework}'s configuration of it"
               if imported is not None else
               f"python -m estimator.predict {args.experiment or 'EXPERIMENT.yaml'} --plan {args.out}")
        print(f"wrote {which}plan {args.out} ({use})")
    if args.trace:
        print(f"wrote Chrome trace {args.trace}")
    return 0


def compare_synchronous(experiment: Experiment, profile: Profile, sim: SimResult, plan: Plan, sync_plan: Plan) -> dict:
    """The asynchronous best plan's throughput, idle fractions and staleness, beside the best
    synchronous plan's (searched with the same budget and seed)."""
    sync_exp = experiment.with_staleness(0)
    sync_report = async_report(sync_exp, sync_plan, predict(sync_exp, sync_plan, profile)[0])
    best = async_report(experiment, plan, sim)
    return best.to_dict() | {"synchronous": sync_report.to_dict() | {"plan": json.loads(sync_plan.to_json())},
                             "speedup_over_synchronous": sync_report.iteration_s / best.iteration_s}


def render_asynchrony(a: dict) -> str:
    rows = [[name, f"{r['iteration_s']:.4g}", f"{r['tokens_per_s']:,.0f}", f"{100 * r['rollout_idle']:.1f}",
             f"{100 * r['trainer_idle']:.1f}", f"{r['staleness_mean']:.2f} / {r['staleness_max']}",
             f"{r['push_s']:.3f}" if r["standing"] else "-"]
            for name, r in ((f"best, max staleness {a['max_staleness']}", a), ("best synchronous", a["synchronous"]))]
    table = format_table([("plan", "iteration s", "tokens/s trained", "rollout idle %", "trainer idle %",
                           "staleness mean / max", "push s"), *rows])
    sync_plan = Plan.from_data(a["synchronous"]["plan"]).table()
    gain = a["speedup_over_synchronous"]
    served = (f"; streaming {', '.join(a['streaming'])}, {a['recomputed_tokens']:,} tokens prefilled again"
              if a["streaming"] else "")
    head = (f"asynchronous RL: {gain:.2f}x the best synchronous plan's throughput (discarded tokens: "
            f"{a['discarded_tokens']}{served})" if gain > 1 else
            f"asynchronous RL is predicted no faster here ({gain:.2f}x): run the best synchronous plan "
            "(the two steady states train on different draws of the response lengths, about 1 % apart)")
    return f"{head}\n{table}\nbest synchronous plan:\n{sync_plan}"


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
