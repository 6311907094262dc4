"""Cost model: work per op, stage times, transfers per pair, and plausibility on real profiles."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import pytest

from estimator.base.errors import ConfigError
from estimator.cost.census import load_census
from estimator.cost.lowering import lower_call
from estimator.cost.ops import head_flops_per_token, projection_flops_per_token
from estimator.cost.pieces import (
    BF16,
    _extras_s,
    backward_stage,
    decode_stage,
    dp_flatten_s,
    forward_stage,
    optimizer_s,
    stage_params,
)
from estimator.cost.transfers import LinkBook, data_bytes, pair_ports, realloc_bytes
from estimator.profile.profiles import load_profile, profile_from_dict
from estimator.sim.evaluator import call_s
from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.experiment import load_experiment
from estimator.spec.models import PRESETS, ModelSpec
from estimator.spec.plan import Layout, divisors
from estimator.spec.sharding import box_numel, realloc_plan, shard
from estimator.spec.workflow import Call, Workload
from tests.conftest import EXAMPLES
from tests.synthetic import linear_profile, linear_profile_dict

TINY = PRESETS["tiny-2l-128h"]
TIED = ModelSpec("tied", 3, 64, 128, 4, 2, 64, tied_embeddings=True, qkv_bias=True)
GPT = PRESETS["tiny-gpt-2l-128h"]  # LayerNorm, GELU, learned positions, biases, tied
NEOX = PRESETS["tiny-neox-2l-128h"].as_value_model()  # parallel residual, partial rotary


def test_forward_stage_on_a_linear_profile_is_census_flops_over_peak():
    """With unbounded bandwidth and free dispatch a stage costs its FLOPs at peak: the block's
    projections (ops.projection_flops_per_token), causal attention at 4·h per attended (query,
    key) pair, s(s+1)/2 of them, the LM head; nothing else does arithmetic the counter sees."""
    p = linear_profile(peak=1e12, bw=1e30, link_bw=1e9)
    m = PRESETS["llama2-7b"]
    b, s = 4, 128
    t = forward_stage(p, m, tp=1, layers=m.layers, first=True, last=True, batch=b, new=s)
    attention = 4 * m.hidden * s * (s + 1) // 2
    want = b * (m.layers * (s * projection_flops_per_token(m) + attention) + s * head_flops_per_token(m))
    assert t.comm_s == 0.0
    assert t.compute_s == pytest.approx(want / 1e12, rel=1e-9)


def test_backward_is_its_own_piece_not_a_multiple_of_the_forward():
    """Backward GEMMs are exactly twice the forward's; attention's backward is 2.5× its causal
    forward (five products against two, over the same attended pairs); on a profile with memory
    traffic and dispatch the ratio is no fixed factor."""
    p = linear_profile(peak=1e12, bw=1e30, link_bw=1e9)
    m = PRESETS["llama2-7b"]
    b, s, L = 2, 64, 2
    fwd = forward_stage(p, m, 1, L, False, False, b, s)
    bwd = backward_stage(p, m, 1, L, False, False, b, s)
    att = 4 * m.hidden * s * (s + 1) // 2 * b * L  # causal: s(s+1)/2 pairs per sequence
    assert bwd.compute_s * 1e12 == pytest.approx(2 * (fwd.compute_s * 1e12 - att) + 2.5 * att, rel=1e-9)
    # dispatch only: each op the executor dispatches costs one launch, backward's own count
    host = linear_profile(peak=1e30, bw=1e30, link_bw=1e9, launch=1e-5)
    ops = load_census().piece("bfloat16", "block_backward")
    launches = sum(e["count"][0] for e in ops)  # the block's counts are constants
    assert backward_stage(host, m, 1, L, False, False, b, s).compute_s == pytest.approx(L * launches * 1e-5)
    assert launches != 2 * sum(e["count"][0] for e in load_census().piece("bfloat16", "block_forward"))


def test_tp_communication_counts_two_allreduces_per_layer():
    p = linear_profile(peak=1e30, bw=1e30, link_bw=1e9)
    m = PRESETS["llama2-7b"].as_value_model()
    t = forward_stage(p, m, tp=4, layers=3, first=False, last=False, batch=2, new=8)
    one = 2 * 3 / 4 * (2 * 8 * m.hidden * BF16) / 1e9
    assert t.comm_s == pytest.approx(2 * 3 * one)


def _two_link_profile():
    """Linear profile whose intra- and inter-node links differ (α, busbw per class)."""
    d = linear_profile_dict(peak=1e30, bw=1e30)
    for cls, alpha, busbw in (("intra", 1e-6, 1e11), ("inter", 2e-5, 1e9)):
        for kind in ("all_reduce", "all_gather", "reduce_scatter", "p2p", "broadcast"):
            d["links"][cls][kind] = {**d["links"][cls][kind], "alpha_s": alpha, "busbw_bytes_per_s": busbw}
    return profile_from_dict(d)


def test_a_tensor_parallel_group_across_nodes_pays_the_inter_node_links_by_hand():
    """tp = 4 over 2 nodes of 2: each all-reduce of S bytes is the 2-rank intra-node phase
    (α_i + 2·(1/2)·S/B_i) then, on each rank's NIC, the 2-node phase over S/2 (α_e + 2·(1/2)·(S/2)/B_e)."""
    p = _two_link_profile()
    m = PRESETS["llama2-7b"].as_value_model()
    b, s, L = 2, 8, 3
    S = b * s * m.hidden * BF16
    inside = 1e-6 + S / 1e11  # tp = 2 inside one node: 2(n-1)/n = 1
    across = (1e-6 + S / 1e11) + (2e-5 + (S / 2) / 1e9)
    assert forward_stage(p, m, 2, L, False, False, b, s).comm_s == pytest.approx(2 * L * inside)
    t = forward_stage(p, m, 4, L, False, False, b, s, tp_nodes=2)
    assert t.comm_s == pytest.approx(2 * L * across)
    assert backward_stage(p, m, 4, L, False, False, b, s, tp_nodes=2).comm_s == pytest.approx(2 * L * across)
    # the same group priced as if it fitted in a node would be 50x cheaper: the inter phase dominates
    assert forward_stage(p, m, 4, L, False, False, b, s).comm_s < t.comm_s / 10
    # and the lowering of a layout that says tp_across_nodes charges exactly that
    call = Call("actor_inf", "actor", "inference", (), (), Workload(b, 1, s - 1, 1))
    lay = Layout(DeviceMesh(0, 4), 1, 4, 1, 1, tp_across_nodes=True)
    cc = lower_call(call, m, lay, 2, p)
    assert lay.tp_span(2) == (2, 2) and cc.stages[0].fwd.comm_s == pytest.approx(
        forward_stage(p, m, 4, m.layers, True, True, b, s, tp_nodes=2).comm_s)
    assert cc.stages[0].fwd.comm_s > 2 * m.layers * across


MEGATRON = {"name": "Megatron", "attention": "unfused", "cross_entropy": "vocab_parallel", "grad_buffer": "contiguous",
            "optimizer": {"bytes_per_param": 36.0, "launches": 4, "cite": "test"}, "cite": "test"}


def _with_trainer(trainer: dict | None = None, **kw):
    d = linear_profile_dict(**kw)
    if trainer is not None:
        d["trainer"] = trainer
    return profile_from_dict(d)


def test_unfused_attention_adds_the_score_traffic_and_the_uncausal_flops_by_hand():
    """Megatron's core attention over E = rows·heads/tp·s² scores, 2-byte elements: forward
    13·E bytes (baddbmm writes E·2, softmax 2·2·E, dropout 2·2·E + a 1-byte mask, bmm reads
    E·2) and 4·E·d FLOPs where the fused kernel has 2·E·d; backward 19·E bytes (each product's
    two gradients read or write E·2 each, dropout's 2·2·E + the mask, softmax's 3·2·E) and
    8·E·d FLOPs against the fused kernel's 5·E·d. The recomputing backward re-runs the forward's."""
    m, tp, L, b, s = PRESETS["llama2-7b"], 2, 3, 2, 64
    E, d = b * m.heads / tp * s * s, m.head_dim
    for kw, fwd_extra, bwd_extra in (({"peak": 1e30, "bw": 1e12}, 13 * E / 1e12, 19 * E / 1e12),
                                     ({"peak": 1e12, "bw": 1e30}, 2 * E * d / 1e12, 3 * E * d / 1e12)):
        plain, megatron = _with_trainer(None, **kw), _with_trainer({**MEGATRON}, **kw)
        f0, f1 = (forward_stage(p, m, tp, L, False, False, b, s, grad=True) for p in (plain, megatron))
        assert f1.compute_s - f0.compute_s == pytest.approx(L * fwd_extra, rel=1e-9)
        b0, b1 = (backward_stage(p, m, tp, L, False, False, b, s, recompute=True) for p in (plain, megatron))
        assert b1.compute_s - b0.compute_s == pytest.approx(L * (bwd_extra + fwd_extra), rel=1e-9)
        # generation's prefill is the serving engine's: the trainer's attention does not apply
        pre = [forward_stage(p, m, tp, L, False, False, b, s, phase="prefill") for p in (plain, megatron)]
        assert pre[0] == pre[1]


def test_vocab_parallel_loss_all_reduces_three_numbers_per_token_instead_of_gathering_logits():
    m, tp, b, s = PRESETS["llama2-7b"], 4, 2, 32
    n = b * s
    extras = (("loss_sft_actor", {"response": s - 1, "rows": b}),)
    plain = _with_trainer(None, peak=1e30, bw=1e12, link_bw=1e9)
    vp = _with_trainer({"attention": "fused", "cross_entropy": "vocab_parallel", "cite": "test"}, peak=1e30,
                       bw=1e12, link_bw=1e9)
    f0, f1 = (forward_stage(p, m, tp, 0, False, True, b, s, extras=extras, grad=True) for p in (plain, vp))
    assert f0.comm_s == pytest.approx(3 / 4 * n * m.vocab * BF16 / 1e9)  # the logits' all-gather
    assert f1.comm_s == pytest.approx(3 * 2 * 3 / 4 * n * 4 / 1e9)  # three fp32 all-reduces per token
    from estimator.cost.census import model_symbols

    sym = model_symbols(m, tp) | {"rows": b, "tokens": s}
    loss_whole = _extras_s(vp, sym, extras, "grad")
    loss_shard = _extras_s(vp, sym | {"vocab": m.vocab / tp}, extras, "grad")
    assert loss_shard == pytest.approx(loss_whole / tp, rel=0.05) and loss_shard < loss_whole
    b0, b1 = (backward_stage(p, m, tp, 0, False, True, b, s, extras=(("loss_sft_actor_backward", extras[0][1]),))
              for p in (plain, vp))
    assert b1.compute_s < b0.compute_s and b1.comm_s == b0.comm_s  # the head input's all-reduce stays


def test_a_fused_optimizer_moves_its_bytes_per_parameter_and_a_contiguous_buffer_copies_nothing():
    numels = [1_000_000, 3_000_000, 500_000]
    megatron = _with_trainer({**MEGATRON}, peak=1e30, bw=1e12, launch=1e-5)
    assert optimizer_s(megatron, numels) == pytest.approx(36.0 * sum(numels) / 1e12)
    host_bound = _with_trainer({**MEGATRON}, peak=1e30, bw=1e30, launch=1e-5)
    assert optimizer_s(host_bound, numels) == pytest.approx(4 * 1e-5)  # its four launches
    plain = _with_trainer(None, peak=1e30, bw=1e12, launch=1e-5)
    assert optimizer_s(plain, numels) > 4 * 1e-5 * len(numels)  # the census's Adam: ops per tensor
    assert dp_flatten_s(plain, numels) > 0 and dp_flatten_s(megatron, numels) == 0.0


@pytest.mark.parametrize("edit, match", [
    ({"attention": "flash"}, r"trainer attention='flash' \(one of \['fused', 'unfused'\]\)"),
    ({"grad_buffer": "x", "cross_entropy": "y"}, r"cross_entropy='y'.*grad_buffer='x'"),
    ({"optimizer": {"bytes_per_param": -1, "launches": 4, "cite": "c"}}, r"optimizer.bytes_per_param=-1"),
    ({"optimizer": {"bytes_per_param": 30, "launches": 0, "cite": "c"}}, r"optimizer.launches=0"),
    ({"optimizer": {"bytes_per_param": 30}}, r"trainer.optimizer: missing key\(s\) \['cite', 'launches'\]"),
    ({"cite": ""}, r"trainer needs a 'cite'"),
    ({"speed": 2}, r"trainer: unknown key\(s\) \['speed'\]"),
])
def test_the_trainer_section_is_checked(edit, match):
    with pytest.raises(ConfigError, match=match):
        _with_trainer({**MEGATRON, **edit})


def test_stage_params_match_the_shards():
    for model in (TINY, TIED, PRESETS["tiny-4l-256h"].as_value_model(), GPT, NEOX):
        for tp in (1, 2):
            for pp in (1, 2):
                lay = Layout(DeviceMesh(0, tp * pp), 1, tp, pp)
                for dev in lay.mesh.devices:
                    k = lay.coords(dev)[2]
                    want = sum(box_numel(b) for b in shard(model, lay, dev).values())
                    assert stage_params(model, tp, pp, k, len(lay.stage_layers(model.layers, k))) == want


def _reference(model, src, dst, dpn):
    out = defaultdict(int)
    for t in realloc_plan(model, src, dst, dpn):
        out[(t.src, t.dst)] += t.numel * BF16
    return dict(out)


def _layouts(cluster: Cluster, model: ModelSpec) -> list[Layout]:
    out = []
    for mesh in cluster.meshes():
        for tp in divisors(mesh.size):
            for pp in divisors(mesh.size // tp):
                if model.heads % tp == 0 and model.kv_heads % tp == 0 and pp <= model.layers:
                    out.append(Layout(mesh, mesh.size // (tp * pp), tp, pp))
    return out


@pytest.mark.parametrize("model", [TINY, TIED, PRESETS["tiny-4l-256h"].as_value_model(), GPT],
                         ids=lambda m: m.name)
def test_fast_realloc_matches_realloc_plan_exactly(model):
    cluster = Cluster(2, 4, "cpu")
    lays = _layouts(cluster, model)
    for i, src in enumerate(lays):
        for dst in lays[i % 3::3]:
            assert realloc_bytes(model, src, dst, 4) == _reference(model, src, dst, 4), (src, dst)


def _uneven_layouts(cluster: Cluster, model: ModelSpec) -> list[Layout]:
    """Layouts on runs that are not ReaL's meshes, tensor-parallel groups inside nodes."""
    out = []
    for mesh in cluster.meshes(uneven=True):
        if cluster.aligned(mesh):
            continue
        for tp in divisors(mesh.size):
            for pp in divisors(mesh.size // tp):
                if (model.heads % tp == 0 and model.kv_heads % tp == 0 and pp <= model.layers
                        and cluster.tp_problem(mesh, tp) is None):
                    out.append(Layout(mesh, mesh.size // (tp * pp), tp, pp))
    return out


@pytest.mark.parametrize("model", [TINY, TIED], ids=lambda m: m.name)
def test_fast_realloc_matches_realloc_plan_between_uneven_meshes(model):
    cluster = Cluster(2, 4, "cpu")
    uneven = _uneven_layouts(cluster, model)
    assert {lay.mesh.size for lay in uneven} >= {2, 3, 5, 6, 7}
    others = uneven[::7] + _layouts(cluster, model)[::5]
    for src in uneven[::3]:
        for dst in others:
            assert realloc_bytes(model, src, dst, 4) == _reference(model, src, dst, 4), (src, dst)
            assert realloc_bytes(model, dst, src, 4) == _reference(model, dst, src, 4), (dst, src)


def test_realloc_between_uneven_meshes_by_hand():
    """Three of a node's four devices (data-parallel) to a two-stage pipeline on devices 3 and
    4, one on each node: the stage on node 0 takes block 0 and the embedding from a replica
    on its node (device 3 % 3 = 0 of the three), the stage on node 1 block 1, the head and the
    final norm from replica 4 % 3 = 1 across the nodes."""
    split, rep, embed = 147456, 256, 32768  # tiny-2l-128h, as in test_realloc_bytes_by_hand
    src, dst = Layout(DeviceMesh(0, 3), 3, 1, 1), Layout(DeviceMesh(3, 2), 1, 1, 2)
    pairs = realloc_bytes(TINY, src, dst, 4)
    assert pairs == {(0, 3): BF16 * (split + rep + embed), (1, 4): BF16 * (split + rep + embed + 128)}
    p = profile_from_dict(_two_speed_links())
    from estimator.cost.transfers import isolated_transfer_s

    assert isolated_transfer_s(pairs, p, 8, 4) == pytest.approx(max(p.p2p_s(pairs[(0, 3)], "intra"),
                                                                    p.p2p_s(pairs[(1, 4)], "inter")))
    assert p.p2p_s(pairs[(1, 4)], "inter") == pytest.approx(pairs[(1, 4)] / 1e8)


def _two_speed_links() -> dict:
    """The linear profile with NVLink at 1 GB/s and the NIC at 0.1 GB/s, no latency."""
    data = linear_profile_dict(link_bw=1e9)
    inter = data["links"]["inter"]
    inter.update({k: dict(v, busbw_bytes_per_s=1e8) for k, v in inter.items() if isinstance(v, dict)})
    return data


def test_data_parallel_groups_of_meshes_that_are_not_whole_nodes_by_hand():
    """A data-parallel all-reduce of S bytes over a group with a ranks on one node and b on the
    other: the NVLink phase as long as on the fuller node, then each rank of the emptier node
    carries S/min(a, b) on its NIC (all-reduce moves 2(n−1)/n of the data at the bus bandwidth)."""
    from estimator.cost.transfers import group_shape

    p = profile_from_dict(_two_speed_links())
    m = PRESETS["llama2-7b"].as_value_model()
    call = Call("train", "critic", "train", ("seq",), (), Workload(16, 64, 64))
    S = stage_params(m, 1, 1, 0, m.layers) * p.elem_bytes

    def ring(n: int, nbytes: float, bw: float) -> float:
        return 2 * (n - 1) / n * nbytes / bw

    expect = {DeviceMesh(0, 8): ring(8, S, 1e9),  # one node
              DeviceMesh(4, 8): ring(4, S, 1e9) + ring(2, S / 4, 1e8),  # 4 + 4
              DeviceMesh(6, 8): ring(6, S, 1e9) + ring(2, S / 2, 1e8),  # 2 + 6
              DeviceMesh(0, 12): ring(8, S, 1e9) + ring(2, S / 4, 1e8),  # 8 + 4, dp 12
              DeviceMesh(0, 16): ring(8, S, 1e9) + ring(2, S / 8, 1e8)}  # whole nodes
    assert group_shape(range(6, 14), 8) == (6, 2, 2) and group_shape(range(0, 16), 8) == (8, 2, 8)
    ar = {mesh: lower_call(call, m, Layout(mesh, mesh.size, 1, 1, 1), 8, p).stages[0].dp_allreduce_s
          for mesh in expect}
    base = DeviceMesh(0, 8)
    for mesh, want in expect.items():
        if mesh.size == 8:  # the same flatten copies and overhead: only the collective differs
            assert ar[mesh] - ar[base] == pytest.approx(want - expect[base], rel=1e-9), mesh
    twelve, sixteen = DeviceMesh(0, 12), DeviceMesh(0, 16)
    assert p.group_collective_s("all_reduce", S, *group_shape(twelve.devices, 8)) == pytest.approx(expect[twelve])
    assert p.group_collective_s("all_reduce", S, *group_shape(sixteen.devices, 8)) == pytest.approx(expect[sixteen])


def test_pipeline_stages_of_a_mesh_that_starts_mid_node_send_across_only_at_the_boundary():
    """Mesh 4-11 on nodes of 8, tp 2 × pp 4: stages 4-5, 6-7 | 8-9, 10-11; only the message
    from stage 1 to stage 2 crosses the nodes, on the NIC of each of its two pairs."""
    from estimator.cost.transfers import NIC_IN, NIC_OUT, stage_send

    p = profile_from_dict(_two_speed_links())
    lay = Layout(DeviceMesh(4, 8), 1, 2, 4)
    sends = [stage_send(p, lay, k, 1e6, 8) for k in range(4)]
    assert [s[3] for s in sends] == ["intra", "inter", "intra", "intra"]
    assert [s[0] for s in sends[:3]] == pytest.approx([1e6 / 1e9, 1e6 / 1e8, 1e6 / 1e9])
    assert sends[1][1] == (4 * 6 + NIC_OUT, 4 * 8 + NIC_IN, 4 * 7 + NIC_OUT, 4 * 9 + NIC_IN)


def test_rollouts_on_meshes_of_one_size_differ_where_one_crosses_nodes():
    """A generation's rollout is shared between layouts whose links are alike: a pipeline on
    devices 0-1 and one on 2-3 (one node each), not one on 3-4, whose stages talk over the NIC."""
    from estimator.cost.lowering import Costs
    from estimator.cost.rollout import rollout_cost
    from tests.conftest import tiny_experiment

    exp = tiny_experiment("grpo", nodes=2, devices_per_node=4, batch_size=8, group_size=2)
    p = profile_from_dict(_two_speed_links())
    costs = Costs(exp, p)
    call, model = exp.workflow["actor_gen"], exp.models["actor"]
    lays = [Layout(DeviceMesh(first, 2), 1, 1, 2, 2, max_concurrency=4) for first in (0, 2, 3)]
    got = [costs.call("actor_gen", lay).rollout for lay in lays]
    w = call.workload
    lengths = (np.full(w.seqs, w.prompt_len), np.full(w.seqs, w.gen_len))
    alone = [rollout_cost(p, call, model, lay, *lengths, costs.kv_tokens("actor_gen", lay), 4) for lay in lays]
    assert got[0] is got[1] and got[2] is not got[0]
    assert [r.duration_s for r in got] == pytest.approx([r.duration_s for r in alone])
    assert alone[2].duration_s > alone[0].duration_s


def test_realloc_bytes_by_hand():
    # tiny-2l-128h: per block 147456 split parameters + 256 norm weights; embedding and head
    # 32768 each (vocab split); final norm 128.
    split, rep, embed = 147456, 256, 32768
    mesh = DeviceMesh(0, 2)
    tp2, dp2 = Layout(mesh, 1, 2, 1), Layout(mesh, 2, 1, 1)
    # tp=2 → dp=2: each device keeps its half, receives the other half; norms are local
    half = (2 * split + 2 * embed) // 2
    assert realloc_bytes(TINY, tp2, dp2, 4) == {
        (0, 0): BF16 * (half + 2 * rep + 128), (1, 0): BF16 * half,
        (0, 1): BF16 * half, (1, 1): BF16 * (half + 2 * rep + 128)}
    # pp=2 on devices 0-1 → tp=2 on devices 2-3: stage 0 sends block 0 and the embedding,
    # stage 1 block 1, the head and the final norm, halves of split weights to each rank
    pp2, tp2b = Layout(mesh, 1, 1, 2), Layout(DeviceMesh(2, 2), 1, 2, 1)
    from_0 = BF16 * (split // 2 + rep + embed // 2)
    from_1 = BF16 * (split // 2 + rep + embed // 2 + 128)
    assert realloc_bytes(TINY, pp2, tp2b, 4) == {(0, 2): from_0, (1, 2): from_1, (0, 3): from_0, (1, 3): from_1}


def test_data_bytes_by_hand():
    w = Workload(8, 4, 6)
    gen = Call("gen", "actor", "generate", ("prompts",), ("seq", "old_logp"), w)
    train = Call("train", "actor", "train", ("seq", "old_logp"), (), Workload(8, 4, 6, minibatches=2))
    src = Layout(DeviceMesh(0, 2), 2, 1, 1)  # rows 0-3 on device 0, 4-7 on device 1
    dst = Layout(DeviceMesh(2, 2), 1, 1, 2)  # both stages need every row
    per_row = 8 * (4 + 6) + 4 * 6  # int64 tokens per position + fp32 log-prob per generated token
    got = data_bytes("ppo", gen, src, train, dst, ("seq", "old_logp"), 4)
    assert got == {(0, 2): 4 * per_row, (1, 2): 4 * per_row, (0, 3): 4 * per_row, (1, 3): 4 * per_row}


def test_grpo_train_gets_every_reward_on_every_device():
    """Group statistics need a whole group's rewards wherever a group's rows are trained: the
    executor delivers the full vector to each device, and the estimator charges it."""
    w = Workload(8, 4, 6)
    reward = Call("reward_inf", "reward", "inference", ("seq",), ("rewards",), w)
    train = Call("actor_train", "actor", "train", ("seq", "rewards"), (), Workload(8, 4, 6, minibatches=2))
    src = Layout(DeviceMesh(0, 1), 1, 1, 1)  # every reward on device 0
    dst = Layout(DeviceMesh(0, 4), 4, 1, 1)  # two rows per replica
    fp32 = 4
    # (0, 0): device 0's own rows, a local copy
    assert data_bytes("ppo", reward, src, train, dst, ("rewards",), 4) == {(0, d): 2 * fp32 for d in range(4)}
    assert data_bytes("grpo", reward, src, train, dst, ("rewards",), 4) == {(0, d): 8 * fp32 for d in range(4)}


def test_link_book_shares_ports_first_come_first_served():
    p = linear_profile(link_bw=1e9)
    book = LinkBook(4)
    alone = LinkBook(4).send_all({(0, 1): 10**9}, 0.0, p, 4)[1]
    # two messages out of device 0 at once: the second waits for the first
    end = book.send_all({(0, 1): 10**9, (0, 2): 10**9}, 0.0, p, 4)[1]
    assert alone == pytest.approx(1.0) and end == pytest.approx(2.0)
    # a message between other devices is not delayed
    assert book.reserve(pair_ports(2, 3, 4), 0.0, 1.0) == (0.0, 1.0)


def test_link_book_fills_gaps_a_waiting_transfer_leaves():
    book = LinkBook(4)
    assert book.reserve(pair_ports(0, 1, 4), 0.0, 5.0) == (0.0, 5.0)  # 0 → 1 until 5 s
    # 0 → 2 waits for device 0's out-port; device 2's in-port stays free before 5 s ...
    assert book.reserve(pair_ports(0, 2, 4), 0.0, 1.0) == (5.0, 6.0)
    # ... so 3 → 2 uses it at once, and a transfer too long for the gap goes after 6 s
    assert book.reserve(pair_ports(3, 2, 4), 1.0, 2.0) == (1.0, 3.0)
    assert book.reserve(pair_ports(3, 2, 4), 3.0, 2.5) == (6.0, 8.5)
    assert book.reserve(pair_ports(3, 2, 4), 3.0, 2.0) == (3.0, 5.0)  # exactly fits the gap left


def test_link_book_takes_the_earliest_window_free_on_every_port_by_brute_force():
    """Against an oracle that tries every candidate start (the request time and each booking's
    end) and keeps the first window that overlaps no booking of any port: random requests of
    one to four ports, zero-length ones among them, at non-decreasing request times."""
    rng = np.random.default_rng(7)
    book, held = LinkBook(3), {p: [] for p in range(12)}
    now = 0.0
    for _ in range(600):
        now += float(rng.choice([0.0, 0.0, rng.exponential(0.3)]))
        ports = tuple(int(p) for p in rng.choice(12, size=int(rng.integers(1, 5)), replace=False))
        duration = float(rng.choice([0.0, rng.exponential(1.0), rng.integers(1, 4) * 0.25]))
        candidates = sorted({now} | {e for p in ports for _, e in held[p] if e >= now})
        start = next(t for t in candidates
                     if not any(s < t + duration and e > t for p in ports for s, e in held[p]))
        assert book.reserve(ports, now, duration) == (start, start + duration)
        for p in ports:
            held[p].append((start, start + duration))
            # what the book keeps: every booking still running or to come, in order
            assert [iv for iv in book.booked(p) if iv[1] > now] == sorted(iv for iv in held[p] if iv[1] > now)


def test_decode_steps_integrate_kv_growth_exactly():
    prof = load_profile("h100-sxm")
    m = PRESETS["llama2-7b"]
    cached = np.arange(100, 164, dtype=float)
    comp, comm = decode_stage(prof, m, 1, m.layers, True, True, 4, cached)
    one = [decode_stage(prof, m, 1, m.layers, True, True, 4, np.array([c]))[0][0] for c in cached]
    assert np.allclose(comp, one)
    assert np.all(np.diff(comp) >= 0)  # the cache only grows
    call = Call("gen", "actor", "generate", ("prompts",), ("seq",), Workload(8, 100, 65))
    cc = lower_call(call, m, Layout(DeviceMesh(0, 1), 1, 1, 1, 2), 8, prof)
    decode_total = sum(ch.duration_s for ch in cc.stages[0].decode)
    comp2, comm2 = decode_stage(prof, m, 1, m.layers, True, True, 4, cached)
    assert decode_total == pytest.approx(2 * float((comp2 + comm2).sum()))  # two micro-batches per step


def test_decode_step_at_batch_one_reads_all_weights():
    prof = load_profile("h100-sxm")
    m = PRESETS["llama2-7b"]
    comp, comm = decode_stage(prof, m, 1, m.layers, True, True, 1, np.array([255.0]))
    assert comp[0] + comm[0] >= m.bytes() / prof.mem_bandwidth_Bps


def test_tied_embedding_copies_sum_their_gradients_across_the_pipeline():
    """With pp > 1 a tied embedding lives on the first and last stages; each train step sums
    the two copies' gradients (V·h/tp bf16 between the two stages) before the dp all-reduce."""
    prof = load_profile("h100-sxm")
    tied = PRESETS["qwen2.5-0.5b"]
    untied = dataclasses.replace(tied, tied_embeddings=False)
    call = Call("train", "actor", "train", ("seq",), (), Workload(16, 64, 64))
    pair_s = prof.group_collective_s("all_reduce", tied.vocab * tied.hidden / 2 * 2, 2, 1)
    for dp, pp in ((1, 3), (2, 2)):
        layout = Layout(DeviceMesh(0, 2 * dp * pp), dp, 2, pp, 2)
        with_tied = [st.dp_allreduce_s for st in lower_call(call, tied, layout, 8, prof).stages]
        without = [st.dp_allreduce_s for st in lower_call(call, untied, layout, 8, prof).stages]
        extra = [a - b for a, b in zip(with_tied, without)]
        assert extra[0] == pytest.approx(pair_s) and extra[-1] == pytest.approx(pair_s)
        assert all(e == 0 for e in extra[1:-1])
    one_stage = Layout(DeviceMesh(0, 2), 1, 2, 1, 2)  # one copy: nothing to sum
    assert lower_call(call, tied, one_stage, 8, prof).stages[0].dp_allreduce_s == 0


@pytest.mark.parametrize("dp,tp,pp,mb", [(1, 8, 1, 4), (2, 4, 1, 4), (1, 4, 2, 8), (4, 2, 1, 2), (1, 2, 4, 8)])
def test_llama2_7b_training_mfu_is_plausible_on_h100(dp, tp, pp, mb):
    exp = load_experiment(EXAMPLES / "ppo-llama2-7b-8xh100.yaml")
    prof = load_profile("h100-sxm")
    call = exp.workflow["actor_train"]
    model = exp.models["actor"]
    cc = lower_call(call, model, Layout(DeviceMesh(0, 8), dp, tp, pp, mb), 8, prof)
    from estimator.cost.ops import call_flops
    mfu = call_flops(call, model) / (call_s(cc) * 8 * prof.peak_flops)
    # The executor is eager torch: RMSNorm in float32 over the full (replicated) hidden width,
    # unfused rotary and SwiGLU, the loss over float32 logits — work the census charges and
    # Megatron's fused kernels (40–52 % MFU) avoid, so eager plans land lower.
    assert 0.12 <= mfu <= 0.65, mfu


# ---- the compute section: how host dispatch and device work compose; executor terms ---------


def _profile(compose: str | None = None, executor: dict | None = None, **kw):
    d = linear_profile_dict(**kw)
    if compose:
        d["compute"]["compose"] = {"mode": compose, "cite": "test"}
    if executor is not None:
        d["executor"] = executor
    return profile_from_dict(d)


def test_serial_adds_dispatch_and_overlap_takes_the_longer():
    serial, overlap = _profile("serial", launch=1e-3), _profile("overlap", launch=1e-3)
    assert _profile(launch=1e-3).compose == "overlap"  # the default
    assert serial.op_s(1e12, 0.0, 3) == pytest.approx(1.0 + 3e-3)
    assert overlap.op_s(1e12, 0.0, 3) == pytest.approx(1.0)
    assert overlap.op_s(1e6, 0.0, 3) == pytest.approx(3e-3)
    flops, nbytes = np.array([0.0, 1e6, 1e9, 1e12]), np.array([1e3, 0.0, 1e12, 1e6])
    for p in (serial, overlap):
        many = p.ops_s_many(flops, nbytes, 2.0)
        assert many == pytest.approx([p.op_s(f, b, 2) for f, b in zip(flops, nbytes)])


@pytest.mark.parametrize("edit,match", [
    ({"call_overhead_s": -1.0, "micro_batch_overhead_s": 0.0, "command": "x"}, "call_overhead_s=-1.0"),
    ({"call_overhead_s": 0.0, "micro_batch_overhead_s": float("nan"), "command": "x"}, "micro_batch_overhead_s"),
    ({"call_overhead_s": 0.0, "command": "x"}, "missing key"),
    ({"call_overhead_s": 0.0, "micro_batch_overhead_s": 0.0}, "cite"),
])
def test_executor_section_is_checked(edit, match):
    with pytest.raises(ConfigError, match=match):
        _profile(executor=edit)
    with pytest.raises(ConfigError, match="compose.mode"):
        _profile("sometimes")


def test_lowering_charges_the_executor_bookkeeping():
    """Per micro-batch stage pass (forward, backward, each decode step) and once per call,
    spread over the call's passes so a stage's busy time grows by exactly that much."""
    m = PRESETS["tiny-2l-128h"]
    base = _profile(launch=1e-6)
    extra = _profile(launch=1e-6, executor={"call_overhead_s": 0.04, "micro_batch_overhead_s": 0.001, "command": "t"})
    lay = Layout(DeviceMesh(0, 2), 1, 1, 2, 4)
    train = Call("train", "actor", "train", ("seq",), (), Workload(16, 8, 8, minibatches=2))
    a, b = lower_call(train, m, lay, 8, base), lower_call(train, m, lay, 8, extra)
    for sa, sb in zip(a.stages, b.stages):
        assert sb.fwd.compute_s - sa.fwd.compute_s == pytest.approx(0.001 + 0.04 / 8)  # 4 micro-batches × 2 steps
        assert sb.bwd.compute_s - sa.bwd.compute_s == pytest.approx(0.001)
    gen = Call("gen", "actor", "generate", ("prompts",), ("seq",), Workload(8, 8, 5))
    a, b = lower_call(gen, m, lay, 8, base), lower_call(gen, m, lay, 8, extra)
    for sa, sb in zip(a.stages, b.stages):
        assert sb.fwd.compute_s - sa.fwd.compute_s == pytest.approx(0.001 + 0.04 / 4)
        more = sum(c.compute_s for c in sb.decode) - sum(c.compute_s for c in sa.decode)
        assert more == pytest.approx(4 * 4 * 0.001)  # 4 decode steps × 4 micro-batches


def test_census_dtype_follows_the_profile():
    """The CPU profile runs float32 (the executor's CPU default): no bf16↔fp32 casts."""
    cpu, h100 = load_profile("cpu"), load_profile("h100-sxm")
    assert (cpu.dtype, h100.dtype) == ("float32", "bfloat16")
    f32 = sum(e["count"][0] for e in load_census().piece("float32", "block_forward"))
    bf16 = sum(e["count"][0] for e in load_census().piece("bfloat16", "block_forward"))
    assert bf16 > f32  # the norms' up- and down-casts


def test_recompute_charges_the_checkpointed_forward_by_hand():
    """tiny-2l-128h (h 128, f 256, 4 heads of 32, 2 K/V heads: kv_dim 64), 2 sequences of 16
    tokens, 2 blocks, a linear 1 TFLOP/s profile without memory or dispatch cost. A recomputing
    backward runs each block's forward again up to its last saved tensor: the q, k, v, o
    projections, attention and gate/up, but not down_proj, whose output nothing saves (torch's
    non-reentrant checkpoint stops recomputing there)."""
    p = linear_profile(peak=1e12, bw=1e30, link_bw=1e9)
    b, s, L, h, f, kv = 2, 16, 2, 128, 256, 64
    plain = backward_stage(p, TINY, 1, L, False, False, b, s)
    again = backward_stage(p, TINY, 1, L, False, False, b, s, recompute=True)
    per_token = 2 * (2 * h * h + 2 * h * kv) + 2 * 2 * h * f  # q, k, v, o; gate and up
    attention = 4 * h * s * (s + 1) // 2  # per sequence: 4·h per causal (query, key) pair
    extra = L * b * (s * per_token + attention)  # 2·2·(16·229376 + 69632) = 14,958,592 FLOPs
    assert extra == 14_958_592
    assert again.compute_s - plain.compute_s == pytest.approx(extra / 1e12, rel=1e-9)
    # one more all-reduce per block under tensor parallelism: the re-run o_proj's output (the
    # recompute stops before down_proj and its all-reduce; tests/test_census.py counts them)
    tp = 2
    one = 2 * (tp - 1) / tp * (b * s * h * BF16) / 1e9  # ring all-reduce of b·s·h bf16 at 1 GB/s
    assert backward_stage(p, TINY, tp, L, False, False, b, s).comm_s == pytest.approx(2 * L * one)
    assert backward_stage(p, TINY, tp, L, False, False, b, s, recompute=True).comm_s == pytest.approx(3 * L * one)
    # every op dispatches again: the forward's, the checkpoint's detaches of the saved tensors
    census = load_census()
    ops = {n: sum(e["count"][0] for e in census.piece("float32", n))
           for n in ("block_forward", "block_backward", "block_backward_recompute")}
    assert ops["block_backward_recompute"] > ops["block_forward"] + ops["block_backward"]


def test_lowering_recomputes_only_where_the_layout_says():
    exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    prof = load_profile("cpu")
    call = exp.workflow["actor_train"]
    lay = Layout(DeviceMesh(0, 2), 1, 1, 2, 2)
    base = lower_call(call, exp.models["actor"], lay, 2, prof)
    rc = lower_call(call, exp.models["actor"], dataclasses.replace(lay, recompute="full"), 2, prof)
    for a, r, k in zip(base.stages, rc.stages, range(lay.pp)):
        layers = len(lay.stage_layers(exp.models["actor"].layers, k))
        # the same ops forward, plus checkpointing's own cost per block the profile measured
        assert r.fwd.compute_s == pytest.approx(a.fwd.compute_s + layers * prof.checkpoint_s[0])
        assert a.fwd.comm_s == r.fwd.comm_s and a.optimizer_s == r.optimizer_s
        assert r.bwd.compute_s > a.bwd.compute_s + layers * prof.checkpoint_s[1]
    assert prof.checkpoint_s[0] > 0 and prof.checkpoint_s[1] > 0
    assert call_s(rc) > call_s(base)


def test_recomputed_old_logprobs_cost_what_the_reference_forward_costs():
    """``actor_inf`` runs the same forward and ``response_logp`` as ``ref_inf`` (the census
    piece ``loss_ref_logp``) on an actor-sized model: the same stage costs on the same layout;
    a forward without log-probs (a value model's) leaves the piece out."""
    from estimator.spec.workflow import WorkflowParams, build

    prof = load_profile("h100-sxm")
    m = PRESETS["llama2-7b"]
    wf = build("grpo", WorkflowParams(8, 64, 64, 1, 4, old_logprobs="recompute"))
    layout = Layout(DeviceMesh(0, 4), 2, 2, 1, 2)
    actor, ref = (lower_call(wf[n], m, layout, 8, prof, "grpo") for n in ("actor_inf", "ref_inf"))
    assert actor.stages == ref.stages and actor.reward_s == 0.0
    bare = dataclasses.replace(wf["ref_inf"], outputs=("values",))
    assert lower_call(bare, m, layout, 8, prof, "grpo").stages[0].fwd.compute_s < ref.stages[0].fwd.compute_s


def test_a_verifier_is_charged_on_the_generate_call_per_replica_sequence():
    from estimator.spec.workflow import WorkflowParams, build

    prof = load_profile("h100-sxm")
    m = PRESETS["llama2-7b"]
    wf = build("grpo", WorkflowParams(8, 64, 64, 1, 4, verifier=True))  # 32 sequences
    gen = wf["actor_gen"]
    for dp, want in ((1, 32 * 0.25), (4, 8 * 0.25)):
        layout = Layout(DeviceMesh(0, 4), dp, 4 // dp, 1, 1)
        assert lower_call(gen, m, layout, 8, prof, "grpo", 0.25).reward_s == pytest.approx(want)
        assert lower_call(gen, m, layout, 8, prof, "grpo").reward_s == 0.0
    plain = build("grpo", WorkflowParams(8, 64, 64, 1, 4))["actor_gen"]  # no rewards written: no verifier
    assert lower_call(plain, m, Layout(DeviceMesh(0, 1), 1, 1, 1, 1), 8, prof, "grpo", 0.25).reward_s == 0.0
