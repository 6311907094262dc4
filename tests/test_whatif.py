"""What-if sweeps: keys, the changed experiments, the figures of a point, and the refusal
without the search package. A stand-in search (the symmetric plan) keeps them independent
of the search itself."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis import whatif
from estimator.base.errors import EXIT_INVALID, ConfigError
from estimator.baselines import symmetric_plan
from estimator.profile.profiles import load_profile
from estimator.sim.simulate import simulate
from estimator.spec.experiment import load_experiment
from tests.conftest import EXAMPLES

EXP = EXAMPLES / "ppo-llama2-7b-8xh100.yaml"
STAND_IN = (lambda e, p: symmetric_plan(e, p), lambda e, p: {"symmetric": symmetric_plan(e)})


def test_parse_vary_types_values_and_rejects_bad_keys():
    assert whatif.parse_vary(["nodes=1,2", "actor=llama2-13b", "device=h800"], "ppo") == {
        "nodes": [1, 2], "actor": ["llama2-13b"], "device": ["h800"]}
    with pytest.raises(ConfigError, match="unknown key 'critic'"):
        whatif.parse_vary(["critic=llama2-7b"], "grpo")  # grpo has no critic
    with pytest.raises(ConfigError, match=r"\['0'\] must be positive integers"):
        whatif.parse_vary(["gen_len=128,0"], "ppo")
    with pytest.raises(ConfigError, match="given twice"):
        whatif.parse_vary(["nodes=1", "nodes=2"], "ppo")


def test_apply_changes_cluster_workload_and_models():
    exp = load_experiment(EXP)
    changed = whatif.apply(exp, {"nodes": 2, "gen_len": 256, "critic": "llama2-13b"})
    assert changed.cluster.num_devices == 16 and changed.params.gen_len == 256
    assert changed.workflow["actor_gen"].workload.gen_len == 256
    assert changed.models["critic"].head == "value" and changed.models["critic"].layers == 40
    assert exp.cluster.nodes == 1  # the original is untouched
    with pytest.raises(ConfigError, match="point batch_size=3"):
        whatif.apply(exp, {"batch_size": 3})  # ppo_minibatches=4 does not divide 3


def test_point_row_figures():
    exp = load_experiment(EXP)
    profile = load_profile("h100-sxm")
    plan = symmetric_plan(exp, profile)
    row = whatif.point_row(exp, profile, plan, {"symmetric": plan})
    t = simulate(exp, plan, profile).iteration_s
    seqs = exp.params.batch_size
    assert row["best_iteration_s"] == pytest.approx(t)
    assert row["samples_per_s"] == pytest.approx(seqs / t)
    assert row["tokens_per_s"] == pytest.approx(seqs * (exp.params.prompt_len + exp.params.gen_len) / t)
    assert row["gpu_hours_per_1000_steps"] == pytest.approx(t * 1000 * 8 / 3600)
    assert row["speedup_over_symmetric"] == pytest.approx(1.0)


def test_sweep_over_a_grid_writes_csv_plot_and_plans(tmp_path: Path):
    rc = whatif.main([str(EXP), "--vary", "gen_len=64,128", "--vary", "nodes=1,2", "--out", str(tmp_path)],
                     functions=STAND_IN)
    assert rc == 0
    df = pd.read_csv(tmp_path / "whatif.csv")
    assert list(zip(df["gen_len"], df["nodes"])) == [(64, 1), (64, 2), (128, 1), (128, 2)]
    # twice the generation length costs time on the same cluster
    by = df.set_index(["gen_len", "nodes"])["best_iteration_s"]
    assert by[(128, 1)] > by[(64, 1)] and by[(128, 2)] > by[(64, 2)]
    assert all((tmp_path / p).is_file() for p in df["plan_file"])
    assert (tmp_path / "whatif.png").stat().st_size > 1000


def test_profile_and_device_cannot_both_be_given(tmp_path: Path, capsys):
    rc = whatif.main([str(EXP), "--vary", "device=h800", "--profile", "h100-sxm", "--out", str(tmp_path)],
                     functions=STAND_IN)
    assert rc == EXIT_INVALID and "exclude each other" in capsys.readouterr().err


def test_a_real_search_sweep_repeats_exactly(tmp_path: Path):
    argv = [str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--vary", "gen_len=8,16", "--search-evals", "100", "--json"]
    assert whatif.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert whatif.main(argv + ["--out", str(tmp_path / "b")]) == 0
    a, b = (pd.read_csv(tmp_path / d / "whatif.csv") for d in ("a", "b"))
    assert a["best_iteration_s"].tolist() == b["best_iteration_s"].tolist()
    assert (a["best_iteration_s"] > 0).all() and len(a) == 2
    # the searched plan is never predicted slower than a baseline
    assert (a["speedup_over_megatron"] >= 1.0).all() and (a["speedup_over_split"] >= 1.0).all()


def _no_plan_for_long_generation(e, p):
    if e.params.gen_len > 100:
        raise ConfigError("call actor_gen: no valid layout fits in 1.0 GiB per device")
    return symmetric_plan(e, p)


def test_a_point_without_a_plan_is_recorded_and_the_rest_kept(tmp_path: Path, capsys):
    functions = (_no_plan_for_long_generation, STAND_IN[1])
    rc = whatif.main([str(EXP), "--vary", "gen_len=64,128,32", "--out", str(tmp_path)], functions=functions)
    assert rc == 0
    df = pd.read_csv(tmp_path / "whatif.csv", keep_default_na=False)
    assert df["gen_len"].tolist() == [64, 128, 32]
    assert df["status"].tolist() == ["planned", "no plan", "planned"]
    failed = df.set_index("gen_len").loc[128]
    assert "actor_gen: no valid layout fits" in failed["reason"] and failed["plan_file"] == ""
    assert failed["best_iteration_s"] == ""
    assert all((tmp_path / p).is_file() for p in df.loc[df["status"] == "planned", "plan_file"])
    out = capsys.readouterr().out
    assert "no plan" in out and "1 of 3 point(s) have no plan:" in out
    assert "gen_len=128: call actor_gen: no valid layout fits" in out
    assert (tmp_path / "whatif.png").is_file()


def test_a_sweep_where_no_point_has_a_plan_exits_1_with_the_reasons_written(tmp_path: Path, capsys):
    functions = (_no_plan_for_long_generation, STAND_IN[1])
    rc = whatif.main([str(EXP), "--vary", "gen_len=128,256", "--out", str(tmp_path), "--json"], functions=functions)
    assert rc == whatif.EXIT_NO_POINT_PLANNED
    rows = pd.read_json(tmp_path / "whatif.json")
    assert rows["status"].tolist() == ["no plan", "no plan"] and rows["reason"].str.contains("actor_gen").all()
    assert "no point of the sweep has a plan" in capsys.readouterr().err


def test_rows_name_the_profile_and_the_stack_it_prices(tmp_path: Path, capsys):
    rc = whatif.main([str(EXP), "--vary", "device=h100-sxm", "--vary", "stack=executor,fsdp-vllm", "--out",
                      str(tmp_path)], functions=STAND_IN)
    assert rc == 0
    df = pd.read_csv(tmp_path / "whatif.csv")
    assert df[["profile", "stack", "op_set"]].values.tolist() == [["h100-sxm", "executor", "executor"],
                                                                  ["h100-rl", "fsdp-vllm", "fused"]]
    out = capsys.readouterr().out
    assert "profile h100-sxm: priced for executor (this project's eager executor; compute.ops=executor)" in out
    assert "profile h100-rl: priced for fsdp-vllm (PyTorch FSDP2 (DTensor) training with vLLM generation" in out
    with pytest.raises(ConfigError, match="--vary stack='vllm' is not a stack"):
        whatif.parse_vary(["stack=vllm"], "ppo")


def test_a_verifier_reward_has_no_model_to_vary():
    assert whatif.parse_vary(["actor=llama2-13b"], "grpo", ("actor", "ref")) == {"actor": ["llama2-13b"]}
    with pytest.raises(ConfigError, match="models.reward is a rule \\(a verifier\\), which holds no model to vary"):
        whatif.parse_vary(["reward=llama2-7b"], "grpo", ("actor", "ref"))
    assert whatif.parse_vary(["reward=llama2-7b"], "grpo") == {"reward": ["llama2-7b"]}  # a reward model


def test_varying_a_length_follows_a_fixed_count_and_refuses_a_distribution():
    import dataclasses

    from estimator.spec.lengths import Lengths

    exp = load_experiment(EXP)
    changed = whatif.apply(exp, {"prompt_len": 64})
    assert changed.params.prompt_lengths.max == 64 and changed.params.prompt_lengths.fixed
    assert changed.params.gen_lengths == exp.params.gen_lengths
    drawn = dataclasses.replace(exp.params, gen_lengths=Lengths(exp.params.gen_len, "lognormal", mu=3.9, sigma=0.5))
    with pytest.raises(ConfigError, match="--vary gen_len needs a fixed gen_len; the experiment's is a distribution"):
        whatif.apply(dataclasses.replace(exp, params=drawn), {"gen_len": 256})


def test_parse_vary_bounds_and_repeats():
    with pytest.raises(ConfigError, match=r"--vary batch_size=8,2000000: \['2000000'\] exceed the limit 1,048,576"):
        whatif.parse_vary(["batch_size=8,2000000"], "ppo")
    with pytest.raises(ConfigError, match=r"--vary nodes=1,01: \['1'\] given more than once"):
        whatif.parse_vary(["nodes=1,01"], "ppo")
    with pytest.raises(ConfigError, match=r"--vary point prompt_len=1048576: prompt_len \+ gen_len = 1,048,704"):
        whatif.apply(load_experiment(EXP), {"prompt_len": 1 << 20})


@pytest.mark.parametrize("flags, message", [
    (["--search-budget-s", "-1"], "--search-budget-s=-1.0 must be positive"),
    (["--search-budget-s", "nan"], "--search-budget-s=nan must be a finite number"),
    (["--seed", "-1"], "--seed=-1 must be a non-negative integer"),
    (["--search-evals", "0"], "--search-evals=0 must be at least 1"),
    (["--profile", ""], "--profile: the hardware profile name is empty"),
    (["--out", ""], "--out: the path is empty"),
    (["--vary", "gen_len=8,2000000"], "exceed the limit"),
    (["--vary", "nodes=1,2", "--vary", "batch_size=8,7"], "--vary point nodes=1,batch_size=7: "),  # the 2nd point
])
def test_every_flag_and_point_is_checked_before_the_first_search(tmp_path: Path, capsys, flags, message):
    searched = []
    functions = (lambda e, p: searched.append(e) or symmetric_plan(e, p), STAND_IN[1])
    argv = [str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--out", str(tmp_path / "w")] + flags
    if "--vary" not in flags:
        argv += ["--vary", "nodes=1"]
    assert whatif.main(argv, functions=functions) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err
    assert searched == [] and not (tmp_path / "w").exists()


def test_out_may_be_a_new_directory_but_not_a_file(tmp_path: Path, capsys):
    (tmp_path / "f").write_text("x")
    argv = [str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--vary", "gen_len=8"]
    assert whatif.main(argv + ["--out", str(tmp_path / "f" / "w")], functions=STAND_IN) == EXIT_INVALID
    assert "is not a directory" in capsys.readouterr().err
    assert whatif.main(argv + ["--out", str(tmp_path / "new" / "w")], functions=STAND_IN) == 0
    assert (tmp_path / "new" / "w" / "whatif.csv").is_file()


def test_the_printed_table_fits_a_terminal_and_json_keeps_every_column(tmp_path: Path, capsys):
    import search.baselines as sb

    def baselines(e, p):  # the four baselines: the widest table whatif prints for one key
        return {n: b.plan for n in sb.BASELINES if (b := sb.build(n, e, p)).plan is not None}

    argv = [str(EXP), "--vary", "gen_len=64,128", "--vary", "nodes=1,2", "--out", str(tmp_path)]
    assert whatif.main(argv, functions=(STAND_IN[0], baselines)) == 0
    table, rest = capsys.readouterr().out.split("\n\n", 1)
    lines = table.splitlines()
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    assert f"\nwrote {tmp_path} " in "\n" + rest and "profile h100-rl: priced for megatron-vllm" in rest
    assert lines[0].split()[:4] == ["gen_len", "nodes", "best", "s"] and "vs real-heuristic" in lines[0]
    df = pd.read_csv(tmp_path / "whatif.csv")
    first = lines[2].split()
    assert first[:2] == ["64", "1"] and first[2] == f"{df['best_iteration_s'][0]:.4g}"
    assert first[-1] == f"{df['speedup_over_real-heuristic'][0]:.2f}x"
    assert whatif.main(argv + ["--json"], functions=(STAND_IN[0], baselines)) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"megatron_iteration_s", "speedup_over_megatron", "gpu_hours_per_1000_steps"} <= set(rows[0])


def test_streaming_varies_and_is_off_where_the_point_is_synchronous():
    assert whatif.parse_vary(["max_staleness=0,1", "streaming=off,recompute"], "grpo") == {
        "max_staleness": [0, 1], "streaming": ["off", "recompute"]}
    with pytest.raises(ConfigError, match="must be one of off, recompute, keep"):
        whatif.parse_vary(["streaming=on"], "grpo")
    exp = load_experiment(EXAMPLES / "grpo-longtail-tiny-2xcpu.yaml")
    assert whatif.apply(exp, {"max_staleness": 2, "streaming": "keep"}).workflow.streaming == "keep"
    synchronous = whatif.apply(exp, {"max_staleness": 0, "streaming": "recompute"})
    assert synchronous.workflow.streaming == "off" and not synchronous.workflow.asynchronous
