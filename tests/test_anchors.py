"""Sanity anchors on GPUs, with the profiles fitted on vidur's measured kernels: Megatron-style
training reaches the MFU public Megatron runs report (35-55 %), and batch-1 decoding of
LLaMA-2 7B on one H100 runs at the speed public serving stacks reach (150-250 tokens/s), never
faster than streaming the weights once per token allows."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.baselines import symmetric_plan
from estimator.cost.pieces import decode_stage
from estimator.predict import predict
from estimator.profile.profiles import load_profile
from estimator.spec.experiment import experiment_from_dict
from estimator.spec.models import PRESETS

# public Megatron-LM runs reach 40-52 % MFU (Narayanan et al. 2021, arXiv:2104.04473, 1T on 3,072 A100s:
# 52 %), widened to a band a planner must land in
MFU_BAND = (0.35, 0.55)


def _sft_mfu(profile: str, model: str, nodes: int) -> float:
    """MFU of the megatron baseline (tp across a node, pp across nodes, no recompute) training
    ``model`` on 256 sequences of 2,048 tokens."""
    exp = experiment_from_dict({"algorithm": "sft", "models": {"actor": model}, "batch_size": 256,
                                "prompt_len": 1024, "gen_len": 1024,
                                "cluster": {"nodes": nodes, "devices_per_node": 8, "device": profile}})
    prof = load_profile(profile)
    plan = symmetric_plan(exp, prof)
    layout = plan.layouts["actor_train"]
    assert (layout.tp, layout.pp, layout.dp) == (8, nodes, 1)
    return predict(exp, plan, prof, iterations=2)[2]["mfu"]


@pytest.mark.parametrize("profile,model,nodes", [
    ("h100-vidur", "llama2-13b", 1), ("h100-vidur", "llama2-70b", 4),
    ("a100-vidur", "llama2-7b", 1), ("a100-vidur", "llama2-13b", 1), ("a100-vidur", "llama2-70b", 4),
])
def test_megatron_training_mfu_is_in_the_published_band(profile, model, nodes):
    mfu = _sft_mfu(profile, model, nodes)
    assert MFU_BAND[0] <= mfu <= MFU_BAND[1], f"{profile} {model}: MFU {mfu:.3f}"


@pytest.mark.xfail(strict=True, reason="tp=8 on a 7B model: the TP all-reduces (4 per layer, ~1/3 of the step) "
                   "are charged on the critical path; Megatron-Core overlaps them with GEMMs on H100 "
                   "(--tp-comm-overlap), which the cost model does not")
def test_megatron_7b_at_tp8_on_h100_is_in_the_published_band():
    mfu = _sft_mfu("h100-vidur", "llama2-7b", 1)
    assert MFU_BAND[0] <= mfu <= MFU_BAND[1], mfu


def test_fused_kernels_beat_the_eager_executor_on_the_same_device():
    assert _sft_mfu("h100-vidur", "llama2-13b", 1) > 1.3 * _sft_mfu("h100-sxm", "llama2-13b", 1)


def test_llama2_7b_decodes_at_batch_1_on_one_h100_as_fast_as_serving_stacks():
    prof, model = load_profile("h100-vidur"), PRESETS["llama2-7b"]
    cached = np.arange(128.0, 640.0)
    compute, comm = decode_stage(prof, model, 1, model.layers, True, True, 1, cached)
    step_s = compute + comm
    weights_s = model.bytes() / prof.mem_bandwidth_Bps  # every weight read once per token
    assert (step_s >= weights_s).all()
    tokens_per_s = 1.0 / step_s.mean()
    assert 150 <= tokens_per_s <= 250, tokens_per_s
