"""Asynchronous training: lagged version edges, weight pushes to standing copies, admission under η."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from estimator.base.errors import ConfigError
from estimator.cost.lowering import Costs
from estimator.cost.memory import home_bytes, plan_memory
from estimator.profile.profiles import load_profile
from estimator.sim.asynchrony import async_report
from estimator.sim.evaluator import Evaluator, call_s
from estimator.sim.instances import PUSH, instance_graph
from estimator.sim.simulator import Simulation
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import experiment_from_dict, load_experiment
from estimator.spec.plan import Layout, Plan, standing_copies
from estimator.spec.workflow import SYNC_LAG

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GOLDEN = ROOT / "tests" / "golden" / "sync-timelines.json"


def lay(mesh: str, dp: int = 1, tp: int = 1, pp: int = 1, mb: int = 1) -> Layout:
    return Layout(DeviceMesh.parse(mesh), dp, tp, pp, mb)


def _fingerprint(name: str, plan_path: Path) -> dict:
    e = load_experiment(EXAMPLES / f"{name}.yaml")
    prof = load_profile(e.cluster.device)
    plan = Plan.load(str(plan_path))
    r = Simulation(e, plan, prof, 3).run()
    ev = Evaluator(e, prof, 3).evaluate(plan)
    return {"simulated_s": repr(r.iteration_s), "evaluated_s": repr(ev.iteration_s),
            "records": {f"{i}:{c}": [repr(x.start_s), repr(x.end_s)] for (i, c), x in sorted(r.records.items())}}


def test_staleness_zero_reproduces_the_synchronous_timelines_to_the_last_digit():
    """Every committed plan of every CPU example, simulated and evaluated, against the timings
    recorded before staleness existed (regenerate deliberately: RLHF_PLAN_UPDATE_GOLDEN=1)."""
    got = {}
    for ex in sorted(EXAMPLES.glob("*-2xcpu.yaml")):
        for plan_path in sorted((EXAMPLES / "plans" / ex.stem).glob("*.json")):
            got[f"{ex.stem}/{plan_path.name}"] = _fingerprint(ex.stem, plan_path)
    if os.environ.get("RLHF_PLAN_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], key


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_synchronous_unroll_is_iteration_then_topological_order(example):
    wf = load_experiment(EXAMPLES / example).workflow
    assert wf.staleness == 0 and all(e.lag == SYNC_LAG for e in wf.version_edges())
    nodes, _ = wf.unroll(3)
    order = wf.topological_order()
    assert [(n.iteration, n.call) for n in nodes] == [(i, c) for i in range(3) for c in order]


@pytest.mark.parametrize("eta", [1, 2, 4])
def test_staleness_lags_only_the_actor_generate_edge_and_unrolls_in_a_valid_order(eta):
    wf = load_experiment(EXAMPLES / "ppo-llama2-7b-8xh100.yaml").with_staleness(eta).workflow
    lags = {(e.train, e.call): e.lag for e in wf.version_edges()}
    assert lags[("actor_train", "actor_gen")] == eta + 1
    assert all(lag == SYNC_LAG for k, lag in lags.items() if k != ("actor_train", "actor_gen"))
    nodes, edges = wf.unroll(6)
    pos = {n: i for i, n in enumerate(nodes)}
    assert all(pos[a] < pos[b] for a, b in edges)
    # the rollouts of iteration j run η slots ahead: before the update of iteration j − 1 ends
    assert pos[type(nodes[0])(eta, "actor_gen")] < pos[type(nodes[0])(0, "actor_train")]


def _two_device(eta: int, device: str = "h100-sxm"):
    """GRPO of a tiny model under a verifier on two devices: rollouts (and the reference) on
    device 0, the actor's training on device 1."""
    e = experiment_from_dict({
        "algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "rule"},
        "batch_size": 4, "group_size": 4, "prompt_len": 16, "gen_len": 16, "seed": 1,
        "cluster": {"nodes": 1, "devices_per_node": 2, "device": device},
        **({"async": {"max_staleness": eta}} if eta else {})})
    plan = Plan({"actor_gen": lay("0"), "ref_inf": lay("0"), "actor_train": lay("1")})
    return e, plan


def test_weight_push_on_a_hand_computed_two_device_case():
    e, plan = _two_device(1)
    prof = load_profile("h100-sxm")
    costs = Costs(e, prof)
    g = call_s(costs.call("actor_gen", plan["actor_gen"]))
    r = call_s(costs.call("ref_inf", plan["ref_inf"]))
    t = call_s(costs.call("actor_train", plan["actor_train"]))
    d_gen = costs.data_s("actor_gen", plan["actor_gen"], "actor_train", plan["actor_train"])
    d_ref = costs.data_s("ref_inf", plan["ref_inf"], "actor_train", plan["actor_train"])
    p = costs.realloc_s("actor", plan["actor_train"], plan["actor_gen"])
    assert p > 0 and min(g, r, t) > 0
    assert standing_copies(e.workflow, plan) == {"actor_gen"}
    res = Simulation(e, plan, prof, 3).run()
    rec = res.records
    # device 0 runs gen 0, gen 1 (no update to wait for), then ref 0 on gen 0's rows
    assert rec[(0, "actor_gen")].start_s == 0 and rec[(0, "actor_gen")].end_s == pytest.approx(g)
    assert rec[(1, "actor_gen")].start_s == pytest.approx(g)
    assert rec[(0, "ref_inf")].end_s == pytest.approx(2 * g + r)
    # device 1 trains once both inputs have arrived
    train0 = max(g + d_gen, 2 * g + r + d_ref)
    assert rec[(0, "actor_train")].compute_start_s == pytest.approx(train0)
    assert rec[(0, "actor_train")].end_s == pytest.approx(train0 + t)
    # the push of update 0 holds both devices once training ends, then gen 2 starts from it
    push0 = res.pushes[(0, "actor_gen")]
    assert push0.start_s == pytest.approx(train0 + t) and push0.end_s == pytest.approx(train0 + t + p)
    assert rec[(2, "actor_gen")].start_s == pytest.approx(train0 + t + p)
    assert rec[(2, "actor_gen")].realloc_s == 0.0  # the copy stands: no reallocation
    ev = Evaluator(e, prof, 3).evaluate(plan)
    assert ev.iteration_s == pytest.approx(res.iteration_s, rel=1e-9)


def test_standing_copy_is_resident_on_the_rollout_devices():
    e, plan = _two_device(1)
    prof = load_profile("h100-sxm")
    weights = home_bytes(e.models["actor"], plan["actor_gen"], trained=False)[0]["weights"]
    sync = plan_memory(e.with_staleness(0), plan, prof.capacity_bytes, prof.stack).devices[0]
    copy = plan_memory(e, plan, prof.capacity_bytes, prof.stack).devices[0]
    # synchronous: the rollout reallocates a copy for its own duration; asynchronous: the copy
    # stands beside the reference's weights through every call on the device
    assert sync.parts["weights"] + weights == pytest.approx(copy.parts["weights"])
    assert copy.parts["realloc"] == 0.0
    assert Evaluator(e, prof, 3).evaluate(plan).peak_memory_bytes == pytest.approx(
        max(d.peak_bytes for d in plan_memory(e, plan, prof.capacity_bytes, prof.stack).devices))


@pytest.mark.parametrize("eta", [0, 1, 2, 3])
def test_rollouts_are_admitted_at_most_eta_versions_ahead(eta):
    """With generation far faster than training, the rollouts run exactly as far ahead as η allows."""
    e, plan = _two_device(eta)
    prof = load_profile("h100-sxm")
    res = Simulation(e, plan, prof, 4).run()
    for (j, call), rec in res.records.items():
        if call != "actor_gen" or j < eta + 1:
            continue
        feeder = res.pushes.get((j - eta - 1, "actor_gen")) if eta else res.records[(j - 1, "actor_train")]
        assert rec.start_s >= feeder.end_s - 1e-12
    report = async_report(e, plan, res)
    assert report.staleness_max == eta and report.staleness_mean == pytest.approx(eta)
    assert report.discarded_tokens == 0
    assert (report.push_s > 0) == (eta > 0)


def test_disaggregated_async_beats_sync_and_idles_less():
    e, plan = _two_device(1)
    prof = load_profile("h100-sxm")
    sync = async_report(e.with_staleness(0), plan, Simulation(e.with_staleness(0), plan, prof, 3).run())
    ahead = async_report(e, plan, Simulation(e, plan, prof, 3).run())
    assert ahead.iteration_s < sync.iteration_s
    assert ahead.tokens_per_s > sync.tokens_per_s
    assert ahead.trainer_idle < sync.trainer_idle
    assert 0.0 <= ahead.rollout_idle <= 1.0 and 0.0 <= ahead.trainer_idle <= 1.0


@pytest.mark.parametrize("plan_name", ["disjoint-cap8", "dp2", "tp2", "single-device"])
@pytest.mark.parametrize("eta", [1, 2])
def test_evaluator_follows_the_simulator_under_staleness(plan_name, eta):
    e = load_experiment(EXAMPLES / "grpo-longtail-tiny-2xcpu.yaml").with_staleness(eta)
    path = EXAMPLES / "plans" / "grpo-longtail-tiny-2xcpu" / f"{plan_name}.json"
    if not path.exists():
        pytest.skip(f"no plan {plan_name}")
    plan = Plan.load(str(path))
    prof = load_profile(e.cluster.device)
    sim = Simulation(e, plan, prof, 3, weights=Evaluator(e, prof, 3).call_weights(plan)).run()
    ev = Evaluator(e, prof, 3).evaluate(plan)
    assert ev.iteration_s == pytest.approx(sim.iteration_s, rel=0.02)


def test_instance_graph_pushes_follow_updates_and_feed_the_lagged_rollout():
    e, plan = _two_device(2)
    g = instance_graph(e.workflow, 6, standing_copies(e.workflow, plan))
    index = {(n.iteration, n.call): i for i, n in enumerate(g.nodes)}
    for (it, call), i in index.items():
        if call.startswith(PUSH):
            assert g.version_preds[i] == (index[(it, "actor_train")],)
            assert index[(it + 3, "actor_gen")] > i
            assert index[(it + 3, "actor_gen")] in [j for j, v in enumerate(g.version_preds) if i in v]


@pytest.mark.parametrize("raw,needle", [
    ({"async": {"max_staleness": -1}}, "async.max_staleness=-1"),
    ({"async": {"max_staleness": 1.5}}, "must be an integer"),
    ({"async": {"staleness": 1}}, "unknown key 'staleness'"),
    ({"async": {}}, "needs max_staleness"),
    ({"async": 2}, "async must be a mapping"),
    ({"async": {"max_staleness": 65}}, "exceeds the limit 64"),
])
def test_bad_async_settings_name_the_value(raw, needle):
    base = {"algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "rule"},
            "batch_size": 4, "group_size": 4, "prompt_len": 16, "gen_len": 16,
            "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"}}
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        experiment_from_dict(base | raw)


def test_staleness_needs_generation():
    raw = {"algorithm": "dpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h"}, "batch_size": 4,
           "prompt_len": 16, "gen_len": 16, "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"},
           "async": {"max_staleness": 1}}
    with pytest.raises(ConfigError, match="applies to algorithms that generate"):
        experiment_from_dict(raw)


def test_search_with_max_staleness_reports_throughput_idle_and_the_synchronous_best(capsys):
    from search.__main__ import main

    assert main([str(EXAMPLES / "grpo-tiny-2xcpu.yaml"), "--max-staleness", "1", "--max-evals", "60",
                 "--seed", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    a = out["asynchrony"]
    assert a["max_staleness"] == 1 and a["synchronous"]["max_staleness"] == 0
    assert a["staleness_max"] <= 1 and a["synchronous"]["staleness_max"] == 0
    # the synchronous best is a start of the asynchronous search, so it is never beaten by it
    assert a["iteration_s"] <= a["synchronous"]["iteration_s"] * 1.02
    assert a["speedup_over_synchronous"] == pytest.approx(a["synchronous"]["iteration_s"] / a["iteration_s"])
    for key in ("tokens_per_s", "rollout_idle", "trainer_idle", "staleness_mean", "push_s"):
        assert key in a


def test_split_baselines_build_and_areal_default_needs_asynchrony():
    from search.baselines import build, disaggregated, split_points

    e = load_experiment(EXAMPLES / "grpo-llama3-8b-8xh100.yaml")
    prof = load_profile(e.cluster.device)
    assert 4 in split_points(e)
    assert "asynchronously" in build("areal-default", e, prof, simulate_it=False).reason
    async_e = e.with_staleness(2)
    for name in ("areal-3/4", "areal-default", "balanced"):
        b = build(name, async_e, prof, simulate_it=False)
        assert b.plan is not None, b.reason
        gen = b.plan["actor_gen"].mesh
        train = b.plan["actor_train"].mesh
        assert not gen.overlaps(train) and gen.size + train.size == 8
        assert standing_copies(async_e.workflow, b.plan) == {"actor_gen"}
    share = build("areal-3/4", async_e, prof, simulate_it=False).plan["actor_gen"].mesh.size
    nearer = [k for k in split_points(e) if abs(k - 6) < abs(share - 6)]
    for k in nearer:  # a split nearer 3/4 exists only where some call has no layout on it
        with pytest.raises(ConfigError):
            disaggregated(async_e, prof, k)


def test_whatif_varies_staleness_and_the_generation_share():
    from analysis.whatif import parse_vary

    v = parse_vary(["max_staleness=0,1,2", "gen_devices=2,4"], "grpo")
    assert v == {"max_staleness": [0, 1, 2], "gen_devices": [2, 4]}
    with pytest.raises(ConfigError, match="non-negative"):
        parse_vary(["max_staleness=-1"], "grpo")
    with pytest.raises(ConfigError, match="positive"):
        parse_vary(["gen_devices=0"], "grpo")


def test_the_executor_runs_an_asynchronous_experiment_as_the_estimator_counts_it(tmp_path, capsys):
    """``--iterations 3`` under η = 1 runs the 3 + 2η + η iterations the simulator unrolls,
    leaves the warm-up (1 + 2η) and the drain (η) out of the steady state, and reports the
    weight pushes to the standing copy of a generate call on a device of its own."""
    from estimator.spec.timeline import Timeline
    from executor.run import main

    text = (EXAMPLES / "grpo-tiny-2xcpu.yaml").read_text() + "async: {max_staleness: 1}\n"
    exp = tmp_path / "async.yaml"
    exp.write_text(text)
    plan = tmp_path / "split.json"
    plan.write_text(Plan({"actor_gen": lay("0"), "ref_inf": lay("1"), "reward_inf": lay("1"),
                          "actor_train": lay("1")}).to_json())
    timeline = tmp_path / "measured.json"
    assert main([str(exp), "--plan", str(plan), "--iterations", "3", "--json", "--timeline", str(timeline)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["max_staleness"] == 1 and rep["warmup_iterations"] == 3 and rep["drain_iterations"] == 1
    assert len(rep["iterations_s"]) == 6
    assert rep["iteration_s"] == pytest.approx(sum(rep["iterations_s"][3:5]) / 2)  # the steady iterations 3, 4
    assert list(rep["pushes"]) == ["push:actor_gen"] and rep["pushes"]["push:actor_gen"]["duration_s"] > 0
    measured = Timeline.load(timeline)
    # updates 0-3 feed the rollouts of iterations 2-5; the last update feeds none
    assert sorted({s.iteration for s in measured.spans if s.op == "push"}) == [0, 1, 2, 3]
    assert measured.meta["drain_iterations"] == 1 and measured.meta["max_staleness"] == 1


def test_predict_reports_throughput_idle_and_staleness_of_an_asynchronous_plan(tmp_path, capsys):
    from estimator.predict import main

    exp = tmp_path / "async.yaml"
    exp.write_text((EXAMPLES / "grpo-tiny-2xcpu.yaml").read_text() + "async: {max_staleness: 2}\n")
    plan = tmp_path / "plan.json"
    plan.write_text(Plan({"actor_gen": lay("0"), "ref_inf": lay("1"), "reward_inf": lay("1"),
                          "actor_train": lay("1")}).to_json())
    assert main([str(exp), "--plan", str(plan), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["drain_iterations"] == 2 and out["warmup_iterations"] == 5
    a = out["asynchrony"]
    assert a["standing"] == ["actor_gen"] and a["staleness_max"] <= 2 and a["push_s"] > 0
    assert main([str(exp), "--plan", str(plan)]) == 0
    assert "tokens trained/s" in capsys.readouterr().out
