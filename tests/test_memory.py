"""Memory per device: homes, reallocated copies, activations, KV cache, the peak and its reason."""

from __future__ import annotations

import dataclasses
import re

import pytest

from estimator.cost.memory import (
    GiB,
    activation_bytes_per_token_layer,
    call_bytes,
    home_bytes,
    plan_memory,
)
from estimator.cost.pieces import stage_params
from estimator.spec.cluster import DeviceMesh
from estimator.spec.models import PRESETS
from estimator.spec.plan import Layout, Plan
from estimator.spec.workflow import WorkflowParams, remax
from tests.conftest import tiny_experiment

TINY = PRESETS["tiny-2l-128h"]


def test_home_is_the_train_call_else_the_first_call():
    exp = tiny_experiment("ppo")
    assert exp.workflow.home_calls() == {"actor": "actor_train", "critic": "critic_train",
                                        "ref": "ref_inf", "reward": "reward_inf"}
    assert remax(WorkflowParams(8, 4, 4)).home_calls()["reward"] == "reward_inf"


def test_home_bytes_mixed_precision_adam():
    lay = Layout(DeviceMesh(0, 4), 2, 2, 1)
    p = stage_params(TINY, 2, 1, 0, 2)
    assert home_bytes(TINY, lay, trained=False) == [{"weights": 2 * p}]
    assert home_bytes(TINY, lay, trained=True) == [{"weights": 2 * p, "grads": 2 * p, "optimizer": 12 * p}]
    zero = home_bytes(TINY, dataclasses.replace(lay, shard="optimizer"), trained=True)[0]
    assert zero["optimizer"] == 12 * p / 2  # ZeRO-1: 4 + 12/dp bytes per parameter


def test_activation_formula_recounted_for_llama():
    h, kv, f, a = 128, 64, 256, 4
    assert activation_bytes_per_token_layer(TINY, 2) == 8 * h + (4 * h + 4 * kv + 8 * f + 4 * a) / 2
    # LLaMA-2-7B without tensor parallelism: about 37.5·h bytes per token and layer
    m = PRESETS["llama2-7b"]
    assert activation_bytes_per_token_layer(m, 1) / m.hidden == pytest.approx(37.53, abs=0.01)


def test_call_bytes_by_kind():
    exp = tiny_experiment("ppo", batch_size=8, minibatches=2)  # prompt 16, gen 16
    wf = exp.workflow
    lay = Layout(DeviceMesh(0, 4), 2, 1, 2, 2)  # dp 2, pp 2, 2 micro-batches
    per_tl = activation_bytes_per_token_layer(TINY, 1)
    # generation: every sequence of the dp rank keeps K and V of its stage's one block
    gen = call_bytes(wf["actor_gen"], TINY, lay, at_home=True)
    kv_seq = 2 * 1 * TINY.kv_dim * 32 * 2
    assert gen[0]["kv_cache"] == 4 * kv_seq and gen[0]["realloc"] == 0.0
    # training, 1F1B: stage 0 keeps min(m, p) = 2 micro-batches, the last stage 1
    train = call_bytes(wf["actor_train"], TINY, lay, at_home=True)
    tokens = (4 // 2 // 2) * 32  # 4 sequences per minibatch, per dp rank 2, per micro-batch 1
    assert train[0]["activations"] == 2 * tokens * (per_tl + 2 * TINY.hidden)
    assert train[1]["activations"] == tokens * (per_tl + 2 * TINY.hidden) + 10 * tokens * TINY.vocab
    # away from home a call holds its own copy of the weights
    away = call_bytes(wf["ref_inf"], TINY, lay, at_home=False)
    assert away[0]["realloc"] == 2 * stage_params(TINY, 1, 2, 0, 1)


def test_recompute_keeps_each_block_input_and_one_block_by_hand():
    """tiny-2l-128h: one block's saved activations are 8·128 + 4·128 + 4·64 + 8·256 + 4·4 =
    3856 bytes per token; a block input is 2·128 = 256. PPO actor_train, 4 sequences of 32
    tokens per minibatch, dp 2, pp 2, 2 micro-batches: 32 tokens per micro-batch, one block
    per stage."""
    exp = tiny_experiment("ppo", batch_size=8, minibatches=2)
    call = exp.workflow["actor_train"]
    plain = Layout(DeviceMesh(0, 4), 2, 1, 2, 2)
    full = Layout(DeviceMesh(0, 4), 2, 1, 2, 2, recompute="full")
    before = call_bytes(call, TINY, plain, at_home=True)
    after = call_bytes(call, TINY, full, at_home=True)
    # stage 0 keeps 2 micro-batches (1F1B): without recompute 2·32·(3856 + 256) = 263,168 B
    assert before[0]["activations"] == 263_168
    # with it, each block's input and the stage's input per micro-batch, plus one block's
    # activations of the micro-batch in backward: 2·32·(256 + 256) + 32·3856 = 156,160 B
    assert after[0]["activations"] == 156_160
    # the last stage: one micro-batch 32·(256 + 256) + 32·3856, and the head's 10·32·256
    assert after[1]["activations"] == 16_384 + 123_392 + 81_920
    # one stage of both blocks: recompute keeps 2 block inputs instead of 2 blocks' activations
    one_stage = Layout(DeviceMesh(0, 1), 1, 1, 1, 1)
    a = call_bytes(call, TINY, one_stage, at_home=True)[0]["activations"]
    b = call_bytes(call, TINY, dataclasses.replace(one_stage, recompute="full"), at_home=True)[0]["activations"]
    tokens = 4 * 32  # the whole minibatch in one micro-batch
    head = 10 * tokens * TINY.vocab
    assert a - head == tokens * (2 * 3856 + 256) and b - head == tokens * (2 * 256 + 256 + 3856)


def test_plan_memory_adds_homes_and_the_largest_call():
    exp = tiny_experiment("dpo", devices_per_node=4)
    home = Layout(DeviceMesh(0, 4), 1, 4, 1)
    other = Layout(DeviceMesh(0, 2), 1, 2, 1)
    report = plan_memory(exp, Plan({"ref_inf": other, "actor_train": home}), capacity_bytes=1e12, stack=None)
    p_actor, p_ref = stage_params(TINY, 4, 1, 0, 2), stage_params(TINY, 2, 1, 0, 2)
    d0 = report.devices[0]
    assert d0.parts["weights"] == 2 * p_actor + 2 * p_ref  # both homes
    assert d0.parts["optimizer"] == 12 * p_actor
    assert report.devices[3].parts["weights"] == 2 * p_actor  # the reference's home is 0-1 only
    assert report.feasible and report.reasons() == []


def test_infeasible_plan_names_device_and_bytes():
    exp = tiny_experiment("dpo", devices_per_node=4)
    lay = Layout(DeviceMesh(0, 4), 1, 4, 1)
    report = plan_memory(exp, Plan({"ref_inf": lay, "actor_train": lay}), capacity_bytes=1e6, stack=None)
    assert not report.feasible
    (reason,) = report.reasons()
    assert re.match(r"predicted \d+\.\d MiB on device 0 against 976\.6 KiB during \w+ \(weights \d", reason)
    assert "3 more device(s) over capacity" in reason
    assert report.peak.peak_bytes / GiB > 0


def test_a_verifier_holds_no_memory_and_actor_inf_is_a_copy_away_from_home():
    """Under ``reward: rule`` only the actor's and the reference's weights live anywhere; the
    recomputing ``actor_inf`` on another placement holds a reallocated copy, at home none."""
    base = tiny_experiment("grpo", devices_per_node=4, group_size=2)
    params = dataclasses.replace(base.params, verifier=True, old_logprobs="recompute")
    exp = dataclasses.replace(base, params=params, models={r: m for r, m in base.models.items() if r != "reward"})
    home, half = Layout(DeviceMesh(0, 4), 1, 4, 1), Layout(DeviceMesh(0, 2), 1, 2, 1)
    plan = Plan({"actor_gen": home, "actor_inf": half, "ref_inf": Layout(DeviceMesh(2, 2), 1, 2, 1),
                 "actor_train": home})
    report = plan_memory(exp, plan, capacity_bytes=1e12, stack=None)
    p_actor, p_ref = stage_params(TINY, 4, 1, 0, 2), stage_params(TINY, 2, 1, 0, 2)
    assert [d.parts["weights"] for d in report.devices] == [2 * p_actor] * 2 + [2 * p_actor + 2 * p_ref] * 2
    away = call_bytes(exp.workflow["actor_inf"], TINY, half, at_home=False)[0]
    assert away["realloc"] == 2 * stage_params(TINY, 2, 1, 0, 2)
    assert call_bytes(exp.workflow["actor_inf"], TINY, home, at_home=True)[0]["realloc"] == 0.0
