"""Baseline plans: each a valid plan of the documented shape, or a reason it does not fit."""

from __future__ import annotations

import json

import pytest

from estimator.base.errors import ConfigError
from estimator.baselines import symmetric_plan
from estimator.cost.memory import plan_memory
from estimator.profile.profiles import load_profile
from estimator.spec.experiment import load_experiment
from estimator.spec.plan import Plan, check
from search.baselines import ALL_BASELINES, BASELINES, FRAMEWORK_BASELINES, build, main
from tests.conftest import EXAMPLES, tiny_experiment
from tests.synthetic import linear_profile, linear_profile_dict

SEVEN_B = EXAMPLES / "ppo-llama2-7b-8xh100.yaml"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_baseline_is_a_valid_plan_that_fits_or_says_why_not(path):
    exp = load_experiment(path)
    profile = load_profile(exp.cluster.device)
    for name in ALL_BASELINES:
        b = build(name, exp, profile, simulate_it=False)
        assert b.name == name
        if b.feasible:
            check(b.plan, exp)
            assert plan_memory(exp, b.plan, profile.capacity_bytes, profile.stack).feasible
        else:
            assert b.reason and b.iteration_s is None


def test_megatron_is_the_symmetric_plan_and_colocate_one_model_parallel_size_on_all_devices():
    exp, profile = load_experiment(SEVEN_B), load_profile("h100-sxm")
    assert build("megatron", exp, profile, simulate_it=False).plan == symmetric_plan(exp, profile)
    colocate = build("colocate", exp, profile, simulate_it=False).plan
    assert {lay.mesh for lay in colocate.layouts.values()} == {exp.cluster.whole()}
    assert len({lay.tp * lay.pp for lay in colocate.layouts.values()}) == 1


def test_megatron_with_recompute_recomputes_every_train_call():
    exp, profile = load_experiment(SEVEN_B), load_profile("h100-sxm")
    plain = build("megatron", exp, profile)
    full = build("megatron", exp, profile, recompute="full")
    wf = exp.workflow
    for name, lay in full.plan.layouts.items():
        assert lay.recompute == ("full" if wf[name].kind == "train" else "none")
        other = plain.plan[name]  # the same placement; micro-batches may differ, fitted to memory
        assert (lay.mesh, lay.dp, lay.tp, lay.pp) == (other.mesh, other.dp, other.tp, other.pp)
    assert full.feasible and full.iteration_s > plain.iteration_s
    # needing less memory, the recomputing train calls fit with no more micro-batches
    assert all(full.plan[c].micro_batches <= plain.plan[c].micro_batches for c in ("actor_train", "critic_train"))
    with pytest.raises(ConfigError, match="baseline 'colocate' takes no recompute setting"):
        build("colocate", exp, profile, recompute="full")


def test_split_puts_actor_and_reference_apart_from_critic_and_reward():
    exp, profile = load_experiment(SEVEN_B), load_profile("h100-sxm")
    plan = build("split", exp, profile, simulate_it=False).plan
    first = {str(plan[c].mesh) for c in ("actor_gen", "ref_inf", "actor_train")}
    second = {str(plan[c].mesh) for c in ("reward_inf", "critic_inf", "critic_train")}
    assert first == {"0-3"} and second == {"4-7"}


def test_real_heuristic_on_one_node_follows_reals_allocation():
    exp, profile = load_experiment(SEVEN_B), load_profile("h100-sxm")
    plan = build("real-heuristic", exp, profile, simulate_it=False).plan
    d = {c: (str(lay.mesh), lay.dp, lay.tp, lay.pp) for c, lay in plan.layouts.items()}
    assert d["actor_gen"] == ("0-7", 4, 1, 2)
    assert d["ref_inf"] == ("0-7", 2, 4, 1)
    assert d["actor_train"] == ("0-3", 2, 2, 1) and d["critic_train"] == ("4-7", 2, 2, 1)
    assert {d["reward_inf"][0], d["critic_inf"][0]} == {"0-3", "4-7"}


def test_real_heuristic_sizes_training_node_sets_by_model_size():
    exp, profile = load_experiment(EXAMPLES / "ppo-llama2-70b-128xh100.yaml"), load_profile("h100-sxm")
    plan = build("real-heuristic", exp, profile, simulate_it=False).plan
    actor, critic = plan["actor_train"].mesh, plan["critic_train"].mesh
    assert not actor.overlaps(critic) and actor.size > 4 * critic.size  # 70B actor, 7B critic
    assert plan["actor_gen"].tp == 1 and plan["actor_gen"].pp == 16


def test_a_baseline_that_cannot_fit_reports_the_memory_reason():
    b = build("megatron", tiny_experiment("ppo"), linear_profile(capacity=3e6))
    assert not b.feasible and b.iteration_s is None and "against" in b.reason and "during" in b.reason


def test_cli_writes_the_plan_and_exits_by_fit(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main([str(SEVEN_B), "--name", "real-heuristic", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iteration_s"] > 0 and summary["reason"] is None
    assert summary["stack"] == "megatron-vllm" and summary["op_set"]["ops"] == "fused"  # a GPU's default
    check(Plan.load(str(out)), load_experiment(SEVEN_B))
    small = tmp_path / "small.json"
    small.write_text(json.dumps(linear_profile_dict(capacity=3e6)))
    assert main([str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--name", "megatron", "--profile", str(small)]) == 1
    text = capsys.readouterr().out
    # a bf16 profile prices a GPU's default, the production stack
    assert "does not fit" in text and "priced for megatron-vllm (Megatron-Core training" in text
    assert "on profile linear (compute.ops=fused; no engine, refit or trainer terms" in text
    assert main([str(SEVEN_B), "--name", "deepspeed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'deepspeed'" in err[0]


def _verified_7b(tmp_path, **extra):
    """The 8×H100 PPO example with a verifier reward and recomputed old log-probs."""
    import yaml

    raw = yaml.safe_load(SEVEN_B.read_text())
    raw["models"]["reward"] = "rule"
    path = tmp_path / "verified.yaml"
    path.write_text(yaml.safe_dump({**raw, "old_logprobs": "recompute", **extra}))
    return load_experiment(path)


def test_baselines_place_actor_inf_with_the_actor_and_nothing_for_a_verifier(tmp_path):
    exp, profile = _verified_7b(tmp_path), load_profile("h100-sxm")
    assert "reward_inf" not in exp.workflow and "actor_inf" in exp.workflow
    plans = {name: build(name, exp, profile, simulate_it=False).plan for name in BASELINES}
    for name, plan in plans.items():
        check(plan, exp)
        assert set(plan.layouts) == set(exp.workflow.call_names), name
    whole = {str(plans["megatron"][c].mesh) for c in exp.workflow.call_names}
    assert whole == {"0-7"} and plans["colocate"]["actor_inf"].mesh == plans["colocate"]["actor_gen"].mesh
    split = plans["split"]  # the critic still stands beside the actor
    assert str(split["actor_inf"].mesh) == str(split["actor_train"].mesh) == "0-3"
    assert {str(split[c].mesh) for c in ("critic_inf", "critic_train")} == {"4-7"}
    real = plans["real-heuristic"]  # like the reference's inference: all devices, tp 4, dp 2
    shape = (str(real["actor_inf"].mesh), real["actor_inf"].dp, real["actor_inf"].tp, real["actor_inf"].pp)
    assert shape == ("0-7", 2, 4, 1) == (str(real["ref_inf"].mesh), real["ref_inf"].dp, real["ref_inf"].tp,
                                         real["ref_inf"].pp)


def test_split_says_a_verifier_holds_no_model_to_split_off(tmp_path):
    import yaml

    raw = yaml.safe_load((EXAMPLES / "grpo-qwen2.5-7b-16xh100.yaml").read_text())
    raw["models"]["reward"] = "rule"
    path = tmp_path / "grpo-rule.yaml"
    path.write_text(yaml.safe_dump(raw))
    b = build("split", load_experiment(path), load_profile("h100-sxm"), simulate_it=False)
    assert b.plan is None and "models.reward: rule" in b.reason and "holds no model" in b.reason


def test_cli_refuses_an_empty_profile_or_out(tmp_path, capsys):
    tiny = str(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    assert main([tiny, "--name", "megatron", "--profile", ""]) == 2
    assert "--profile: the hardware profile name is empty" in capsys.readouterr().err
    assert main([tiny, "--name", "megatron", "--out", ""]) == 2
    assert "the path is empty" in capsys.readouterr().err


# framework default → (generation engines' tp it asks for, the train calls' recompute, their offload on
# the 7B PPO example: verl's none fits there; OpenRLHF's hybrid engine sleeps DeepSpeed; NeMo-RL's
# colocated policy goes to the host whole)
FRAMEWORK_SHAPES = {"verl-default": (4, "full", "none"), "openrlhf-hybrid": (2, "full", "optimizer"),
                    "nemo-rl-default": (1, "none", "all"), "dschat": (1, "none", "none")}


@pytest.mark.parametrize("name", sorted(FRAMEWORK_SHAPES))
def test_a_framework_default_colocates_every_call_shards_training_and_sizes_its_engines(name):
    exp, profile = load_experiment(SEVEN_B), load_profile("h100-sxm")
    plan = build(name, exp, profile, simulate_it=False).plan
    gen_tp, recompute, offload = FRAMEWORK_SHAPES[name]
    assert {lay.mesh for lay in plan.layouts.values()} == {exp.cluster.whole()}  # one resource pool
    for call in exp.workflow.calls:
        lay = plan[call.name]
        assert lay.pp == 1 and lay.dp * lay.tp == exp.cluster.num_devices
        if call.kind == "generate":
            assert lay.tp == gen_tp  # LLaMA-2 7B takes each of 1, 2 and 4
        else:
            assert lay.tp == 1  # FSDP / ZeRO-3 data parallel over every device
        if call.kind == "train":
            assert (lay.shard, lay.recompute, lay.offload) == ("full", recompute, offload)


def test_realhf_heuristic_is_real_heuristic_and_areal_default_says_what_plans_lack():
    exp, profile = load_experiment(SEVEN_B), load_profile("h100-sxm")
    assert build("realhf-heuristic", exp, profile, simulate_it=False).plan == \
        build("real-heuristic", exp, profile, simulate_it=False).plan
    areal = build("areal-default", exp, profile, simulate_it=False)
    assert areal.plan is None and "asynchronous" in areal.reason
    assert set(FRAMEWORK_BASELINES) >= {"verl-default", "openrlhf-hybrid", "nemo-rl-default", "areal-default",
                                        "realhf-heuristic", "dschat"}


def test_an_unknown_baseline_name_gets_the_closest():
    with pytest.raises(ConfigError, match=r"'verl-defualt' is not known \(did you mean 'verl-default'\?\)"):
        build("verl-defualt", load_experiment(SEVEN_B), load_profile("h100-sxm"))
