"""Streaming rollouts (estimator.spec.stream): admission under η, the switch, consumption."""

from functools import cache

import numpy as np
import pytest

from estimator.base.errors import ConfigError
from estimator.cost.lowering import Costs
from estimator.cost.rollout import serving_limits
from estimator.profile.profiles import load_profile
from estimator.sim.evaluator import Evaluator
from estimator.sim.simulate import simulate
from estimator.spec.experiment import load_experiment
from estimator.spec.plan import Layout, Plan
from estimator.spec.sharding import dp_rows
from estimator.spec.stream import call_streams, needed_version, stream_engine, stream_problems, streaming_calls
from estimator.spec.workflow import PUSH
from tests.conftest import EXAMPLES


def _stream(gens, eta=1, cap=0, group=1, recompute=True, switch_at=()):
    n = len(gens[0])
    prompts = [np.ones(n, dtype=np.int64) for _ in gens]
    return stream_engine(prompts, [np.array(g) for g in gens], [(0, n)] * len(gens), eta, group, cap,
                         recompute=recompute, switch_at=switch_at)


def test_the_next_iteration_starts_behind_the_tail_and_the_first_finished_are_consumed():
    # no cap, η 1: iteration 1's prompts are admitted with iteration 0's (version 0 serves both);
    # the long response of iteration 0 is overtaken by iteration 1's short ones
    s = _stream([[5, 1], [1, 1], [1, 1]], switch_at=(5,))
    seg0 = s.run.segments[0]
    assert seg0.prefill == (0, 1, 2, 3)  # request 4 (iteration 2) needs version 1
    assert seg0.finished == (1, 2, 3, 0) and seg0.steps == 4
    assert s.run.segments[1].switch == 1 and s.run.segments[1].prefill == (4, 5)
    assert s.consumed == ((1, 2), (3, 0), (4, 5))  # first finished, first trained on
    assert [list(s.staleness(j)) for j in range(3)] == [[0, 0], [1, 1], [1, 1]]
    assert s.switch_at == (5,) and s.emit_op == (1, 5, 6)


def test_without_its_switch_point_the_stream_stops_where_it_needs_the_update():
    s = _stream([[5, 1], [1, 1], [1, 1]])
    assert not s.complete and s.run.waiting == 1
    assert len(s.consumed) == 2 and s.switch_at == ()


def test_admission_waits_for_the_version_while_decoding_goes_on_and_the_switch_recomputes():
    # cap 5, 3 rows an iteration, η 1: request 6 (iteration 2) needs version 1, which comes after
    # 13 ops — in the middle of request 5's decode steps, which go on meanwhile
    s = _stream([[9, 9, 9], [2, 3, 20], [1, 1, 1]], cap=5, switch_at=(13,))
    segs = s.run.segments
    assert segs[0].prefill == (0, 1, 2, 3, 4) and segs[0].finished == (3,)  # ops 1 (prefill) and 2
    assert segs[1].prefill == (5,) and segs[1].finished == (4,)  # ops 3, 4
    assert segs[2].prefill == () and segs[2].steps == 6 and segs[2].finished == (0, 1, 2)  # gated: decode only
    assert segs[3].prefill == () and segs[3].steps == 3 and segs[3].finished == ()  # cut at the switch point
    assert segs[4].switch == 1 and segs[4].preempted == (5,)  # the running request evicted
    # request 5 prefilled again under version 1 with its tokens (1 prompt + 11 generated), then 6, 7, 8
    assert segs[5].prefill == (5, 6, 7, 8) and segs[5].prefill_tokens == (12, 1, 1, 1)
    assert list(s.admitted_version) == [0] * 6 + [1] * 3  # a re-prefill keeps the version of admission
    assert s.consumed == ((3, 4, 0), (1, 2, 6), (7, 8, 5))
    assert s.emit_op == (10, 14, 22) and s.switch_at == (13,)
    assert [list(s.staleness(j)) for j in range(3)] == [[0, 0, 0], [1, 1, 0], [1, 1, 2]]  # 5 was overtaken


def test_keep_mode_switches_without_evicting():
    s = _stream([[9, 9, 9], [2, 3, 20], [1, 1, 1]], cap=5, recompute=False, switch_at=(13,))
    assert not any(seg.preempted for seg in s.run.segments)
    (sw,) = [seg for seg in s.run.segments if seg.switch >= 0]
    assert sw.switch == 1 and sw.prefill == (6, 7, 8)  # request 5 keeps its slot and its keys and values


def test_a_switch_before_the_engines_share_is_done_is_refused():
    # after 6 ops only requests 3 and 4 finished: the update of iteration 0 still waits for a third
    with pytest.raises(ConfigError, match="fewer than its share"):
        _stream([[9, 9, 9], [2, 3, 20], [1, 1, 1]], cap=5, switch_at=(6,))


def test_groups_are_consumed_whole():
    # two groups of two an iteration; group (0, 1) ends with its long member, after group (2, 3)
    s = _stream([[1, 7, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], group=2, switch_at=(7,))
    assert s.consumed[0] == (2, 3, 4, 5)
    assert sorted(s.consumed[0] + s.consumed[1]) == list(range(8))


def test_staleness_grows_for_an_overtaken_response():
    # η 2: request 0 of iteration 0 is long; iterations 1 and 2's short ones overtake it
    s = _stream([[9, 1], [1, 1], [1, 1], [1, 1]], eta=2, switch_at=(9,))
    assert s.consumed[0] == (1, 2)
    late = [j for j in range(4) if 0 in s.consumed[j]]
    assert late == [2] and int(s.staleness(2).max()) == 2  # admitted under version 0, trained on in 2


def test_bad_streams_are_refused():
    with pytest.raises(ConfigError, match="max_staleness ≥ 1"):
        _stream([[1, 1]], eta=0)
    with pytest.raises(ConfigError, match="multiple of the group size 2"):
        stream_engine([np.ones(3)], [np.ones(3)], [(0, 3)], 1, group=2)


# ---- the simulated stream ------------------------------------------------------------------



ITERATIONS = 4


def _layout(mesh: str, **kw) -> Layout:
    return Layout.from_dict({"mesh": mesh, "dp": 1, "tp": 1, "pp": 1, **kw})


def _split(cap: int = 8, gen_mb: int = 1) -> Plan:
    """Generation on device 0 (a standing copy under η ≥ 1), every other call on device 1."""
    return Plan({"actor_gen": _layout("0", max_concurrency=cap, micro_batches=gen_mb), "actor_inf": _layout("1"),
                 "ref_inf": _layout("1"), "actor_train": _layout("1")})


@cache
def _run(eta: int, streaming: str, cap: int = 8):
    exp = load_experiment(EXAMPLES / "grpo-longtail-tiny-2xcpu.yaml").with_staleness(eta, streaming)
    plan = _split(cap)
    return exp, plan, simulate(exp, plan, load_profile("cpu-epyc"), ITERATIONS)


def test_which_plans_stream():
    exp = load_experiment(EXAMPLES / "grpo-longtail-tiny-2xcpu.yaml").with_staleness(1, "recompute")
    assert streaming_calls(exp, _split()) == {"actor_gen"}
    assert streaming_calls(exp.with_staleness(1, "off"), _split()) == frozenset()
    colocated = Plan({c: _layout("0-1", dp=2) for c in exp.workflow.call_names})
    assert "no standing copy" in stream_problems(exp, colocated, "actor_gen")[0]
    assert "2 virtual engines" in " ".join(stream_problems(exp, _split(gen_mb=2), "actor_gen"))
    shared = Plan(_split().layouts | {"ref_inf": _layout("0")})
    assert "ref_inf also run" in " ".join(stream_problems(exp, shared, "actor_gen"))


def test_every_trajectory_is_trained_on_once_admitted_within_the_bound():
    exp, _, res = _run(2, "recompute")
    (summary,) = res.streams.values()
    (s,) = summary.streams
    consumed = [r for j in range(len(s.consumed)) for r in s.consumed[j]]
    assert sorted(consumed) == list(range(len(s.batch)))  # each once
    assert all(s.admitted_version[r] >= needed_version(int(s.batch[r]), 2) for r in range(len(s.batch)))
    wf = exp.workflow
    total = sum(float(sum(exp.lengths(wf.draw_iteration(b))[0]) + sum(exp.lengths(wf.draw_iteration(b))[1]))
                for b in range(res.iterations))
    assert abs(sum(summary.tokens) - total) < 1e-6
    assert any(int(s.batch[r]) != j for j in range(len(s.consumed)) for r in s.consumed[j])  # out of order
    assert summary.recomputed_tokens > 0  # some switch evicted running requests


def test_a_stream_takes_each_push_at_the_end_of_the_op_it_runs():
    """The push of version v is offered when update v − 1 ends; the replica stops at the end of
    the op in progress (its stream span ends there), and the weights move from then on."""
    exp, plan, res = _run(1, "recompute")
    (summary,) = res.streams.values()
    longest = float(max(_priced_ops(exp, plan, summary).op_s))  # every device busy: the slowest an op runs
    spans = [s for s in res.timeline().spans if s.device == 0 and s.call == "actor_gen"]
    for (u, _), push in res.pushes.items():
        offered = res.records[(u, "actor_train")].end_s
        stop = max((s.end_s for s in spans if s.end_s <= push.compute_start_s + 1e-12), default=0.0)
        assert push.compute_start_s >= offered - 1e-12
        assert push.compute_start_s == max(stop, offered) or abs(push.compute_start_s - max(stop, offered)) < 1e-9
        assert push.compute_start_s - offered <= longest + 1e-9, u
        # nothing of the stream runs while its weights move
        assert not any(s.start_s < push.end_s - 1e-12 and s.end_s > push.compute_start_s + 1e-12 for s in spans)


def _priced_ops(exp, plan, summary):
    costs = Costs(exp, load_profile("cpu-epyc"))
    return costs.stream("actor_gen", plan["actor_gen"], len(summary.streams[0].consumed), 0,
                        tuple(summary.switch_at[0]))


def test_the_switch_points_the_simulation_found_give_its_stream_back():
    """What the executor follows: the stream scheduled again from the recorded switch points."""
    exp, plan, res = _run(2, "recompute")
    (summary,) = res.streams.values()
    cap, prefill = serving_limits(load_profile("cpu-epyc"), plan["actor_gen"])
    kv = Costs(exp, load_profile("cpu-epyc")).kv_tokens("actor_gen", plan["actor_gen"])
    again = call_streams(exp, plan, "actor_gen", res.iterations, cap, kv, prefill, summary.switch_at)
    assert [a.consumed for a in again] == [s.consumed for s in summary.streams]
    assert [a.run.segments for a in again] == [s.run.segments for s in summary.streams]


def test_a_stream_fills_the_tail_and_the_evaluator_agrees():
    """Capped at 8 running requests, a synchronous-batch rollout idles through each batch's long
    tail; the stream admits the next batch's prompts behind it and is faster at η = 2."""
    _, _, batch = _run(2, "off")
    exp, plan, stream = _run(2, "recompute")
    assert stream.iteration_s < 0.95 * batch.iteration_s
    assert Evaluator(exp, load_profile("cpu-epyc"), ITERATIONS).evaluate(plan).iteration_s == \
        pytest.approx(stream.iteration_s, rel=1e-12)
    assert {(i, c) for i, c in stream.pushes} == {(u, "actor_gen") for u in range(stream.iterations - 3)}
    assert all(PUSH + "actor_gen" not in k for k in stream.records)


def test_a_streaming_rollout_deals_whole_groups():
    exp = load_experiment(EXAMPLES / "grpo-longtail-tiny-2xcpu.yaml")  # 4 prompts × 8
    gen = exp.with_staleness(1, "recompute").workflow["actor_gen"]
    assert gen.workload.group == 8 and exp.workflow["actor_gen"].workload.group == 1
    lay = _layout("0-2", dp=3)
    assert [dp_rows(gen, lay, r) for r in range(3)] == [[(0, 16)], [(16, 24)], [(24, 32)]]
    assert [dp_rows(exp.workflow["actor_gen"], lay, r) for r in range(3)] == [[(0, 11)], [(11, 22)], [(22, 32)]]
