"""Continuous batching: the engine schedule by hand, the rollout priced from it, memory's rule."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from estimator.cost.lowering import Costs
from estimator.cost.memory import call_bytes, stage_param_counts
from estimator.cost.rollout import engine_rows, kv_bytes_per_token, rollout_cost
from estimator.profile.profiles import load_profile
from estimator.spec.batching import Segment, kv_need, schedule
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import experiment_from_dict
from estimator.spec.plan import Layout, layout_problems
from estimator.spec.sharding import budget_micro_batches


def test_three_requests_under_a_cap_of_two_by_hand() -> None:
    """Prompts of 2 tokens, responses of 3, 5 and 2. Requests 0 and 1 start (prefill: one token
    each, then KV 3 each); request 0 leaves after 2 steps; 2 joins (KV 5 + 3); after 1 step it
    leaves; request 1 finishes alone with 1 more step."""
    run = schedule(np.array([2, 2, 2]), np.array([3, 5, 2]), max_running=2)
    assert run.segments == (
        Segment((0, 1), (2, 2), (), 2, 2, 6, 3, (0,)),
        Segment((2,), (2,), (), 1, 2, 8, 5, (2,)),
        Segment((), (), (), 1, 1, 6, 6, (1,)),
    )
    assert (run.preemptions, run.peak_running, run.decode_steps) == (0, 2, 4)


def test_a_pool_that_runs_out_preempts_the_youngest_and_recomputes_it() -> None:
    """Three requests of 2 + 4 tokens, a pool of 10: all three fit at the first step (KV 9);
    at the second (12 > 10) the youngest leaves with the 2 tokens it generated; the other two
    finish after two more steps (KV 8 then 10); it comes back, prefilling 2 + 2 tokens, which
    samples its 3rd token, and needs one step for its 4th."""
    run = schedule(np.array([2, 2, 2]), np.array([4, 4, 4]), kv_tokens=10)
    assert run.segments == (
        Segment((0, 1, 2), (2, 2, 2), (), 1, 3, 9, 3, ()),
        Segment((), (), (2,), 2, 2, 8, 4, (0, 1)),
        Segment((2,), (4,), (), 1, 1, 5, 5, (2,)),
    )
    assert run.preemptions == 1 and run.decode_steps == 4


def test_the_pool_must_hold_one_request_at_its_longest() -> None:
    assert kv_need(np.array([3, 5]), np.array([4, 2])) == 6
    with pytest.raises(ValueError, match="kv_tokens=5 cannot hold the longest request"):
        schedule(np.array([3, 5]), np.array([4, 2]), kv_tokens=5)


@pytest.mark.parametrize("seed", range(6))
def test_every_request_generates_exactly_its_length(seed: int) -> None:
    """Token accounting on random cases: each request's prefills and decode steps add up to its
    response (+1 prefill-sampled token per admission), whatever the cap and the pool."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    prompt, gen = rng.integers(1, 20, n), rng.integers(1, 60, n)
    pool = int(kv_need(prompt, gen) + rng.integers(0, 200))
    run = schedule(prompt, gen, int(rng.integers(0, 8)), pool, prefill_tokens=int(rng.integers(0, 60)))
    made = np.zeros(n, dtype=int)
    running: list[int] = []
    for s in run.segments:
        for r, tokens in zip(s.prefill, s.prefill_tokens):
            assert tokens == prompt[r] + made[r]  # it prefills its prompt and what it had made
            made[r] += 1
            running.append(r)
        for r in s.preempted:
            running.remove(r)
        running = [r for r in running if made[r] < gen[r]]
        assert len(running) == s.batch
        if s.steps:
            assert s.kv_sum == sum(prompt[r] + made[r] for r in running) <= pool
            made[running] += s.steps
        assert set(s.finished) == {r for r in running + list(s.prefill) if made[r] == gen[r]} - set(s.preempted)
    assert (made == gen).all()


class _Linear:
    """Stage costs of known form: a decode step ``a + b·batch + c·batch·kv``, a prefill
    ``d·rows·tokens``."""

    fused = False

    def __init__(self, a: float, b: float, c: float, d: float):
        self.a, self.b, self.c, self.d = a, b, c, d

    def decode(self, batch: np.ndarray, kv_max: np.ndarray, kv_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.a + self.b * batch + self.c * batch * kv_max, np.zeros(len(batch))

    def prefill_many(self, rows: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.d * rows * tokens, np.zeros(len(rows))


def _experiment(gen_len: object = 8, batch: int = 3):
    return experiment_from_dict({
        "algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "tiny-2l-128h"},
        "batch_size": batch, "group_size": 1, "prompt_len": 2, "gen_len": gen_len,
        "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"}})


def test_the_rollout_of_three_requests_under_a_cap_of_two_by_hand() -> None:
    """The first schedule above priced with known step costs: prefill 2·2 + 2, 2 decode steps
    at batch 2 (KV 3, 4), prefill 2, a step at batch 2 (KV 5), a step at batch 1 (KV 6)."""
    exp = _experiment()
    call = exp.workflow["actor_gen"]
    lay = Layout(DeviceMesh(0, 1), 1, 1, 1, 1, max_concurrency=2)
    costs = _Linear(a=1.0, b=0.5, c=0.01, d=0.1)
    ro = rollout_cost(None, call, exp.models["actor"], lay, np.array([2, 2, 2]), np.array([3, 5, 2]), 0, 2,
                      stage_costs=[costs])

    def step(b: int, kv: int) -> float:
        return 1.0 + 0.5 * b + 0.01 * b * kv

    expected = (0.1 * 2 * 2 + step(2, 3) + step(2, 4) + 0.1 * 1 * 2 + step(2, 5) + step(1, 6))
    assert ro.duration_s == pytest.approx(expected, rel=1e-12)
    assert ro.peak_running == 2 and ro.preemptions == 0 and ro.tokens == 10
    # the running batch over time: 2 (prefill and two steps), 2 again, then 1, then 0 at the end
    assert [n for _, n in ro.running] == [2, 1, 0]
    # the last request finishes at the end; 90 % of 3 requests is the third, so the tail is 0
    assert ro.tail_s == 0.0
    # the timeline's spans: each kind's busy time exactly, none overlapping, the last ending with
    # the rollout — prefill, two steps, prefill, two steps
    pre1, pre2 = 0.1 * 2 * 2, 0.1 * 1 * 2
    want = [(0.0, pre1, "prefill", 0), (pre1, pre1 + step(2, 3) + step(2, 4), "decode", 0),
            (pre1 + step(2, 3) + step(2, 4), pre1 + step(2, 3) + step(2, 4) + pre2, "prefill", 0),
            (expected - step(2, 5) - step(1, 6), expected, "decode", 0)]
    assert [w[2:] for w in ro.windows] == [w[2:] for w in want]
    assert np.allclose([w[:2] for w in ro.windows], [w[:2] for w in want], rtol=1e-12)


def test_the_rollout_with_one_preemption_by_hand() -> None:
    exp = _experiment(gen_len=8)
    call = exp.workflow["actor_gen"]
    lay = Layout(DeviceMesh(0, 1), 1, 1, 1, 1)
    costs = _Linear(a=1.0, b=0.5, c=0.01, d=0.1)
    ro = rollout_cost(None, call, exp.models["actor"], lay, np.array([2, 2, 2]), np.array([4, 4, 4]), 10, 2,
                      stage_costs=[costs])

    def step(b: int, kv: int) -> float:
        return 1.0 + 0.5 * b + 0.01 * b * kv

    # prefill of 3 × 2 tokens (padded to 2), a step at batch 3 (longest KV 3), the youngest
    # preempted, two steps at batch 2 (KV 4, 5), its re-prefill of 4 tokens, a step (KV 5)
    expected = 0.1 * 3 * 2 + step(3, 3) + step(2, 4) + step(2, 5) + 0.1 * 1 * 4 + step(1, 5)
    assert ro.duration_s == pytest.approx(expected, rel=1e-12)
    assert ro.preemptions == 1 and ro.recomputed_tokens == 2


@pytest.mark.parametrize("seed", range(4))
def test_segment_charging_equals_a_step_by_step_reference(seed: int) -> None:
    """Interpolating a segment's steps between its ends is exact for costs linear in KV:
    the rollout equals summing every op of every engine one by one (pp = 1: engines take turns)."""
    rng = np.random.default_rng(seed)
    n = 24
    prompt, gen = rng.integers(1, 12, n), rng.integers(1, 40, n)
    exp = _experiment(gen_len={"max": 64, "mean": 10}, batch=n)
    call = exp.workflow["actor_gen"]
    lay = Layout(DeviceMesh(0, 2), 2, 1, 1, 1, max_concurrency=int(rng.integers(1, 8)))
    costs = _Linear(a=0.3, b=0.02, c=0.001, d=0.004)
    pool = int(kv_need(prompt, gen) + rng.integers(0, 60))
    ro = rollout_cost(None, call, exp.models["actor"], lay, prompt, gen, pool, 2, stage_costs=[costs])
    per_replica = []
    for r in range(2):
        (lo, hi), = engine_rows(call, lay, r)
        total = 0.0
        for s in schedule(prompt[lo:hi], gen[lo:hi], lay.max_concurrency, pool).segments:
            if s.prefill:
                total += 0.004 * len(s.prefill) * max(s.prefill_tokens)
            for k in range(s.steps):  # one by one
                total += 0.3 + 0.02 * s.batch + 0.001 * s.batch * (s.kv_max + k)
        per_replica.append(total)
    assert ro.replica_s == pytest.approx(tuple(per_replica), rel=1e-9)
    assert ro.duration_s == pytest.approx(max(per_replica), rel=1e-9)


def test_census_priced_segments_stay_close_to_pricing_every_step() -> None:
    """On the real census and profile (not linear in KV) the interpolation stays within 1 %."""
    exp = _experiment(gen_len={"max": 96, "mean": 16}, batch=16)
    call, model = exp.workflow["actor_gen"], exp.models["actor"]
    prof = load_profile("cpu")
    lay = Layout(DeviceMesh(0, 1), 1, 1, 1, 1)
    prompt, gen = exp.lengths(0)
    ro = rollout_cost(prof, call, model, lay, prompt, gen, 0, 2)
    from estimator.cost.rollout import _StageCosts

    st = _StageCosts(prof, model, lay, 0, "sample_ending", 2)
    total = 0.0
    for s in schedule(prompt, gen).segments:
        if s.prefill:
            total += float(st.prefill_many(np.array([len(s.prefill)]), np.array([max(s.prefill_tokens)]))[0][0])
        if s.steps:
            b = np.full(s.steps, s.batch)
            kv = s.kv_max + np.arange(s.steps)
            c, a = st.decode(b, kv, kv)
            total += float(c.sum() + a.sum())
    assert ro.duration_s == pytest.approx(total, rel=0.01)


def test_a_generate_layout_is_infeasible_only_when_one_request_at_the_cap_cannot_fit() -> None:
    exp = _experiment(gen_len={"max": 1000, "mean": 100}, batch=8)
    call, model = exp.workflow["actor_gen"], exp.models["actor"]
    lay = Layout(DeviceMesh(0, 1), 1, 1, 1, 1)
    per_token = kv_bytes_per_token(model, lay, 0)
    need = 2 + 1000 - 1  # prompt + the longest response, less its last token
    base = call_bytes(call, model, lay, at_home=True, engine_bytes=1e12)[0]
    fixed = base["activations"] + 2.0 * stage_param_counts(model, lay)[0]  # activations and bf16 weights
    fits = call_bytes(call, model, lay, at_home=True, engine_bytes=fixed + need * per_token)[0]
    short = call_bytes(call, model, lay, at_home=True, engine_bytes=fixed + (need - 1) * per_token)[0]
    assert math.isfinite(fits["kv_cache"]) and fits["kv_cache"] == pytest.approx(need * per_token)
    assert math.isinf(short["kv_cache"])
    # and the pool is what the lowering hands the engines
    costs = Costs(dataclasses.replace(exp, kv_fraction=1.0), load_profile("cpu"))
    assert costs.kv_tokens("actor_gen", lay) > need


def test_the_search_gives_engines_one_per_stage_and_caps_split_over_them() -> None:
    from search.space import build_space

    exp = _experiment(gen_len={"max": 64, "mean": 8}, batch=8)
    call, model, cl = exp.workflow["actor_gen"], exp.models["actor"], exp.cluster
    space = build_space(exp, load_profile("cpu"))
    shapes = [sh for sizes in space["actor_gen"].shapes.values() for sh in sizes]
    assert shapes and all(mb == pp for _, _, pp, mb, *_ in shapes)  # one virtual engine per stage
    assert any("max_concurrency=1 is below micro_batches=2" in p
               for p in layout_problems(call, model, cl, Layout(DeviceMesh(0, 2), 1, 1, 2, 2, max_concurrency=1)))
    assert engine_rows(call, Layout(DeviceMesh(0, 2), 2, 1, 1, 1), 1) == [(4, 8)]


def test_token_budget_micro_batches_pack_rows_in_order() -> None:
    """Rows of 5, 3, 9, 2, 2, 2 tokens, budget 12: (5, 3) pads to 10; 9 alone (18 > 12 with it);
    then the three 2s."""
    assert budget_micro_batches((10, 16), np.array([5, 3, 9, 2, 2, 2]), 12) == [(10, 12), (12, 13), (13, 16)]
    # pairs stay whole: units (5, 3) and (4, 4) pad to 5 and 4; together 5 × 4 = 20 > 16
    assert budget_micro_batches((0, 4), np.array([5, 3, 4, 4]), 16, per_unit=2) == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="pass the budget"):
        budget_micro_batches((0, 2), np.array([20, 1]), 12)


def test_the_modern_grpo_example_fits_and_its_tail_costs() -> None:
    """examples/grpo-llama3-8b-8xh100.yaml (NeMo-RL v0.3's GRPO setting): the search finds a plan
    that fits, and on that plan the long-tailed rollout takes at least 1.5× the generation of
    the same plan with every response exactly the mean length."""
    from estimator.predict import predict
    from estimator.spec.experiment import load_experiment
    from search import run_search
    from tests.conftest import EXAMPLES

    exp = load_experiment(EXAMPLES / "grpo-llama3-8b-8xh100.yaml")
    prof = load_profile(exp.cluster.device)
    found = run_search(exp, prof, max_evals=120, seed=3, chains=1, progress=False)
    _, memory, summary = predict(exp, found.plan, prof, 2)
    assert memory.feasible
    gen = summary["calls"]["actor_gen"]
    assert gen["generation"]["tail_s"] > 0 and gen["generation"]["tokens"] == int(exp.lengths(1)[1].sum())
    fixed = dataclasses.replace(exp, params=dataclasses.replace(exp.params, gen_len=795, gen_lengths=None))
    _, _, flat = predict(fixed, found.plan, prof, 2)
    assert gen["duration_s"] >= 1.5 * flat["calls"]["actor_gen"]["duration_s"]
