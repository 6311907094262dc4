"""``python -m executor.run``: validation before any process starts, the report, the files it
writes, and a worker that dies mid-call."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
import yaml

from estimator.base.errors import ConfigError
from estimator.spec.experiment import experiment_from_dict, load_experiment
from estimator.spec.plan import Plan
from estimator.spec.timeline import Timeline
from executor.run import main, table, with_async
from tests.conftest import EXAMPLES, ROOT

PPO = str(EXAMPLES / "ppo-tiny-2xcpu.yaml")
PLANS = EXAMPLES / "plans" / "ppo-tiny-2xcpu"


def _bad_plan(tmp_path) -> str:
    plan = json.loads((PLANS / "tp2.json").read_text())
    plan["calls"]["actor_gen"].update(dp=2)  # 2·2·1 ≠ 2 devices
    del plan["calls"]["critic_train"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(plan))
    return str(path)


def test_invalid_plan_exits_2_with_every_message_before_starting(tmp_path, capsys, monkeypatch):
    import executor.launch as launch_mod

    def no_launch(*args, **kwargs):
        raise AssertionError("processes started for an invalid plan")

    monkeypatch.setattr(launch_mod, "launch", no_launch)
    assert main([PPO, "--plan", _bad_plan(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: call actor_gen: dp·tp·pp = 2·2·1 = 4 must equal mesh 0-1 size 2" in err
    assert "error: call critic_train: missing from the plan" in err


@pytest.mark.parametrize("flags, message", [
    (["--iterations", "0"], "--iterations=0 must be at least 1"),
    (["--iterations", "2", "--warmup", "2"], "--warmup=2 must be below --iterations=2"),
    (["--inject-fault", "one:actor_train"], "must look like RANK:CALL"),
    (["--inject-fault", "1:nope"], "unknown call 'nope'"),
])
def test_bad_flags_exit_2(flags, message, capsys):
    assert main([PPO, "--plan", str(PLANS / "dp2.json"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_that_does_not_fit_exits_2_before_starting(tmp_path, capsys, monkeypatch):
    import executor.launch as launch_mod
    from estimator.spec.models import PRESETS
    from executor import model as M
    from executor.hf import save_hf

    spec = PRESETS["tiny-2l-128h"]
    params = M.init_params(spec, 0)
    del params["layers.1.mlp.down_proj.weight"]
    save_hf(tmp_path / "sft", spec, params)
    (tmp_path / "exp.yaml").write_text(
        (EXAMPLES / "ppo-tiny-2xcpu.yaml").read_text().replace("actor: tiny-2l-128h", "actor: sft/config.json"))
    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: pytest.fail("processes started for a bad checkpoint"))
    assert main([str(tmp_path / "exp.yaml"), "--plan", str(PLANS / "dp2.json")]) == 2
    err = capsys.readouterr().err
    assert "models.actor: checkpoint" in err and "'model.layers.1.mlp.down_proj.weight' is missing" in err


def test_missing_experiment_exits_2(capsys):
    assert main(["nope.yaml", "--plan", str(PLANS / "dp2.json")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_json_report_trace_and_timeline(tmp_path, capfd):
    trace, timeline = tmp_path / "trace.json", tmp_path / "timeline.json"
    code = main([PPO, "--plan", str(PLANS / "gen-vs-train.json"), "--iterations", "2", "--json",
                 "--trace", str(trace), "--timeline", str(timeline)])
    assert code == 0
    out, err = capfd.readouterr()  # the workers' progress lines reach the terminal's stderr
    rep = json.loads(out)
    assert "starting 2 gloo worker processes" in err
    assert f"wrote Chrome trace {trace} (open it in Perfetto)" in err and f"wrote measured timeline {timeline}" in err
    assert [ln.split(" done")[0] for ln in err.splitlines() if " done after " in ln] == \
        ["iteration 1/2", "iteration 2/2"]
    exp = load_experiment(PPO)
    assert rep["warmup_iterations"] == 1 and len(rep["iterations_s"]) == 2
    assert rep["iteration_s"] == pytest.approx(rep["iterations_s"][1])
    assert set(rep["calls"]) == set(exp.workflow.call_names)
    for c in rep["calls"].values():
        assert c["duration_s"] > 0 and {"realloc_s", "data_s", "span_s", "mesh", "dp", "tp", "pp"} <= set(c)
    assert rep["calls"]["actor_gen"]["realloc_s"] > 0  # generation runs away from the actor's home
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "actor_train:compute" for e in events)
    tl = Timeline.load(timeline)
    assert tl.source == "measured" and tl.iterations == [0, 1] and tl.meta["warmup_iterations"] == 1
    assert tl.meta["host"]["cpu"] and tl.meta["host"]["torch"] == torch.__version__  # what it measured on
    text = table(rep, exp)
    assert "warm-up (excluded)" in text and "excludes 1 warm-up iteration" in text
    assert all(name in text for name in exp.workflow.call_names)


def test_a_worker_killed_mid_call_fails_the_run_within_60s():
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "executor.run", PPO, "--plan", str(PLANS / "dp2.json"), "--iterations", "2",
         "--inject-fault", "1:critic_train"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode == 1
    assert "rank 1 failed in call critic_train (iteration 0)" in proc.stderr
    assert "exited with code 13" in proc.stderr


def test_runs_under_torchrun(tmp_path):
    """The multi-node path (torchrun sets RANK/WORLD_SIZE; here gloo on CPU): rank 0 reports."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "executor.run", PPO, "--plan", str(PLANS / "disjoint.json"), "--iterations", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rep = json.loads(proc.stdout)
    assert len(rep["iterations_s"]) == 1 and rep["calls"]["critic_train"]["duration_s"] > 0


def test_in_run_dtype_follows_what_the_executor_holds():
    from executor.run import in_run_dtype

    p = 1000.0  # parameters on the device
    model = {"weights": 2 * p, "grads": 2 * p, "optimizer": 12 * p, "activations": 100.0, "kv_cache": 10.0}
    assert in_run_dtype(model, "bfloat16") == model  # fp32 master weights and moments: 12 bytes, as modelled
    assert in_run_dtype(model, "float32") == {"weights": 4 * p, "grads": 4 * p, "optimizer": 8 * p,
                                              "activations": 200.0, "kv_cache": 20.0}  # moments only
    assert in_run_dtype(model, "float64")["optimizer"] == 16 * p


def test_a_run_the_host_cannot_hold_exits_2_with_the_figures_before_starting(capsys, monkeypatch):
    """The 8×H100 7B example with a plan on 2 of its devices, on a host with 64 GiB available."""
    import executor.launch as launch_mod
    import executor.run as run_mod
    from estimator.cost.memory import fmt_bytes, plan_memory
    from estimator.spec.plan import Plan

    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: pytest.fail("processes started for a run too big"))
    monkeypatch.setattr(run_mod, "host_available_bytes", lambda: (64 * 2.0**30, "MemAvailable in /proc/meminfo"))
    exp_path = EXAMPLES / "ppo-llama2-7b-8xh100.yaml"
    assert main([str(exp_path), "--plan", str(PLANS / "tp2.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    exp = load_experiment(exp_path)
    memory = plan_memory(exp, Plan.load(str(PLANS / "tp2.json")), float("inf"), None)
    need = sum(sum(run_mod.in_run_dtype(d.parts, "float32").values()) for d in memory.devices)
    need += 9 * run_mod.PROCESS_BASE_BYTES  # 8 workers and the parent
    assert err[0].startswith(f"error: this host cannot hold the run: it needs about {fmt_bytes(need)} of host "
                             "memory and 64.0 GiB is available (MemAvailable in /proc/meminfo): 8 worker processes")
    assert "the fullest (device 0, during actor_train)" in err[0] and "in float32 (weights " in err[0]
    assert "the plan uses 2 of the cluster's 8 devices (0, 1)" in err[0]


def test_a_plan_on_part_of_the_cluster_is_noted_and_small_runs_pass_the_check():
    from estimator.spec.plan import Plan
    from executor.run import check_host_memory

    exp = load_experiment(PPO)
    plenty = (64 * 2.0**30, "test")
    assert check_host_memory(exp, Plan.load(str(PLANS / "dp2.json")), "float32", plenty) is None
    note = check_host_memory(exp, Plan.load(str(PLANS / "second-device.json")), "float32", plenty)
    assert note == ("note: the plan uses 1 of the cluster's 2 devices (1), but a run starts one process per "
                    "device of the cluster, so 1 of them only idle")


def test_the_table_says_where_the_trace_and_timeline_went(tmp_path, capsys, monkeypatch):
    import types

    import executor.run as run_mod
    from estimator.spec.timeline import Span

    spans = [Span(0.0, 1.0, 0, 0, "actor_gen", "decode"), Span(1.0, 2.0, 0, 1, "actor_gen", "decode")]
    result = types.SimpleNamespace(timeline=Timeline.of(spans, source="measured"), iteration_s=1.0,
                                   iterations_s=[1.0, 1.0], warmup=1, drain=0, call_stats=lambda: {})
    monkeypatch.setattr(run_mod, "run_local", lambda *args: result)  # the workers are tested above
    trace, timeline = tmp_path / "t.json", tmp_path / "tl.json"
    assert main([PPO, "--plan", str(PLANS / "dp2.json"), "--trace", str(trace), "--timeline", str(timeline)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"wrote Chrome trace {trace} (open it in Perfetto)\n"
                                 f"wrote measured timeline {timeline} (rlhf-plan/timeline-v1)")
    assert Timeline.load(timeline).spans == tuple(spans) and trace.is_file()


@pytest.mark.parametrize("eta, iterations, warmup, want", [
    (0, 3, None, (3, 1)),  # synchronous: as before
    (0, 1, None, (1, 0)),
    (2, 3, None, (9, 5)),  # 3 + 2η warm-up and η drain run; 1 + 2η warm-up left out
    (2, 1, None, (7, 4)),  # a single steady iteration: its 2η warm-up left out, as 0 without asynchrony
    (1, 2, 0, (5, 0)),
])
def test_asynchronous_runs_count_iterations_as_the_estimator(eta, iterations, warmup, want):
    import argparse

    from executor.run import options_from

    exp = load_experiment(EXAMPLES / "grpo-tiny-2xcpu.yaml").with_staleness(eta)
    plan = Plan.load(str(EXAMPLES / "plans" / "grpo-tiny-2xcpu" / "single-device.json"))
    args = argparse.Namespace(iterations=iterations, warmup=warmup, timeout_s=300.0, inject_fault=None)
    total, warm, _ = options_from(args, exp, plan)
    assert (total, warm) == want and total - warm - exp.workflow.drain >= 1


def test_a_warmup_into_the_drain_names_the_iterations_run():
    import argparse

    from executor.run import options_from

    exp = load_experiment(EXAMPLES / "grpo-tiny-2xcpu.yaml").with_staleness(1)
    plan = Plan.load(str(EXAMPLES / "plans" / "grpo-tiny-2xcpu" / "single-device.json"))
    args = argparse.Namespace(iterations=2, warmup=4, timeout_s=300.0, inject_fault=None)
    with pytest.raises(ConfigError, match=r"--warmup=4 must be below --iterations=2 \(with max_staleness=1, 5 "
                                          r"iterations run, the last 1 of them drain\)"):
        options_from(args, exp, plan)


def test_streaming_flags_keep_or_override_the_files_async_block():
    """``--max-staleness`` keeps the file's ``async.streaming`` where η allows a stream;
    ``--streaming`` overrides it, and refuses a stream at η = 0 in one line."""
    base = load_experiment(EXAMPLES / "grpo-longtail-tiny-2xcpu.yaml")
    raw = {**yaml.safe_load((EXAMPLES / "grpo-longtail-tiny-2xcpu.yaml").read_text()),
           "async": {"max_staleness": 1, "streaming": "keep"}}
    streaming = experiment_from_dict(raw)
    assert with_async(streaming, 2, None).streaming == "keep"
    assert with_async(streaming, 0, None).streaming == "off"
    assert with_async(streaming, None, "recompute").streaming == "recompute"
    got = with_async(base, 1, "recompute")
    assert (got.max_staleness, got.streaming) == (1, "recompute")
    assert with_async(base, None, None) is base
    with pytest.raises(ConfigError, match="--streaming keep needs max_staleness ≥ 1"):
        with_async(base, None, "keep")


def test_switch_points_are_checked_before_any_process_starts():
    """``--switch-at`` names calls that stream, one ordered list a replica; points the rule
    refuses (a switch before the replica's share of the previous iteration) are refused."""
    from executor.options import RunOptions
    from executor.run import parse_switch_at, stream_points

    exp = load_experiment(EXAMPLES / "grpo-longtail-tiny-2xcpu.yaml").with_staleness(1, "recompute")
    plan = Plan.load(str(EXAMPLES / "plans" / "grpo-longtail-tiny-2xcpu" / "disjoint-cap8.json"))
    assert parse_switch_at('{"actor_gen": [[276, 436]]}', exp, plan) == {"actor_gen": ((276, 436),)}
    for text, match in (('{"ref_inf": [[1]]}', "does not stream"), ('{"actor_gen": [[5, 2]]}', "in order"),
                        ('{"actor_gen": [[1], [2]]}', "1 list"), ("[1", "not JSON")):
        with pytest.raises(ConfigError, match=match):
            parse_switch_at(text, exp, plan)
    too_early = RunOptions(iterations=4, switch_at={"actor_gen": ((1, 2),)})
    with pytest.raises(ConfigError, match="fewer than its share"):
        stream_points(exp, plan, too_early)
    default = stream_points(exp, plan, RunOptions(iterations=4))["actor_gen"]
    assert len(default) == 1 and len(default[0]) == 2  # versions 1 and 2 feed iterations 2 and 3
    assert main([str(EXAMPLES / "grpo-longtail-tiny-2xcpu.yaml"), "--plan",
                 str(EXAMPLES / "plans" / "grpo-longtail-tiny-2xcpu" / "disjoint-cap8.json"), "--max-staleness", "1",
                 "--streaming", "recompute", "--switch-at", '{"actor_gen": [[1, 2]]}']) == 2


def test_tensor_parallelism_across_simulated_nodes_runs_when_the_plan_says_so(tmp_path, capfd):
    """On CPU the nodes are simulated: a DPO plan whose tensor-parallel groups span the two
    one-device nodes runs with tp_across_nodes and is refused, naming the key, without it."""
    exp = tmp_path / "dpo-2nodes.yaml"
    exp.write_text((EXAMPLES / "dpo-tiny-2xcpu.yaml").read_text().replace(
        "{nodes: 1, devices_per_node: 2, device: cpu}", "{nodes: 2, devices_per_node: 1, device: cpu}"))
    layout = {"mesh": "0-1", "dp": 1, "tp": 2, "pp": 1, "tp_across_nodes": True}
    plan = tmp_path / "tp-across.json"
    plan.write_text(json.dumps({"calls": {"ref_inf": layout, "actor_train": {**layout, "micro_batches": 2}}}))
    assert main([str(exp), "--plan", str(plan), "--json"]) == 0
    rep = json.loads(capfd.readouterr().out)
    assert rep["calls"]["actor_train"]["tp"] == 2 and rep["calls"]["actor_train"]["duration_s"] > 0
    plan.write_text(plan.read_text().replace(', "tp_across_nodes": true', ""))
    assert main([str(exp), "--plan", str(plan)]) == 2
    assert "call actor_train: tp=2 spans nodes" in capfd.readouterr().err
