"""Simulator: hand-computed timelines on round numbers, link sharing, version edges, ties."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from estimator.baselines import symmetric_plan
from estimator.cost.decode import DecodeChunk
from estimator.cost.pieces import StageTime
from estimator.cost.roofline import roofline_s
from estimator.cost.transfers import group_ports
from estimator.profile.profiles import load_profile
from estimator.sim.simulate import simulate
from estimator.spec.experiment import load_experiment
from estimator.spec.plan import Plan
from estimator.spec.workflow import Call
from tests.conftest import EXAMPLES, ROOT
from tests.synthetic import StubCosts, call_cost, lay, linear_profile, plan_of, workload, world

PROF = linear_profile(link_bw=1e9)


def _call(name: str, role: str, kind: str = "inference", inputs=("prompts",), outputs=()) -> Call:
    return Call(name, role, kind, tuple(inputs), tuple(outputs) or (f"{name}_out",), workload())


def _run(calls, costs: dict, layouts: dict, iterations: int = 1, data=None, realloc=None, homes=None):
    w = world(calls)
    homes = homes or {c.role: c.name for c in calls}
    stub = StubCosts(costs, homes, PROF, data=data or {}, realloc=realloc or {})
    return simulate(w, plan_of(layouts), PROF, iterations, costs=stub)


def _spans(result, op: str, call: str | None = None):
    return sorted((r[0], r[1], r[2], r[6], r[7]) for r in result.rows if r[5] == op and call in (None, r[4]))


def test_single_call():
    a = lay(0, 4, mb=2)
    r = _run([_call("a", "x")], {"a": call_cost("a", "inference", a, fwd=1.0)}, {"a": a}, iterations=3)
    assert _spans(r, "forward") == [(0, 1, 0, 0, 0), (1, 2, 0, 1, 0), (2, 3, 0, 0, 0), (3, 4, 0, 1, 0),
                                    (4, 5, 0, 0, 0), (5, 6, 0, 1, 0)]
    assert r.iteration_ends() == [2.0, 4.0, 6.0]
    assert r.iteration_s == pytest.approx(2.0)


def test_two_calls_on_disjoint_meshes_run_concurrently():
    a, b = lay(0, 4), lay(4, 4)
    costs = {"a": call_cost("a", "inference", a, 3.0), "b": call_cost("b", "inference", b, 2.0)}
    r = _run([_call("a", "x"), _call("b", "y")], costs, {"a": a, "b": b})
    assert (r.records[(0, "a")].start_s, r.records[(0, "a")].end_s) == (0.0, 3.0)
    assert (r.records[(0, "b")].start_s, r.records[(0, "b")].end_s) == (0.0, 2.0)


def test_two_calls_on_one_mesh_are_serialised():
    a, b = lay(0, 4), lay(2, 2)  # overlapping meshes
    costs = {"a": call_cost("a", "inference", a, 3.0), "b": call_cost("b", "inference", b, 2.0)}
    r = _run([_call("a", "x"), _call("b", "y")], costs, {"a": a, "b": b})
    assert (r.records[(0, "b")].start_s, r.records[(0, "b")].end_s) == (3.0, 5.0)


@pytest.mark.parametrize("p,m", [(4, 8), (2, 2), (3, 1), (1, 4)])
def test_1f1b_bubble_fraction(p, m):
    f, b = 1.0, 2.0
    layout = lay(0, p, pp=p, mb=m)
    r = _run([_call("t", "actor", "train")], {"t": call_cost("t", "train", layout, f, b)}, {"t": layout})
    total = r.records[(0, "t")].end_s
    assert total == pytest.approx((m + p - 1) * (f + b))
    busy = m * (f + b)  # per stage
    assert 1 - busy / total == pytest.approx((p - 1) / (m + p - 1))
    # stage k starts k forwards late and ends k backwards early
    for k in range(p):
        fwd = [s for s in _spans(r, "forward") if s[4] == k]
        bwd = [s for s in _spans(r, "backward") if s[4] == k]
        assert fwd[0][0] == pytest.approx(k * f)
        assert bwd[-1][1] == pytest.approx(total - k * b)


def _fanout(order: tuple[str, str], gb: int = 10**9):
    """Producer a on device 0; consumers on devices 1 and 2 both receive ``gb`` bytes from it."""
    la, lb, lc = lay(0, 1), lay(1, 1), lay(2, 2)
    calls = {"a": _call("a", "x", outputs=("d",)), "b": _call("b", "y", inputs=("d",)),
             "c": _call("c", "z", inputs=("d",))}
    costs = {"a": call_cost("a", "inference", la, 1.0), "b": call_cost("b", "inference", lb, 1.0),
             "c": call_cost("c", "inference", lc, 1.0)}
    data = {("a", "b"): {(0, 1): gb}, ("a", "c"): {(0, 2): gb}}
    return _run([calls["a"]] + [calls[n] for n in order], costs, {"a": la, "b": lb, "c": lc}, data=data)


def test_shared_link_slows_concurrent_transfers():
    r = _fanout(("b", "c"))
    # each message alone takes 1 s; both leave device 0's NVLink port at t=1, so one waits
    assert r.records[(0, "b")].compute_start_s == pytest.approx(2.0)
    assert r.records[(0, "c")].compute_start_s == pytest.approx(3.0)
    alone = _run([_call("a", "x", outputs=("d",)), _call("b", "y", inputs=("d",))],
                 {"a": call_cost("a", "inference", lay(0, 1), 1.0), "b": call_cost("b", "inference", lay(1, 1), 1.0)},
                 {"a": lay(0, 1), "b": lay(1, 1)}, data={("a", "b"): {(0, 1): 10**9}})
    assert alone.records[(0, "b")].compute_start_s == pytest.approx(2.0)
    assert len(_spans(r, "data")) == 2


def test_ties_break_by_topological_order_and_runs_repeat_exactly():
    first = _fanout(("b", "c"))
    swapped = _fanout(("c", "b"))  # c declared first: its message leaves first
    assert swapped.records[(0, "c")].compute_start_s == pytest.approx(2.0)
    assert swapped.records[(0, "b")].compute_start_s == pytest.approx(3.0)
    again = _fanout(("b", "c"))
    assert again.rows == first.rows and again.records == first.records


def test_version_edges_make_generation_wait_for_last_training():
    gen_l, train_l = lay(0, 4), lay(4, 4)
    calls = [_call("gen", "actor", "generate", outputs=("seq",)), _call("train", "actor", "train", inputs=("seq",))]
    costs = {"gen": call_cost("gen", "generate", gen_l, 1.0), "train": call_cost("train", "train", train_l, 1.0, 1.0)}
    r = _run(calls, costs, {"gen": gen_l, "train": train_l}, iterations=3, homes={"actor": "train"})
    starts = [r.records[(i, "gen")].start_s for i in range(3)]
    assert starts == [0.0, 3.0, 6.0]  # not 1.0: iteration 1 needs iteration 0's trained weights
    assert r.iteration_s == pytest.approx(3.0)


def test_reallocation_precedes_the_call_and_uses_links():
    gen_l, train_l = lay(0, 2), lay(2, 2)
    calls = [_call("gen", "actor", "generate", outputs=("seq",)), _call("train", "actor", "train", inputs=("seq",))]
    costs = {"gen": call_cost("gen", "generate", gen_l, 1.0), "train": call_cost("train", "train", train_l, 1.0, 1.0)}
    realloc = {("actor", "gen"): {(2, 0): 2 * 10**9, (3, 1): 10**9}}  # 2 s and 1 s on separate ports
    r = _run(calls, costs, {"gen": gen_l, "train": train_l}, realloc=realloc, homes={"actor": "train"})
    rec = r.records[(0, "gen")]
    assert rec.realloc_s == pytest.approx(2.0) and rec.compute_start_s == pytest.approx(2.0)
    assert _spans(r, "realloc")[0][:2] == (0.0, 2.0)


def test_home_devices_send_weights_only_when_free_and_are_free_again_after():
    """A call away from home needs its home's devices for the reallocation: it waits for the
    call running there, and the next call on the home devices waits only for the reallocation."""
    busy_l, gen_l, train_l = lay(0, 1), lay(2, 1), lay(0, 2)
    calls = [_call("busy", "b"), _call("gen", "actor", "generate", outputs=("seq",)),
             _call("train", "actor", "train")]
    costs = {"busy": call_cost("busy", "inference", busy_l, 3.0), "gen": call_cost("gen", "generate", gen_l, 1.0),
             "train": call_cost("train", "train", train_l, 1.0, 1.0)}
    realloc = {("actor", "gen"): {(0, 2): 10**9}}  # 1 s from device 0 (busy until 3 s)
    r = _run(calls, costs, {"busy": busy_l, "gen": gen_l, "train": train_l}, realloc=realloc,
             homes={"actor": "train", "b": "busy"})
    gen, train = r.records[(0, "gen")], r.records[(0, "train")]
    assert (gen.start_s, gen.compute_start_s, gen.end_s) == pytest.approx((3.0, 4.0, 5.0))
    assert (train.start_s, train.end_s) == pytest.approx((4.0, 6.0))


def test_tensor_parallel_collectives_wait_for_a_busy_nvlink_port():
    """Call t (tp=2 on devices 0-1) starts at 0.5 s and computes 1 s; its collectives then need
    both devices' NVLink ports for 1 s, but a data transfer into device 1 (requested at 0.25 s,
    before t started) holds device 1's in-port until 2.25 s. (A task books its collectives when
    it starts: transfers requested while it computes queue behind them.)"""
    w_l, p_l, t_l, q_l = lay(0, 1), lay(2, 1), lay(0, 2, tp=2), lay(1, 1)
    t_cost = call_cost("t", "inference", t_l, 1.0)
    t_cost = dataclasses.replace(t_cost, stages=tuple(
        dataclasses.replace(st, fwd=StageTime(1.0, 1.0), tp_ports=tuple(group_ports(st.devices, 8)))
        for st in t_cost.stages))
    costs = {"w": call_cost("w", "inference", w_l, 0.5), "p": call_cost("p", "inference", p_l, 0.25),
             "t": t_cost, "q": call_cost("q", "inference", q_l, 1.0)}
    calls = [_call("w", "v"), _call("p", "y", outputs=("d",)), _call("t", "x"), _call("q", "z", inputs=("d",))]
    layouts = {"w": w_l, "p": p_l, "t": t_l, "q": q_l}
    r = _run(calls, costs, layouts, data={("p", "q"): {(2, 1): 2 * 10**9}})
    assert _spans(r, "tp_allreduce", "t") == [(2.25, 3.25, 0, 0, 0)]
    assert (r.records[(0, "q")].compute_start_s, r.records[(0, "q")].end_s) == pytest.approx((3.25, 4.25))
    quiet = _run(calls, costs, layouts, data={("p", "q"): {(2, 3): 2 * 10**9}})  # the transfer avoids t
    assert _spans(quiet, "tp_allreduce", "t") == [(1.5, 2.5, 0, 0, 0)]


def test_pipelined_decode_chunks_start_one_micro_batch_apart():
    layout = lay(0, 2, pp=2, mb=2)
    chunk = DecodeChunk(steps=4, duration_s=8.0, compute_s=8.0, comm_s=0.0, lag_s=1.0, send_bytes=0.0)
    cc = call_cost("gen", "generate", layout, 1.0, decode=(chunk, chunk))
    r = _run([_call("gen", "actor", "generate")], {"gen": cc}, {"gen": layout})
    dec = _spans(r, "decode")
    # prefill: stage 0 [0,1] [1,2], stage 1 [1,2] [2,3]; decode waits for micro-batch 0's token (t=2)
    assert [(s[0], s[4]) for s in dec] == [(2.0, 0), (3.0, 1), (10.0, 0), (11.0, 1)]
    assert r.records[(0, "gen")].end_s == pytest.approx(19.0)


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_predictions_never_beat_the_roofline(name):
    exp = load_experiment(EXAMPLES / f"{name}.yaml")
    prof = load_profile(exp.cluster.device)
    result = simulate(exp, symmetric_plan(exp, prof), prof)
    assert result.iteration_s >= roofline_s(exp, prof)


def test_simulation_is_deterministic_and_exports_a_timeline():
    exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    prof = load_profile("cpu")
    plan = symmetric_plan(exp, prof)
    a, b = simulate(exp, plan, prof), simulate(exp, plan, prof)
    assert a.rows == b.rows
    tl = a.timeline()
    assert tl.steady_state_s() == pytest.approx(a.iteration_s)
    ops = {s.op for s in tl.spans}
    assert {"forward", "backward", "prefill", "decode", "tp_allreduce", "optimizer"} <= ops
    df = tl.to_dataframe()
    assert len(df) == len(tl.spans)
    assert "traceEvents" in tl.chrome_trace()


def test_timeline_has_every_device_of_a_stage():
    exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    prof = load_profile("cpu")
    plan = symmetric_plan(exp, prof)  # tp=2: both devices run every stage span in lock-step
    result = simulate(exp, plan, prof)
    full, compact = result.timeline(), result.timeline(per_device=False)
    compute = [s for s in compact.spans if s.device >= 0]
    links = [s for s in compact.spans if s.device < 0]
    assert len(full.spans) == 2 * len(compute) + len(links)
    for s in compute:
        twins = {t.device for t in full.spans if (t.start_s, t.end_s, t.call, t.op, t.micro_batch) ==
                 (s.start_s, s.end_s, s.call, s.op, s.micro_batch)}
        assert twins == {0, 1}
    assert full.steady_state_s() == pytest.approx(compact.steady_state_s())


GOLDEN = ROOT / "tests" / "golden" / "ppo-tiny-mixed-h100-trace.json"


def _trace_events(trace: dict) -> list[tuple]:
    """(name, track, iteration, micro-batch, stage, device) and (start, duration) per span."""
    tracks = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    return [((e["name"], tracks[e["tid"]], e["args"]["iteration"], e["args"]["micro_batch"], e["args"]["stage"],
              e["args"]["device"]), (e["ts"], e["dur"])) for e in trace["traceEvents"] if e["ph"] == "X"]


def test_predicted_trace_matches_the_golden_file():
    """The whole predicted trace of one small plan: any change to lowering, costs or scheduling
    shows here. After a deliberate change, regenerate with
    ``RLHF_PLAN_UPDATE_GOLDEN=1 python -m pytest tests/test_simulator.py -k golden`` and review
    the diff."""
    exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    plan = Plan.load(str(EXAMPLES / "plans" / "ppo-tiny-2xcpu" / "mixed-micro-batches.json"))
    trace = simulate(exp, plan, load_profile("h100-sxm"), 2).timeline().chrome_trace()
    trace = {"traceEvents": trace["traceEvents"]}  # provenance (meta) is not part of the contract
    if os.environ.get("RLHF_PLAN_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(trace, indent=1) + "\n")
    got, want = _trace_events(trace), _trace_events(json.loads(GOLDEN.read_text()))
    assert [k for k, _ in got] == [k for k, _ in want]
    for (key, times), (_, expected) in zip(got, want):
        assert times == pytest.approx(expected, rel=1e-9, abs=1e-6), key


def test_waiting_for_a_producer_is_wait_not_communication():
    """A consumer on a disjoint mesh starts with the run, waits 3 s for its producer to end,
    then 1 s for the data to arrive: 3 s of waiting and 1 s of communication, not 4 s of it."""
    from estimator.predict import call_rows

    la, lb = lay(0, 1), lay(1, 1)
    calls = [_call("a", "x", outputs=("d",)), _call("b", "y", inputs=("d",))]
    costs = {"a": call_cost("a", "inference", la, 3.0), "b": call_cost("b", "inference", lb, 2.0)}
    r = _run(calls, costs, {"a": la, "b": lb}, data={("a", "b"): {(0, 1): 10**9}})
    rec = r.records[(0, "b")]
    assert (rec.start_s, rec.compute_start_s, rec.end_s) == pytest.approx((0.0, 4.0, 6.0))
    assert (rec.data_s, rec.wait_s) == pytest.approx((4.0, 3.0))
    rows = call_rows(r)
    assert (rows["b"]["comm_s"], rows["b"]["wait_s"]) == pytest.approx((1.0, 3.0))
    assert (rows["a"]["comm_s"], rows["a"]["wait_s"]) == pytest.approx((0.0, 0.0))


def test_a_verifier_lengthens_its_generate_call_by_its_seconds_per_replica_sequence():
    """``reward_s_per_sample`` × the sequences of one data-parallel replica, at the end of the
    generate call: 0.25 s × 16 sequences / dp 2 = 2 s longer in the evaluator and the
    simulator, a ``reward`` span on every device of the last stage, and — every call on one
    mesh, one after the other — an iteration 2 s longer."""
    from estimator.sim.evaluator import Evaluator
    from estimator.spec.cluster import DeviceMesh
    from estimator.spec.experiment import experiment_from_dict
    from estimator.spec.plan import Layout

    raw = {"algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "rule"},
           "batch_size": 4, "group_size": 4, "prompt_len": 16, "gen_len": 16, "old_logprobs": "recompute",
           "cluster": {"nodes": 1, "devices_per_node": 2, "device": "h100-sxm"}}
    plain, verified = (experiment_from_dict({**raw, "reward_s_per_sample": s}) for s in (0.0, 0.25))
    both = DeviceMesh(0, 2)
    plan = Plan({"actor_gen": Layout(both, 2, 1, 1, 1), "actor_inf": Layout(both, 1, 2, 1, 1),
                 "ref_inf": Layout(both, 1, 1, 2, 2), "actor_train": Layout(both, 2, 1, 1, 1)})
    prof = load_profile("h100-sxm")
    (a, b) = (simulate(e, plan, prof, 2) for e in (plain, verified))
    for it in range(2):
        assert b.records[(it, "actor_gen")].duration_s - a.records[(it, "actor_gen")].duration_s == pytest.approx(2.0)
        for call in ("actor_inf", "ref_inf", "actor_train"):
            assert b.records[(it, call)].duration_s == pytest.approx(a.records[(it, call)].duration_s)
    assert b.iteration_s - a.iteration_s == pytest.approx(2.0)
    spans = [s for s in b.timeline().spans if s.op == "reward"]
    want = [(i, d, "actor_gen") for i in (0, 1) for d in (0, 1)]
    assert sorted((s.iteration, s.device, s.call) for s in spans) == want
    assert all(s.duration_s == pytest.approx(2.0) and s.end_s == b.records[(s.iteration, "actor_gen")].end_s
               for s in spans)
    assert not [s for s in a.timeline().spans if s.op == "reward"]
    ea, eb = (Evaluator(e, prof, 2).evaluate(plan) for e in (plain, verified))
    (sa, xa), (sb, xb) = ea.calls["actor_gen"], eb.calls["actor_gen"]
    assert (xb - sb) - (xa - sa) == pytest.approx(2.0) and eb.iteration_s - ea.iteration_s == pytest.approx(2.0)
