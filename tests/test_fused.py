"""The fused-kernel op set: current with its generator, the executor's piece names, the
formulas' FLOPs, and a profile's choice of op set (CPU profiles keep the executor's)."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest

from calibration import fused
from estimator.base.errors import ConfigError
from estimator.cost.census import FUSED_VARIANTS, OP_SET_PATHS, load_op_set, model_symbols
from estimator.cost.ops import projection_flops_per_token
from estimator.cost.pieces import piece_s
from estimator.profile.profiles import load_profile, profile_from_dict
from estimator.spec.models import PRESETS


def _work(name: str, model, tp: int, **sym):
    w = load_op_set("fused").compiled("bfloat16", name)(model_symbols(model, tp) | sym)
    return float((w.flops * w.count).sum()), float((w.bytes * w.count).sum()), float(w.count.sum())


def test_committed_fused_census_is_current_with_its_generator():
    assert OP_SET_PATHS["fused"].read_text() == fused.render(), "regenerate with: python -m calibration.fused"


def test_fused_census_has_every_piece_of_the_executor_census():
    executor = json.loads(OP_SET_PATHS["executor"].read_text())["dtypes"]["bfloat16"]
    fused_pieces = set(load_op_set("fused").dtypes["bfloat16"])
    assert fused_pieces >= set(executor)
    # beyond them only the blocks the executor cannot run (Qwen3's q/k norms)
    assert fused_pieces - set(executor) and all(p.endswith(tuple(FUSED_VARIANTS)) for p in fused_pieces - set(executor))


@pytest.mark.parametrize("name,tp", [("llama2-7b", 1), ("llama3-8b", 2), ("llama2-70b", 8)])
def test_block_flops_are_the_projections_plus_causal_attention(name, tp):
    model = PRESETS[name]
    b, s = 2, 1024
    flops, nbytes, kernels = _work("block_forward" + ("@tp" if tp > 1 else ""), model, tp, rows=b, tokens=s)
    attention = 2.0 * b * s * s * model.hidden / tp  # 4·heads·d·s²/2 on this rank's heads
    assert flops == pytest.approx(b * s * projection_flops_per_token(model) / tp + attention, rel=1e-12)
    assert kernels == 11  # norm, qkv, rope, attention, o, add, norm, gate+up, SwiGLU, down, add
    weights = (model.params_per_layer - 2 * model.hidden) / tp * 2  # bf16, read once
    # plus activations in and out: at most 56 bytes per token of hidden width and 12 of ffn width
    assert weights + b * s * model.hidden < nbytes < weights + b * s * (56 * model.hidden + 12 * model.ffn / tp)
    back, _, _ = _work("block_backward" + ("@tp" if tp > 1 else ""), model, tp, rows=b, tokens=s)
    gemm = b * s * projection_flops_per_token(model) / tp
    assert back == pytest.approx(2 * gemm + 2.5 * attention, rel=1e-12)


@pytest.mark.parametrize("tp", [1, 4])
def test_qwen3_block_has_wide_heads_and_two_qk_norm_kernels(tp):
    """Qwen3-32B: 64 heads of 128 on hidden 5120, so q and o are 8192 wide; the q and k norms
    are two more memory-bound kernels that read and write the rank's q and k rows."""
    model = PRESETS["qwen3-32b"]
    assert model.q_dim == 8192 != model.hidden
    b, s = 2, 1024
    name = "block_forward" + ("@tp" if tp > 1 else "") + "+qknorm"
    flops, nbytes, kernels = _work(name, model, tp, rows=b, tokens=s)
    attention = 2.0 * b * s * s * model.q_dim / tp
    assert flops == pytest.approx(b * s * projection_flops_per_token(model) / tp + attention, rel=1e-12)
    assert kernels == 13  # the LLaMA block's 11 and the q and k norms
    plain = dataclasses.replace(model, qk_norm=False)
    _, plain_bytes, _ = _work("block_forward" + ("@tp" if tp > 1 else ""), plain, tp, rows=b, tokens=s)
    rows_bytes = 2 * 2 * b * s * (model.q_dim + model.kv_dim) / tp  # q and k in and out, bf16
    assert nbytes - plain_bytes == pytest.approx(rows_bytes + 2 * 2 * model.head_dim)


def test_decode_reads_the_weights_and_the_kv_cache_once():
    model = PRESETS["llama2-7b"]
    kv = np.array([1.0, 1000.0])
    w = load_op_set("fused").compiled("bfloat16", "block_decode")(model_symbols(model, 1) | {
        "rows": 1.0, "tokens": 1.0, "kv_len": kv})
    nbytes = (w.bytes * w.count).sum(axis=0)
    kv_bytes = 2 * model.kv_dim * 2  # k and v of one cached token, bf16
    assert nbytes[1] - nbytes[0] == pytest.approx(999 * kv_bytes)
    assert nbytes[0] == pytest.approx((model.params_per_layer - 2 * model.hidden) * 2, rel=0.01)


def test_optimizer_is_one_multi_tensor_kernel_and_flattening_is_free():
    from estimator.cost.census import tensors_work

    census = load_op_set("fused")
    _, nbytes, launches = tensors_work(census, "bfloat16", "optimizer", 300, 1e9)
    assert launches == 2 and nbytes == pytest.approx(34e9)  # Adam 30 B/element + zeroing 4 B
    assert tensors_work(census, "bfloat16", "dp_allreduce", 300, 1e9) == (0.0, 0.0, 0.0)


def test_a_profile_selects_its_op_set_and_names_a_bad_one():
    base = load_profile("h100-sxm")
    assert base.ops == "executor" and load_profile("h100-vidur").ops == "fused"
    doc = copy.deepcopy(base.raw)
    doc["compute"]["ops"] = "fused"
    as_fused = profile_from_dict(doc)
    sym = model_symbols(PRESETS["llama2-7b"], 1) | {"rows": 4, "tokens": 512}
    assert piece_s(as_fused, "block_forward", sym) < piece_s(base, "block_forward", sym)
    doc["compute"]["ops"] = "megatron"
    with pytest.raises(ConfigError, match=r"compute\.ops='megatron' must be one of \('executor', 'fused'\)"):
        profile_from_dict(doc)


def test_per_kernel_figures_are_checked():
    doc = copy.deepcopy(load_profile("h100-vidur").raw)
    doc["compute"]["kernels"]["by_kernel"]["add"]["bandwidth_efficiency"] = 0
    with pytest.raises(ConfigError, match=r"by_kernel\.add\.bandwidth_efficiency=0 must be a positive number"):
        profile_from_dict(doc)
    doc["compute"]["kernels"]["by_kernel"]["add"] = {"bandwidth_efficiency": 0.5}
    with pytest.raises(ConfigError, match=r"by_kernel\.add must be an object with keys"):
        profile_from_dict(doc)


def test_a_measured_kernel_uses_its_own_bandwidth_and_floor():
    prof = load_profile("h100-vidur")
    eff, floor = prof.kernels["rms_norm"][:2]
    big, tiny = 1e9, 1e3
    got = prof.ops_s_many(np.zeros(2), np.array([big, tiny]), 0.0, "nograd", ("rms_norm",))
    assert got[0] == pytest.approx(big / (prof.mem_bandwidth_Bps * eff))
    assert got[1] == pytest.approx(floor)
    plain = prof.ops_s_many(np.zeros(2), np.array([big, tiny]), 0.0, "nograd", ("something_else",))
    assert plain[0] == pytest.approx(big / (prof.mem_bandwidth_Bps * prof.mem_efficiency(big)))
    assert plain[1] == pytest.approx(prof.kernel_floor_s)


def test_gpt_style_variants_change_the_kernels_they_should():
    """LayerNorm reads a bias too, GELU has one up projection, learned positions drop the rotary
    kernel, every projection's bias is read once (hooks for GPT-style pieces)."""
    from estimator.cost.census import compile_piece

    model = PRESETS["llama2-7b"]
    sym = model_symbols(model, 1) | {"rows": 1.0, "tokens": 512.0}

    def work(**kw):
        w = compile_piece([k.entry() for k in fused.block_kernels("forward", **kw)])(sym)
        return float((w.flops * w.count).sum()), float((w.bytes * w.count).sum()), int(w.count.sum())

    f0, b0, n0 = work()
    _, b_ln, _ = work(norm_kind="layer")
    assert b_ln - b0 == pytest.approx(2 * 2 * model.hidden)  # two norms' biases, bf16
    f_gelu, _, _ = work(mlp="gelu")
    assert f0 - f_gelu == pytest.approx(2 * 512 * model.hidden * model.ffn)  # no gate projection
    _, _, n_learned = work(positions="learned")
    assert n_learned == n0 - 1
    _, b_bias, _ = work(linear_bias=True)
    assert b_bias - b0 == pytest.approx(2 * (3 * model.hidden + model.hidden + 2 * model.ffn + model.hidden))
