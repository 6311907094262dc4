"""Sharded data parallelism (Layout.shard) in the vocabulary and the estimator: the plan key and
its rules, memory by hand, collective times by hand from the profile's curves, reallocation
from a sharded home, and the search choosing it where only it fits."""

from __future__ import annotations

import dataclasses

import pytest

from estimator.base.errors import ConfigError
from estimator.cost.dpshard import backward_exposed_s, forward_exposed_s, full_shard_pass
from estimator.cost.lowering import Costs, lower_call
from estimator.cost.memory import call_bytes, gathered_bytes, home_bytes, plan_memory
from estimator.cost.pieces import dp_flatten_s, optimizer_s
from estimator.cost.transfers import gather_bytes, realloc_bytes
from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.experiment import Experiment
from estimator.spec.models import PRESETS, ModelSpec
from estimator.spec.plan import SHARD_CHOICES, Layout, Plan, count_layouts, enumerate_layouts, validate
from estimator.spec.sharding import ENDS, box_numel, flat_chunk, shard, shard_groups
from estimator.spec.workflow import WorkflowParams
from tests.conftest import tiny_experiment
from tests.synthetic import linear_profile

TINY = PRESETS["tiny-2l-128h"]
# tiny-2l-128h (hidden 128, kv 64, ffn 256, vocab 256), by hand: a block holds q 128·128, k and
# v 64·128 each, o 128·128, gate, up 256·128 each, down 128·256 and two norms of 128; the ends
# the embedding 256·128, the final norm 128 and the LM head 256·128.
BLOCK = 128 * 128 + 2 * 64 * 128 + 128 * 128 + 3 * 256 * 128 + 2 * 128
ENDS_NUMEL = 256 * 128 + 128 + 256 * 128
TOTAL = ENDS_NUMEL + 2 * BLOCK


def _layout(mesh: str = "0-1", dp: int = 2, tp: int = 1, pp: int = 1, mb: int = 1, shard: str = "none") -> Layout:
    return Layout(DeviceMesh.parse(mesh), dp, tp, pp, mb, shard=shard)


# ---- vocabulary ---------------------------------------------------------------------------------


def test_the_hand_counts_are_the_inventory():
    assert (BLOCK, ENDS_NUMEL, TOTAL) == (147_712, 65_664, 361_088)
    assert TINY.params == TOTAL
    groups = shard_groups(TINY, _layout(), 0)
    assert list(groups) == [ENDS, "layers.0", "layers.1"]
    assert groups[ENDS] == ["embed_tokens.weight", "norm.weight", "lm_head.weight"]
    assert flat_chunk(TOTAL, 2) == 180_544 and flat_chunk(7, 2) == 4


def test_shard_is_a_train_layout_option_carried_only_when_set():
    old = '{"calls": {"a": {"mesh": "0-1", "dp": 2, "tp": 1, "pp": 1}}}'
    assert Plan.from_json(old)["a"].shard == "none"
    plan = Plan({"actor_train": _layout(shard="full"), "ref_inf": _layout()})
    assert '"shard": "full"' in plan.to_json() and plan.to_json().count("shard") == 1
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(Plan({"a": _layout(shard="optimizer")}).to_json())["a"].shard == "optimizer"
    lines = plan.table().splitlines()
    assert lines[0].split()[-1] == "shard" and lines[2].split()[-1] == "full" and lines[3].split()[-1] == "none"
    assert "shard" not in Plan({"ref_inf": plan["ref_inf"]}).table()
    assert SHARD_CHOICES == ("none", "optimizer", "full")


def test_bad_shard_values_are_errors_naming_the_value_and_the_rule():
    with pytest.raises(ConfigError, match=r"layout shard='zero3': must be one of \['none', 'optimizer', 'full'\]"):
        _layout(shard="zero3")
    text = '{"calls": {"a": {"mesh": "0-1", "dp": 2, "tp": 1, "pp": 1, "shard": "zero3"}}}'
    with pytest.raises(ConfigError, match=r"calls.a.shard: 'zero3' is not one of \['none', 'optimizer', 'full'\]"):
        Plan.from_json(text)


def test_validation_names_shard_on_a_call_that_does_not_train_and_tied_embeddings_over_stages():
    exp = tiny_experiment("ppo", devices_per_node=2, batch_size=8, minibatches=2)
    layouts = {c: _layout() for c in exp.workflow.call_names}
    layouts["actor_train"] = _layout(shard="full")
    layouts["critic_train"] = _layout(shard="optimizer")
    assert validate(Plan(layouts), exp) == []
    layouts["ref_inf"] = _layout(shard="optimizer")
    assert validate(Plan(layouts), exp) == [
        "call ref_inf: shard='optimizer' applies to train calls only, not to this inference call (use shard='none')"]
    four = tiny_experiment("ppo", devices_per_node=4, batch_size=8, minibatches=2)
    gpt = dataclasses.replace(four, models={**four.models, "actor": PRESETS["tiny-gpt-2l-128h"]})
    layouts = {c: _layout() for c in exp.workflow.call_names}
    layouts["actor_train"] = Layout(DeviceMesh(0, 4), 2, 1, 2, 2, shard="full")
    problems = validate(Plan(layouts), gpt)
    assert len(problems) == 1 and problems[0].startswith(
        "call actor_train: shard='full' with pp=2 and the tied embeddings of model tiny-gpt-2l-128h")


def test_a_fully_sharded_home_places_parameters_apart_and_the_others_do_not():
    full, opt, none = _layout(shard="full"), _layout(shard="optimizer"), _layout()
    assert not full.same_placement(none) and opt.same_placement(none)
    assert full.sharded and not opt.sharded and not _layout("0", dp=1, shard="full").sharded


def test_layouts_are_enumerated_and_counted_with_their_sharding():
    exp = tiny_experiment("ppo", devices_per_node=2, batch_size=8, minibatches=2)
    train, gen = exp.workflow["actor_train"], exp.workflow["actor_gen"]
    listed = enumerate_layouts(train, TINY, exp.cluster)
    assert count_layouts(train, TINY, exp.cluster) == len(listed)
    assert {lay.shard for lay in listed if lay.dp > 1} == set(SHARD_CHOICES)
    assert {lay.shard for lay in listed if lay.dp == 1} == {"none"}
    assert {lay.shard for lay in enumerate_layouts(gen, TINY, exp.cluster)} == {"none"}


# ---- memory -------------------------------------------------------------------------------------


def test_home_bytes_by_sharding_by_hand():
    p = TOTAL
    assert home_bytes(TINY, _layout(), True) == [{"weights": 2 * p, "grads": 2 * p, "optimizer": 12 * p}]
    assert home_bytes(TINY, _layout(shard="optimizer"), True) == [{"weights": 2 * p, "grads": 2 * p,
                                                                    "optimizer": 12 * p / 2}]
    assert home_bytes(TINY, _layout(shard="full"), True) == [{"weights": 2 * p / 2, "grads": 2 * p / 2,
                                                               "optimizer": 12 * p / 2}]


def test_a_fully_sharded_train_call_holds_two_gathered_blocks_and_its_ends():
    assert gathered_bytes(TINY, _layout(), 0) == {}
    assert gathered_bytes(TINY, _layout(shard="full"), 0) == {"weights": 2 * (ENDS_NUMEL + 2 * BLOCK),
                                                              "grads": 2 * BLOCK}
    exp = tiny_experiment("ppo", devices_per_node=2, batch_size=8, minibatches=2)
    call = exp.workflow["actor_train"]
    plain = call_bytes(call, TINY, _layout(), at_home=True)[0]
    full = call_bytes(call, TINY, _layout(shard="full"), at_home=True)[0]
    assert full["weights"] == 2 * (ENDS_NUMEL + 2 * BLOCK) and "weights" not in plain
    assert full["activations"] == plain["activations"]


def test_plan_memory_follows_the_train_calls_sharding():
    exp = tiny_experiment("sft", devices_per_node=2, batch_size=8, minibatches=1)
    peaks = {s: plan_memory(exp, Plan({"actor_train": _layout(shard=s)}), 80e9, None).devices[0].parts
             for s in SHARD_CHOICES}
    assert peaks["none"]["optimizer"] == 12 * TOTAL and peaks["optimizer"]["optimizer"] == 6 * TOTAL
    assert peaks["full"]["weights"] == TOTAL + 2 * (ENDS_NUMEL + 2 * BLOCK)
    assert peaks["full"]["grads"] == TOTAL + 2 * BLOCK


# ---- time ---------------------------------------------------------------------------------------


def test_exposed_communication_of_prefetched_passes_by_hand():
    # forward: the first gather whole; gather i+1 during compute i
    assert forward_exposed_s([3.0, 2.0, 5.0], [1.0, 4.0, 9.0]) == 3.0 + 1.0 + 1.0
    assert forward_exposed_s([], []) == 0.0
    # backward: gathers [1, 2, 2], reduce-scatters [3, 3, 1], computes [2, 4, 1]:
    # during compute 0 gather 1 (2 - 2 = 0), compute 1 gather 2 + reduce 0 (5 - 4 = 1),
    # compute 2 reduce 1 (3 - 1 = 2); plus the first gather 1 and the last reduce 1
    assert backward_exposed_s([1.0, 2.0, 2.0], [2.0, 4.0, 1.0], [3.0, 3.0, 1.0]) == 1.0 + 0.0 + 1.0 + 2.0 + 1.0


def test_full_shard_pass_by_hand_from_the_link_curve():
    """Linear links of 1 GB/s: an all-gather or a reduce-scatter of S bytes over two ranks takes
    (2 − 1)/2 · S / 1e9 s. With compute far longer than a block's collectives every block
    gather but the first hides, the ends' gather and reduce-scatter and one block's of each are
    exposed."""
    profile = linear_profile(link_bw=1e9)
    eb = profile.elem_bytes
    coll = {"ends": 0.5 * ENDS_NUMEL * eb / 1e9, "block": 0.5 * BLOCK * eb / 1e9}
    long = 10.0
    cost = full_shard_pass(profile, TINY, _layout(shard="full"), 0, 2, block_f=long, block_b=long,
                           embed_f=0.0, embed_b=0.0, head_b=0.0)
    # forward: ends whole, block 0 during the embedding (no compute), block 1 under block 0
    assert cost.forward_s == pytest.approx(coll["ends"] + coll["block"], rel=1e-12)
    # backward: head (gather ends), blocks 1 and 0, embedding; block 1's gather under the head
    # (none), block 0's under block 1, block 0's reduce-scatter under the embedding (none), the
    # ends' at the very end
    assert cost.backward_s == pytest.approx(2 * coll["ends"] + 2 * coll["block"], rel=1e-12)
    # with no compute at all every collective is exposed
    bare = full_shard_pass(profile, TINY, _layout(shard="full"), 0, 2, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert bare.forward_s == pytest.approx(coll["ends"] + 2 * coll["block"], rel=1e-12)
    assert bare.backward_s == pytest.approx(2 * coll["ends"] + 4 * coll["block"], rel=1e-12)


def test_the_optimizer_shard_step_by_hand_from_the_link_curve():
    """shard="optimizer", dp 2: the gradients' reduce-scatter and the parameters' all-gather of
    the whole (padded) buffer, each half the census's flatten-and-copy-back work, and Adam over
    one tensor of half the elements; replicated: one all-reduce (2·(2 − 1)/2 · S / B)."""
    profile = linear_profile(link_bw=1e9)
    exp = tiny_experiment("sft", devices_per_node=2, batch_size=8, minibatches=1)
    call = exp.workflow["actor_train"]
    size = TOTAL * profile.elem_bytes
    tensors = [box_numel(b) for b in shard(TINY, _layout(), 0).values()]
    copies = dp_flatten_s(profile, tensors)
    none = lower_call(call, TINY, _layout(), 2, profile, "sft").stages[0]
    opt = lower_call(call, TINY, _layout(shard="optimizer"), 2, profile, "sft").stages[0]
    assert none.dp_allreduce_s == pytest.approx(2 * 0.5 * size / 1e9 + copies, rel=1e-12)
    assert none.dp_gather_s == 0.0 and none.optimizer_s == optimizer_s(profile, tensors)
    assert opt.dp_allreduce_s == pytest.approx(0.5 * size / 1e9 + copies / 2, rel=1e-12)
    assert opt.dp_gather_s == pytest.approx(0.5 * size / 1e9 + copies / 2, rel=1e-12)
    assert opt.optimizer_s == optimizer_s(profile, [TOTAL // 2])
    assert opt.fwd == none.fwd and opt.bwd == none.bwd


def test_a_fully_sharded_train_call_adds_its_exposed_collectives_to_its_passes():
    profile = linear_profile(link_bw=1e9)
    exp = tiny_experiment("sft", devices_per_node=2, batch_size=8, minibatches=1)
    call = exp.workflow["actor_train"]
    none = lower_call(call, TINY, _layout(), 2, profile, "sft").stages[0]
    full = lower_call(call, TINY, _layout(shard="full"), 2, profile, "sft").stages[0]
    assert full.dp_allreduce_s == 0.0 and full.dp_gather_s == 0.0
    assert full.fwd == none.fwd and full.bwd.comm_s == none.bwd.comm_s
    assert none.fwd_shard_s == none.bwd_shard_s == 0.0
    eb = profile.elem_bytes
    gathers = 0.5 * (ENDS_NUMEL + 2 * BLOCK) * eb / 1e9  # every gather of a pass, each exposed at most
    assert 0.5 * ENDS_NUMEL * eb / 1e9 <= full.fwd_shard_s <= gathers + 1e-15
    assert 0.5 * ENDS_NUMEL * eb / 1e9 < full.bwd_shard_s <= 2 * gathers + 1e-15
    assert full.fwd_s == full.fwd.total_s + full.fwd_shard_s
    assert full.bwd.compute_s > none.bwd.compute_s  # the gradients' flatten before each reduce-scatter
    assert full.optimizer_s == optimizer_s(profile, [flat_chunk(ENDS_NUMEL, 2), flat_chunk(BLOCK, 2),
                                                     flat_chunk(BLOCK, 2)])


def test_predicted_iteration_by_sharding_and_the_simulator_records_the_new_collectives():
    from estimator.sim.evaluator import Evaluator
    from estimator.sim.simulate import simulate

    profile = linear_profile(link_bw=1e9)
    exp = tiny_experiment("sft", devices_per_node=2, batch_size=8, minibatches=1)
    times = {}
    for s in SHARD_CHOICES:
        plan = Plan({"actor_train": _layout(shard=s)})
        sim = simulate(exp, plan, profile, iterations=2)
        times[s] = Evaluator(exp, profile).evaluate(plan).iteration_s
        ops = {r.op for r in sim.timeline().spans}
        assert ("dp_reduce_scatter" in ops and "dp_allgather" in ops) == (s == "optimizer")
        assert ("dp_allreduce" in ops) == (s == "none")
        assert ("dp_shard_comm" in ops) == (s == "full")
    assert times["full"] > times["none"]


# ---- reallocation -------------------------------------------------------------------------------


def test_an_all_gather_is_the_reallocation_from_a_sharded_home():
    eb = 4
    full = _layout(shard="full")
    chunk = flat_chunk(ENDS_NUMEL, 2) + 2 * flat_chunk(BLOCK, 2)
    assert gather_bytes(TINY, full, eb) == {(0, 1): chunk * eb, (1, 0): chunk * eb}
    assert gather_bytes(TINY, _layout(), eb) == {}
    exp = tiny_experiment("ppo", devices_per_node=2, batch_size=8, minibatches=2)
    costs = Costs(exp, linear_profile())
    same = costs.realloc_pairs("actor", full, _layout())  # the generate call on the home's mesh and degrees
    assert same == gather_bytes(TINY, full, costs.profile.elem_bytes)
    assert costs.realloc_pairs("actor", _layout(shard="optimizer"), _layout()) == {}
    tp2 = _layout(dp=1, tp=2)
    both = costs.realloc_pairs("actor", full, tp2)
    then = realloc_bytes(TINY, _layout(), tp2, 2, costs.profile.elem_bytes)
    pairs = set(then) | set(same)
    assert both == {p: then.get(p, 0) + same.get(p, 0) for p in pairs}


# ---- search -------------------------------------------------------------------------------------


def _deep_narrow_sft() -> Experiment:
    """SFT of an 8-block model with one attention head (so tp is 1) over 8 devices, 256
    sequences per step: pipelining splits the parameters as far as sharding does, but keeps up
    to 8 micro-batches in flight on its first stage, where 8 data-parallel ranks of 32
    micro-batches each hold one sequence's activations."""
    model = ModelSpec("deep-narrow", 8, 64, 128, 1, 1, 64)
    return Experiment("sft", {"actor": model}, WorkflowParams(256, 16, 16, 1), Cluster(1, 8, "cpu"))


def test_the_search_picks_full_sharding_where_only_it_fits():
    """A capacity between the least a fully sharded layout needs and the least any other
    (replicated, optimizer-sharded, pipelined, recomputing) needs: the only plans that fit shard
    fully, and the search finds one."""
    from search.run import run_search
    from search.space import _stage_bytes

    exp = _deep_narrow_sft()
    listed = enumerate_layouts(exp.workflow["actor_train"], exp.models["actor"], exp.cluster)

    def need(lay: Layout) -> float:
        return max(_stage_bytes(exp, "actor_train", lay, True, None))

    least = {s: min(need(lay) for lay in listed if lay.shard == s) for s in SHARD_CHOICES}
    assert least["full"] < min(least["none"], least["optimizer"])
    cap = (least["full"] + min(least["none"], least["optimizer"])) / 2
    result = run_search(exp, linear_profile(capacity=cap), max_evals=1, progress=False, top_k=1, method="exact")
    assert result.plan["actor_train"].shard == "full"
    assert plan_memory(exp, result.plan, cap, None).feasible


def test_the_search_prefers_the_optimizer_sharding_where_replicas_train():
    """With room for everything, a data-parallel train layout steps a chunk of the optimizer
    under ``shard="optimizer"`` for the same bytes on the links (a reduce-scatter and an
    all-gather move what an all-reduce does): faster, so the search's data-parallel winner shards
    its optimizer."""
    from estimator.sim.evaluator import Evaluator
    from search.run import run_search

    exp = tiny_experiment("sft", devices_per_node=2, batch_size=8, minibatches=1)
    profile = linear_profile(link_bw=1e9)
    ev = Evaluator(exp, profile)
    times = {s: ev.evaluate(Plan({"actor_train": _layout(shard=s)})).iteration_s for s in SHARD_CHOICES}
    assert times["optimizer"] < times["none"] < times["full"]
    result = run_search(exp, profile, max_evals=1, progress=False, top_k=1, method="exact")
    best = result.plan["actor_train"]
    assert best.shard == ("optimizer" if best.dp > 1 else "none")


def test_the_search_space_offers_sharding_only_over_replicas():
    from search.space import build_space

    exp = tiny_experiment("sft", devices_per_node=4, batch_size=8, minibatches=1)
    space = build_space(exp, linear_profile())
    kept = space["actor_train"].layouts()
    assert {lay.shard for lay in kept if lay.dp > 1} == set(SHARD_CHOICES)
    assert {lay.shard for lay in kept if lay.dp == 1} == {"none"}
    assert space.summary()["calls"]["actor_train"]["shard"] == sum(lay.shard != "none" for lay in kept)


def test_predict_shows_the_sharding_of_each_call(capsys):
    from estimator.predict import main as predict_main
    from tests.conftest import EXAMPLES

    plan = EXAMPLES / "plans" / "ppo-tiny-2xcpu" / "dp2-sharded.json"
    assert predict_main([str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--plan", str(plan), "--iterations", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("call ") and "shard" in line).split()
    column = header.index("shard")
    rows = {line.split()[0]: line.split()[column] for line in lines if line.split()[:1] and
            line.split()[0] in ("actor_train", "critic_train", "actor_gen") and len(line.split()) > column}
    assert rows == {"actor_train": "full", "critic_train": "optimizer", "actor_gen": "none"}
    assert predict_main([str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--plan",
                         str(EXAMPLES / "plans" / "ppo-tiny-2xcpu" / "dp2.json"), "--iterations", "2"]) == 0
    assert not any(line.startswith("call ") and "shard" in line for line in capsys.readouterr().out.splitlines())
