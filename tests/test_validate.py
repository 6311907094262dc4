"""The validation driver: plan sampler coverage, and the whole pipeline with a stand-in executor
whose timelines are the prediction stretched by a known factor (so every error is known)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from analysis import validate
from analysis.sampler import KINDS, plan_kinds, sample_plans
from estimator.base.errors import EXIT_INVALID
from estimator.cost.memory import plan_memory
from estimator.profile.profiles import load_profile
from estimator.spec.experiment import load_experiment
from estimator.spec.plan import Plan
from estimator.spec.plan import validate as plan_problems
from estimator.spec.timeline import Timeline
from tests.conftest import EXAMPLES, ROOT

STRETCH = 1.25  # measured = 1.25 × predicted: every absolute error is 0.25 / 1.25 = 20 %


@pytest.mark.parametrize("name", ["ppo-tiny-2xcpu", "grpo-tiny-2xcpu"])
def test_sample_covers_every_structural_kind_with_valid_distinct_plans(name: str):
    exp = load_experiment(EXAMPLES / f"{name}.yaml")
    profile = load_profile(exp.cluster.device)
    plans, missing = sample_plans(exp, profile, 20, seed=3)
    assert missing == [] and len(plans) == 20
    assert set().union(*(plan_kinds(p, exp) for p in plans)) == set(KINDS)
    assert len({p.to_json() for p in plans}) == 20
    assert all(not plan_problems(p, exp) and plan_memory(exp, p, profile.capacity_bytes, profile.stack).feasible
               for p in plans)
    again, _ = sample_plans(exp, profile, 20, seed=3)
    assert [p.to_json() for p in again] == [p.to_json() for p in plans]
    other, _ = sample_plans(exp, profile, 20, seed=4)
    assert [p.to_json() for p in other] != [p.to_json() for p in plans]


def test_sample_says_which_kinds_the_experiment_cannot_have():
    exp = load_experiment(EXAMPLES / "dpo-tiny-2xcpu.yaml")  # one call per role: nothing to reallocate
    plans, missing = sample_plans(exp, load_profile("cpu"), 10, seed=0)
    assert missing == ["realloc"]
    assert set().union(*(plan_kinds(p, exp) for p in plans)) == set(KINDS) - {"realloc"}


def test_plan_kinds_of_the_example_plans(ppo_tiny):
    def kinds(name: str) -> set[str]:
        return plan_kinds(Plan.load(str(EXAMPLES / "plans" / "ppo-tiny-2xcpu" / f"{name}.json")), ppo_tiny)

    assert kinds("single-device") == set()
    assert kinds("tp2") == {"tp"}
    assert "disjoint" in kinds("disjoint")
    assert "realloc" in kinds("gen-vs-train")


def stretched_runner(experiment: Path, plan_file: Path, iterations: int, out: Path) -> Timeline:
    """Stand-in for the executor: the plan's predicted timeline, every time × STRETCH."""
    pred = Timeline.load(out.parent / f"{plan_file.stem}.predicted.json")
    spans = [dataclasses.replace(s, start_s=s.start_s * STRETCH, end_s=s.end_s * STRETCH) for s in pred.spans]
    tl = Timeline.of(spans, "measured")
    tl.save(out)
    return tl


def test_driver_writes_tables_figures_and_summary(tmp_path: Path, capsys):
    out = tmp_path / "val"
    rc = validate.main([str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--plans", "6", "--iterations", "2", "--runs", "2",
                        "--search-evals", "200", "--out", str(out), "--json"], runner=stretched_runner)
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["iteration"]["median_ape"] == pytest.approx(0.2) and s["iteration"]["max_ape"] == pytest.approx(0.2)
    assert s["op_kind"]["decode"]["median_ape"] == pytest.approx(0.2)
    assert s["ranking"]["spearman"] == pytest.approx(1.0)
    assert s["ranking"]["predicted_best_is_measured_best"]
    assert any("searched best plan: 200 plans evaluated" in n for n in s["notes"])  # said, not silent
    assert [p["runs"] for p in s["plans"]] == [2] * 6
    plans = pd.read_csv(out / "plans.csv")
    assert len(plans) == 6 and plans["plan"][0] == "baseline-megatron"
    assert {"plan_file", "predicted_iteration_s", "measured_iteration_s", "actor_gen_predicted_s",
            "actor_gen_measured_s"} <= set(plans.columns)
    assert (plans["measured_iteration_s"] / plans["predicted_iteration_s"]).to_numpy() == pytest.approx(STRETCH)
    assert all((out / f).stat().st_size > 1000 for f in ("scatter.png", "errors.png", "timelines.png"))
    calls, ops = pd.read_csv(out / "calls.csv"), pd.read_csv(out / "ops.csv")
    assert calls["ape"].to_numpy() == pytest.approx(0.2, abs=1e-5)
    assert set(ops["kind"]) >= {"prefill", "decode", "forward", "backward", "optimizer"}
    assert "Spearman" in (out / "summary.txt").read_text()
    files = {p.name for p in (out / "timelines").iterdir()}
    assert all({f"{plan}.measured-0.json", f"{plan}.measured-1.json", f"{plan}.predicted.json"} <= files
               for plan in plans["plan"])


def test_rescore_predicts_earlier_runs_again_with_another_profile(tmp_path: Path, capsys):
    """--rescore runs nothing: the measured runs of an earlier validation, predicted again."""
    first = tmp_path / "first"
    exp = str(EXAMPLES / "dpo-tiny-2xcpu.yaml")
    assert validate.main([exp, "--plan-dir", str(EXAMPLES / "plans" / "dpo-tiny-2xcpu"), "--iterations", "2",
                          "--runs", "2", "--out", str(first)], runner=stretched_runner) == 0
    capsys.readouterr()
    # a profile twice as fast everywhere: every prediction halves against the same measurements
    doc = json.loads((ROOT / "calibration" / "profiles" / "cpu.json").read_text())
    doc["name"] = "cpu-2x"
    doc["compute"]["peak"]["flops_per_s"] *= 2
    doc["memory"]["bandwidth"]["bytes_per_s"] *= 2
    for k in ("overhead_s", "grad_overhead_s", "backward_overhead_s"):
        doc["compute"]["launch"][k] /= 2
    for k in ("call_overhead_s", "micro_batch_overhead_s", "collective_overhead_s", "p2p_overhead_s",
              "checkpoint_forward_s", "checkpoint_backward_s"):
        if k in doc["executor"]:
            doc["executor"][k] /= 2
    for cls in doc["links"].values():
        for link in cls.values():
            if isinstance(link, dict) and "curves" in link:
                link["curves"] = {g: [[x, t / 2] for x, t in pts] for g, pts in link["curves"].items()}
    fast = tmp_path / "cpu-2x.json"
    fast.write_text(json.dumps(doc))
    again = tmp_path / "again"

    def no_runs(*_):
        raise AssertionError("--rescore must not run the executor")

    assert validate.main([exp, "--rescore", str(first), "--profile", str(fast), "--iterations", "2",
                          "--out", str(again), "--json"], runner=no_runs) == 0
    s = json.loads(capsys.readouterr().out)
    before = pd.read_csv(first / "plans.csv").set_index("plan")
    after = pd.read_csv(again / "plans.csv").set_index("plan")
    assert (after["measured_iteration_s"] == before["measured_iteration_s"]).all()
    ratio = after["predicted_iteration_s"] / before["predicted_iteration_s"]
    assert ratio.to_numpy() == pytest.approx(0.5, rel=0.02)
    assert s["settings"]["rescored"] == str(first) and s["settings"]["runs"] == 2
    assert len(list((again / "timelines").glob("*.measured-*.json"))) == 2 * len(after)
    # a directory that holds no validation is refused by name
    assert validate.main([exp, "--rescore", str(tmp_path / "nothing")]) == 2
    assert "no plans/*.json" in capsys.readouterr().err


def test_driver_validates_a_plan_directory(tmp_path: Path, capsys):
    rc = validate.main([str(EXAMPLES / "dpo-tiny-2xcpu.yaml"), "--plan-dir", str(EXAMPLES / "plans" / "dpo-tiny-2xcpu"),
                        "--iterations", "1", "--runs", "1", "--out", str(tmp_path)], runner=stretched_runner)
    assert rc == 0
    plans = pd.read_csv(tmp_path / "plans.csv")
    assert sorted(plans["plan"]) == sorted(p.stem for p in (EXAMPLES / "plans" / "dpo-tiny-2xcpu").glob("*.json"))
    assert "predicted-best plan" in capsys.readouterr().out


def test_bad_options_exit_2_with_one_line(tmp_path: Path, capsys):
    assert validate.main([str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--runs", "0"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.strip() == "error: --runs=0 must be at least 1"
    assert validate.main([str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--plan-dir", str(tmp_path)]) == EXIT_INVALID
    assert "no *.json plan files" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    for flags, message in ((["--profile", ""], "--profile: the hardware profile name is empty"),
                           (["--out", ""], "--out: the path is empty"),
                           (["--out", str(tmp_path / "f" / "out")], "is not a directory")):
        assert validate.main([str(EXAMPLES / "ppo-tiny-2xcpu.yaml")] + flags) == EXIT_INVALID
        assert message in capsys.readouterr().err


def test_a_failed_run_is_reported_not_hidden(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"calls": {"actor_gen": {"mesh": "0", "dp": 1, "tp": 1, "pp": 1}}}))
    expected = "exit 2: error: call ref_inf: missing from the plan; error: call reward_inf"
    with pytest.raises(RuntimeError, match=expected):
        validate.run_executor(EXAMPLES / "ppo-tiny-2xcpu.yaml", bad, 1, tmp_path / "m.json")


def test_baselines_and_the_searched_best_come_first_then_the_sample(ppo_tiny):
    import search.baselines as sb

    profile = load_profile("cpu")
    cands, notes = validate.choose(ppo_tiny, profile, 8, 0, 200)
    ids = [c.id for c in cands]
    assert ids[:4] == [f"baseline-{n}" for n in sb.BASELINES]  # all four fit the tiny PPO example
    assert "searched-best" in ids or any("searched-best is the same plan as" in n for n in notes)
    assert len(cands) == 8 and all(c.origin == "sample" for c in cands if c.id.startswith("sample-"))
    assert len({c.plan.to_json() for c in cands}) == 8  # distinct plans
    again, _ = validate.choose(ppo_tiny, profile, 8, 0, 200)
    assert [c.plan for c in again] == [c.plan for c in cands]  # the same seed and budget repeat exactly


def test_a_baseline_that_does_not_apply_is_named_with_its_reason():
    from estimator.spec.experiment import load_experiment

    dpo = load_experiment(EXAMPLES / "dpo-tiny-2xcpu.yaml")
    cands, notes = validate.choose(dpo, load_profile("cpu"), 6, 0, 200)
    assert "baseline-split" not in [c.id for c in cands]
    assert any(n.startswith("baseline split left out: ") for n in notes), notes



def test_a_rerun_into_the_same_directory_leaves_no_file_of_plans_it_does_not_have(tmp_path: Path, capsys):
    out = tmp_path / "val"
    for sub in ("plans", "timelines"):
        (out / sub).mkdir(parents=True)
    stale = [out / "plans" / "old-plan.json", out / "timelines" / "old-plan.predicted.json",
             out / "timelines" / "old-plan.measured-0.json"]
    for f in stale:
        f.write_text("{}")
    mine = out / "timelines" / "notes.txt"  # not a validation file: left alone
    mine.write_text("keep")
    rc = validate.main([str(EXAMPLES / "dpo-tiny-2xcpu.yaml"), "--plan-dir", str(EXAMPLES / "plans" / "dpo-tiny-2xcpu"),
                        "--iterations", "1", "--runs", "1", "--out", str(out), "--json"], runner=stretched_runner)
    assert rc == 0
    assert not any(f.exists() for f in stale) and mine.read_text() == "keep"
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("removed 3 file(s)" in n for n in notes)
    ids = {p.stem for p in (EXAMPLES / "plans" / "dpo-tiny-2xcpu").glob("*.json")}
    assert {p.stem for p in (out / "plans").glob("*.json")} == ids


@pytest.mark.parametrize("n", [2, 4])
def test_plans_n_validates_exactly_n_and_names_the_baselines_left_out(n: int, tmp_path: Path, capsys):
    out = tmp_path / "val"
    rc = validate.main([str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--plans", str(n), "--iterations", "2", "--runs", "1",
                        "--search-evals", "200", "--out", str(out), "--json"], runner=stretched_runner)
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    plans = pd.read_csv(out / "plans.csv")
    assert len(plans) == n and s["settings"]["plans"] == n
    assert "searched-best" in set(plans["plan"])  # the searched best is never the one left out
    # on this example all four baselines fit and differ from the searched best: 5 plans before the cut
    left_out = [note.split(" ")[0] for note in s["notes"] if f"left out: --plans {n} leaves no room" in note]
    baselines = ["baseline-megatron", "baseline-colocate", "baseline-split", "baseline-real-heuristic"]
    assert list(plans["plan"]) == baselines[:n - 1] + ["searched-best"] and left_out == baselines[n - 1:]
    assert sorted(p.name for p in (out / "plans").iterdir()) == sorted(f"{p}.json" for p in plans["plan"])
    assert s["op_set"]["ops"] == "executor" and "eager executor" in s["op_set"]["text"]
    assert "predictions priced for executor (this project's eager executor)" in (out / "summary.txt").read_text()


def test_replot_redraws_the_figures_from_the_tables_and_touches_nothing_else(tmp_path: Path, capsys):
    out = tmp_path / "val"
    exp = str(EXAMPLES / "dpo-tiny-2xcpu.yaml")
    assert validate.main([exp, "--plan-dir", str(EXAMPLES / "plans" / "dpo-tiny-2xcpu"), "--iterations", "2",
                          "--runs", "1", "--out", str(out)], runner=stretched_runner) == 0
    figures = ("scatter.png", "errors.png", "timelines.png")
    before = {f: (out / f).read_bytes() for f in figures}
    others = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in figures}
    for f in figures:
        (out / f).unlink()
    capsys.readouterr()

    def no_runs(*args):
        raise AssertionError("--replot ran a plan")

    assert validate.main([exp, "--replot", str(out)], runner=no_runs) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {out / f}" for f in figures]
    assert {f: (out / f).read_bytes() for f in figures} == before  # the same figures, redrawn
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in figures} == others
    assert validate.main([exp, "--replot", str(tmp_path / "nothing")]) == EXIT_INVALID
    assert "not a validation output directory" in capsys.readouterr().err


def test_runs_measured_on_another_cpu_than_the_profile_are_named():
    profile = load_profile("cpu")  # software.cpu: the CPU model the shipped profile was measured on
    same = Timeline.of([], "measured", host={"cpu": profile.software["cpu"], "torch": "x"})
    other = Timeline.of([], "measured", host={"cpu": "Some Other CPU 9000", "torch": "x"})
    bare = Timeline.of([], "measured")  # a run that predates the host record
    assert validate.host_notes(profile, [same, bare]) == []
    (note,) = validate.host_notes(profile, [same, other])
    assert "Some Other CPU 9000" in note and profile.software["cpu"] in note and "calibrate" in note
