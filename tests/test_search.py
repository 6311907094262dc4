"""The search: annealing reaches the exact optimum on small spaces, never loses to a baseline,
repeats exactly under an evaluation budget, and scales to 1,024 devices."""

from __future__ import annotations

import dataclasses

import pytest

from estimator.cost.memory import plan_memory
from estimator.profile.profiles import load_profile
from estimator.sim.evaluator import Evaluator
from estimator.spec.cluster import Cluster
from estimator.spec.experiment import load_experiment
from estimator.spec.plan import Plan, check, enumerate_layouts
from search import run_search
from search.anneal import RECOMPUTE_P, Chain, polish_shapes, split_evals
from search.exact import EXACT_MAX_PLANS
from search.space import build_space
from tests.conftest import EXAMPLES, tiny_experiment
from tests.synthetic import linear_profile

# Tiny models on one node of 4 devices, memory tight enough that trained roles need two devices:
# spaces of 164,025 (PPO) and 127,776 (GRPO) plans without activation recompute, which the exact
# search enumerates (recompute would double the trained roles' layouts here).
SMALL = {"ppo": dict(batch_size=1, minibatches=1), "grpo": dict(batch_size=2, minibatches=1)}
TIGHT = 4e6  # bytes per device


def _search_best(result) -> float:
    return min(c.evaluator_s for c in result.candidates if c.source == "search")


@pytest.mark.parametrize("algorithm", sorted(SMALL))
def test_annealing_finds_the_optimum_the_exact_search_proves(algorithm):
    exp, profile = tiny_experiment(algorithm, **SMALL[algorithm]), linear_profile(capacity=TIGHT)
    space = build_space(exp, profile, recompute=False)
    assert 50_000 < space.size <= EXACT_MAX_PLANS
    exact = run_search(exp, profile, max_evals=1, progress=False, top_k=1, method="auto", recompute=False)
    assert exact.method == "exact" and exact.evaluated == space.size
    optimum = _search_best(exact)
    # the proof: no plan of the space that fits is faster (checked here on a sample of it)
    ev = Evaluator(exp, profile)
    for c in exact.candidates:
        r = ev.evaluate(c.plan)
        assert r.feasible and r.iteration_s >= optimum - 1e-15
    for seed in (0, 1):
        annealed = run_search(exp, profile, max_evals=3000, seed=seed, chains=1, progress=False, top_k=1,
                              method="anneal", recompute=False)
        assert annealed.method == "anneal" and annealed.evaluated == 3000
        assert _search_best(annealed) == pytest.approx(optimum, rel=1e-12)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_the_searched_plan_is_never_predicted_slower_than_a_baseline_that_fits(path):
    exp = load_experiment(path)
    profile = load_profile(exp.cluster.device)
    evals = 100 if exp.cluster.num_devices <= 16 else 20  # new layouts on 128 devices cost a lowering each
    result = run_search(exp, profile, max_evals=evals, chains=1, progress=False, top_k=1)
    check(result.plan, exp)
    assert plan_memory(exp, result.plan, profile.capacity_bytes, profile.stack).feasible
    assert result.simulated and result.peak_memory_bytes <= result.capacity_bytes
    assert result.roofline_s <= result.iteration_s
    fits = [b for b in result.baselines.values() if b.feasible]
    assert fits, "every example has a baseline that fits"
    for b in fits:
        assert result.iteration_s <= b.iteration_s * (1 + 1e-12), b.name


def test_same_seed_and_evaluation_budget_give_the_same_plan_across_processes():
    exp, profile = load_experiment(EXAMPLES / "ppo-llama2-7b-8xh100.yaml"), load_profile("h100-sxm")
    runs = [run_search(exp, profile, max_evals=400, seed=seed, chains=2, progress=False, top_k=2)
            for seed in (3, 3)]
    assert runs[0].method == "anneal" and runs[0].evaluated == 400
    assert runs[0].plan == runs[1].plan and runs[0].iteration_s == runs[1].iteration_s
    assert [c.plan for c in runs[0].candidates] == [c.plan for c in runs[1].candidates]


def test_evaluation_budget_is_split_deterministically():
    assert split_evals(10, 3) == [4, 3, 3]
    assert sum(split_evals(401, 2)) == 401
    assert split_evals(None, 2) == [None, None]


def test_1024_devices_search_under_a_time_budget_and_return_a_valid_plan():
    """How fast (setup within the budget, return soon after) is timed by
    ``python benchmarks/bench_search.py --large-cluster``; here, that a budgeted search of a
    1,024-device space ends with a valid plan."""
    exp = load_experiment(EXAMPLES / "ppo-llama2-7b-8xh100.yaml")
    big = dataclasses.replace(exp, cluster=Cluster(128, 8, "h100-sxm"))
    result = run_search(big, load_profile("h100-sxm"), time_budget_s=8.0, chains=1, progress=False)
    assert result.space_log10 > 30 and result.evaluated >= 1
    check(result.plan, big)


@pytest.mark.parametrize("capacity,recomputes", [(3.1e6, True), (3.7e6, None), (1e9, False)])
def test_recompute_is_chosen_by_predicted_time_where_memory_demands(capacity, recomputes):
    """SFT of the tiny model on two devices: the exact search over the pruned space finds the
    fastest layout of all that fit, recompute or not (brute force over every valid layout). At
    3.1 MB only recomputing layouts fit; with room to spare none is kept."""
    exp = tiny_experiment("sft", devices_per_node=2, batch_size=8, minibatches=1)
    profile = dataclasses.replace(load_profile("cpu"), capacity_bytes=capacity)
    result = run_search(exp, profile, max_evals=1, progress=False, top_k=1, method="exact")
    ev = Evaluator(exp, profile)
    call = exp.workflow["actor_train"]
    every = [ev.evaluate(Plan({"actor_train": lay}))
             for lay in enumerate_layouts(call, exp.models["actor"], exp.cluster)]
    assert any(r.feasible for r in every)
    assert _search_best(result) == pytest.approx(min(r.iteration_s for r in every if r.feasible), rel=1e-12)
    if recomputes is not None:
        assert (result.plan["actor_train"].recompute == "full") is recomputes
    if recomputes is False:
        assert build_space(exp, profile)["actor_train"].recompute_count == 0


def test_annealing_proposes_recompute_where_only_it_fits_and_otherwise_by_chance():
    exp = tiny_experiment("sft", devices_per_node=2, batch_size=8, minibatches=1)
    profile = linear_profile()
    chain = Chain(exp, profile, build_space(exp, profile), (0, 0), top_k=1)
    both = [(1, 1, 1, 2, "none"), (1, 1, 1, 2, "full")]
    only = [(1, 1, 1, 4, "full")]
    picks = [chain._pick_shape(both + only) for _ in range(4000)]
    assert picks.count(only[0]) == pytest.approx(2000, rel=0.1)  # degrees first, uniformly
    assert picks.count(both[1]) == pytest.approx(2000 * RECOMPUTE_P, rel=0.15)
    assert set(picks) == set(both + only)


def test_polish_tries_other_degrees_with_the_current_settings_then_every_setting_of_its_degrees():
    shapes = [(4, 1, 1, 1, "none", "none", "none"), (4, 1, 1, 2, "none", "none", "none"),
              (4, 1, 1, 2, "full", "none", "none"), (2, 2, 1, 1, "none", "none", "none"),
              (2, 2, 1, 2, "none", "none", "none"), (1, 4, 1, 1, "none", "optimizer", "none")]
    current = (4, 1, 1, 2, "none", "none", "none")
    tried = polish_shapes(shapes, current)
    # (2, 2, 1) at the current settings; (1, 4, 1) has no such shape: its first kept one
    assert tried[:2] == [(2, 2, 1, 2, "none", "none", "none"), (1, 4, 1, 1, "none", "optimizer", "none")]
    assert tried[2:] == shapes[:3]  # every setting of the current degrees
    assert len(set(tried)) == len(tried)


def test_polish_ends_at_a_plan_no_single_reshape_improves_and_keeps_to_its_budget():
    """From a searched plan of a tiny PPO: the polished plan is at least as fast, and no reshape
    polish_shapes offers for any call makes it faster (checked one by one); a budget of five
    evaluations stops it after five."""
    from search.space import make_layout, shape_of

    exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    profile = load_profile(exp.cluster.device)
    space = build_space(exp, profile)
    chain = Chain(exp, profile, space, (0, 0), top_k=4)
    start = list(space.key(run_search(exp, profile, max_evals=40, seed=0, chains=1, progress=False).plan))
    fits, cost = chain.score(tuple(start))
    assert fits
    state, polished = chain.polish(list(start), cost, lambda: False)
    assert polished <= cost and chain.score(tuple(state)) == (True, polished)
    for c, cs in enumerate(space.calls):
        for shape in polish_shapes(cs.shapes_on(state[c].mesh), shape_of(state[c])):
            lay = make_layout(state[c].mesh.first, state[c].mesh.size, shape)
            fits, other = chain.score(tuple(state[:c] + [lay] + state[c + 1:]))
            assert not fits or other >= polished, (space.names[c], shape)
    budget = Chain(exp, profile, space, (0, 0), top_k=4)
    budget.polish(list(start), cost, lambda: budget.evaluated >= 5)
    assert budget.evaluated == 5


def test_no_plan_fits_names_the_tightest_call_and_its_memory_by_part():
    """Three 7B models and a 34B reward model on two H100s: every call fits alone, but no plan
    holds the reward's weights beside the actor's training, offloaded or not (four 7B models do
    fit there, their trained state offloaded); the error names the call and device at the
    lowest peak of the plans it tried, with the bytes by part against the capacity."""
    import search.baselines as sb
    from estimator.base.errors import ConfigError
    from estimator.cost.memory import fmt_bytes
    from estimator.spec.experiment import experiment_from_dict
    from search.space import least_memory_plan

    exp = experiment_from_dict({
        "name": "ppo-7b-2xh100", "algorithm": "ppo", "batch_size": 64, "prompt_len": 128, "gen_len": 128,
        "ppo_minibatches": 4, "models": {"actor": "llama2-7b", "critic": "llama2-7b", "ref": "llama2-7b",
                                         "reward": "codellama-34b"},
        "cluster": {"nodes": 1, "devices_per_node": 2, "device": "h100-sxm"}}, where="test")
    profile = load_profile("h100-sxm")
    space = build_space(exp, profile)  # every call fits somewhere alone
    with pytest.raises(ConfigError) as err:
        run_search(exp, profile, max_evals=100, chains=1, progress=False)
    msg = str(err.value)
    plans = [least_memory_plan(exp, space)] + [b.plan for b in (sb.build(n, exp, profile, simulate_it=False)
                                                                for n in sb.BASELINES) if b.plan is not None]
    peak = min((plan_memory(exp, p, profile.capacity_bytes, profile.stack).peak for p in plans),
               key=lambda d: d.peak_bytes)
    assert msg.startswith("no plan fits in 74.5 GiB per device: no baseline fits and the search found none among")
    assert f"{peak.call} is the tightest call, {fmt_bytes(peak.peak_bytes)} on device {peak.device} " \
           "against 74.5 GiB (weights " in msg
    shown = [part for part in ("weights", "grads", "optimizer", "activations", "kv_cache") if peak.parts[part] > 0]
    assert len(shown) >= 3
    for part in shown:
        assert f"{part} {fmt_bytes(peak.parts[part])}" in msg
    assert "resident state of actor, ref, reward, critic" in msg
