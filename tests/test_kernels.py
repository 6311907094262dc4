"""Kernel microbenchmarks: the grid covers what plans run, rows are sane (how ops are counted:
test_aten.py)."""

from __future__ import annotations

import pytest
import torch

from calibration.aten import decode
from calibration.kernels import LEVELS, PIECES, grid, measure, tp_widths
from calibration.timing import torch_device
from estimator.base.errors import ConfigError
from estimator.spec.models import PRESETS
from tests.conftest import EXAMPLES

SINGLE_FAMILIES = {"gemm", "attention", "elementwise", "norm", "rotary", "embedding", "softmax", "adam",
                   "stream", "dispatch"}


def test_tp_widths_divide_heads_kv_heads_ffn_and_vocab():
    assert tp_widths(PRESETS["tiny-2l-128h"]) == [1, 2]  # kv_heads = 2
    assert tp_widths(PRESETS["tiny-4l-256h"]) == [1, 2, 4]
    assert tp_widths(PRESETS["llama2-70b"]) == [1, 2, 4, 8]


def test_quick_grid_covers_every_family_phase_and_shard_width():
    cases = grid("quick")
    assert {c.family for c in cases} == SINGLE_FAMILIES | set(PIECES)
    assert {(c.model, c.tp) for c in cases if c.model} == {
        ("tiny-2l-128h", 1), ("tiny-2l-128h", 2), ("tiny-4l-256h", 1), ("tiny-4l-256h", 2), ("tiny-4l-256h", 4)}
    decode = {(c.batch, c.kv) for c in cases if c.family == "block_fwd" and c.op == "decode"}
    lv = LEVELS["quick"]
    assert decode == {(b, kv) for b in lv.decode_batches for kv in lv.kv_lengths}
    assert {c.op for c in cases if c.family == "block_fwd"} == {"decode", "prefill", "forward", "train"}
    assert len(cases) == len(set(cases))


def test_experiment_adds_its_models_and_lengths():
    cases = grid("tiny", experiment=str(EXAMPLES / "ppo-tiny-2xcpu.yaml"))  # prompt 16, gen 16, batch 8
    assert {(c.batch, c.seq) for c in cases if c.family == "block_fwd" and c.op == "prefill"} >= {(1, 16), (8, 16)}
    assert {c.kv for c in cases if c.op == "decode"} >= {17, 32}
    assert {(c.batch, c.seq) for c in cases if c.family == "block_bwd"} >= {(4, 32)}  # 8 rows / 2 minibatches
    # critic and reward share the actor's trunk: only their value head is timed apart
    value = [c for c in cases if c.model == "tiny-2l-128h+value"]
    assert value and {c.family for c in value} == {"head", "head_bwd", "gemm"}
    assert {c.op for c in value if c.family == "gemm"} == {"head"}


def test_unknown_level_and_model_are_config_errors():
    with pytest.raises(ConfigError, match="level 'huge'"):
        grid("huge")
    with pytest.raises(ConfigError, match="model 'gpt-9'"):
        grid("tiny", models=["gpt-9"])


def test_measured_rows_describe_each_case():
    cases = [c for c in grid("tiny") if c.tp == 1 and c.phase == "decode" and c.family in ("gemm", "block_fwd")]
    raw = measure(cases, level="tiny")
    assert len(raw) == len(cases) + 3  # + the compose rows
    kern = raw[raw["family"] != "compose"]
    assert (kern["p10_s"] <= kern["median_s"]).all() and (kern["median_s"] <= kern["p90_s"]).all()
    assert (kern["repeats"] == LEVELS["tiny"].repeats).all() and (kern["launches"] >= 1).all()
    # one decode block of tiny-2l-128h at batch 2 against 8 keys: the products and the attention
    block = kern[kern["family"] == "block_fwd"].iloc[0]
    m, b, kv = PRESETS["tiny-2l-128h"], 2, 8
    gemms = 2 * b * m.hidden * (2 * m.hidden + 2 * m.kv_dim + 3 * m.ffn)
    assert block["flops"] == gemms + 4 * b * m.heads * kv * m.head_dim
    assert sum(decode(block["ops"])[0]) == block["flops"]
    assert set(raw.loc[raw["family"] == "compose", "op"]) == {"big", "stream", "both"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the guard on a machine without a GPU")
def test_cuda_is_refused_with_a_message_without_a_gpu():
    with pytest.raises(ConfigError, match="no CUDA device"):
        torch_device("cuda")
    with pytest.raises(ConfigError, match="device='tpu'"):
        torch_device("tpu")


