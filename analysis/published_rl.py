"""Predict published RL steps: per-phase timings of other people's GRPO runs, run by run.

Usage::

    python -m analysis.published rl analysis/data/published/nemo_rl_v03_blog.csv \\
        --out analysis/results/published/nemo-rl-v03
    python -m analysis.published rl TABLE.csv --profile h100-rl --json
    python -m analysis.published rl-fit analysis/data/published/nemo_rl_v03_blog.csv --base h100-vidur --name h100-rl

``rl`` reads a table in the long format of ``analysis/data/published/README.md`` (one measured
number per row; the rows of one run share ``experiment_id`` and repeat its configuration), maps
every run to an experiment and to the plan its source states (:func:`map_run`), simulates it on
the stack its source ran (``megatron-vllm`` for a Megatron training backend, ``fsdp-vllm`` for
DTensor / FSDP2; :mod:`estimator.spec.stack`) and reports each measured phase beside its
prediction (:data:`PHASES`), the MAPE per phase — over all runs, the runs whose rows fitted the
profile's stack terms (named in their ``cite``) and the held-out ones —, the worst runs, a PNG
and, with ``--json``, ``runs[]`` (``experiment_id``, ``phases.<metric>.{predicted_s,
measured_s}``, …), ``skipped[]`` with reasons and ``mape.<metric>``. A run it cannot express —
a mixture-of-experts or vision model, a GPU without a profile, context or expert parallelism,
batch sizes the source does not print — is listed with the reason and skipped, never fatal:
exit 0 when any run was predicted, 2 when none was (or the table is invalid).

``rl-fit`` fits the production stacks' own numbers (:mod:`estimator.profile.stacks`) on the
runs ``--fit`` names (default: the NeMo-RL blog's two Llama-3.1-8B rows) with scipy's
``least_squares`` on the log error of their generation, log-prob, training and refit phases:
the engine's fixed cost per step (its cost per running request follows from a published
measurement, :data:`STEP_AT_256_S`), and per stack the trainer's cost per micro-batch pass and
the refit's cost per parameter tensor. The other numbers are public measurements or the
framework's defaults, cited. It writes ``--base`` with a ``stacks`` section as profile
``--name``; every fitted number's ``cite`` names the rows it was fitted on, so ``rl`` marks those
runs fitted and judges the others.

What the mapping takes from the source and what it assumes (``notes`` of each run says so):
GRPO with a verifier reward, policy and frozen reference, old log-probs recomputed
(NeMo-RL's ``get_logprobs``), prompts × samples per step, the optimizer batch as
``ppo_minibatches``, responses capped at the total sequence length less the prompt with the
stated mean (a log-normal body and a point mass at the cap, :mod:`estimator.spec.lengths`),
prompts of :data:`PROMPT_TOKENS` tokens (not published), every call colocated on all GPUs,
generation in vLLM engines of the stated tensor-parallel size, training and log-probs on the
stated trainer layout (the rest data parallel; Megatron's distributed optimizer, FSDP's full
sharding) with NeMo-RL v0.3.0's token budgets per micro-batch (:func:`nemo_rl_settings`), the
policy's state offloaded to host memory while the engine generates (``offload: all``,
:data:`COLOCATED_OFFLOAD`: NeMo-RL's colocated loop does so).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from estimator.base.errors import ConfigError
from estimator.base.io import atomic_write_json, atomic_write_text, check_output_dir, check_output_path
from estimator.base.progress import progress_bar
from estimator.base.tables import format_table
from estimator.cost.memory import plan_memory
from estimator.profile.pricing import for_stack
from estimator.profile.profiles import PROFILE_DIR, Profile, load_profile, op_set
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment, experiment_from_dict
from estimator.spec.models import PRESETS, hf_preset
from estimator.spec.plan import Layout, Plan, validate
from estimator.spec.stack import FSDP_VLLM, MEGATRON_VLLM

# table metric → what it measures, as the prediction is read off the simulated timeline
PHASES = {
    "step_time": "steady-state iteration",
    "gen_time": "the actor's generate call (to the engine's sleep)",
    "logprob_time": "actor_inf + ref_inf (policy and reference log-probs)",
    "old_log_prob_time": "actor_inf (the policy's old log-probs)",
    "ref_time": "ref_inf (the reference's log-probs)",
    "train_time": "actor_train", "update_actor_time": "actor_train",
    "refit_time": "the generate call's refit (its reallocation)", "weight_sync_time": "the generate call's refit",
}
ORDER = ("step_time", "gen_time", "logprob_time", "old_log_prob_time", "ref_time", "train_time", "update_actor_time",
         "refit_time", "weight_sync_time")
UNITS = {"s": 1.0, "ms": 1e-3}
GPU_PROFILES = {"H100": "h100-sxm", "H800": "h800", "H200": "h200", "H20": "h20", "A100": "a100-80g", "A800": "a800",
                "L20": "l20"}
PROMPT_TOKENS = 256  # prompts are not published: an OpenMathInstruct-2 problem in NeMo-RL's CoT template
DEFAULT_FIT = ("nrl03-llama8b-megatron", "nrl03-llama8b-dtensor")
# vLLM V1 (AsyncLLM, Llama-2-7B, batch 256, ShareGPT): 5-6 ms between two decode steps
# (vllm-project/vllm#10634, 2024-11-25): the engine's host time of a step at 256 running requests
STEP_AT_256_S, STEP_AT = 5.5e-3, 256
REQUIRED = ("experiment_id", "metric", "value", "unit", "actor", "gpu", "gpus_total", "nodes", "gen_len", "mean_len",
            "prompts_per_step", "samples_per_prompt", "train_batch", "plan", "system", "mode")
OPTIONAL = ("value_kind", "config_complete", "notes")


@dataclass(frozen=True)
class RlRun:
    """One run of the table: its configuration as printed and its measured phases."""

    experiment_id: str
    system: str  # training backend and engine, in the source's words
    mode: str  # colocated / split, in the source's words
    actor: str  # Hugging Face name of the policy
    gpu: str
    gpus: int
    nodes: int
    seq_cap: int  # tokens per sequence (prompt + response) at most
    mean_len: float  # mean generated tokens per sample
    prompts: float  # prompts per step (NaN: not printed)
    samples: float  # samples per prompt
    train_batch: float  # samples per optimizer step
    plan: str  # the layout, in the source's words
    value_kind: str = "reported"
    config_complete: str = ""
    notes: str = ""
    measured: dict[str, float] = field(default_factory=dict)  # metric → seconds


def load_table(path: str | Path) -> list[RlRun]:
    """The runs of a long-format table, in the table's order; a missing column, an unknown
    unit or a non-numeric value is a :class:`ConfigError` naming it."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise ConfigError(f"table {str(path)!r} does not exist") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ConfigError(f"table {str(path)!r}: {exc}") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ConfigError(f"table {str(path)!r} lacks column(s) {missing}; a long-format table has {list(REQUIRED)}")
    runs = []
    for eid, g in df.groupby("experiment_id", sort=False):
        first = g.iloc[0]
        measured = {}
        for i, r in g.iterrows():
            if r["unit"] not in UNITS:
                raise ConfigError(f"table {path}: row {i + 2}: unit={r['unit']!r} must be one of {list(UNITS)}")
            value = pd.to_numeric(r["value"], errors="coerce")
            if not (isinstance(value, float | int) and math.isfinite(value) and value > 0):
                raise ConfigError(f"table {path}: row {i + 2}: value={r['value']!r} must be a positive number")
            measured[str(r["metric"])] = float(value) * UNITS[r["unit"]]

        def num(col: str, row: Any = first) -> float:
            v = pd.to_numeric(row[col], errors="coerce")
            return float(v) if v == v else math.nan

        runs.append(RlRun(str(eid), str(first["system"]), str(first["mode"]), str(first["actor"]), str(first["gpu"]),
                          int(num("gpus_total")) if num("gpus_total") == num("gpus_total") else 0,
                          int(num("nodes")) if num("nodes") == num("nodes") else 0,
                          int(num("gen_len")) if num("gen_len") == num("gen_len") else 0, num("mean_len"),
                          num("prompts_per_step"), num("samples_per_prompt"), num("train_batch"), str(first["plan"]),
                          *(str(first[c]) if c in df.columns and first[c] == first[c] else "" for c in OPTIONAL),
                          measured=measured))
    if not runs:
        raise ConfigError(f"table {str(path)!r} has no rows")
    return runs


# ---- a run as an experiment and a plan --------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the source's configs set that its table does not print."""

    train_mb_tokens: int  # tokens per packed training micro-batch (NeMo-RL sequence_packing.train_mb_tokens)
    logprob_mb_tokens: int  # tokens per packed log-prob micro-batch (logprob_mb_tokens)
    kv_fraction: float  # vLLM gpu_memory_utilization
    gen_tp: int | None  # vLLM tensor_parallel_size where the table does not print it
    source: str


NEMO_RL = "NVIDIA-NeMo/RL v0.3.0 (b1c86a81)"
# NeMo-RL v0.3.0 offloads a colocated policy while vLLM generates: refit_policy_generation
# (nemo_rl/algorithms/grpo.py at b1c86a81) calls policy.offload_before_refit() (the optimizer
# state to the CPU) and, after the refit, policy.offload_after_refit() (the model too); the
# step loop brings them back with prepare_for_lp_inference() and prepare_for_training() (both
# DTensor and Megatron workers). In this project's vocabulary that is the train layout's
# offload "all" (estimator.cost.offload), which prices its memory and its host copies by one rule.
COLOCATED_OFFLOAD = "all"


def nemo_rl_settings(run: RlRun, stack: str, preset: str) -> Settings:
    """NeMo-RL v0.3.0's token budgets, engine memory share and (where the table omits it) vLLM
    tensor parallelism for a run: ``train_mb_tokens`` = ``max_total_sequence_length`` ×
    ``train_micro_batch_size`` (1 in every 8B/70B config), ``logprob_mb_tokens`` = the same ×
    ``logprob_batch_size`` (4 in grpo_math_8B_megatron.yaml and grpo_math_70B_megatron.yaml, 2 in
    grpo_math_8B.yaml), ``gpu_memory_utilization`` 0.6 in all of them."""
    seq = run.seq_cap
    if stack == FSDP_VLLM and preset.endswith("-8b"):
        lp, where = 2, "examples/configs/grpo_math_8B.yaml"
    elif stack == MEGATRON_VLLM and preset.endswith("-8b"):
        lp, where = 4, "examples/configs/grpo_math_8B_megatron.yaml"
    else:
        lp, where = 4, "examples/configs/grpo_math_70B_megatron.yaml (no v0.3.0 config for this run; its values)"
    gen_tp = None
    if preset.startswith("qwen3-32b"):
        gen_tp = 4
        where += ("; vLLM tensor_parallel_size 4 from examples/configs/recipes/llm/performance/"
                  "grpo-qwen3-32b-4n8g.yaml (NVIDIA-NeMo/RL 37cb7de1, a later commit)")
    return Settings(seq, seq * lp, 0.6, gen_tp, f"{NEMO_RL} {where}")


def stack_of(run: RlRun) -> str | None:
    """The production stack a run's system names (None: neither Megatron nor DTensor/FSDP)."""
    s = run.system.lower()
    if "megatron" in s:
        return MEGATRON_VLLM
    if "dtensor" in s or "fsdp" in s:
        return FSDP_VLLM
    return None


def batching_of(run: RlRun) -> str:
    """How the run's trainer cuts its token budgets: NeMo-RL's sequence packing (every v0.3.0
    config), or its dynamic batching where the source says it ran that instead (the 70B DTensor
    rows: "dynamic batching instead of sequence packing", NVIDIA-NeMo/RL issue 769)."""
    return "dynamic" if re.search(r"dynamic batching", run.plan, re.IGNORECASE) else "packed"


def _degree(text: str, name: str) -> int | None:
    m = re.search(rf"\b{name}\s*(\d+)", text)
    return int(m.group(1)) if m else None


def why_skipped(run: RlRun, preset: str | None) -> str | None:
    """Why a run cannot be expressed, or None."""
    text = " ".join((run.actor, run.plan, run.notes)).lower()
    if preset is None:
        if re.search(r"moe|-a\d+b|mixtral", text):
            return (f"mixture-of-experts model {run.actor!r}: the plan vocabulary has no expert parallelism "
                    "and ModelSpec no experts")
        if re.search(r"-vl\b|vision|llava", text):
            return f"vision model {run.actor!r}: the vocabulary has no vision encoder"
        return f"no model preset for {run.actor!r} (add it to estimator.spec.models)"
    if re.search(r"context.parallel|\bcp\s*\d", text):
        return f"context parallelism ({run.plan!r}) is outside the plan vocabulary"
    if re.search(r"\bep\s*\d|expert", text):
        return f"expert parallelism ({run.plan!r}) is outside the plan vocabulary"
    if gpu_profile(run) is None:
        return f"GPU {run.gpu!r} has no profile (known: {', '.join(GPU_PROFILES)})"
    if stack_of(run) is None:
        return f"training backend of {run.system!r} is neither Megatron nor DTensor/FSDP"
    if "coloc" not in run.mode.lower():
        return f"mode {run.mode!r}: only colocated runs are mapped"
    if any(not (v == v and v > 0) for v in (run.prompts, run.samples, run.train_batch, run.mean_len)) or \
            run.gpus < 1 or run.nodes < 1 or run.seq_cap <= PROMPT_TOKENS:
        return "batch sizes, lengths or GPU counts are not printed for this run"
    return None


def gpu_profile(run: RlRun) -> str | None:
    """The shipped profile of the run's GPU (the first known name in its ``gpu`` text)."""
    m = re.search(r"\b(" + "|".join(sorted(GPU_PROFILES, key=len, reverse=True)) + r")\b", run.gpu.upper())
    return GPU_PROFILES[m.group(1)] if m else None


@dataclass(frozen=True)
class Mapped:
    """A run as this project's experiment and plan, on the profile that prices its stack."""

    run: RlRun
    experiment: Experiment
    plan: Plan
    profile: Profile
    notes: tuple[str, ...]


def map_run(run: RlRun, profile: str | Path | None = None) -> Mapped | str:
    """``run`` as an experiment, the plan its source states and the profile of its GPU and stack
    (``profile``: instead of the GPU's), or why it cannot be expressed."""
    preset = hf_preset(run.actor)
    reason = why_skipped(run, preset)
    if reason is not None:
        return reason
    stack = stack_of(run)
    settings = nemo_rl_settings(run, stack, preset)
    priced = for_stack(load_profile(profile if profile is not None else gpu_profile(run), key="--profile"), stack)
    trainer_text = run.plan.split(";")[0]
    tp = _degree(trainer_text, "TP") or 1
    pp = _degree(trainer_text, "PP") or 1
    gen_tp = _degree(run.plan, "vLLM TP") or settings.gen_tp
    if gen_tp is None:
        return f"vLLM tensor parallelism is not printed for this run ({run.plan!r})"
    per_step = int(run.prompts * run.samples)
    raw = {"algorithm": "grpo", "models": {"actor": preset, "ref": preset, "reward": "rule"},
           "batch_size": int(run.prompts), "group_size": int(run.samples), "prompt_len": PROMPT_TOKENS,
           "gen_len": {"max": run.seq_cap - PROMPT_TOKENS, "mean": run.mean_len},
           "ppo_minibatches": max(1, round(per_step / run.train_batch)), "old_logprobs": "recompute",
           "kv_fraction": settings.kv_fraction, "seed": 0, "name": run.experiment_id,
           "cluster": {"nodes": run.nodes, "devices_per_node": run.gpus // run.nodes, "device": str(priced.path),
                       "stack": stack, "micro_batching": batching_of(run)}}
    try:
        exp = experiment_from_dict(raw, where=f"run {run.experiment_id}")
    except ConfigError as exc:
        return f"not an experiment of this project: {exc}"
    whole = DeviceMesh(0, run.gpus)
    dp = run.gpus // (tp * pp)
    shard = ("optimizer" if stack == MEGATRON_VLLM else "full") if dp > 1 else "none"
    layouts = {"actor_gen": Layout(whole, run.gpus // gen_tp, gen_tp, 1),
               "actor_inf": Layout(whole, dp, tp, pp, max_tokens_per_micro_batch=settings.logprob_mb_tokens),
               "ref_inf": Layout(whole, dp, tp, pp, max_tokens_per_micro_batch=settings.logprob_mb_tokens),
               "actor_train": Layout(whole, dp, tp, pp, max_tokens_per_micro_batch=settings.train_mb_tokens,
                                     shard=shard, offload=COLOCATED_OFFLOAD)}
    plan = Plan(layouts)
    problems = validate(plan, exp)
    if problems:
        return f"the stated layout is outside the plan vocabulary: {problems[0]}"
    notes = (f"{PRESETS[preset].name} ({run.actor}); stack {stack}",
             f"generation: {run.gpus // gen_tp} vLLM engine(s) of tp {gen_tp}; trainer tp {tp} pp {pp} dp {dp}, "
             f"shard {shard}, offload {COLOCATED_OFFLOAD} (the colocated policy on the host while vLLM generates)",
             f"token budgets per micro-batch: train {settings.train_mb_tokens}, log-probs "
             f"{settings.logprob_mb_tokens}, {batching_of(run)} (sequence packing, or dynamic batching: sorted by "
             f"length, padded to the longest); gpu_memory_utilization {settings.kv_fraction} ({settings.source})",
             f"assumed: prompts of {PROMPT_TOKENS} tokens, responses up to {run.seq_cap - PROMPT_TOKENS} with mean "
             f"{run.mean_len:g} (log-normal body, point mass at the cap)")
    return Mapped(run, exp, plan, priced, notes)


# ---- prediction ---------------------------------------------------------------------------------


def predict_phases(mapped: Mapped, profile: Profile | None = None, iterations: int = 3) -> dict[str, float]:
    """Every phase of :data:`PHASES` predicted for ``mapped`` (on ``profile``, default its own),
    seconds, read off the last simulated iteration: a call's own time runs from its compute
    start (after its reallocation and inputs) to its end, the refit is the generate call's
    reallocation. The trainer's download of its offloaded state after its last step counts to
    the refit, not to training: NeMo-RL times it there (``offload_before_refit`` and
    ``offload_after_refit`` run inside ``refit_policy_generation``, under the
    ``prepare_for_generation`` timer), as its uploads sit in the prep timers that no phase of
    the table holds (``logprob_inference_prep``, ``training_prep``) and only the step counts."""
    from estimator.sim.simulate import simulate

    prof = profile or mapped.profile
    result = simulate(mapped.experiment, mapped.plan, prof, iterations)
    last = max(it for it, _ in result.records)
    rec = {c: r for (it, c), r in result.records.items() if it == last}

    def own(call: str) -> float:
        return rec[call].end_s - rec[call].compute_start_s

    download = max((r[1] - r[0] for r in result.rows if r[3] == last and r[4] == "actor_train"
                    and r[5] == "offload" and r[8] == "host download"), default=0.0)
    train = own("actor_train") - download
    refit = rec["actor_gen"].realloc_s + download
    return {"step_time": result.iteration_s, "gen_time": own("actor_gen"),
            "logprob_time": own("actor_inf") + own("ref_inf"), "old_log_prob_time": own("actor_inf"),
            "ref_time": own("ref_inf"), "train_time": train, "update_actor_time": train, "refit_time": refit,
            "weight_sync_time": refit}


def fitted_runs(profile: Profile) -> set[str]:
    """Experiment ids the priced profile's stack terms were fitted on (named in their cites)."""
    terms = profile.terms
    if terms is None:
        return set()
    text = " ".join(terms.cites.values())
    return set(re.findall(r"\brow ([\w.\-]+)", text)) | {
        x.strip() for m in re.findall(r"\brows ([\w.\-, ]+?)(?:\)|;|$)", text) for x in m.split(",")}


def predict_runs(mapped: list[Mapped], progress: bool = True) -> list[dict[str, Any]]:
    """Per run: id, kind, stack, profile, whether it fitted the profile, whether its plan fits in
    memory, and each measured phase with its prediction and absolute percentage error."""
    out = []
    for m in progress_bar(mapped, desc="runs", unit="run", disable=not progress):
        predicted = predict_phases(m)
        phases = {k: {"predicted_s": predicted[k], "measured_s": v, "ape": abs(predicted[k] - v) / v}
                  for k, v in m.run.measured.items() if k in predicted}
        unknown = sorted(set(m.run.measured) - set(predicted))
        memory = plan_memory(m.experiment, m.plan, m.profile.capacity_bytes, m.profile.stack)
        out.append({"experiment_id": m.run.experiment_id, "value_kind": m.run.value_kind,
                    "role": "fitted" if m.run.experiment_id in fitted_runs(m.profile) else "held_out",
                    "stack": m.profile.stack, "profile": m.profile.name, "fits_memory": memory.feasible,
                    "phases": phases, "unmapped_metrics": unknown, "notes": list(m.notes),
                    "plan": json.loads(m.plan.to_json())["calls"]})
    return out


def mape(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean absolute percentage error per phase over ``runs``."""
    errs: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r["phases"].items():
            errs.setdefault(k, []).append(v["ape"])
    return {k: sum(v) / len(v) for k, v in sorted(errs.items(), key=lambda kv: ORDER.index(kv[0])
                                                     if kv[0] in ORDER else len(ORDER))}


def summarize(table: str, runs: list[dict[str, Any]], skipped: list[dict[str, str]], worst: int = 5) -> dict[str, Any]:
    groups = {"fitted": [r for r in runs if r["role"] == "fitted"],
              "held_out": [r for r in runs if r["role"] == "held_out"],
              "held_out_reported": [r for r in runs if r["role"] == "held_out" and r["value_kind"] == "reported"]}
    errors = sorted(((v["ape"], r["experiment_id"], k) for r in runs for k, v in r["phases"].items()), reverse=True)
    return {"table": table, "runs": runs, "skipped": skipped, "mape": mape(runs),
            "mape_by_role": {g: mape(rs) for g, rs in groups.items() if rs},
            "worst": [{"experiment_id": e, "metric": k, "ape": a} for a, e, k in errors[:worst]],
            "phases": {k: PHASES[k] for k in ORDER if any(k in r["phases"] for r in runs)},
            "priced": sorted({op_set_text(r) for r in runs})}


def configuration(run: RlRun) -> tuple:
    """What makes two runs of a table the same configuration: everything it prints but the
    measured outcomes (phases, mean response length) and who measured it."""
    fields = (run.system, run.mode, run.actor, run.gpu, run.gpus, run.nodes, run.seq_cap, run.prompts, run.samples,
              run.train_batch, run.plan)
    return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in fields)


def repeat_spread(runs: list[RlRun]) -> dict[str, Any]:
    """How far two measurements of one configuration lie apart: every run that is not the
    source's own report (``value_kind`` other than ``reported``: a third-party rerun) against
    the reported run of the same :func:`configuration`, per metric both measured, the repeat's
    relative difference (repeat / report − 1). ``spread``: per metric the median and the largest
    absolute difference over the pairs; no goal on a phase can be tighter than that."""
    reported = {configuration(r): r for r in runs if r.value_kind == "reported"}
    pairs = []
    for r in runs:
        base = reported.get(configuration(r)) if r.value_kind != "reported" else None
        if base is None:
            continue
        diff = {m: r.measured[m] / base.measured[m] - 1 for m in ORDER if m in r.measured and m in base.measured}
        pairs.append({"reported": base.experiment_id, "repeat": r.experiment_id, "value_kind": r.value_kind,
                      "difference": diff})
    spread = {}
    for m in ORDER:
        d = sorted(abs(p["difference"][m]) for p in pairs if m in p["difference"])
        if d:
            spread[m] = {"pairs": len(d), "median": statistics.median(d), "max": d[-1]}
    return {"pairs": pairs, "spread": spread}


def op_set_text(run: dict[str, Any]) -> str:
    return f"{run['stack']} on {run['profile']}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(s: dict[str, Any], lines_of_priced: list[str]) -> str:
    metrics = [k for k in ORDER if any(k in r["phases"] for r in s["runs"])]
    rows = [("run", "kind", "role", "stack", *(m.removesuffix("_time") + " s" for m in metrics))]
    for r in s["runs"]:
        cells = []
        for m in metrics:
            p = r["phases"].get(m)
            cells.append("-" if p is None else f"{p['predicted_s']:.1f} / {p['measured_s']:g}")
        kind = "rerun" if r["value_kind"] == "third_party_rerun" else r["value_kind"]
        rows.append((r["experiment_id"], kind, r["role"].replace("_", "-"), r["stack"], *cells))
    out = [f"{len(s['runs'])} run(s) predicted, {len(s['skipped'])} skipped; predicted / measured seconds per phase",
           *lines_of_priced, "", format_table(rows, right=set(range(4, len(rows[0])))), ""]
    table = [("MAPE", *(m.removesuffix("_time") for m in metrics))]
    for name, errs in [("all runs", s["mape"])] + [(g.replace("_", "-"), e) for g, e in s["mape_by_role"].items()]:
        table.append((name, *(_pct(errs[m]) if m in errs else "-" for m in metrics)))
    out += [format_table(table, right=set(range(1, len(table[0])))), ""]
    spread = s.get("repeats", {}).get("spread", {})
    if spread:
        shown = [m for m in metrics if m in spread]
        table = [("two measurements of one configuration", *(m.removesuffix("_time") for m in shown))]
        for p in s["repeats"]["pairs"]:
            table.append((f"{p['repeat']} / {p['reported']} - 1",
                          *(f"{100 * p['difference'][m]:+.0f} %" if m in p["difference"] else "-" for m in shown)))
        for stat in ("median", "max"):
            table.append((f"{stat} |difference|", *(_pct(spread[m][stat]) for m in shown)))
        out += [format_table(table, right=set(range(1, len(table[0])))), ""]
    out.append("worst: " + "; ".join(f"{w['experiment_id']} {w['metric']} {_pct(w['ape'])}" for w in s["worst"]))
    out += [f"skipped {k['experiment_id']}: {k['reason']}" for k in s["skipped"]]
    return "\n".join(out)


def figure(s: dict[str, Any], out: Path, title: str) -> Path:
    """Predicted (y) against measured (x) seconds per phase and run, log-log, fitted runs
    hollow, with y = x and ±20 % / ±30 % bands; and per run the predicted and measured step
    split into its phases."""
    from analysis.plot import _save, plt

    metrics = [m for m in ("gen_time", "logprob_time", "train_time", "refit_time", "step_time")
               if any(m in r["phases"] for r in s["runs"])]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [1, 1.35]})
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(metrics)}
    xs = [v for r in s["runs"] for v in (p["measured_s"] for p in r["phases"].values())]
    ys = [v for r in s["runs"] for v in (p["predicted_s"] for p in r["phases"].values())]
    lo, hi = 0.7 * min(xs + ys), 1.4 * max(xs + ys)
    for m in metrics:
        for role, marker in (("fitted", "o"), ("held_out", "s")):
            pts = [(r["phases"][m]["measured_s"], r["phases"][m]["predicted_s"]) for r in s["runs"]
                   if m in r["phases"] and r["role"] == role]
            if pts:
                face = "none" if role == "fitted" else colors[m]
                ax.scatter(*zip(*pts), marker=marker, facecolors=face, edgecolors=colors[m], s=42,
                           label=f"{m.removesuffix('_time')} ({role.replace('_', '-')})")
    ax.plot([lo, hi], [lo, hi], color="black", lw=1)
    for band, alpha in ((0.3, 0.10), (0.2, 0.18)):
        ax.fill_between([lo, hi], [(1 - band) * lo, (1 - band) * hi], [(1 + band) * lo, (1 + band) * hi],
                        color="grey", alpha=alpha, lw=0)
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured s (source's table)",
           ylabel="predicted s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.set_title("per phase: hollow = fitted runs, filled = held out; bands ±20 % and ±30 %", fontsize=8)
    parts = [m for m in ("gen_time", "logprob_time", "train_time", "refit_time") if m in metrics]
    names = [r["experiment_id"] for r in s["runs"]]
    for j, (which, offset) in enumerate((("measured_s", -0.2), ("predicted_s", 0.2))):
        bottom = [0.0] * len(names)
        for m in parts:
            vals = [r["phases"].get(m, {}).get(which, 0.0) for r in s["runs"]]
            bx.bar([i + offset for i in range(len(names))], vals, 0.38, bottom=bottom, color=colors[m],
                   alpha=0.55 if which == "measured_s" else 0.95, label=m.removesuffix("_time") if j else None,
                   edgecolor="white", lw=0.5)
            bottom = [b + v for b, v in zip(bottom, vals)]
        steps = [r["phases"].get("step_time", {}).get(which) for r in s["runs"]]
        bx.scatter([i + offset for i, v in enumerate(steps) if v], [v for v in steps if v], marker="_", s=160,
                   color="black", label="step" if j else None, zorder=3)
    labels = [f"{n}\n({r['role'].replace('_', '-')}" + (", rerun)" if r["value_kind"] == "third_party_rerun" else ")")
              for n, r in zip(names, s["runs"])]
    bx.set_xticks(range(len(names)), labels, rotation=35, ha="right", fontsize=7)
    bx.set(ylabel="seconds per step")
    bx.set_title("per run: left bar measured, right bar predicted; black tick: the whole step", fontsize=8)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def run_rl(args: argparse.Namespace) -> int:
    runs = load_table(args.table)
    mapped, skipped = [], []
    for run in runs:
        m = map_run(run, args.profile)
        if isinstance(m, str):
            skipped.append({"experiment_id": run.experiment_id, "reason": m})
        else:
            mapped.append(m)
    out = _out_dir(args.out) if args.out else None
    if not mapped:
        raise ConfigError(f"no run of {args.table} can be predicted: " +
                          "; ".join(f"{k['experiment_id']}: {k['reason']}" for k in skipped))
    priced = sorted({op_set(m.profile)["text"] for m in mapped})
    summary = summarize(str(args.table), predict_runs(mapped, progress=not args.json), skipped)
    summary["priced"] = priced
    summary["repeats"] = repeat_spread(runs)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        rows = ["experiment_id,value_kind,role,stack,profile,metric,predicted_s,measured_s,ape"]
        rows += [f"{r['experiment_id']},{r['value_kind']},{r['role']},{r['stack']},{r['profile']},{k},"
                 f"{v['predicted_s']:.4g},{v['measured_s']:.4g},{v['ape']:.4f}"
                 for r in summary["runs"] for k, v in r["phases"].items()]
        atomic_write_text(out / "predictions.csv", "\n".join(rows) + "\n")
        held = summary["mape_by_role"].get("held_out", {})
        stacks = ", ".join(sorted({m.profile.stack for m in mapped}))
        profiles = ", ".join(sorted({m.profile.name for m in mapped}))
        title = (f"{Path(args.table).name}: {len(mapped)} runs predicted ({len(skipped)} skipped), {stacks} on "
                 f"{profiles}" + (f"; held-out MAPE step {_pct(held['step_time'])}" if "step_time" in held else ""))
        figure(summary, out / "phases.png", title)
        atomic_write_json(out / "summary.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render(summary, priced))
        if out is not None:
            print(f"\nwrote {out}/predictions.csv, phases.png, summary.json")
    return 0


OUT_FILES = ("predictions.csv", "phases.png", "summary.json")


def _out_dir(path: str) -> Path:
    """``--out``, checked before any work (:func:`estimator.base.io.check_output_dir`; a file it
    holds must be writable where the directory exists already); made when written."""
    out = check_output_dir(path, "--out")
    if out.is_dir():
        for name in OUT_FILES:
            check_output_path(out / name, "--out")
    return out


# ---- fitting the stacks' own numbers -----------------------------------------------------------

FIT_PHASES = ("gen_time", "logprob_time", "train_time", "refit_time")
# vLLM's custom all-reduce latency on H100 in microseconds by tp size (sgl-project/sglang#2904,
# unit test without CUDA graphs, the 'vllm' table) at these message sizes (elements)
AR_ELEMENTS = (512, 4096, 32768, 262144, 524288, 1048576)
VLLM_ALLREDUCE_US = {2: (9.5, 8.8, 8.7, 12.9, 17.7, 26.6), 4: (9.1, 8.5, 9.2, 20.6, 26.9, 40.2),
                     8: (10.1, 9.3, 11.8, 24.1, 30.4, 45.0)}
STACK_NAMES_FIT = (MEGATRON_VLLM, FSDP_VLLM)


def _decode_kernels(profile: Profile, preset: str = "llama3.1-8b") -> float:
    """Kernels one decode step of ``preset`` launches on one device (tp 1) in the fused census."""
    from estimator.cost.census import block_piece, end_piece, model_symbols
    from estimator.cost.pieces import piece_launches

    m, fused = PRESETS[preset], for_stack(profile, MEGATRON_VLLM)
    sym = model_symbols(m, 1) | {"rows": 1.0, "tokens": 1.0, "kv_len": 1.0}
    return (m.layers * piece_launches(fused, block_piece("decode_batched", m, 1), sym)
            + sum(piece_launches(fused, p, sym) for p in (end_piece("embed", 1, m), end_piece("head_lm", 1, m),
                                                           "sample_ending")))


def stacks_doc(base: Profile, name: str, x: list[float], fit_cite: dict[str, str]) -> dict:
    """``base``'s document with the ``stacks`` section of fitted terms ``x`` = (engine fixed
    cost per step; per stack: trainer cost per micro-batch pass, refit cost per tensor)."""
    import copy

    fixed = float(x[0])
    kernels = _decode_kernels(base)
    eager = (8.4e-3 - 5.1e-3) / kernels
    generation = {
        "step": {"fixed_s": fixed, "per_request_s": max(STEP_AT_256_S - fixed, 0.0) / STEP_AT,
                 "cite": f"fixed_s {fit_cite['generation']}; per_request_s = ({1e3 * STEP_AT_256_S:g} ms - fixed_s) / "
                         f"{STEP_AT}, so that a step with {STEP_AT} running requests costs {1e3 * STEP_AT_256_S:g} ms, "
                         "the gap between decode steps vLLM V1 showed at batch 256 on Llama-2-7B "
                         "(vllm-project/vllm#10634: 5-6 ms)"},
        "launch": {"cuda_graphs": True, "graph_s": base.launch_overhead_s, "eager_kernel_s": eager,
                   "cite": f"cuda_graphs: NeMo-RL v0.3.0 runs vLLM with enforce_eager: False "
                           f"(examples/configs/grpo_math_1B.yaml); graph_s: one launch, the profile's "
                           f"compute.launch.overhead_s; eager_kernel_s: Llama 3.1 8B decodes on H100 SXM5 in 8.4 ms "
                           f"eager against 5.1 ms with CUDA graphs (cloudai.pt), over the {kernels:.0f} kernels of its "
                           f"decode step in the fused census"},
        "allreduce": {"curves": {str(tp): [[2.0 * n, round(us * 1e-6, 10)] for n, us in zip(AR_ELEMENTS, times)]
                                 for tp, times in VLLM_ALLREDUCE_US.items()},
                      "cite": "vLLM's custom all-reduce on H100, without CUDA graphs (so an upper bound inside a "
                              "captured decode step): sgl-project/sglang#2904's table 'vllm' (tp 2/4/8 at 512 ... "
                              "1,048,576, read as bf16 elements); NCCL beyond the largest size"},
        "scheduler": {"max_num_seqs": 1024, "prefill_chunk_tokens": 16384,
                      "cite": "vLLM 0.9.0 (NeMo-RL v0.3.0 pins vllm==0.9.0) V1 defaults of the LLM class on a GPU "
                              "of at least 70 GiB: max_num_seqs 1024, max_num_batched_tokens 16384 "
                              "(vllm/engine/arg_utils.py, EngineArgs._set_default_args_v1)"}}
    doc = copy.deepcopy(base.raw)
    doc["name"], doc["source"] = name, "measured"
    doc["stacks"] = {s: {"generation": copy.deepcopy(generation),
                         "refit": {"per_tensor_s": float(x[2 + 2 * i]),
                                   "cite": f"per_tensor_s {fit_cite[s + ':refit']}"},
                         "trainer": {"micro_batch_s": float(x[1 + 2 * i]),
                                     "cite": f"micro_batch_s {fit_cite[s + ':trainer']}"}}
                     for i, s in enumerate(STACK_NAMES_FIT)}
    return doc


def fit_stacks(mapped: list[Mapped], base: Profile, name: str, command: str, progress: bool = True
               ) -> tuple[dict, dict[str, Any]]:
    """Fit the five numbers of :func:`stacks_doc` to ``mapped``'s measured phases (scipy
    ``least_squares`` on the log error of :data:`FIT_PHASES`)."""
    import numpy as np
    from scipy import optimize

    from estimator.profile.profiles import profile_from_dict

    by_stack = {s: [m.run.experiment_id for m in mapped if m.profile.stack == s] for s in STACK_NAMES_FIT}
    all_ids = ", ".join(m.run.experiment_id for m in mapped)
    cite = {"generation": f"fitted by `{command}` on the gen_time of rows {all_ids}"}
    for s, ids in by_stack.items():
        rows = ", ".join(ids) if ids else "none (not fitted: 0)"
        cite[s + ":refit"] = f"fitted by `{command}` on the refit_time of rows {rows}"
        cite[s + ":trainer"] = f"fitted by `{command}` on the train_time and logprob_time of rows {rows}"
    bar = progress_bar(desc="fit evaluations", unit="eval", disable=not progress)
    measured = np.array([m.run.measured[k] for m in mapped for k in FIT_PHASES if k in m.run.measured])

    def predict_all(x: np.ndarray) -> np.ndarray:
        doc = stacks_doc(base, name, list(x), cite)
        prof = profile_from_dict(doc, where=f"profile {name}")
        out = []
        for m in mapped:
            phases = predict_phases(m, for_stack(prof, m.profile.stack))
            out += [phases[k] for k in FIT_PHASES if k in m.run.measured]
        bar.update()
        return np.array(out)

    def residuals(x: np.ndarray) -> np.ndarray:
        return np.log(predict_all(x) / measured)

    lo = [0.0] * 5
    hi = [STEP_AT_256_S, 0.5, 0.5, 0.1, 0.1]
    x0 = [2e-3, 0.02, 0.02, 0.005, 0.005]
    fit = optimize.least_squares(residuals, x0, bounds=(lo, hi), x_scale=[1e-3, 1e-2, 1e-2, 1e-3, 1e-3],
                                 diff_step=1e-2, method="trf", xtol=1e-4, ftol=1e-5)
    evaluations = bar.n
    bar.close()
    doc = stacks_doc(base, name, list(fit.x), cite)
    names = ("step_fixed_s", "megatron_micro_batch_s", "megatron_per_tensor_s", "fsdp_micro_batch_s",
             "fsdp_per_tensor_s")
    return doc, {**dict(zip(names, (float(v) for v in fit.x))), "evaluations": int(evaluations),
                 "fit_runs": [m.run.experiment_id for m in mapped],
                 "fit_mape": float(np.mean(np.abs(np.expm1(fit.fun))))}


def run_fit(args: argparse.Namespace) -> int:
    from estimator.profile.profiles import profile_from_dict

    out = check_output_path(args.out if args.out is not None else PROFILE_DIR / f"{args.name}.json", "--out")
    base = load_profile(args.base, key="--base")
    wanted = [x.strip() for x in args.fit.split(",") if x.strip()]
    runs = {r.experiment_id: r for r in load_table(args.table)}
    unknown = [w for w in wanted if w not in runs]
    if unknown or not wanted:
        raise ConfigError(f"--fit {args.fit!r}: {unknown or 'no run'} not in {args.table} "
                          f"(runs: {', '.join(runs)})")
    mapped = []
    for w in wanted:
        m = map_run(runs[w], args.base)
        if isinstance(m, str):
            raise ConfigError(f"--fit: run {w} cannot be predicted: {m}")
        mapped.append(m)
    command = f"python -m analysis.published rl-fit {args.table} --base {args.base} --name {args.name}" + (
        f" --fit {args.fit}" if tuple(wanted) != DEFAULT_FIT else "")
    doc, result = fit_stacks(mapped, base, args.name, command, progress=not args.json)
    doc["notes"] = (f"{base.name} with the production stacks' own numbers (stacks.megatron-vllm, stacks.fsdp-vllm): "
                    f"five fitted by `{command}` on runs {', '.join(wanted)} of the NeMo-RL v0.3 table "
                    f"(analysis/data/published/), every other run held out; the rest cited")
    profile_from_dict(doc, where=f"profile {out}")
    atomic_write_text(out, json.dumps(doc, indent=2) + "\n", "--out")
    result["profile"] = str(out)
    print(json.dumps(result, indent=2) if args.json else
          f"wrote {out}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
          + f" ({result['evaluations']} evaluations)")
    return 0


def add_parsers(sub: Any) -> None:
    """The ``rl`` and ``rl-fit`` subcommands of ``python -m analysis.published``."""
    r = sub.add_parser("rl", help="predict every run of a long-format table of published RL steps")
    r.add_argument("table", help="CSV in the long format of analysis/data/published/README.md")
    r.add_argument("--profile", help="hardware profile name or file for every run (default: each run's GPU)")
    r.add_argument("--out", help="directory for predictions.csv, phases.png, summary.json")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    f = sub.add_parser("rl-fit", help="fit the production stacks' own numbers on some runs of such a table")
    f.add_argument("table", help="CSV in the long format of analysis/data/published/README.md")
    f.add_argument("--base", default="h100-vidur", help="profile to add the numbers to (default h100-vidur)")
    f.add_argument("--name", default="h100-rl", help="name of the new profile (default h100-rl)")
    f.add_argument("--fit", default=",".join(DEFAULT_FIT), help="runs to fit on, by experiment_id "
                                                               f"(default {','.join(DEFAULT_FIT)})")
    f.add_argument("--out", help="profile file to write (default calibration/profiles/<name>.json)")
    f.add_argument("--json", action="store_true", help="print one JSON object")


COMMANDS = {"rl": run_rl, "rl-fit": run_fit}
