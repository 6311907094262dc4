"""The runtime: any valid plan computes the same update (plan invariance, float64), the measured
timeline, home layouts, and failures that stop the run instead of hanging it."""

from __future__ import annotations

import dataclasses
import gc
import json
import multiprocessing
import time
import weakref
from pathlib import Path

import pytest
import torch

from estimator.spec.batching import kv_need, schedule
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.lengths import LOGNORMAL, Lengths
from estimator.spec.models import PRESETS
from estimator.spec.plan import Layout, Plan, check, standing_copies
from estimator.spec.schedule import BACKWARD, FORWARD, schedule_1f1b
from estimator.spec.sharding import budget_micro_batches, dp_rows, shard
from executor.dataflow import Mailbox, message_schedule, send_order
from executor.launch import WorkerFailed, launch
from executor.runtime import RunOptions, RunResult, home_layouts, initial_params, merge, role_seed, run_rank
from tests.conftest import EXAMPLES, tiny_experiment

PLANS = EXAMPLES / "plans"
TOL = 1e-9


def _run_many(rank: int, world: int, status, runs: list[tuple[Experiment, Plan]], options: RunOptions):
    return [run_rank(rank, world, status, exp, plan, options) for exp, plan in runs]


def run_many(runs: list[tuple[Experiment, Plan]], iterations: int = 1) -> list[RunResult]:
    """Run every (experiment, plan) in one set of processes (one start-up for all)."""
    options = RunOptions(iterations=iterations, dtype="float64", return_params=True)
    for exp, plan in runs:
        check(plan, exp)
    world = runs[0][0].cluster.num_devices
    per_rank = launch(world, _run_many, (runs, options), timeout_s=120)
    return [merge([r[i] for r in per_rank], exp, plan, options) for i, (exp, plan) in enumerate(runs)]


def run_all(experiment: Experiment, plans: list[Plan], iterations: int = 1) -> list[RunResult]:
    return run_many([(experiment, plan) for plan in plans], iterations)


def _initial(experiment: Experiment, role: str) -> dict[str, torch.Tensor]:
    from executor.model import init_params

    return init_params(experiment.models[role], role_seed(experiment.seed, role), torch.float64)


def assert_invariant(experiment: Experiment, names: list[str], results: list[RunResult], roles: tuple[str, ...]):
    base = results[names.index("single-device")]
    for role in roles:
        init = _initial(experiment, role)
        moved = max((base.params[role][n] - init[n]).abs().max().item() for n in init)
        assert moved > 1e-8, f"{role} did not train"
    assert base.losses, "no train losses recorded"
    for name, res in zip(names, results):
        for role in roles:
            for pname, ref in base.params[role].items():
                diff = (res.params[role][pname] - ref).abs().max().item()
                assert diff < TOL, f"plan {name}: {role} {pname} differs by {diff:.3g}"
        assert res.losses.keys() == base.losses.keys(), name
        for key, loss in base.losses.items():
            assert abs(res.losses[key] - loss) < TOL, f"plan {name}: loss {key} {res.losses[key]} != {loss}"


def _example_plans(directory: str) -> tuple[list[str], list[Plan]]:
    files = sorted((PLANS / directory).glob("*.json"))
    return [f.stem for f in files], [Plan.load(str(f)) for f in files]


@pytest.fixture(scope="module")
def ppo_runs() -> tuple[Experiment, dict[str, RunResult]]:
    """One PPO iteration under every example plan, all in one set of processes."""
    exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    names, plans = _example_plans("ppo-tiny-2xcpu")
    return exp, dict(zip(names, run_all(exp, plans)))


def test_ppo_update_is_the_same_under_every_example_plan(ppo_runs):
    exp, runs = ppo_runs
    assert len(runs) >= 7 and "single-device" in runs
    assert_invariant(exp, list(runs), list(runs.values()), ("actor", "critic"))


def test_single_device_plan_matches_the_plain_torch_loop(ppo_runs):
    """An oracle outside the executor: the textbook single-process PPO loop."""
    from executor.reference import run_ppo

    exp, runs = ppo_runs
    expect = run_ppo(exp, iterations=1, dtype=torch.float64)
    for role in ("actor", "critic"):
        for name, t in expect[role].items():
            diff = (runs["single-device"].params[role][name] - t.detach()).abs().max().item()
            assert diff < TOL, f"{role} {name} differs from the reference by {diff:.3g}"


def test_grpo_update_is_the_same_under_every_example_plan():
    exp = load_experiment(EXAMPLES / "grpo-tiny-2xcpu.yaml")
    names, plans = _example_plans("grpo-tiny-2xcpu")
    assert len(names) >= 4
    assert_invariant(exp, names, run_all(exp, plans), ("actor",))


def test_dpo_update_is_the_same_under_every_example_plan():
    exp = load_experiment(EXAMPLES / "dpo-tiny-2xcpu.yaml")
    names, plans = _example_plans("dpo-tiny-2xcpu")
    assert len(names) >= 4
    assert_invariant(exp, names, run_all(exp, plans), ("actor",))


def _recomputing(plan: Plan, experiment: Experiment) -> Plan:
    """``plan`` with every train call recomputing its activations."""
    wf = experiment.workflow
    return Plan({c: dataclasses.replace(lay, recompute="full") if wf[c].kind == "train" else lay
                 for c, lay in plan.layouts.items()})


def test_activation_recompute_computes_the_same_update(ppo_runs):
    """Checkpointed blocks (tensor-parallel hooks re-run, pipeline stages re-entered) change
    memory and time, never the update: tp2, pp2 and dp2 with recompute match the single-device
    run without it."""
    exp, runs = ppo_runs
    names = ["tp2", "pp2", "dp2"]
    plans = [_recomputing(Plan.load(str(PLANS / "ppo-tiny-2xcpu" / f"{n}.json")), exp) for n in names]
    assert all(p["actor_train"].recompute == "full" and p["actor_gen"].recompute == "none" for p in plans)
    results = run_all(exp, plans)
    assert_invariant(exp, ["single-device", *names], [runs["single-device"], *results], ("actor", "critic"))


def _sharded(plan: Plan, experiment: Experiment, shard: str, recompute: str = "none") -> Plan:
    """``plan`` with every train call over more than one replica sharding its data parallelism."""
    wf = experiment.workflow
    return Plan({c: dataclasses.replace(lay, shard=shard, recompute=recompute)
                 if wf[c].kind == "train" and lay.dp > 1 else lay for c, lay in plan.layouts.items()})


def test_sharded_data_parallelism_computes_the_same_update(ppo_runs):
    """Under dp 2, ``shard="optimizer"`` (reduce-scatter, Adam on a chunk, all-gather) and
    ``shard="full"`` (chunks at home, every group gathered in forward and again in backward,
    reduce-scattered per micro-batch; the other calls gather the home before they reallocate),
    with and without activation recompute, with micro-batches and reallocation to tp and pp
    layouts, match the single-device run."""
    exp, runs = ppo_runs
    dp2 = Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "dp2.json"))
    mixed = Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "mixed-micro-batches.json"))
    gen_vs_train = Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "gen-vs-train.json"))
    plans = {"dp2-optimizer": _sharded(dp2, exp, "optimizer"), "dp2-full": _sharded(dp2, exp, "full"),
             "dp2-full-recompute": _sharded(dp2, exp, "full", "full"),
             "mixed-full": _sharded(mixed, exp, "full"), "gen-vs-train-full": _sharded(gen_vs_train, exp, "full")}
    critic = plans["mixed-full"]["critic_train"]
    assert critic.shard == "full" and critic.micro_batches == 2
    assert plans["gen-vs-train-full"]["actor_train"].shard == "full"
    results = run_all(exp, list(plans.values()))
    assert_invariant(exp, ["single-device", *plans], [runs["single-device"], *results], ("actor", "critic"))
    ops = {s.op for s in results[0].timeline.spans if s.call == "actor_train"}
    assert {"dp_reduce_scatter", "dp_allgather"} <= ops and "dp_allreduce" not in ops
    full_ops = {s.op for s in results[1].timeline.spans if s.call == "actor_train"}
    assert not {"dp_reduce_scatter", "dp_allgather", "dp_allreduce"} & full_ops
    realloc = {s.call for s in results[1].timeline.spans if s.op == "realloc"}
    assert realloc == {"actor_gen", "critic_inf"}  # the calls reading a sharded home gather it


def _offloaded(plan: Plan, experiment: Experiment, offload: str, shard: str | None = None) -> Plan:
    """``plan`` with every train call offloading ``offload`` (and sharding ``shard`` where it has replicas)."""
    wf = experiment.workflow
    out = {}
    for c, lay in plan.layouts.items():
        if wf[c].kind == "train":
            lay = dataclasses.replace(lay, offload=offload)
            if shard is not None and lay.dp > 1:
                lay = dataclasses.replace(lay, shard=shard)
        out[c] = lay
    return Plan(out)


def test_offload_computes_the_same_update_over_two_iterations():
    """Under dp 2 (gloo), a home that keeps its Adam state — and under ``all`` its parameters —
    in a host buffer between calls computes the single-device update over two iterations (the
    moments leave after the first train call and come back for the second): replicated, ZeRO-1
    and fully sharded homes, read at home and through reallocations (tp and pp layouts) that
    upload the weights on the home's devices first."""
    exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    single = Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "single-device.json"))
    dp2 = Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "dp2.json"))
    gen_vs_train = Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "gen-vs-train.json"))
    plans = {"dp2-optimizer": _offloaded(dp2, exp, "optimizer"), "dp2-all": _offloaded(dp2, exp, "all"),
             "dp2-zero1-optimizer": _offloaded(dp2, exp, "optimizer", "optimizer"),
             "dp2-full-all": _offloaded(dp2, exp, "all", "full"),
             "gen-vs-train-all": _offloaded(gen_vs_train, exp, "all")}
    assert not gen_vs_train["actor_gen"].same_placement(gen_vs_train["actor_train"])
    results = run_all(exp, [single, *plans.values()], iterations=2)
    assert_invariant(exp, ["single-device", *plans], results, ("actor", "critic"))
    for name, res in zip(plans, results[1:]):
        offload = {(s.call, s.iteration) for s in res.timeline.spans if s.op == "offload"}
        assert {("actor_train", 0), ("actor_train", 1), ("critic_train", 1)} <= offload, name
        # under all the generation reads the actor's weights: uploaded at home or on the home's devices
        assert (("actor_gen", 1) in offload) == name.endswith("-all"), name


def test_the_host_buffer_frees_the_device_copy_and_brings_back_the_same_values():
    from executor.offload import Offloader, optimizer_tensors
    from executor.optim import ShardAdam

    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True),
              "b": torch.randn(3, dtype=torch.bfloat16, requires_grad=True)}
    opt = ShardAdam(params, lr=1e-2)
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()
    state = optimizer_tensors(opt)
    assert len(state) == 3 * len(params)  # bf16: float32 master weights and the two moments
    off = Offloader("all", params, opt)
    before = [t.clone() for t in off.state()]
    moved = off.download(off.state())
    assert moved == sum(t.numel() * t.element_size() for t in before)
    assert all(t.numel() == 0 for t in off.state()) and not any(off.resident(t) for t in state)
    off.upload(off.weights())  # another call of the role reads the weights, the state stays away
    assert params["w"].shape == (4, 3) and all(t.numel() == 0 for t in state)
    off.drop(off.weights())
    off.upload(off.state())
    assert all(torch.equal(a, b) for a, b in zip(off.state(), before))
    with pytest.raises(RuntimeError, match="without a host copy"):
        Offloader("all", {"x": torch.zeros(2)}, None).drop([torch.zeros(2)])


def _layout(mesh: str, dp: int = 1, tp: int = 1, pp: int = 1, mb: int = 1) -> Layout:
    return Layout(DeviceMesh.parse(mesh), dp, tp, pp, mb)


def test_an_uneven_split_of_three_processes_trains_the_same():
    """Meshes no aligned rule admits, on a node of three: generation on device 0 alone, the
    other calls on the runs 0-1 and 1-2 with data, tensor and pipeline parallelism, parameters
    reallocated between them — one process per device builds its groups from
    ``Layout.device`` and takes the single device's step."""
    exp = tiny_experiment("ppo", devices_per_node=3, batch_size=4, minibatches=2)
    uneven = Plan({"actor_gen": _layout("0"), "ref_inf": _layout("1-2", dp=2), "reward_inf": _layout("1-2", pp=2, mb=2),
                   "critic_inf": _layout("0-1", tp=2), "actor_train": _layout("1-2", dp=2),
                   "critic_train": _layout("0-1", pp=2, mb=2)})
    assert not any(exp.cluster.aligned(lay.mesh) for lay in uneven.layouts.values() if lay.mesh.size == 2)
    single = Plan({c: _layout("0") for c in exp.workflow.call_names})
    results = run_many([(exp, single), (exp, uneven)])
    assert_invariant(exp, ["single-device", "uneven"], results, ("actor", "critic"))


def test_remax_sft_and_rw_train_the_same_under_two_plans(tmp_path):
    examples = tmp_path / "sft.jsonl"  # sft reads a prompts file: the JSONL path end to end
    examples.write_text("\n".join(json.dumps(list(range(i, i + 20 + i))) for i in range(5)) + "\n")
    runs, roles = [], []
    for algorithm, role in (("remax", "actor"), ("sft", "actor"), ("rw", "reward")):
        exp = tiny_experiment(algorithm, devices_per_node=2, batch_size=4, minibatches=2)
        if algorithm == "sft":
            exp = dataclasses.replace(exp, prompts_path=str(examples))
        calls = exp.workflow.call_names
        single = Plan({c: _layout("0") for c in calls})
        # calls sharded differently: reallocation between layouts, tp, pp and dp in one plan
        shapes = [dict(pp=2, mb=2), dict(tp=2), dict(dp=2)]
        mixed = Plan({c: _layout("0-1", **shapes[i % 3]) for i, c in enumerate(calls)})
        runs += [(exp, single), (exp, mixed)]
        roles.append(role)
    results = run_many(runs)
    for i, role in enumerate(roles):
        exp = runs[2 * i][0]
        assert_invariant(exp, ["single-device", "mixed"], results[2 * i:2 * i + 2], (role,))


def test_runs_start_from_hugging_face_checkpoints(tmp_path):
    """Roles whose model entry is a checkpoint's config.json start from its weights, each rank
    reading only its slices; a critic started from a language model gets a seeded value head."""
    from executor import model as M
    from executor.hf import save_hf
    from executor.reference import run_ppo

    spec = PRESETS["tiny-2l-128h"]
    lm, rm = M.init_params(spec, 11, torch.float64), M.init_params(spec.as_value_model(), 12, torch.float64)
    save_hf(tmp_path / "sft", spec, lm)
    save_hf(tmp_path / "rm", spec.as_value_model(), rm)
    (tmp_path / "bare").mkdir()  # a config without weights: estimator-only, seeded in the executor
    (tmp_path / "bare" / "config.json").write_text((tmp_path / "sft" / "config.json").read_text())
    yaml = (EXAMPLES / "ppo-tiny-2xcpu.yaml").read_text().replace(
        "models: {actor: tiny-2l-128h, critic: tiny-2l-128h, ref: tiny-2l-128h, reward: tiny-2l-128h}",
        "models: {actor: sft/config.json, critic: ./sft, ref: bare/config.json, reward: rm/config.json}")
    (tmp_path / "exp.yaml").write_text(yaml)
    exp = load_experiment(tmp_path / "exp.yaml")
    assert exp.checkpoints == {"actor": str(tmp_path / "sft"), "critic": str(tmp_path / "sft"),
                               "reward": str(tmp_path / "rm")}

    layout = _layout("0-1", tp=2)
    for role, expect in (("actor", lm), ("reward", rm), ("critic", lm)):
        boxes = shard(exp.models[role], layout, 1)
        got = initial_params(exp, role, boxes, torch.float64)
        assert list(got) == list(boxes)
        for name, box in boxes.items():
            if role == "critic" and name == "value_head.weight":
                want = M.init_param(name, (1, spec.hidden), role_seed(exp.seed, "critic"), torch.float64)
            else:
                want = expect[name]
            assert torch.equal(got[name], want[M.box_index(box)]), (role, name)
    boxes = shard(exp.models["ref"], layout, 1)
    seeded = initial_params(exp, "ref", boxes, torch.float64)
    assert all(torch.equal(seeded[n], t) for n, t in
               M.init_boxes(exp.models["ref"], boxes, role_seed(exp.seed, "ref"), torch.float64).items())

    plans = [Plan.load(str(PLANS / "ppo-tiny-2xcpu" / f"{n}.json")) for n in ("single-device", "tp2", "pp2")]
    results = run_all(exp, plans)
    assert_invariant(exp, ["single-device", "tp2", "pp2"], results, ("actor", "critic"))
    expect = run_ppo(exp, iterations=1, dtype=torch.float64)  # full checkpoints, one process
    for role in ("actor", "critic"):
        for name, t in expect[role].items():
            assert (results[0].params[role][name] - t.detach()).abs().max().item() < TOL, (role, name)


def test_timeline_spans_and_concurrency(ppo_runs):
    res = ppo_runs[1]["disjoint"]
    tl = res.timeline
    assert tl.source == "measured" and tl.iterations == [0]
    assert {s.op for s in tl.spans} >= {"call", "compute", "data"}
    assert {s.device for s in tl.spans if s.call == "critic_train"} == {1}
    # actor and critic train on disjoint devices at the same time
    compute = {(s.iteration, s.call): (s.start_s, s.end_s) for s in tl.spans if s.op == "compute"}
    a, c = compute[(0, "actor_train")], compute[(0, "critic_train")]
    assert a[0] < c[1] and c[0] < a[1], f"actor_train {a} and critic_train {c} do not overlap"
    assert len(res.iterations_s) == 1 and res.iteration_s > 0
    stats = res.call_stats()
    assert set(stats) == set(ppo_runs[0].workflow.call_names)
    assert all(st["span_s"] >= st["duration_s"] > 0 for st in stats.values())


def test_micro_batch_spans_follow_the_plan(ppo_runs):
    """Per micro-batch and stage: forwards and backwards of every micro-batch of every PPO
    minibatch (1F1B order on each stage), prefill and decode steps, all inside the compute."""
    exp, runs = ppo_runs
    plan = Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "mixed-micro-batches.json"))
    spans = runs["mixed-micro-batches"].timeline.spans
    minibatches, gen_len = exp.params.ppo_minibatches, exp.params.gen_len
    compute = {(s.call, s.device): (s.start_s, s.end_s) for s in spans if s.op == "compute"}
    for s in spans:
        if s.op in ("forward", "backward", "prefill", "decode", "dp_allreduce"):
            lo, hi = compute[(s.call, s.device)]
            assert lo <= s.start_s <= s.end_s <= hi, s

    def ops(call: str, device: int) -> list[tuple[str, int]]:
        return [(s.op, s.micro_batch) for s in sorted(spans, key=lambda s: s.start_s)
                if s.call == call and s.device == device and s.op in ("forward", "backward", "dp_allreduce")]

    m = plan["actor_train"].micro_batches  # pp=2: stage 0 on device 0, stage 1 on device 1
    for device, stage in ((0, 0), (1, 1)):
        names = {FORWARD: "forward", BACKWARD: "backward"}
        assert ops("actor_train", device) == [(names[o], j) for o, j in schedule_1f1b(2, stage, m)] * minibatches
        assert {s.stage for s in spans if s.call == "actor_train" and s.device == device and s.op == "forward"} \
            == {stage}
    m = plan["critic_train"].micro_batches  # dp=2: m micro-batches per replica, gradients reduced per minibatch
    one = [("forward", j) for j in range(m)] + [("backward", j) for j in range(m)]
    for device in (0, 1):
        got = ops("critic_train", device)
        assert [o for o in got if o[0] == "dp_allreduce"] == [("dp_allreduce", -1)] * minibatches
        assert sorted(o for o in got if o[0] != "dp_allreduce") == sorted(one * minibatches)
    m = plan["actor_gen"].micro_batches
    gen = [(s.op, s.micro_batch) for s in spans if s.call == "actor_gen" and s.op in ("prefill", "decode")]
    assert sorted(gen) == sorted([("prefill", j) for j in range(m)] + [("decode", j) for j in range(m)] * (gen_len - 1))
    fwd = {s.micro_batch for s in spans if s.call == "ref_inf" and s.op == "forward"}
    assert fwd == set(range(plan["ref_inf"].micro_batches))  # dp=2: micro-batches of each replica


def test_realloc_spans_appear_when_a_call_leaves_home(ppo_runs):
    res = ppo_runs[1]["gen-vs-train"]
    realloc = {s.call for s in res.timeline.spans if s.op == "realloc"}
    assert realloc == {"actor_gen", "critic_inf"}


def test_home_layouts_are_train_layouts_else_first_calls():
    exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    plan = Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "gen-vs-train.json"))
    homes = home_layouts(exp, plan)
    assert homes == {"actor": plan["actor_train"], "critic": plan["critic_train"],
                     "ref": plan["ref_inf"], "reward": plan["reward_inf"]}


def test_message_schedule_skips_local_rows_and_orders_by_producer():
    exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    single = message_schedule(exp, Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "single-device.json")))
    assert single == []
    msgs = message_schedule(exp, Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "disjoint.json")))
    order = exp.workflow.topological_order()
    assert [order.index(m.producer) for m in msgs] == sorted(order.index(m.producer) for m in msgs)
    assert {(m.src, m.dst) for m in msgs} == {(0, 1), (1, 0)}
    assert all(m.num_rows == 8 for m in msgs)


def test_a_mailbox_is_freed_without_the_cycle_collector():
    """A reference cycle would keep the data group alive past destroy_process_group; gloo then
    aborts the process at interpreter exit (seen under torchrun)."""
    exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    msgs = message_schedule(exp, Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "disjoint.json")))
    gc.disable()
    try:
        box = Mailbox(1, msgs, send_order(exp.workflow, exp.workflow.program(2)), {}, None, torch.device("cpu"))
        assert box.expected  # device 1 expects messages from device 0
        ref = weakref.ref(box)
        del box
        assert ref() is None
    finally:
        gc.enable()


def test_role_seeds_tie_ref_to_actor_and_critic_to_reward():
    assert role_seed(3, "ref") == role_seed(3, "actor")
    assert role_seed(3, "critic") == role_seed(3, "reward")
    assert role_seed(3, "actor") != role_seed(3, "reward") != role_seed(4, "reward")


def _raise_on_rank_one(rank: int, world: int, status) -> int:
    status("call boom (iteration 0)")
    if rank == 1:
        raise RuntimeError("planned failure")
    time.sleep(600)  # a peer that would wait forever
    return rank


def test_a_raising_worker_stops_the_run_naming_rank_and_call():
    start = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        launch(2, _raise_on_rank_one)
    assert time.monotonic() - start < 60
    exc = info.value
    assert exc.rank == 1 and "call boom" in exc.where and "planned failure" in exc.reason
    assert "RuntimeError" in exc.details
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_worker_that_dies_mid_call_stops_the_run(staleness):
    """Rank 1 dies in its first update. Under staleness 1 on the split plan rank 0 generates
    ahead, then waits for it in the push of that update: the run ends all the same."""
    if staleness:
        exp = load_experiment(EXAMPLES / "grpo-tiny-2xcpu.yaml").with_staleness(staleness)
        plan = check(_split(exp.workflow.call_names), exp)
    else:
        exp = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
        plan = Plan.load(str(PLANS / "ppo-tiny-2xcpu" / "dp2.json"))
    options = RunOptions(iterations=3, fault=(1, "actor_train"))
    start = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        launch(2, run_rank, (exp, plan, options), timeout_s=120)
    assert time.monotonic() - start < 60
    assert info.value.rank == 1 and "actor_train" in info.value.where
    assert "exited with code 13" in info.value.reason
    assert multiprocessing.active_children() == []


def test_example_plans_are_valid():
    for exp_file in ("ppo-tiny-2xcpu", "grpo-tiny-2xcpu", "dpo-tiny-2xcpu"):
        exp = load_experiment(EXAMPLES / f"{exp_file}.yaml")
        for f in Path(PLANS / exp_file).glob("*.json"):
            check(Plan.load(str(f)), exp)


def test_shard_adam_is_adam_and_keeps_float32_master_weights_for_16_bit():
    from executor.optim import ShardAdam

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
    mine, ref = {"w": w.clone().requires_grad_()}, w.clone().requires_grad_()
    opt, torch_opt = ShardAdam(mine, lr=0.1), torch.optim.Adam([ref], lr=0.1)
    for _ in range(3):
        mine["w"].grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
        opt.zero_grad()
    assert torch.equal(mine["w"], ref) and mine["w"].grad is None

    low = {"w": w.to(torch.bfloat16).requires_grad_()}
    opt = ShardAdam(low, lr=1e-4)  # far below bf16's resolution near 1: only the master moves
    low["w"].grad = grad.to(torch.bfloat16)
    opt.step()
    assert opt.master[0].dtype == torch.float32
    assert not torch.equal(opt.master[0], w.to(torch.bfloat16).float())
    assert torch.equal(low["w"], opt.master[0].to(torch.bfloat16))


def test_gpt_style_models_train_the_same_under_tp_pp_dp_and_reallocation():
    """GPT-2 style (LayerNorm, GELU, learned positions on the first stage, biases — row-parallel
    ones added once after the all-reduce —, tied head) and GPT-NeoX style (parallel residual,
    partial rotary): one PPO iteration under a single device and under a plan that gives each
    call its own tp / pp / dp layout (so parameters are reallocated), against the textbook loop."""
    from estimator.spec.workflow import VALUE_ROLES
    from executor.reference import run_ppo

    runs = []
    for name in ("tiny-gpt-2l-128h", "tiny-neox-2l-128h"):
        model = PRESETS[name]
        base = tiny_experiment("ppo", devices_per_node=2, batch_size=4, minibatches=2)
        exp = dataclasses.replace(base, models={r: model.as_value_model() if r in VALUE_ROLES else model
                                                for r in base.models})
        calls = exp.workflow.call_names
        shapes = [dict(pp=2, mb=2), dict(tp=2), dict(dp=2)]
        mixed = Plan({c: _layout("0-1", **shapes[i % 3]) for i, c in enumerate(calls)})
        runs += [(exp, Plan({c: _layout("0") for c in calls})), (exp, mixed)]
    results = run_many(runs)
    for i in range(0, len(runs), 2):
        exp = runs[i][0]
        assert_invariant(exp, ["single-device", "mixed"], results[i:i + 2], ("actor", "critic"))
        expect = run_ppo(exp, iterations=1, dtype=torch.float64)
        for role in ("actor", "critic"):
            for pname, t in expect[role].items():
                diff = (results[i].params[role][pname] - t.detach()).abs().max().item()
                assert diff < TOL, f"{exp.models[role].name} {role} {pname} differs from the reference by {diff:.3g}"


def test_grpo_with_a_verifier_and_recomputed_old_logprobs_trains_the_same_under_every_plan():
    """``reward: rule`` (rewards written by actor_gen on its last stage) and ``old_logprobs:
    recompute`` (an actor_inf call on a layout of its own): one device, and a plan with
    data-parallel generation and training, a tensor-parallel actor_inf that reallocates the
    actor's weights and a pipelined reference take the same step — and so does the run whose
    generate call writes the old log-probs itself, the same quantity."""
    from estimator.spec.experiment import experiment_from_dict

    raw = {"algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "rule"},
           "batch_size": 4, "group_size": 4, "prompt_len": 8, "gen_len": 24, "ppo_minibatches": 2, "seed": 3,
           "hyperparams": {"lr": 1e-3, "temperature": 0.7},
           "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"}}
    recomputed = experiment_from_dict({**raw, "old_logprobs": "recompute"})
    written = experiment_from_dict(raw)
    assert "actor_inf" in recomputed.workflow and "reward_inf" not in recomputed.workflow
    single = Plan({c: _layout("0") for c in recomputed.workflow.call_names})
    mixed = Plan({"actor_gen": _layout("0-1", dp=2), "actor_inf": _layout("0-1", tp=2),
                  "ref_inf": _layout("0-1", pp=2, mb=2), "actor_train": _layout("0-1", dp=2, mb=2)})
    results = run_many([(recomputed, single), (recomputed, mixed),
                        (written, Plan({c: _layout("0") for c in written.workflow.call_names}))], iterations=2)
    assert_invariant(recomputed, ["single-device", "mixed", "from-generation"], results, ("actor",))
    reward_spans = {(s.device, s.iteration) for s in results[1].timeline.spans if s.op == "reward"}
    assert reward_spans == {(d, i) for d in (0, 1) for i in (0, 1)}  # every replica scores its own rows


def test_ppo_and_remax_with_a_verifier_and_recomputed_old_logprobs_train_the_same_under_two_plans():
    """The other two generating workflows: ReMax's greedy call writes ``rewards_greedy`` by the
    rule too, PPO's critic trains on the rule's rewards; every call sharded differently from
    the single-device plan."""
    from estimator.spec.experiment import experiment_from_dict

    runs, roles = [], []
    for algorithm, trained in (("ppo", ("actor", "critic")), ("remax", ("actor",))):
        models = {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "rule"}
        if algorithm == "ppo":
            models["critic"] = "tiny-2l-128h"
        exp = experiment_from_dict({
            "algorithm": algorithm, "models": models, "batch_size": 8, "prompt_len": 8, "gen_len": 24,
            "ppo_minibatches": 2, "seed": 3, "old_logprobs": "recompute", "hyperparams": {"lr": 1e-3},
            "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"}})
        calls = exp.workflow.call_names
        assert "actor_inf" in calls and not any(c.startswith("reward_inf") for c in calls)
        single = Plan({c: _layout("0") for c in calls})
        shapes = [dict(dp=2), dict(tp=2), dict(pp=2, mb=2)]
        mixed = Plan({c: _layout("0-1", **shapes[i % 3]) for i, c in enumerate(calls)})
        runs += [(exp, single), (exp, mixed)]
        roles.append(trained)
    results = run_many(runs)
    for i, trained in enumerate(roles):
        assert_invariant(runs[2 * i][0], ["single-device", "mixed"], results[2 * i:2 * i + 2], trained)


def test_long_tail_grpo_trains_the_same_under_continuous_batching_and_token_budgets():
    """GRPO with groups and long-tailed response lengths (``gen_len: {max: 16, mean: …}``) and
    prompts of drawn length: a single device, then plans generating under dp, a pipeline and tp
    with a concurrency cap, a small KV pool (preemptions) and token-budget micro-batches, all
    take the same steps; so does PPO (masked GAE and critic) under a mixed plan."""
    from tests.test_serving import long_tail

    base = tiny_experiment("grpo", devices_per_node=2, batch_size=4, minibatches=2, group_size=2)
    exp = long_tail(base, cap=16, mu=1.6, sigma=1.0, prompt=Lengths(16, LOGNORMAL, mu=2.2, sigma=0.4))
    _, gen = exp.lengths(0)
    assert exp.params.gen_lengths.mean() < 8 and len(set(gen.tolist())) > 3
    single = Plan({c: _layout("0") for c in exp.workflow.call_names})
    lay = dataclasses.replace
    mixed = Plan({"actor_gen": lay(_layout("0-1", dp=2, mb=2), max_concurrency=2),
                  "ref_inf": _layout("0-1", tp=2),
                  "reward_inf": _layout("0-1", pp=2, mb=2),
                  "actor_train": lay(_layout("0-1", pp=2), max_tokens_per_micro_batch=64)})
    piped = Plan({"actor_gen": _layout("0-1", pp=2, mb=2),
                  "ref_inf": lay(_layout("0-1", dp=2), max_tokens_per_micro_batch=32),
                  "reward_inf": _layout("0"),
                  "actor_train": lay(_layout("0-1", dp=2), max_tokens_per_micro_batch=32)})
    # a KV pool that holds just the longest request per virtual engine of the pipelined
    # generation (two engines a replica) preempts there
    need = max(kv_need(*exp.lengths(it)) for it in range(2))
    kv = 2 * need
    assert any(schedule(p[lo:hi], g[lo:hi], 0, need).preemptions
               for p, g in [exp.lengths(it) for it in range(2)] for lo, hi in ((0, 4), (4, 8)))
    options = RunOptions(iterations=2, dtype="float64", return_params=True, kv_tokens={"actor_gen": kv})
    tensor = Plan({"actor_gen": lay(_layout("0-1", tp=2), max_concurrency=3),
                   "ref_inf": _layout("0"), "reward_inf": _layout("1"),
                   "actor_train": lay(_layout("0-1", tp=2), max_tokens_per_micro_batch=48)})
    # PPO with the same lengths: masked GAE, critic values and the critic's loss
    ppo = long_tail(tiny_experiment("ppo", devices_per_node=2, batch_size=4, minibatches=2), cap=16, mu=1.6)
    ppo_single = Plan({c: _layout("0") for c in ppo.workflow.call_names})
    shapes = [dict(pp=2, mb=2), dict(tp=2), dict(dp=2)]
    ppo_mixed = Plan({c: _layout("0-1", **shapes[i % 3]) for i, c in enumerate(ppo.workflow.call_names)})
    runs = [(exp, single), (exp, mixed), (exp, piped), (exp, tensor), (ppo, ppo_single), (ppo, ppo_mixed)]
    for e, plan in runs:
        check(plan, e)
    per_rank = launch(2, _run_many, (runs, options), timeout_s=180)
    results = [merge([r[i] for r in per_rank], e, p, options) for i, (e, p) in enumerate(runs)]
    assert_invariant(exp, ["single-device", "mixed", "piped", "tensor"], results[:4], ("actor",))
    assert_invariant(ppo, ["single-device", "mixed"], results[4:], ("actor", "critic"))
    # the piped plan's train call ran budget_micro_batches' micro-batches (more than one a minibatch)
    call, cut = exp.workflow["actor_train"], False
    for it in range(2):
        prompt, gen = exp.lengths(it)
        for dp_rank, device in ((0, 0), (1, 1)):
            want = [budget_micro_batches(r, (prompt + gen)[r[0]:r[1]], 32)
                    for r in dp_rows(call, piped["actor_train"], dp_rank)]
            forwards = [s for s in results[2].timeline.spans
                        if (s.iteration, s.call, s.op, s.device) == (it, "actor_train", "forward", device)]
            assert len(forwards) == sum(len(m) for m in want)
            cut |= len(forwards) > len(want)
    assert cut, "the budget never cut a minibatch in two"
    # the measured running batch follows the schedule on each replica's first device
    running = [c for c in results[0].timeline.counters if c.name == "running" and c.iteration == 0]
    run = schedule(*exp.lengths(0), 0, kv)
    assert [c.value for c in running] == [float(s.batch) for s in run.segments if s.steps] + [0.0]


def test_engines_sharing_a_rollout_batch_unevenly_train_the_same():
    """Five sequences over two engine replicas (three and two requests), one with two virtual
    engines (two and one): the rollout server's uneven deal computes the update the single
    device does."""
    exp = tiny_experiment("ppo", devices_per_node=2, batch_size=5, minibatches=1)
    assert exp.workflow["actor_gen"].workload.seqs == 5
    uneven = Plan({"actor_gen": _layout("0-1", dp=2, mb=2), "ref_inf": _layout("1"), "reward_inf": _layout("0"),
                   "critic_inf": _layout("1"), "actor_train": _layout("0"), "critic_train": _layout("1")})
    single = Plan({c: _layout("0") for c in exp.workflow.call_names})
    results = run_many([(exp, single), (exp, uneven)])
    assert_invariant(exp, ["single-device", "uneven"], results, ("actor", "critic"))


def test_continuous_batching_engines_sharing_a_batch_unevenly_train_the_same():
    """Drawn response lengths (continuous batching): nine sequences (three prompts, three samples
    each) over two replicas of two virtual engines (3 + 2 and 2 + 2 requests) against the single
    device."""
    from estimator.spec.experiment import experiment_from_dict

    exp = experiment_from_dict({
        "algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "tiny-2l-128h"},
        "batch_size": 3, "group_size": 3, "prompt_len": 8, "gen_len": {"max": 16, "mean": 6}, "seed": 3,
        "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"}})
    uneven = Plan({"actor_gen": _layout("0-1", dp=2, mb=2), "ref_inf": _layout("1"), "reward_inf": _layout("1"),
                   "actor_train": _layout("0")})
    single = Plan({c: _layout("0") for c in exp.workflow.call_names})
    results = run_many([(exp, single), (exp, uneven)])
    assert_invariant(exp, ["single-device", "uneven"], results, ("actor",))


# ---- asynchronous training (async.max_staleness) ----------------------------------------------

ASYNC_ITERATIONS = 4


def _split(calls: tuple[str, ...]) -> Plan:
    """Generation on device 0, every other call on device 1: under staleness η ≥ 1 the generate
    call keeps a standing copy of the actor, refreshed by a push after each update."""
    return Plan({c: _layout("0" if c == "actor_gen" else "1") for c in calls})


@pytest.fixture(scope="module")
def async_runs() -> dict[tuple[str, int, str], tuple[Experiment, Plan, RunResult]]:
    """(algorithm, η, plan) → (experiment, plan, result): GRPO under η = 0, 1, 2 on one device,
    on the split plan and (η = 1) with generation tensor-parallel over both devices (no standing
    copy: it reallocates from the home as a synchronous run does); PPO under η = 1 split. All
    in one set of processes, ``ASYNC_ITERATIONS`` iterations each."""
    grpo = load_experiment(EXAMPLES / "grpo-tiny-2xcpu.yaml")
    ppo = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    single = Plan.load(str(PLANS / "grpo-tiny-2xcpu" / "single-device.json"))
    tp_gen = Plan.load(str(PLANS / "grpo-tiny-2xcpu" / "gen-vs-train.json"))
    split = _split(grpo.workflow.call_names)
    runs = {("grpo", 0, "single"): (grpo, single), ("grpo", 0, "split"): (grpo, split)}
    for eta in (1, 2):
        runs |= {("grpo", eta, "single"): (grpo.with_staleness(eta), single),
                 ("grpo", eta, "split"): (grpo.with_staleness(eta), split)}
    runs[("grpo", 1, "tp-gen")] = (grpo.with_staleness(1), tp_gen)
    runs[("ppo", 1, "split")] = (ppo.with_staleness(1), _split(ppo.workflow.call_names))
    results = run_many(list(runs.values()), ASYNC_ITERATIONS)
    return {k: (e, p, r) for (k, (e, p)), r in zip(runs.items(), results)}


def _params_diff(a: RunResult, b: RunResult, role: str = "actor") -> float:
    return max((a.params[role][n] - b.params[role][n]).abs().max().item() for n in a.params[role])


def test_an_asynchronous_update_equals_the_single_process_run_of_the_same_program(async_runs):
    """Which weights generate which rollouts is the program's rule (Workflow.program), so a run
    on two processes — a standing copy fed by pushes, or generation reallocated from the home —
    takes the very steps of one process running the same program; and a different η takes
    other steps."""
    exp, split, _ = async_runs[("grpo", 1, "split")]
    assert standing_copies(exp.workflow, split) == {"actor_gen"}
    assert not standing_copies(exp.workflow, async_runs[("grpo", 1, "tp-gen")][1])
    for eta, plans in ((0, ["split"]), (1, ["split", "tp-gen"]), (2, ["split"])):
        base = async_runs[("grpo", eta, "single")][2]
        for name in plans:
            res = async_runs[("grpo", eta, name)][2]
            assert _params_diff(res, base) < 1e-12, f"η={eta} {name}"
            assert res.losses.keys() == base.losses.keys()
            assert all(abs(res.losses[k] - v) < 1e-12 for k, v in base.losses.items()), f"η={eta} {name}"
    reference = [async_runs[("grpo", eta, "single")][2] for eta in (0, 1, 2)]
    for i in range(3):
        for j in range(i):
            # the same seed and data, rollouts from other policy versions: other updates
            assert _params_diff(reference[i], reference[j]) > 1e-10, f"η={i} trained as η={j}"


def test_asynchronous_ppo_is_the_textbook_loop_with_a_rollout_queue(async_runs):
    """An oracle outside the executor: the plain-torch loop sampling iteration j's rollouts with
    the weights after update j − η − 1 (executor.reference.run_ppo)."""
    from executor.reference import run_ppo

    exp, _, res = async_runs[("ppo", 1, "split")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend for the cores
    try:
        expected = {eta: run_ppo(exp.with_staleness(eta), ASYNC_ITERATIONS, dtype=torch.float64) for eta in (0, 1)}
    finally:
        torch.set_num_threads(threads)
    for eta, close in ((1, True), (0, False)):
        expect = expected[eta]
        diff = max((res.params[role][n] - expect[role][n].detach()).abs().max().item()
                   for role in ("actor", "critic") for n in expect[role])
        assert (diff < TOL) == close, f"reference with η={eta}: differs by {diff:.3g}"


def test_an_asynchronous_run_pushes_after_each_update_and_generates_ahead(async_runs):
    """Measured order on the split plan: the push of update i (spans ``push`` and ``call`` on
    both devices) for every update a later rollout reads, generation of iteration j + η starting
    before the update of iteration j (in steady state) and after the push it reads; a
    synchronous run generates only after the update."""
    def starts(res: RunResult, op: str = "compute") -> dict[tuple[int, str], tuple[float, float]]:
        return {(s.iteration, s.call): (s.start_s, s.end_s) for s in res.timeline.spans if s.op == op}

    for eta in (1, 2):
        exp, _, res = async_runs[("grpo", eta, "split")]
        lag = exp.workflow.lag("actor_gen")
        pushes = {(s.iteration, s.device, s.op) for s in res.timeline.spans if s.call == "push:actor_gen"}
        assert pushes == {(i, d, op) for i in range(ASYNC_ITERATIONS - lag) for d in (0, 1) for op in ("call", "push")}
        compute = starts(res)
        # from the second update on, both devices leave the push of update j − 1 together: one
        # generates at once, the other scores and trains (earlier, only η = 1 is certain to)
        for j in range(1, ASYNC_ITERATIONS - eta):
            assert compute[(j + eta, "actor_gen")][0] < compute[(j, "actor_train")][0], (eta, j)
        # the rollouts of iteration i + lag start once the push of update i is done on their device
        push = {s.iteration: s.end_s for s in res.timeline.spans if s.op == "push" and s.device == 0}
        for i, end in push.items():
            assert compute[(i + lag, "actor_gen")][0] >= end
    _, _, sync = async_runs[("grpo", 0, "split")]
    compute = starts(sync)
    assert not any(s.call.startswith("push:") for s in sync.timeline.spans)
    for j in range(ASYNC_ITERATIONS - 1):
        assert compute[(j + 1, "actor_gen")][0] >= compute[(j, "actor_train")][1]



def test_offload_under_staleness_pushes_from_the_host_buffer():
    """GRPO under η = 1 on the split plan, the actor's home offloading everything: each push of
    the update to the standing rollout copy uploads the weights from the host buffer first, and
    the run takes the very steps of the single-process run."""
    grpo = load_experiment(EXAMPLES / "grpo-tiny-2xcpu.yaml").with_staleness(1)
    single = Plan.load(str(PLANS / "grpo-tiny-2xcpu" / "single-device.json"))
    split = _offloaded(_split(grpo.workflow.call_names), grpo, "all")
    base, res = run_many([(grpo, single), (grpo, split)], ASYNC_ITERATIONS)
    assert _params_diff(res, base) < 1e-12
    assert all(abs(res.losses[k] - v) < 1e-12 for k, v in base.losses.items())
    offload = {s.call for s in res.timeline.spans if s.op == "offload"}
    assert {"actor_train", "push:actor_gen"} <= offload
