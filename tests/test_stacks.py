"""The stack an experiment is priced on and the production stacks' own costs: the profile's
terms, which profile prices which stack, engine steps and launches by hand, the refit's bytes
and fixed cost, host copies around a colocated engine, sequence packing, and every command
naming the stack it priced."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from estimator.base.errors import ConfigError
from estimator.cost.engine import generate_moves, inference_moves, refit_pairs, tensor_count
from estimator.cost.lowering import Costs, micro_batch_shapes
from estimator.cost.rollout import rollout_cost
from estimator.profile.pricing import default_stack, for_stack, micro_batching, resolve
from estimator.profile.profiles import load_profile, op_set, profile_from_dict
from estimator.profile.stacks import EngineTerms
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import experiment_from_dict
from estimator.spec.models import PRESETS
from estimator.spec.plan import Layout, Plan
from estimator.spec.sharding import budget_micro_batches, param_inventory
from estimator.spec.stack import priced_stack
from tests.conftest import EXAMPLES
from tests.synthetic import CITE, linear_profile_dict


def _stack_doc(fixed=0.0, per_request=0.0, graphs=True, graph=0.0, eager=0.0, max_seqs=1024, chunk=16384,
               per_tensor=0.0, micro_batch=0.0, allreduce=None) -> dict:
    generation = {"step": {"fixed_s": fixed, "per_request_s": per_request, **CITE},
                  "launch": {"cuda_graphs": graphs, "graph_s": graph, "eager_kernel_s": eager, **CITE},
                  "scheduler": {"max_num_seqs": max_seqs, "prefill_chunk_tokens": chunk, **CITE}}
    if allreduce is not None:
        generation["allreduce"] = {"curves": allreduce, **CITE}
    return {"generation": generation, "refit": {"per_tensor_s": per_tensor, **CITE},
            "trainer": {"micro_batch_s": micro_batch, **CITE}}


def _profile(host=(1e9, 2e9), **terms):
    doc = linear_profile_dict(launch=1e-6)
    doc["host_link"] = {"h2d_bytes_per_s": host[0], "d2h_bytes_per_s": host[1], "alpha_s": 0.0, **CITE}
    doc["stacks"] = {"megatron-vllm": _stack_doc(**terms), "fsdp-vllm": _stack_doc(**terms)}
    return profile_from_dict(doc)


def _experiment(batch: int = 3, devices: int = 1, gen: object = 8):
    return experiment_from_dict({
        "algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "rule"},
        "batch_size": batch, "group_size": 1, "prompt_len": 2, "gen_len": gen, "old_logprobs": "recompute",
        "cluster": {"nodes": 1, "devices_per_node": devices, "device": "cpu"}})


# ---- the profile's terms ---------------------------------------------------------------------


def test_stack_terms_load_and_every_bad_value_is_named():
    p = _profile(fixed=1e-3, per_request=1e-5)
    assert p.stacks["megatron-vllm"].generation.step_host_s(100) == pytest.approx(2e-3)
    # 2 GB out at 2 GB/s, 1 GB in at 1 GB/s, each copy issued at one launch
    assert p.host_copy_s(2e9, 1, "download") + p.host_copy_s(1e9, 1, "upload") == pytest.approx(2.0 + 2e-6)
    doc = linear_profile_dict()
    doc["stacks"] = {"megatron-vllm": _stack_doc()}
    doc["stacks"]["megatron-vllm"]["generation"]["step"]["fixed_s"] = -1
    with pytest.raises(ConfigError, match="stacks.megatron-vllm.generation.step.fixed_s=-1"):
        profile_from_dict(doc)
    doc["stacks"] = {"executor": _stack_doc()}
    with pytest.raises(ConfigError, match="stacks.executor: not a production stack"):
        profile_from_dict(doc)
    doc["stacks"] = {"fsdp-vllm": _stack_doc()}
    del doc["stacks"]["fsdp-vllm"]["refit"]["cite"]
    with pytest.raises(ConfigError, match="refit needs a 'cite'"):
        profile_from_dict(doc)


def test_engine_allreduce_interpolates_log_log_and_falls_back_beyond_its_curve():
    e = EngineTerms(0.0, 0.0, True, 0.0, 0.0, 8, 64, allreduce=((4, ((1000.0, 1e-5), (4000.0, 4e-5))),))
    assert e.allreduce_s(4, 2000.0) == pytest.approx(2e-5)  # t ∝ size between the two points
    assert e.allreduce_s(4, 10.0) == 1e-5 and e.allreduce_s(4, 5000.0) is None  # held below; NCCL beyond
    assert e.allreduce_s(8, 2000.0) == pytest.approx(2e-5)  # the nearest group measured
    assert e.allreduce_s(1, 2000.0) is None


# ---- which profile prices which stack ---------------------------------------------------------


def test_a_gpu_defaults_to_a_production_stack_and_a_cpu_to_the_executor():
    assert default_stack(load_profile("cpu")) == "executor"
    assert default_stack(load_profile("h100-sxm")) == "megatron-vllm"
    cpu = resolve("cpu")
    assert (cpu.name, cpu.stack, cpu.ops) == ("cpu", "executor", "executor")
    h100 = resolve("h100-sxm")  # the eager executor's figures give way to the profile with the stack's numbers
    assert (h100.name, h100.stack, h100.ops) == ("h100-rl", "megatron-vllm", "fused") and h100.terms is not None
    assert "profile h100-sxm has no numbers for the stack's engine" in op_set(h100)["text"]
    back = resolve("h100-vidur", "executor")  # fused figures do not price the executor's aten ops
    assert (back.name, back.ops) == ("h100-sxm", "executor") and "h100-sxm, of the same device" in back.stack_note
    h20 = resolve("h20")  # a datasheet device without the stack's numbers: kernels, links and host copies
    assert (h20.name, h20.ops, h20.terms) == ("h20", "fused", None)
    assert "no engine, refit or trainer terms" in op_set(h20)["text"]
    with pytest.raises(ConfigError, match="cluster.stack='vllm' is not a stack.*megatron-vllm"):
        for_stack(load_profile("h100-sxm"), "vllm")


def test_a_directly_loaded_profile_prices_as_before_a_stack_is_named():
    p = load_profile("h100-vidur")
    assert p.stack == "" and p.terms is None and op_set(p)["text"].startswith("priced for a fused Megatron/vLLM")


@pytest.mark.parametrize("name,peak,capacity,bandwidth", [("h20", 148e12, 96e9, 4.0e12),
                                                          ("a800", 312e12, 80e9, 2.039e12),
                                                          ("l20", 119.5e12, 48e9, 864e9)])
def test_datasheet_profiles_carry_their_datasheet_figures_and_cite_every_number(name, peak, capacity, bandwidth):
    p = load_profile(name)
    assert (p.peak_flops, p.capacity_bytes, p.mem_bandwidth_Bps, p.source) == (peak, capacity, bandwidth, "datasheet")
    assert p.host_link is not None
    cited = p.provenance()
    for group in ("compute.peak", "memory.capacity", "memory.bandwidth", "links.intra.all_reduce", "host_link"):
        assert cited.get(group), f"{name}: {group} has no citation"


# ---- engine steps by hand ---------------------------------------------------------------------


def _rollout(profile, cap: int = 0, gen=(3, 5, 2)):
    exp = _experiment(gen=8)
    call = exp.workflow["actor_gen"]
    lay = Layout(DeviceMesh(0, 1), 1, 1, 1, 1, max_concurrency=cap)
    return rollout_cost(for_stack(profile, "megatron-vllm"), call, exp.models["actor"], lay, np.array([2, 2, 2]),
                        np.array(gen), 0, 1)


def test_every_engine_step_pays_its_scheduler_and_graph_replay_by_hand():
    """Three requests of 3, 5 and 2 tokens: one prefill of all three, then decode steps at
    batch 3, 2, 1, 1 (4 steps, 7 request-steps); each step costs fixed + per request, each
    decode step one graph replay."""
    fixed, per, graph = 1e-3, 1e-4, 1e-5
    base = _rollout(_profile())
    ro = _rollout(_profile(fixed=fixed, per_request=per, graph=graph))
    expected = (fixed + 3 * per) + 4 * (fixed + graph) + 7 * per
    assert ro.duration_s - base.duration_s == pytest.approx(expected, rel=1e-9)


def test_eager_steps_launch_every_kernel_instead_of_one_graph():
    """tiny-2l-128h, one stage: 12 kernels a block in decode and prefill (norm, qkv, rope,
    attention, KV write, o, add, norm, gate+up, SwiGLU, down, add), the embedding, the final
    norm and head (2), the sampler (3): 30 a step; 4 decode steps and 1 prefill eager."""
    base = _rollout(_profile(graphs=False))
    ro = _rollout(_profile(graphs=False, eager=2e-6))
    assert ro.duration_s - base.duration_s == pytest.approx(5 * 30 * 2e-6, rel=1e-9)


def test_the_engine_caps_running_requests_at_its_max_num_seqs():
    assert _rollout(_profile(max_seqs=2)).peak_running == 2
    assert _rollout(_profile(max_seqs=1024)).peak_running == 3
    assert _rollout(_profile(max_seqs=1024), cap=1).peak_running == 1  # the layout's cap wins


# ---- refit, host copies, packing ------------------------------------------------------------------


def test_a_refit_on_the_trainers_own_placement_copies_and_pays_per_tensor():
    exp = _experiment(batch=4, devices=2)
    prof = for_stack(_profile(per_tensor=1e-3), "megatron-vllm")
    costs = Costs(exp, prof)
    home = Layout(DeviceMesh(0, 2), 2, 1, 1, shard="optimizer")
    gen = Layout(DeviceMesh(0, 2), 2, 1, 1)
    model = PRESETS["tiny-2l-128h"]
    pairs = costs.realloc_pairs("actor", home, gen, "actor_gen")
    assert pairs == {(0, 0): 2 * model.params, (1, 1): 2 * model.params}  # each engine loads its own copy
    assert costs.realloc_pairs("actor", home, gen) == {}  # the executor's reallocation: none
    assert tensor_count(model) == len(param_inventory(model)) == 21
    assert costs.refit_fixed_s("actor", "actor_gen") == pytest.approx(21e-3)


def test_every_engine_device_receives_the_whole_model_from_a_sharded_trainer():
    model = PRESETS["tiny-2l-128h"]
    home = Layout(DeviceMesh(0, 2), 2, 1, 1, shard="full")
    gen = Layout(DeviceMesh(0, 2), 1, 2, 1)  # one engine of tp 2
    pairs = refit_pairs(model, home, gen, 8)
    received = {d: sum(b for (s, r), b in pairs.items() if r == d and s != d) for d in (0, 1)}
    local = {d: pairs[(d, d)] for d in (0, 1)}
    # the half it lacks, gathered (the flat chunks pad to equal halves), then its tp shard loaded
    assert all(model.params <= received[d] <= model.params + 64 for d in (0, 1))
    assert local[0] == local[1] < 2 * model.params
    # an FSDP trainer's float32 master weights: twice the bytes gathered, the same shard loaded
    wide = refit_pairs(model, home, gen, 8, gather_bytes=4)
    for d in (0, 1):
        assert sum(b for (s, r), b in wide.items() if r == d and s != d) == 2 * received[d]
        assert wide[(d, d)] == local[d]


def test_the_fsdp_stack_refit_gathers_float32_master_weights():
    assert priced_stack("fsdp-vllm").refit_bytes == 4 and priced_stack("megatron-vllm").refit_bytes == 0
    exp = _experiment(devices=2)
    home = Layout(DeviceMesh(0, 2), 2, 1, 1, shard="full")
    gen = Layout(DeviceMesh(0, 2), 1, 2, 1)
    moved = {}
    for stack in ("megatron-vllm", "fsdp-vllm"):
        pairs = Costs(exp, for_stack(_profile(), stack)).realloc_pairs("actor", home, gen, "actor_gen")
        moved[stack] = sum(b for (s, r), b in pairs.items() if s != r)
    assert moved["fsdp-vllm"] == 2 * moved["megatron-vllm"] > 0


def test_host_copies_around_a_colocated_engine_by_hand():
    """The engine wakes before generating and sleeps after it; the reference swaps in with the
    policy's weights out and back where they are resident; the trainer's own state moves only
    by its layout's offload (estimator.cost.offload), never here."""
    model = PRESETS["tiny-2l-128h"]
    h2d, d2h = 1e9, 2e9
    prof = for_stack(_profile(host=(h2d, d2h)), "megatron-vllm")
    launch = prof.dispatch_s()
    home = Layout(DeviceMesh(0, 2), 2, 1, 1, shard="optimizer")
    gen = Layout(DeviceMesh(0, 2), 2, 1, 1)
    weights = 2 * model.params  # bf16, replicated over dp 2
    mv = generate_moves(prof, model, gen, shares=True)
    assert mv.before_s == pytest.approx(weights / h2d + launch) and [w for w, _ in mv.parts] == [
        "wake engine weights", "engine sleeps"]
    assert mv.after_s == pytest.approx(weights / d2h + launch) and mv.inside_s == 0.0
    ref = inference_moves(prof, model, gen, False, True, (model, home))
    swap = weights / d2h + weights / h2d + weights / h2d + 3 * launch
    assert ref.inside_s == pytest.approx(swap) and ref.before_s == 0.0
    offloaded = Layout(DeviceMesh(0, 2), 2, 1, 1, shard="optimizer", offload="all")  # policy already on the host
    assert inference_moves(prof, model, gen, False, True, (model, offloaded)).inside_s == pytest.approx(
        weights / h2d + launch)
    assert inference_moves(prof, model, gen, True, True, (model, home)) == inference_moves(
        prof, model, gen, False, False, (model, home)) and not inference_moves(prof, model, gen, True, True, None).parts
    assert generate_moves(prof, model, gen, shares=False).before_s == 0.0  # engine on devices of its own
    assert generate_moves(load_profile("h100-vidur"), model, gen, True).before_s == 0.0  # no stack named


def test_a_colocated_trainer_that_offloads_pays_its_layouts_copies_once():
    """On a colocated production stack the train call's host copies are its layout's offload
    (its upload before and download after, estimator.cost.offload) and nothing else: the
    stack adds no trainer offload of its own, with or without a layout that offloads."""
    from estimator.sim.simulate import simulate

    exp = _experiment(batch=4, devices=2)
    prof = for_stack(_profile(host=(1e8, 2e8)), "fsdp-vllm")
    whole = DeviceMesh(0, 2)

    def plan(offload: str) -> Plan:
        return Plan({"actor_gen": Layout(whole, 2, 1, 1), "actor_inf": Layout(whole, 2, 1, 1),
                     "ref_inf": Layout(whole, 2, 1, 1),
                     "actor_train": Layout(whole, 2, 1, 1, shard="optimizer", offload=offload)})

    costs = Costs(exp, prof)
    kept, moved = plan("none"), plan("all")
    assert costs.shares(kept.layouts) and costs.shares(moved.layouts)
    for p in (kept, moved):
        assert costs.moves("actor_train", p.layouts, True).before_s == 0.0
        assert not {w for w, _ in costs.moves("actor_gen", p.layouts, True).parts} - {"wake engine weights",
                                                                                      "engine sleeps"}
    home = moved["actor_train"]
    oc = costs.offload("actor_train", home, home)
    assert oc.upload_s > 0 and oc.download_s > 0
    for p, expected in ((kept, 0.0), (moved, oc.upload_s + oc.download_s)):
        rows = [r for r in simulate(exp, p, prof, 2).rows if r[3] == 1 and r[4] == "actor_train" and r[2] == 0]
        assert sum(r[1] - r[0] for r in rows if r[5] == "offload") == pytest.approx(expected)
        assert not [r for r in rows if r[5] == "host_copy"]


def test_a_colocated_production_plan_pays_its_host_copies_in_simulator_and_evaluator_alike():
    from estimator.sim.evaluator import Evaluator
    from estimator.sim.simulate import simulate

    exp = _experiment(batch=4, devices=2)
    prof = for_stack(_profile(fixed=1e-4, per_tensor=1e-3), "megatron-vllm")
    whole = DeviceMesh(0, 2)
    plan = Plan({"actor_gen": Layout(whole, 2, 1, 1), "actor_inf": Layout(whole, 2, 1, 1),
                 "ref_inf": Layout(whole, 2, 1, 1), "actor_train": Layout(whole, 2, 1, 1, shard="optimizer")})
    sim = simulate(exp, plan, prof, 3)
    ev = Evaluator(exp, prof, 3).evaluate(plan)
    assert sim.iteration_s == pytest.approx(ev.iteration_s, rel=1e-6)
    ops = {row[5] for row in sim.rows}
    assert {"host_copy", "realloc"} <= ops
    refit = next(r for (it, c), r in sim.records.items() if it == 2 and c == "actor_gen").realloc_s
    assert refit > 21e-3  # the per-tensor cost, the local copies and the host copies before it


def test_packed_micro_batches_count_summed_tokens_and_are_charged_at_their_mean():
    tokens = np.array([5, 3, 9, 2, 2, 2])
    assert budget_micro_batches((0, 6), tokens, 12) == [(0, 2), (2, 3), (3, 6)]  # padded to the longest
    assert budget_micro_batches((0, 6), tokens, 12, packed=True) == [(0, 2), (2, 4), (4, 6)]  # 8, 11, 4
    exp = _experiment(batch=6)
    lay = Layout(DeviceMesh(0, 1), 1, 1, 1, max_tokens_per_micro_batch=12)
    assert micro_batch_shapes(exp.workflow["actor_inf"], lay, tokens, "packed") == [[(2, 4), (2, 6), (2, 2)]]
    assert micro_batch_shapes(exp.workflow["actor_inf"], lay, tokens) == [[(2, 5), (1, 9), (3, 2)]]


def test_dynamic_batching_sorts_rounds_and_pads_each_micro_batch_to_its_longest():
    """NeMo-RL's dynamic batching: a rank's rows sorted by length, each rounded up to 64 tokens,
    cut so that rows × the longest stay within the budget; beside the executor's rows in order,
    padded, and sequence packing."""
    tokens = np.array([100, 40, 250, 20, 20, 70])
    exp = _experiment(batch=6)
    lay = Layout(DeviceMesh(0, 1), 1, 1, 1, max_tokens_per_micro_batch=256)
    call = exp.workflow["actor_inf"]
    # sorted and rounded: 64 64 64 | 128 128 | 256
    assert micro_batch_shapes(call, lay, tokens, "dynamic") == [[(3, 64), (2, 128), (1, 256)]]
    assert micro_batch_shapes(call, lay, tokens, "padded") == [[(2, 100), (1, 250), (3, 70)]]
    assert micro_batch_shapes(call, lay, tokens, "packed") == [[(2, 70), (1, 250), (3, 37)]]


def test_micro_batching_is_the_experiments_or_the_stacks_and_the_executor_only_pads():
    raw = {"algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "rule"},
           "batch_size": 2, "prompt_len": 2, "gen_len": 4, "cluster": {"nodes": 1, "devices_per_node": 1,
                                                                        "device": "cpu"}}
    cpu = load_profile("cpu")
    assert micro_batching(experiment_from_dict(raw), cpu) == "padded"
    gpu = raw | {"cluster": raw["cluster"] | {"device": "h100-rl", "stack": "fsdp-vllm"}}
    h100 = load_profile("h100-rl")
    assert micro_batching(experiment_from_dict(gpu), for_stack(h100, "fsdp-vllm")) == "packed"
    dynamic = gpu | {"cluster": gpu["cluster"] | {"micro_batching": "dynamic"}}
    assert micro_batching(experiment_from_dict(dynamic), for_stack(h100, "fsdp-vllm")) == "dynamic"
    with pytest.raises(ConfigError, match="pads micro-batches in row order"):
        micro_batching(experiment_from_dict(raw | {"cluster": raw["cluster"] | {"micro_batching": "dynamic"}}), cpu)
    with pytest.raises(ConfigError, match="micro_batching='sorted' must be one of packed, dynamic, padded"):
        experiment_from_dict(raw | {"cluster": raw["cluster"] | {"micro_batching": "sorted"}})


# ---- every output names the stack -----------------------------------------------------------------


def test_predict_search_baselines_and_describe_name_the_stack(capsys):
    from estimator.describe import main as describe
    from estimator.predict import main as predict
    from search.baselines import main as baselines

    exp = str(EXAMPLES / "grpo-llama3-8b-8xh100.yaml")
    assert predict([exp, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["stack"], out["profile"], out["op_set"]["stack_name"]) == ("megatron-vllm", "h100-rl", "megatron-vllm")
    assert predict([exp, "--stack", "executor", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["stack"], out["profile"], out["op_set"]["ops"]) == ("executor", "h100-sxm", "executor")
    assert predict([str(EXAMPLES / "grpo-tiny-2xcpu.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stack"] == "executor"
    assert predict([exp]) == 0
    assert "priced for megatron-vllm (Megatron-Core training with vLLM generation) on profile h100-rl" in \
        capsys.readouterr().out.splitlines()[1]
    assert describe([exp]) == 0
    assert "stack: priced for megatron-vllm" in capsys.readouterr().out
    assert baselines([exp, "--name", "nemo-rl-default", "--stack", "fsdp-vllm", "--json"]) in (0, 1)
    assert json.loads(capsys.readouterr().out)["stack"] == "fsdp-vllm"


def test_an_unknown_stack_in_an_experiment_exits_2_naming_the_key(tmp_path, capsys):
    from estimator.predict import main as predict

    text = (EXAMPLES / "grpo-llama3-8b-8xh100.yaml").read_text().replace(
        "stack: megatron-vllm}", "stack: megatron-vlm}")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert predict([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cluster.stack='megatron-vlm' is not a stack (did you mean 'megatron-vllm'?)" in err[0]


def test_a_stack_in_the_experiment_is_what_it_is_priced_on(tmp_path):
    raw = {"algorithm": "sft", "models": {"actor": "tiny-2l-128h"}, "batch_size": 4, "prompt_len": 8,
           "gen_len": 8, "cluster": {"nodes": 1, "devices_per_node": 2, "device": "h100-sxm", "stack": "executor"}}
    exp = experiment_from_dict(copy.deepcopy(raw))
    assert exp.stack == "executor" and resolve(exp.cluster.device, exp.stack).name == "h100-sxm"
    raw["cluster"]["stack"] = "fsdp-vllm"
    assert resolve("h100-sxm", experiment_from_dict(raw).stack).stack == "fsdp-vllm"


def test_a_colocated_production_stack_keeps_the_reference_in_host_memory_between_its_calls():
    """NeMo-RL keeps the reference's weights on the CPU and swaps them in for its log-probs: on a
    production stack whose engine shares the trainer's devices the reference holds device
    memory only during ref_inf (the evaluator agrees); with the engine on devices of its own,
    or on the executor's stack, it stays resident."""
    from estimator.cost.memory import plan_memory, swapped_roles
    from estimator.sim.evaluator import Evaluator

    def experiment(ref: str):
        return experiment_from_dict({
            "algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": ref, "reward": "rule"},
            "batch_size": 4, "group_size": 1, "prompt_len": 2, "gen_len": 8, "old_logprobs": "recompute",
            "cluster": {"nodes": 1, "devices_per_node": 4, "device": "cpu"}})

    whole, half, rest = DeviceMesh(0, 4), DeviceMesh(0, 2), DeviceMesh(2, 2)
    shared = Plan({"actor_gen": Layout(whole, 4, 1, 1), "actor_inf": Layout(whole, 4, 1, 1),
                   "ref_inf": Layout(whole, 4, 1, 1),
                   "actor_train": Layout(whole, 4, 1, 1, shard="optimizer", offload="all")})
    apart = Plan({"actor_gen": Layout(rest, 2, 1, 1), "actor_inf": Layout(half, 2, 1, 1),
                  "ref_inf": Layout(half, 2, 1, 1), "actor_train": Layout(half, 2, 1, 1, shard="optimizer")})
    exp = experiment("tiny-2l-128h")
    assert swapped_roles(exp, shared, "megatron-vllm") == {"ref"}
    assert swapped_roles(exp, apart, "megatron-vllm") == swapped_roles(exp, shared, None) == frozenset()
    # a small reference: training stays every device's largest call, which no longer has the
    # reference's weights beside it
    ref = 2 * PRESETS["tiny-2l-128h"].params  # bf16, replicated over dp
    host, resident = plan_memory(exp, shared, 1e12, "megatron-vllm"), plan_memory(exp, shared, 1e12, None)
    for swapped, kept in zip(host.devices, resident.devices):
        assert swapped.during == kept.during == "actor_train"
        assert swapped.peak_bytes == pytest.approx(kept.peak_bytes - ref)
    # a large one: its own call is the peak, its weights back on the devices for it
    big = experiment("tiny-4l-256h")
    host, resident = plan_memory(big, shared, 1e12, "megatron-vllm"), plan_memory(big, shared, 1e12, None)
    for swapped, kept in zip(host.devices, resident.devices):
        assert swapped.during == "ref_inf" and swapped.parts["weights"] == 2 * PRESETS["tiny-4l-256h"].params
        assert swapped.peak_bytes < kept.peak_bytes  # the trainer's state is not beside it
    assert plan_memory(exp, apart, 1e12, "megatron-vllm").peak.peak_bytes == \
        pytest.approx(plan_memory(exp, apart, 1e12, None).peak.peak_bytes)
    for e in (exp, big):
        prof = for_stack(_profile(), "megatron-vllm")
        for plan in (shared, apart):
            fast = Evaluator(e, prof, costs=Costs(e, prof)).evaluate(plan)
            assert fast.peak_memory_bytes == pytest.approx(
                plan_memory(e, plan, prof.capacity_bytes, prof.stack).peak.peak_bytes)
