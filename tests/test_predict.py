"""python -m estimator.predict: output, exit codes, trace; and the symmetric baseline plan."""

from __future__ import annotations

import json

import pytest
import yaml

from estimator.baselines import symmetric_plan
from estimator.predict import main
from estimator.profile.profiles import load_profile
from estimator.spec.experiment import load_experiment
from estimator.spec.plan import validate
from tests.conftest import EXAMPLES

TINY = str(EXAMPLES / "ppo-tiny-2xcpu.yaml")


def test_json_output(capsys):
    assert main([TINY, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("iteration_s", "feasible", "reasons", "peak_memory_bytes", "roofline_s", "mfu", "calls"):
        assert key in out
    assert out["feasible"] is True and out["reasons"] == []
    assert out["iteration_s"] >= out["roofline_s"] > 0
    assert set(out["calls"]) == {"actor_gen", "ref_inf", "reward_inf", "critic_inf", "actor_train", "critic_train"}
    for v in out["calls"].values():
        assert v["duration_s"] > 0 and v["start_s"] >= 0
        assert v["duration_s"] >= v["comm_s"] + v["wait_s"] + v["realloc_s"] - 1e-9 and v["wait_s"] >= 0
    assert "symmetric" in out["plan_source"]


def test_output_names_the_profile_and_whether_it_is_measured(capsys):
    assert main([str(EXAMPLES / "ppo-llama2-7b-8xh100.yaml"), "--stack", "executor", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["profile"], out["profile_source"]) == ("h100-sxm", "datasheet")
    assert out["profile_path"].endswith("calibration/profiles/h100-sxm.json")
    # the GPU example's default, a production stack, is priced on the H100 profile that holds its numbers
    assert main([str(EXAMPLES / "ppo-llama2-7b-8xh100.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["profile"], out["profile_source"], out["stack"]) == ("h100-rl", "measured", "megatron-vllm")
    tiny = load_profile(load_experiment(TINY).cluster.device)
    assert main([TINY]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"on profile {tiny.name} ({tiny.source}, {tiny.path})" in first


def test_table_output_says_the_plan_is_symmetric(capsys):
    assert main([str(EXAMPLES / "dpo-tiny-2xcpu.yaml"), "--iterations", "4"]) == 0
    out = capsys.readouterr().out
    assert "symmetric baseline plan (no --plan given)" in out
    assert "predicted iteration time" in out and "roofline lower bound" in out and "peak GiB" in out
    assert "comm s  wait s  realloc s" in out


def test_infeasible_plan_exits_1_with_the_reason(tmp_path, capsys):
    exp = {"algorithm": "dpo", "models": {"actor": "llama2-70b", "ref": "llama2-70b"}, "batch_size": 8,
           "prompt_len": 128, "gen_len": 128, "cluster": {"nodes": 1, "devices_per_node": 2, "device": "h100-sxm"}}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(exp))
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: predicted" in out and "GiB on device" in out and "against 74.5 GiB" in out
    assert main([str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["feasible"] is False


def test_invalid_plan_exits_2_with_messages(tmp_path, capsys):
    plan = {"calls": {c: {"mesh": "0-1", "dp": 1, "tp": 3, "pp": 1} for c in
                      ("actor_gen", "ref_inf", "reward_inf", "critic_inf", "actor_train", "critic_train")}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(plan))
    assert main([TINY, "--plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: call actor_gen: dp·tp·pp = 1·3·1 = 3 must equal mesh 0-1 size 2" in err
    assert "Traceback" not in err


def test_unknown_profile_exits_2(capsys):
    assert main([TINY, "--profile", "tpu-v9"]) == 2
    assert "unknown hardware profile 'tpu-v9'" in capsys.readouterr().err


def test_trace_is_chrome_json(tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert main([TINY, "--trace", str(out)]) == 0
    trace = json.loads(out.read_text())
    assert trace["traceEvents"] and all("ph" in e for e in trace["traceEvents"])
    assert {"forward", "decode"} <= {e["name"].split(":")[1] for e in trace["traceEvents"] if e["ph"] == "X"}


def test_given_plan_is_used(tmp_path, capsys):
    exp = load_experiment(TINY)
    plan = symmetric_plan(exp)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    assert main([TINY, "--plan", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan_source"] == f"plan {path}"


@pytest.mark.parametrize("name", ["ppo-llama2-7b-8xh100", "ppo-llama2-70b-128xh100", "grpo-qwen2.5-7b-16xh100",
                                  "dpo-llama3-8b-8xa100", "ppo-tiny-2xcpu", "grpo-tiny-2xcpu", "dpo-tiny-2xcpu"])
def test_symmetric_plan_is_valid(name):
    exp = load_experiment(EXAMPLES / f"{name}.yaml")
    plan = symmetric_plan(exp, load_profile(exp.cluster.device))
    assert validate(plan, exp) == []
    cl = exp.cluster
    for c, layout in plan.layouts.items():
        assert layout.mesh == cl.whole()
        if exp.workflow[c].kind == "train" and cl.nodes > 1:
            assert layout.micro_batches >= layout.pp  # pipelines fill


def test_symmetric_plan_steps_tp_down_where_heads_do_not_split():
    exp = load_experiment(EXAMPLES / "grpo-qwen2.5-7b-16xh100.yaml")  # 4 kv heads: tp <= 4 on 8-GPU nodes
    plan = symmetric_plan(exp)
    assert {(lay.dp, lay.tp, lay.pp) for lay in plan.layouts.values()} == {(2, 4, 2)}


@pytest.mark.parametrize("profile,stack,priced,ops,note", [
    ("h100-sxm", "executor", "h100-sxm", "executor", ""),
    ("h100-vidur", "executor", "h100-sxm", "executor",
     "profile h100-vidur has figures for fused kernels, not for the executor's aten ops, so h100-sxm, of the same "
     "device, prices it"),
    ("h100-sxm", "megatron-vllm", "h100-rl", "fused",
     "profile h100-sxm has no numbers for the stack's engine, refit and trainer, so h100-rl, of the same device, "
     "prices it")])
def test_output_names_the_stack_the_plan_was_priced_for(profile, stack, priced, ops, note, capsys):
    exp = str(EXAMPLES / "ppo-llama2-7b-8xh100.yaml")
    assert main([exp, "--profile", profile, "--stack", stack, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["stack"], out["profile"], out["op_set"]["ops"], out["op_set"]["note"]) == (stack, priced, ops, note)
    assert main([exp, "--profile", profile, "--stack", stack]) == 0
    second = capsys.readouterr().out.splitlines()[1]
    assert second.startswith(f"priced for {stack} (") and f"on profile {priced} (compute.ops={ops}" in second
    assert second.endswith(note or ")")


def test_progress_lines_are_every_half_second_on_a_terminal_and_sparse_in_a_log(monkeypatch):
    import contextlib
    import io

    import estimator.predict as predict_mod
    from estimator.base.progress import LOG_INTERVAL_S

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    now = [0.0]
    monkeypatch.setattr(predict_mod.time, "monotonic", lambda: now[0])
    lines = {}
    for name, stream in (("terminal", Terminal()), ("log", io.StringIO())):
        now[0] = 0.0
        with contextlib.redirect_stderr(stream):
            progress = predict_mod.Progress()
            for _ in range(600):  # a message every 0.1 s for 60 s
                now[0] += 0.1
                progress("iteration 0 actor_gen done")
        lines[name] = stream.getvalue().count("\n")
    assert 100 <= lines["terminal"] <= 120  # every 0.5 s after the first second
    assert lines["log"] <= 60 / LOG_INTERVAL_S + 1
