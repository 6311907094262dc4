"""Predicted against measured: timelines joined per plan, per call and per op kind, and the errors.

Both sides are :class:`estimator.spec.timeline.Timeline` s — the simulator's prediction and the
executor's ``--timeline`` — so the joins are on the same columns (DESIGN §4.9). Only steady-state
iterations count (those after ``warmup`` and before the last ``drain``, which an asynchronous
run has: :attr:`estimator.spec.workflow.Workflow.drain`; all of them when there are no more).
A weight push to a standing rollout copy (call ``push:<generate call>``) is joined as a call of
its own, of kind ``push``, its time the transfer proper as a reallocation's. Three levels:

- **plan**: the steady-state iteration time (:meth:`Timeline.steady_state_s`);
- **call**: each call's compute window per iteration — from when the last of its devices
  began to the last end of its ``compute`` spans when the timeline has them (the executor's,
  which enclose everything it does for the call besides reallocation and waiting for inputs),
  else of its op spans (the simulator's);
- **op kind**: per (call, pipeline stage, kind) the seconds a device spends in that kind per
  iteration (max over the stage's devices, as the executor reports reallocation and data time),
  each op counted from when the stage's last device began it (:func:`lock_step`)
  — so decode, recorded per step by the executor and per chunk by the simulator, is compared
  summed per call and stage. Tensor-parallel collectives, which the executor runs inside its
  forward, backward and decode spans without timing them apart, are counted in the predicted op
  they follow when the measurement has no spans of their own. Reallocation and data movement
  are compared per call (stage -1),
  as the time the transfer itself takes, since the executor's spans also hold waiting for the
  other side: a reallocation from when its last device joins to when its last device is done
  (the executor's devices enter when their previous call ends; the simulator starts them
  together), and a call's data from when its inputs exist and it waits for them (the later of
  its producers' end and its own wait's start) to when the last input has landed. The
  executor's sender-side data spans (posting a call's outputs, after its compute) are left
  out: the simulator files transfers under the consumer only.

A plan measured in several fresh runs gets the median of the runs and their min/max. An error
only counts against the model where the prediction lies outside that spread:
``ape_beyond_spread = max(0, predicted − max, min − predicted) / measured``, next to the plain
absolute percentage error ``ape = |predicted − measured| / measured`` (both as fractions).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from estimator.base.tables import format_table
from estimator.spec.timeline import Timeline
from estimator.spec.workflow import push_target

OP_KINDS = {"prefill": "prefill", "decode": "decode", "forward": "forward", "backward": "backward",
            "optimizer": "optimizer", "tp_allreduce": "tp_comm", "pp_send": "pp_comm", "dp_allreduce": "dp_comm",
            "dp_reduce_scatter": "dp_comm", "dp_allgather": "dp_comm", "dp_shard_comm": "dp_comm",
            "reward": "reward", "realloc": "realloc", "push": "push", "data": "data", "offload": "offload"}
KIND_ORDER = ("prefill", "decode", "forward", "backward", "optimizer", "tp_comm", "pp_comm", "dp_comm",
              "reward", "realloc", "push", "data", "offload")
UNSTAGED = {"realloc", "push", "data"}
PUSH_KIND = "push"  # the call kind of a weight push
# collectives a compute op encloses, when they are not timed alone
INSIDE_OPS = ("tp_allreduce", "dp_shard_comm")
# host transfers of offloaded state (Layout.offload) come before and after a call's computation
OUTSIDE_COMPUTE = {"realloc", "data", "call", "compute", "offload"}
CALL_KEYS, OP_KEYS = ["plan", "call"], ["plan", "call", "stage", "kind"]
_VALUES = ["predicted_s", "measured_s", "measured_min_s", "measured_max_s"]


def default_warmup(timeline: Timeline) -> int:
    """One warm-up iteration when there are several (the executor's and the simulator's rule)."""
    return 1 if len(timeline.iterations) > 1 else 0


def steady_iterations(timeline: Timeline, warmup: int, drain: int = 0) -> list[int]:
    """The iterations after ``warmup`` and before the last ``drain`` (the drain only when
    something is left: :meth:`Timeline.steady_state_s`'s rule); all of them when none is."""
    its = timeline.iterations
    if drain and len(its) > warmup + drain:
        its = its[:len(its) - drain]
    return [i for i in its if i >= warmup] or timeline.iterations


def call_durations(timeline: Timeline, warmup: int, drain: int = 0) -> pd.Series:
    """call → its compute window in seconds, averaged over the steady iterations: from when
    the last of its devices has begun (the simulator starts a call once all its devices are
    free; a device of the executor that enters early waits inside the call) to its last end.
    A weight push's window is its ``push`` spans'."""
    df = timeline.to_dataframe()
    df = df[df["iteration"].isin(steady_iterations(timeline, warmup, drain))]
    per_device = _compute_spans(df).groupby(["call", "iteration", "device"]).agg(lo=("start_s", "min"),
                                                                               hi=("end_s", "max"))
    window = per_device.groupby(["call", "iteration"]).agg(lo=("lo", "max"), hi=("hi", "max"))
    return (window["hi"] - window["lo"]).clip(lower=0.0).groupby("call").mean().rename("duration_s")


def _compute_spans(df: pd.DataFrame) -> pd.DataFrame:
    """The spans that make up calls' computations: the ``compute`` wrappers where the timeline
    has them (the executor's) and its weight pushes, else every op span outside reallocation
    and data (the simulator's, its pushes included)."""
    if (df["op"] == "compute").any():
        return df[df["op"].isin(("compute", "push"))]
    return df[~df["op"].isin(OUTSIDE_COMPUTE)]


def _transfers(df: pd.DataFrame, producers: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Rows (call, iteration, kind, duration_s) of reallocation, weight push and data transfer
    time proper (see the module docstring)."""
    rows = []
    re = df[df["op"].isin(("realloc", "push"))]
    for (call, it, op), g in re.groupby(["call", "iteration", "op"]):
        rows.append((call, it, OP_KINDS[op], max(0.0, g["end_s"].max() - g["start_s"].max())))
    data = df[df["op"] == "data"]
    if not data.empty:
        ends = _compute_spans(df).groupby(["call", "iteration"])["end_s"].max()
        starts = df[df["op"] == "compute"].groupby(["call", "iteration"])["start_s"].min()
        for (call, it), g in data.groupby(["call", "iteration"]):
            if (call, it) in starts.index:  # the executor's: only the waits before the compute
                g = g[g["start_s"] < starts[(call, it)]]
            if g.empty:
                continue
            ready = max((ends.get((p, it), -math.inf) for p in producers.get(call, ())), default=-math.inf)
            per_device = [max(0.0, d["end_s"].max() - max(d["start_s"].min(), ready)) for _, d in g.groupby("device")]
            rows.append((call, it, "data", max(per_device)))
    return pd.DataFrame(rows, columns=["call", "iteration", "kind", "duration_s"])


def fold_comm(df: pd.DataFrame, ops: Sequence[str] = INSIDE_OPS) -> pd.DataFrame:
    """``df`` with each span of ``ops`` (collectives the executor does not time on their own)
    relabelled as the compute op it follows on its device — the executor's forward, backward or
    decode span encloses the tensor-parallel collectives run inside it."""
    df = df.sort_values(["device", "call", "iteration", "start_s"], kind="stable").copy()
    inside = df["op"].isin(ops)
    compute = df["op"].where(df["op"].isin(OP_KINDS) & ~df["op"].isin(UNSTAGED) & ~inside)
    owner = compute.groupby([df["device"], df["call"], df["iteration"]]).ffill()
    df.loc[inside & owner.notna(), "op"] = owner[inside & owner.notna()]
    return df


def lock_step(spans: pd.DataFrame) -> pd.DataFrame:
    """``spans`` with each op's duration counted from when the last device of its stage began
    it: the tensor-parallel ranks (and data-parallel replicas) of a stage run each micro-batch's
    op together, and a rank that enters early waits inside its span, at the first collective,
    for a partner still busy with its previous call — time the op itself does not take. Spans
    are matched across the stage's devices by (call, op, iteration, micro-batch) and their order
    on the device (decode steps share a micro-batch)."""
    if spans.empty:
        return spans
    spans = spans.sort_values("start_s", kind="stable")
    key = ["call", "stage", "op", "iteration", "micro_batch"]
    spans["_k"] = spans.groupby(key + ["device"]).cumcount()
    last_start = spans.groupby(key + ["_k"])["start_s"].transform("max")
    spans["duration_s"] = (spans["end_s"] - last_start).clip(lower=0.0)
    return spans.drop(columns="_k")


def op_durations(timeline: Timeline, warmup: int, producers: Mapping[str, Sequence[str]] | None = None,
                 fold: Sequence[str] = (), drain: int = 0) -> pd.DataFrame:
    """Rows (call, stage, kind, duration_s): seconds per steady iteration on the stage's busiest
    device; reallocation, weight pushes and data (stage -1) as transfer time proper.
    ``producers``: call → the calls whose outputs it reads (without it, a data wait counts from
    its own start); ``fold``: span ops counted in the compute op they follow (:func:`fold_comm`)."""
    df = timeline.to_dataframe()
    steady = steady_iterations(timeline, warmup, drain)
    df = df[df["iteration"].isin(steady)]
    if fold:
        df = fold_comm(df, fold)
    staged = lock_step(df[df["op"].isin(OP_KINDS) & ~df["op"].isin(UNSTAGED)].copy())
    staged["kind"] = staged["op"].map(OP_KINDS)
    per_device = staged.groupby(["call", "stage", "kind", "iteration", "device"])["duration_s"].sum()
    per_iter = per_device.groupby(["call", "stage", "kind", "iteration"]).max()
    moved = _transfers(df, producers or {}).assign(stage=-1)
    if not moved.empty:
        per_iter = pd.concat([per_iter, moved.set_index(["call", "stage", "kind", "iteration"])["duration_s"]])
    # an iteration without the op spent no time in it
    per_iter = per_iter.unstack("iteration").reindex(columns=steady).fillna(0.0)
    return per_iter.mean(axis=1).rename("duration_s").reset_index()


def _runs(frames: Sequence[pd.DataFrame], keys: list[str]) -> pd.DataFrame:
    """Median, min and max over runs of ``duration_s`` per key (a key missing from a run: 0 s)."""
    both = pd.concat([f.assign(run=r) for r, f in enumerate(frames)], ignore_index=True)
    wide = both.pivot_table(index=keys, columns="run", values="duration_s", aggfunc="sum").fillna(0.0)
    return pd.DataFrame({"measured_s": wide.median(axis=1), "measured_min_s": wide.min(axis=1),
                         "measured_max_s": wide.max(axis=1)}).reset_index()


def add_errors(df: pd.DataFrame) -> pd.DataFrame:
    """``ape`` and ``ape_beyond_spread`` (fractions; NaN where either side is missing or zero)."""
    df = df.copy()
    meas, pred = df["measured_s"], df["predicted_s"]
    ok = meas.gt(0) & pred.notna() & meas.notna()
    outside = np.maximum.reduce([np.zeros(len(df)), (pred - df["measured_max_s"]).to_numpy(),
                                 (df["measured_min_s"] - pred).to_numpy()])
    df["ape"] = ((pred - meas).abs() / meas).where(ok)
    df["ape_beyond_spread"] = pd.Series(outside, index=df.index).div(meas).where(ok)
    return df


@dataclass(frozen=True)
class PlanFrames:
    """One plan, predicted and measured, at the three levels (not yet with errors)."""

    plan: pd.DataFrame
    calls: pd.DataFrame
    ops: pd.DataFrame


def compare_plan(plan_id: str, predicted: Timeline, measured: Sequence[Timeline],
                 call_kinds: Mapping[str, str], warmup: int | None = None,
                 producers: Mapping[str, Sequence[str]] | None = None, drain: int = 0) -> PlanFrames:
    """Join one plan's prediction with its measured runs. ``call_kinds``: call → generate |
    inference | train (a weight push is of kind ``push``). ``warmup`` defaults to
    :func:`default_warmup` of each timeline; ``drain``: the last iterations left out too (an
    asynchronous workflow's :attr:`~estimator.spec.workflow.Workflow.drain`). ``producers``:
    call → the calls it reads outputs from (:func:`op_durations`)."""
    if not measured:
        raise ValueError(f"plan {plan_id}: no measured run to compare with")

    def wu(tl: Timeline) -> int:
        return default_warmup(tl) if warmup is None else warmup

    iters = pd.DataFrame({"duration_s": [m.steady_state_s(wu(m), drain) for m in measured], "plan": plan_id})
    plan = _runs([iters.iloc[[r]] for r in range(len(measured))], ["plan"])
    plan.insert(1, "predicted_s", predicted.steady_state_s(wu(predicted), drain))
    plan["runs"] = len(measured)

    def calls_of(tl: Timeline) -> pd.DataFrame:
        return call_durations(tl, wu(tl), drain).reset_index().assign(plan=plan_id)

    calls = _runs([calls_of(m) for m in measured], CALL_KEYS)
    pred_calls = calls_of(predicted).rename(columns={"duration_s": "predicted_s"})
    calls = pred_calls.merge(calls, on=CALL_KEYS, how="outer")
    calls.insert(2, "call_kind", [PUSH_KIND if push_target(c) else call_kinds.get(c) for c in calls["call"]])

    # what the measurement does not time on its own is compared inside the op that encloses it
    timed = set().union(*(set(m.to_dataframe()["op"]) for m in measured))
    fold = tuple(op for op in INSIDE_OPS if op not in timed)

    def ops_of(tl: Timeline, fold: Sequence[str] = ()) -> pd.DataFrame:
        return op_durations(tl, wu(tl), producers, fold, drain).assign(plan=plan_id)

    ops = _runs([ops_of(m) for m in measured], OP_KEYS)
    pred_ops = ops_of(predicted, fold).rename(columns={"duration_s": "predicted_s"})
    ops = pred_ops.merge(ops, on=OP_KEYS, how="outer")
    return PlanFrames(plan, calls[CALL_KEYS + ["call_kind"] + _VALUES], ops[OP_KEYS + _VALUES])


def join(frames: Sequence[PlanFrames]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(plans, calls, ops) over all plans, each with its errors."""
    if not frames:
        raise ValueError("no plan to join")
    plans = add_errors(pd.concat([f.plan for f in frames], ignore_index=True))
    calls = add_errors(pd.concat([f.calls for f in frames], ignore_index=True))
    ops = add_errors(pd.concat([f.ops for f in frames], ignore_index=True))
    ops["kind"] = pd.Categorical(ops["kind"], categories=list(KIND_ORDER))
    ops = ops.sort_values(OP_KEYS, kind="stable").reset_index(drop=True)
    ops["kind"] = ops["kind"].astype(str)
    return plans, calls, ops


def plans_wide(plans: pd.DataFrame, calls: pd.DataFrame) -> pd.DataFrame:
    """One row per plan with ``<call>_predicted_s`` and ``<call>_measured_s`` columns added."""
    wide = calls.pivot_table(index="plan", columns="call", values=["predicted_s", "measured_s"], sort=False)
    wide.columns = [f"{call}_{value}" for value, call in wide.columns]
    order = [f"{c}_{v}" for c in dict.fromkeys(calls["call"]) for v in ("predicted_s", "measured_s")]
    return plans.merge(wide[[c for c in order if c in wide.columns]], left_on="plan", right_index=True, how="left")


def _errors(df: pd.DataFrame) -> dict[str, Any]:
    known = df.dropna(subset=["ape"])
    out: dict[str, Any] = {"n": int(len(known)), "unmeasured": int(df["measured_s"].isna().sum()),
                           "unpredicted": int(df["predicted_s"].isna().sum())}
    for col, name in (("ape", ""), ("ape_beyond_spread", "_beyond_spread")):
        vals = known[col]
        out[f"median_ape{name}"] = float(vals.median()) if len(vals) else math.nan
        out[f"max_ape{name}"] = float(vals.max()) if len(vals) else math.nan
    return out


def ranking(plans: pd.DataFrame) -> dict[str, Any]:
    """Rank agreement of predicted and measured plan times, and how the predicted-best plan did."""
    both = plans.dropna(subset=["predicted_s", "measured_s"])
    out: dict[str, Any] = {"plans": int(len(both)), "spearman": math.nan, "kendall": math.nan}
    if both.empty:
        return out
    if len(both) >= 2:
        with warnings.catch_warnings():  # constant input → NaN, which is the honest answer
            warnings.simplefilter("ignore")
            out["spearman"] = float(stats.spearmanr(both["predicted_s"], both["measured_s"]).statistic)
            out["kendall"] = float(stats.kendalltau(both["predicted_s"], both["measured_s"]).statistic)
    pred_best = both.loc[both["predicted_s"].idxmin()]
    meas_best = both.loc[both["measured_s"].idxmin()]
    out.update({
        "predicted_best": pred_best["plan"], "measured_best": meas_best["plan"],
        "predicted_best_is_measured_best": bool(pred_best["plan"] == meas_best["plan"]),
        "predicted_best_behind": float(pred_best["measured_s"] / meas_best["measured_s"] - 1.0),
        # the two plans' measured spreads overlap: the runs cannot tell them apart
        "predicted_best_within_spread": bool(pred_best["measured_min_s"] <= meas_best["measured_max_s"]),
    })
    return out


def summary(plans: pd.DataFrame, calls: pd.DataFrame, ops: pd.DataFrame) -> dict[str, Any]:
    """Median and max absolute percentage errors per iteration, call kind and op kind; ranking."""
    return {
        "iteration": _errors(plans),
        "call_kind": {k: _errors(g) for k, g in calls.groupby("call_kind", sort=False)},
        "op_kind": {k: _errors(ops[ops["kind"] == k]) for k in KIND_ORDER if (ops["kind"] == k).any()},
        "ranking": ranking(plans),
    }


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def plan_table(plans: pd.DataFrame) -> str:
    """Per plan: predicted and measured (median, min–max over runs) iteration time and the errors."""
    rows = [("plan", "predicted_s", "measured_s", "runs min–max", "|err|", "beyond spread")]
    for _, r in plans.sort_values("measured_s").iterrows():
        rows.append((str(r["plan"]), f"{r['predicted_s']:.4f}", f"{r['measured_s']:.4f}",
                     f"{r['measured_min_s']:.4f}–{r['measured_max_s']:.4f}", _pct(r["ape"]),
                     _pct(r["ape_beyond_spread"])))
    return format_table(rows)


def summary_table(s: Mapping[str, Any]) -> str:
    """The summary as readable tables."""
    rows = [("level", "what", "n", "median |err|", "max |err|", "median beyond spread", "max beyond spread",
             "unmeasured", "unpredicted")]

    def add(level: str, what: str, e: Mapping[str, Any]) -> None:
        rows.append((level, what, str(e["n"]), _pct(e["median_ape"]), _pct(e["max_ape"]),
                     _pct(e["median_ape_beyond_spread"]), _pct(e["max_ape_beyond_spread"]), str(e["unmeasured"]),
                     str(e["unpredicted"])))

    add("iteration", "plan", s["iteration"])
    for k, e in s["call_kind"].items():
        add("call kind", k, e)
    for k, e in s["op_kind"].items():
        add("op kind", k, e)
    r = s["ranking"]
    lines = [format_table(rows, right=set(range(2, 9))), "",
             f"rank correlation over {r['plans']} plans: Spearman {r['spearman']:.3f}, Kendall {r['kendall']:.3f}"]
    if "predicted_best" in r:
        verdict = ("is the measured best" if r["predicted_best_is_measured_best"] else
                   f"is {_pct(r['predicted_best_behind'])} behind the measured best {r['measured_best']}"
                   + (" (within the runs' spread)" if r["predicted_best_within_spread"] else ""))
        lines.append(f"predicted-best plan {r['predicted_best']} {verdict}")
    return "\n".join(lines)
