"""The compute fit: recovers a known profile, ignores held-out rows, reproduces a measured grid."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from calibration.fit_compute import (
    OpTable,
    Params,
    compose_mode,
    executor_section,
    fit_compute,
    op_times,
    params_from_sections,
)
from calibration.kernels import grid, measure
from calibration.overheads import MICRO_BATCHES, measure_overheads
from estimator.base.errors import ConfigError
from estimator.profile.profiles import Curve
from tests.conftest import ROOT

TRUE = Params(peak_flops=50e9, compute_points=np.array([[1e4, 0.05], [1e6, 0.5], [1e8, 1.0]]),
              bandwidth=20e9, memory_points=np.array([[1e2, 0.01], [1e4, 0.2], [1e6, 1.0]]),
              overhead_s=3e-6, mode="serial")
VIEW = (0.0, 0.0)


def _row(family: str, op: str, ops: list[tuple[float, float]], size: float) -> dict:
    return {"family": family, "op": op, "model": "m", "tp": 1, "batch": 1, "seq": 1, "kv": 1, "phase": "",
            "size": 0, "piece": False, "flops": sum(f for f, _ in ops), "bytes": sum(b for _, b in ops),
            "launches": len(ops), "work_ops": sum(1 for f, b in ops if f or b), "sort": size,
            "ops": ";".join(f"{f:.9g}:{b:.9g}" for f, b in ops)}


def _compose(big: float, stream: float, both: float) -> list[dict]:
    return [{**_row("compose", op, [], 0), "ops": "", "launches": 0, "median_s": t}
            for op, t in (("big", big), ("stream", stream), ("both", both))]


def synthetic_raw(p: Params = TRUE, seed: int = 0) -> pd.DataFrame:
    """Rows shaped like the kernel grid's, timed exactly by the contract formula."""
    rng = np.random.default_rng(seed)
    rows = []
    for f in np.logspace(4, 8, 25):
        rows.append(_row("gemm", "proj", [VIEW, VIEW, (f, f / 10), VIEW], f))
        rows.append(_row("attention", "decode", [VIEW, (f / 2, f / 20)], f))
    for b in np.logspace(2, 6.5, 25):
        rows.append(_row("elementwise", "add", [(0.0, b)], b))
        rows.append(_row("stream", "add", [(0.0, b)], b))
        rows.append(_row("norm", "norm", [VIEW] + [(0.0, b / 6)] * 6, b))
    singles = [r for r in rows]
    for i in range(12):
        pick = rng.choice(len(singles), size=20)
        ops = [tuple(map(float, o.split(":"))) for k in pick for o in singles[k]["ops"].split(";")]
        rows.append({**_row("block_fwd", "decode", ops, float(i)), "piece": True})
    raw = pd.DataFrame(rows)
    raw["median_s"] = OpTable(raw).predict(p)
    raw = pd.concat([raw, pd.DataFrame(_compose(1e-3, 5e-4, 1.5e-3))], ignore_index=True)
    for col in ("p10_s", "p90_s"):
        raw[col] = raw["median_s"]
    return raw


def with_mixtures(raw: pd.DataFrame, truth: Params, kinds: list[tuple[str, str]], per_kind: int,
                  rng: np.random.Generator, sizes: tuple[int, int] = (20, 21), layers: bool = False) -> pd.DataFrame:
    """``raw`` plus ``per_kind`` rows of each (family, op) made of random single ops' ops
    (``sizes``: how many, drawn from [lo, hi)), timed exactly by ``truth``; ``layers``: each
    row also says how many blocks it checkpoints (1–4)."""
    singles = raw[raw["family"].isin(("gemm", "elementwise", "norm"))]
    out = []
    for family, op in kinds:
        for i in range(per_kind):
            pick = singles.iloc[rng.choice(len(singles), size=int(rng.integers(*sizes)))]
            ops = [tuple(map(float, o.split(":"))) for text in pick["ops"] for o in text.split(";")]
            out.append({**_row(family, op, ops, float(i)), "piece": True,
                        **({"layers": int(rng.integers(1, 5))} if layers else {})})
    extra = pd.DataFrame(out)
    extra["median_s"] = OpTable(extra).predict(truth)
    extra["p10_s"] = extra["p90_s"] = extra["median_s"]
    return pd.concat([raw, extra], ignore_index=True)


def test_fit_recovers_a_known_profile():
    raw = synthetic_raw()
    sections, report = fit_compute(raw)
    p = params_from_sections(sections)
    assert p.mode == "serial"
    assert p.overhead_s == pytest.approx(TRUE.overhead_s, rel=0.05)
    kern = raw[raw["family"] != "compose"]
    err = np.abs(OpTable(kern).predict(p) / kern["median_s"].to_numpy() - 1)
    assert err.max() < 0.06, err.max()
    assert report["goal_met"].all() and set(report["split"]) == {"fit", "held-out"}


def test_dispatch_costs_per_mode_are_recovered_from_training_pieces():
    """Training forward and backward pieces priced at their own host cost per op: the fit
    recovers each, and the estimator's profile charges them where it charges those pieces."""
    from dataclasses import replace

    from estimator.profile.profiles import profile_from_dict

    truth = replace(TRUE, grad_overhead_s=7e-6, backward_overhead_s=11e-6)
    raw = with_mixtures(synthetic_raw(truth), truth, [("block_fwd", "train"), ("block_bwd", "train")], 12,
                        np.random.default_rng(1))
    sections, _ = fit_compute(raw)
    launch = sections["compute"]["launch"]
    assert launch["overhead_s"] == pytest.approx(3e-6, rel=0.05)
    assert launch["grad_overhead_s"] == pytest.approx(7e-6, rel=0.05)
    assert launch["backward_overhead_s"] == pytest.approx(11e-6, rel=0.05)
    doc = json.loads((ROOT / "calibration/profiles/cpu.json").read_text())
    doc["compute"] = {**doc["compute"], **sections["compute"]}
    prof = profile_from_dict(doc)
    assert [prof.dispatch_s(m) for m in ("nograd", "grad", "backward")] == [
        launch["overhead_s"], launch["grad_overhead_s"], launch["backward_overhead_s"]]
    # the same op costs more host time when autograd records it, and more again in backward
    assert prof.op_s(0.0, 0.0, 10, "nograd") < prof.op_s(0.0, 0.0, 10, "grad") < prof.op_s(0.0, 0.0, 10, "backward")


def test_in_model_device_scale_and_dispatch_per_mode_are_recovered_from_whole_passes():
    """Ops inside the model's code run their device part slower than alone: whole passes
    timed with a known in-model scale and dispatch cost per mode give both back, and the
    estimator's profile charges the scale on every op it prices in that mode."""
    from dataclasses import replace

    from estimator.profile.profiles import profile_from_dict

    truth = replace(TRUE, grad_overhead_s=7e-6, backward_overhead_s=11e-6, device_scale=(1.5, 1.3, 1.2),
                    checkpoint_s=(2e-4, 3e-4))
    passes = [("pass", op) for op in ("forward", "train", "backward", "train_recompute", "backward_recompute")]
    raw = with_mixtures(synthetic_raw(truth), truth, passes, 16, np.random.default_rng(2), sizes=(5, 40), layers=True)
    sections, report = fit_compute(raw)
    scale = sections["compute"]["in_model"]
    assert [scale[m] for m in ("nograd", "grad", "backward")] == pytest.approx([1.5, 1.3, 1.2], rel=0.03)
    launch = sections["compute"]["launch"]
    # the curves are binned medians of single ops, not the truth's exact shape: the host cost
    # per op absorbs what they miss on the passes' ops (here up to a fifth)
    assert [launch["overhead_s"], launch["grad_overhead_s"], launch["backward_overhead_s"]] == pytest.approx(
        [3e-6, 7e-6, 11e-6], rel=0.25)
    held = report.set_index(["family", "split"])
    assert held.loc[("pass/forward", "held-out"), "median_pct"] < 3
    # activation checkpointing's own cost per block, beyond the ops it runs
    ex = sections["executor"]
    assert [ex["checkpoint_forward_s"], ex["checkpoint_backward_s"]] == pytest.approx([2e-4, 3e-4], rel=0.1)
    assert held.loc[("pass/backward_recompute", "held-out"), "median_pct"] < 5
    # without the in-model fit the same passes are predicted too fast
    _, plain = fit_compute(raw, in_model=False)
    assert plain.set_index(["family", "split"]).loc[("pass/forward", "held-out"), "bias_pct"] < -10
    doc = json.loads((ROOT / "calibration/profiles/cpu.json").read_text())
    doc["compute"] = {**doc["compute"], **sections["compute"]}
    prof = profile_from_dict(doc)
    alone = replace(prof, device_scale=(1.0, 1.0, 1.0))
    for mode in ("nograd", "grad", "backward"):
        assert prof.op_s(1e9, 0.0, 0, mode) == pytest.approx(scale[mode] * alone.op_s(1e9, 0.0, 0, mode))
    doc["compute"]["in_model"]["grad"] = 9.0
    with pytest.raises(ConfigError, match=r"in_model.grad=9.0 must be a number in \[0.25, 4\]"):
        profile_from_dict(doc)


def test_held_out_rows_do_not_move_the_fit():
    raw = synthetic_raw()
    sections, report = fit_compute(raw)
    from calibration.fit_compute import holdout_mask
    kern = raw[raw["family"] != "compose"].reset_index(drop=True)
    held = holdout_mask(kern)
    assert 0.4 < held.mean() < 0.6
    spoiled = pd.concat([kern.assign(median_s=np.where(held, kern["median_s"] * 3, kern["median_s"])),
                         raw[raw["family"] == "compose"]], ignore_index=True)
    again, report2 = fit_compute(spoiled)
    assert again == sections
    worse = report2.set_index(["family", "split"])["median_pct"]
    assert (worse.xs("held-out", level="split") > 60).all()  # and the report shows it: 1/3 of the time


def test_overlap_is_chosen_when_the_pair_costs_the_longer_of_the_two():
    serial = pd.DataFrame(_compose(1e-3, 5e-4, 1.5e-3))
    overlap = pd.DataFrame(_compose(1e-3, 5e-4, 1.05e-3))
    assert compose_mode(serial) == ("serial", pytest.approx(1.0))
    assert compose_mode(overlap)[0] == "overlap"
    # the contract: overlap takes the longer of device and host time per op
    p = Params(**{**TRUE.__dict__, "mode": "overlap"})
    assert op_times(np.array([0.0]), np.array([0.0]), 2, p)[0] == pytest.approx(2 * TRUE.overhead_s)
    assert op_times(np.array([1e8]), np.array([0.0]), 1, p)[0] == pytest.approx(1e8 / 50e9)


def test_executor_terms_are_the_engine_slope_less_kernels_and_the_call_intercept():
    rows = [{"family": "executor", "op": "stage_kernels", "batch": 1, "median_s": 1e-3}]
    rows += [{"family": "executor", "op": "engine_forward", "batch": m, "median_s": 5e-5 + m * 1.2e-3}
             for m in MICRO_BATCHES]
    rows += [{"family": "executor", "op": "call", "batch": m, "median_s": 4e-4 + m * 1.5e-3} for m in MICRO_BATCHES]
    sec = executor_section(pd.DataFrame(rows), "cmd")
    assert sec["micro_batch_overhead_s"] == pytest.approx(2e-4)
    assert sec["call_overhead_s"] == pytest.approx(4e-4)
    assert sec["command"] == "cmd"
    # with each run's time outside its marked micro-batches, those are fitted directly
    rows += [{"family": "executor", "op": "engine_forward_unmarked", "batch": m, "median_s": 5e-5 + m * 2e-5}
             for m in MICRO_BATCHES]
    rows += [{"family": "executor", "op": "call_unmarked", "batch": m, "median_s": 3e-4 + m * 5e-5}
             for m in MICRO_BATCHES]
    sec = executor_section(pd.DataFrame(rows), "cmd")
    assert sec["micro_batch_overhead_s"] == pytest.approx(2e-5)
    assert sec["call_overhead_s"] == pytest.approx(3e-4)


def test_bad_inputs_name_the_rule():
    raw = synthetic_raw()
    with pytest.raises(ConfigError, match="holdout_every=1"):
        fit_compute(raw, holdout_every=1)
    with pytest.raises(ConfigError, match="no compose rows"):
        fit_compute(raw[raw["family"] != "compose"])
    with pytest.raises(ConfigError, match="stat='mean'"):
        fit_compute(raw, stat="mean")


@pytest.fixture(scope="module")
def tiny_measured() -> pd.DataFrame:
    kernels = measure(grid("tiny"), level="tiny")
    return pd.concat([kernels, measure_overheads(repeats=5, warmup=1)], ignore_index=True)


def test_tiny_grid_fit_reproduces_its_measurements_and_round_trips(tiny_measured):
    # The fast samples: on a shared machine preemption lengthens the others at random.
    sections, report = fit_compute(tiny_measured, command="python -m calibration.kernels --tiny", stat="p10_s")
    assert set(sections) == {"compute", "memory", "executor"}
    assert set(sections["compute"]) == {"peak", "efficiency", "launch", "compose", "in_model"}
    assert sections["compute"]["compose"]["mode"] == "serial"  # CPU: the host waits for every op
    for sec in (sections["compute"]["efficiency"], sections["memory"]["efficiency"]):
        Curve(tuple(map(tuple, sec["points"])), sec["interpolation"])  # valid profile curves
    assert all(v >= 0 for k, v in sections["executor"].items() if k != "command")
    loaded = params_from_sections(json.loads(json.dumps(sections)))
    kern = tiny_measured[~tiny_measured["family"].isin(["compose", "executor"])]
    ratio = OpTable(kern).predict(loaded) / kern["p10_s"].to_numpy()
    # Rows scatter with the machine's load, and isolated ops pay less dispatch than the pieces
    # that set it (the exact reproduction is test_fit_recovers_a_known_profile): the pieces
    # must land on their data, and no row may be off by a unit.
    assert np.median(np.abs(ratio[kern["piece"].to_numpy(dtype=bool)] - 1)) < 0.6
    assert np.mean((ratio > 0.1) & (ratio < 10)) > 0.8
    assert report["n"].sum() == len(kern)
