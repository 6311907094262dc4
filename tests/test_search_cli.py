"""python -m search: bad input exits 2 before any search work; the plan, trace and JSON it writes."""

from __future__ import annotations

import json

import pytest

import search.__main__ as cli
from estimator.spec.experiment import load_experiment
from estimator.spec.plan import Plan, check
from tests.conftest import EXAMPLES

TINY = str(EXAMPLES / "ppo-tiny-2xcpu.yaml")


@pytest.fixture
def no_search(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the search started before the input was checked")

    monkeypatch.setattr(cli, "run_search", refuse)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize("budget", ["0", "-3", "nan", "inf"])
def test_a_budget_that_is_not_positive_and_finite_exits_2(budget, capsys, no_search):
    assert cli.main([TINY, "--time-budget", budget]) == 2
    assert f"--time-budget {float(budget)!r}" in _one_error_line(capsys)


def test_unknown_experiment_key_exits_2_naming_it(tmp_path, capsys, no_search):
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "ppo-tiny-2xcpu.yaml").read_text() + "gen_lenght: 4\n")
    assert cli.main([str(bad)]) == 2
    assert "'gen_lenght'" in _one_error_line(capsys)


def test_unknown_profile_exits_2_naming_it(capsys, no_search):
    assert cli.main([TINY, "--profile", "tpu-v9"]) == 2
    assert "'tpu-v9'" in _one_error_line(capsys)


def test_unwritable_out_exits_2_naming_it(tmp_path, capsys, no_search):
    assert cli.main([TINY, "--out", str(tmp_path / "missing" / "plan.json")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert cli.main([TINY, "--out", str(tmp_path)]) == 2
    assert "is a directory" in _one_error_line(capsys)
    assert cli.main([TINY, "--max-evals", "0"]) == 2
    assert "--max-evals 0" in _one_error_line(capsys)


def test_search_writes_a_plan_the_other_tools_take_and_prints_the_json_keys(tmp_path, capsys):
    out, trace = tmp_path / "plan.json", tmp_path / "trace.json"
    assert cli.main([TINY, "--max-evals", "200", "--chains", "1", "--out", str(out), "--trace", str(trace),
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("iteration_s", "plan", "baselines", "evaluated", "space_log10", "roofline_s", "peak_memory_bytes"):
        assert key in summary
    assert set(summary["baselines"]) == {"megatron", "colocate", "split", "real-heuristic", "verl-default",
                                         "openrlhf-hybrid", "nemo-rl-default", "dschat", "realhf-heuristic",
                                         "areal-default", "areal-3/4", "balanced", "verl-colocate-sync"}
    # the frameworks' defaults beside the hand-written baselines; one the plans cannot express says why
    assert summary["baselines"]["areal-default"]["iteration_s"] is None
    assert "asynchronously" in summary["baselines"]["areal-default"]["reason"]
    assert all(b["iteration_s"] >= summary["iteration_s"] for b in summary["baselines"].values()
               if b["iteration_s"] is not None)
    assert summary["evaluated"] == 200 and summary["roofline_s"] <= summary["iteration_s"]
    assert summary["op_set"]["ops"] == "executor" and "eager executor" in summary["op_set"]["text"]
    plan = check(Plan.load(str(out)), load_experiment(TINY))
    assert json.loads(plan.to_json()) == summary["plan"]
    assert json.loads(trace.read_text())["traceEvents"]


def test_search_prints_the_report_table(capsys):
    assert cli.main([TINY, "--max-evals", "100", "--chains", "1"]) == 0
    text = capsys.readouterr().out
    for needle in ("plan space: 10^", "predicted iteration time", "roofline lower bound", "real-heuristic",
                   "where the time goes:", "reallocation"):
        assert needle in text
    assert "priced for executor (this project's eager executor) on profile cpu (compute.ops=executor)" in text


@pytest.mark.parametrize("flags, message", [
    (["--profile", ""], "--profile: the hardware profile name is empty"),  # was: the cluster's device
    (["--out", ""], "--out: the path is empty"),  # was: no plan written, exit 0
    (["--trace", ""], "--trace: the path is empty"),
    (["--chains", "100000"], "--chains 100000 exceeds the limit 1,024"),
])
def test_an_empty_path_or_profile_and_too_many_chains_exit_2(flags, message, capsys, no_search):
    assert cli.main([TINY] + flags) == 2
    assert message in _one_error_line(capsys)


def test_a_long_baseline_note_wraps_instead_of_widening_the_table():
    import types

    from estimator.spec.plan import Plan
    from search.baselines import Baseline
    from search.result import NOTE_WIDTH, baseline_table

    reason = ("predicted 342.9 GiB on device 0 against 74.5 GiB during actor_gen (weights 51.3 GiB, grads 32.1 GiB, "
              "optimizer 192.7 GiB, realloc 64.2 GiB, activations 81.1 MiB, kv_cache 2.5 GiB); 15 more device(s) "
              "over capacity")
    plan = Plan({})
    result = types.SimpleNamespace(iteration_s=7.0, baselines={
        "megatron": Baseline("megatron", plan, 14.0, None),
        "real-heuristic": Baseline("real-heuristic", plan, None, reason)})
    lines = baseline_table(result).splitlines()
    assert max(map(len, lines)) <= len("real-heuristic  iteration s  speedup of the searched plan  ") + NOTE_WIDTH
    assert lines[2].split() == ["megatron", "14.000", "2.00x"]
    assert lines[3].startswith("real-heuristic") and "does not fit: predicted 342.9 GiB" in lines[3]
    # the continuation lines hold the rest of the note, word for word, under the note column
    column = lines[0].index("note")
    assert " ".join(line[column:].strip() for line in lines[3:]) == f"does not fit: {reason}"


@pytest.mark.parametrize("flags,uneven", [([], False), (["--uneven-meshes"], True)])
def test_uneven_meshes_reach_the_search_only_when_asked(flags, uneven, monkeypatch, capsys):
    from estimator.base.errors import ConfigError

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise ConfigError("recorded")

    monkeypatch.setattr(cli, "run_search", record)
    assert cli.main([TINY] + flags) == 2 and "recorded" in capsys.readouterr().err
    assert seen["uneven"] is uneven
