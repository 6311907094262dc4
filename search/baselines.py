"""Baseline plans: the layouts people write by hand today, each a documented constructor.

Usage::

    python -m search.baselines examples/ppo-llama2-7b-8xh100.yaml --name megatron
    python -m search.baselines examples/ppo-llama2-7b-8xh100.yaml --name real-heuristic --out plan.json
    python -m search.baselines examples/ppo-llama2-70b-128xh100.yaml --name colocate --json
    python -m search.baselines examples/ppo-llama2-7b-8xh100.yaml --name megatron --recompute full

- ``megatron`` — every call on all devices, tp = devices per node, pp = nodes, dp = 1 (ReaL's
  "heuristic" baseline; :func:`estimator.baselines.symmetric_plan`); ``--recompute full`` makes
  its train calls recompute activations.
- ``colocate`` — every call on all devices with the smallest tp·pp that fits memory, the rest
  data parallel (DeepSpeed-Chat style).
- ``split`` — actor and reference on one half of the devices, critic and reward on the other
  (OpenRLHF style).
- ``real-heuristic`` — the allocation ReaL's code ships: generation on all devices with
  pp = max(2, nodes), tp = 1, dp for the rest; actor and critic training on disjoint node sets
  sized in proportion to their parameters, tp 4, dp 2, pp = their node count (on one node
  4 + 4 devices, tp 2 / dp 2 up to 8 B parameters, tp 4 above); reference inference on all
  devices with tp 4, dp 2; reward and critic inference on one half each.

For asynchronous RL (``async.max_staleness``, ``python -m search --max-staleness``), with the
split between generating and training devices that every framework leaves to its user:

- ``areal-3/4`` — AReaL's rule: the valid split nearest 3/4 of the devices generating (engines
  of tp 1), the rest training with FSDP and recompute; ``areal-default`` is the same plan, built
  only for an asynchronous experiment;
- ``balanced`` — the split that makes rollout time and training time closest (verl's advice for
  ``fully_async_policy``);
- ``verl-colocate-sync`` — ``verl-default`` trained synchronously (staleness 0), the reference
  an asynchronous plan must beat.

The actor's recomputed old log-probs (``old_logprobs: recompute``: ``actor_inf``) are an
inference call of the actor, laid out as each baseline lays out the actor's calls: on all
devices in ``megatron`` and ``colocate``, on the actor's half in ``split``, and in
``real-heuristic`` like the reference's inference (all devices, tp 4, dp 2), the other forward
of an actor-sized model over the rollout. A verifier reward (``models.reward: rule``) has no
call to place; ``split`` then has nothing to put beside the actor unless there is a critic.

Where a model or the batch does not allow a degree, tp and then pp step down and dp takes the
rest; micro-batches start at the fewest valid count that is at least the pipeline depth and
rise call by call while a device would overflow. A baseline that still does not fit keeps its
plan with a null time and the memory reason. Prints the plan, its simulated iteration time
and peak memory; ``--out`` writes the plan file (only when it fits). Exit codes: 0 it fits;
1 it does not fit (or cannot be built for this experiment); 2 invalid input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from estimator.base.errors import ConfigError, cli_guard, did_you_mean
from estimator.base.io import atomic_write_text
from estimator.baselines import closest_layout, fit_micro_batches, symmetric_plan
from estimator.cost.lowering import Costs
from estimator.cost.memory import fmt_bytes, plan_memory
from estimator.profile.pricing import STACK_NAMES, experiment_profile
from estimator.profile.profiles import Profile, op_set
from estimator.sim.evaluator import call_s
from estimator.sim.simulate import simulate
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.plan import (
    RECOMPUTE_CHOICES,
    Plan,
    check,
    divisors,
)
from search.checks import check_out

SMALL_MODEL_PARAMS = 8e9  # ReaL's one-node rule: tp 2 up to this size, tp 4 above


@dataclass(frozen=True)
class Baseline:
    name: str
    plan: Plan | None  # None when no valid plan of this kind exists for the experiment
    iteration_s: float | None  # simulated steady-state iteration time; None when it does not fit
    reason: str | None  # why it does not fit (or cannot be built); None when it fits
    note: str | None = None  # where iteration_s comes from when not from the simulator

    @property
    def feasible(self) -> bool:
        return self.plan is not None and self.reason is None


def _halves(exp: Experiment, first_share: float = 0.5) -> tuple[DeviceMesh, DeviceMesh]:
    """Two disjoint meshes covering the cluster: whole nodes split by ``first_share`` (at least
    one node each), or the two halves of a single node."""
    cl = exp.cluster
    dpn = cl.devices_per_node
    if cl.nodes >= 2:
        a = min(cl.nodes - 1, max(1, round(cl.nodes * first_share)))
        return DeviceMesh(0, a * dpn), DeviceMesh(a * dpn, (cl.nodes - a) * dpn)
    half = DeviceMesh(dpn // 2, dpn // 2) if dpn >= 2 else None
    if half is None or cl.mesh_problems(half):
        raise ConfigError(f"the cluster's one node of {dpn} devices cannot be split into two aligned halves")
    return DeviceMesh(0, dpn // 2), half


def _build(exp: Experiment, profile: Profile, rule: Callable[[str], tuple[DeviceMesh, int, int]],
           shard: str = "none", recompute: str = "none", offloads: tuple[str, ...] = ("none",)) -> Plan:
    """Lay out every call by ``rule`` (call → mesh, tp, pp), the train calls with ``shard``
    (where they have more than one data-parallel replica) and ``recompute``, then fit
    micro-batches to memory. ``offloads``: the train calls' offload settings a user of the
    framework tries in turn — its default first, then what its recipes set to fit —, the
    first with which the plan fits as laid out (else the last) kept before micro-batches are
    raised."""
    layouts = {}
    for name in exp.workflow.topological_order():
        mesh, tp, pp = rule(name)
        lay = closest_layout(exp, name, mesh, tp, pp)
        if lay is None:
            raise ConfigError(f"call {name}: no valid layout on mesh {mesh}")
        if exp.workflow[name].kind == "train":
            lay = dataclasses.replace(lay, recompute=recompute, shard=shard if lay.dp > 1 else "none")
        layouts[name] = lay
    plan = check(Plan(layouts), exp)
    for off in offloads:
        if off != "none" and profile.host_link is None:
            raise ConfigError(f"the framework offloads training state (offload: {off}) and profile {profile.name} "
                              "has no host_link section to price it")
        plan = Plan({n: dataclasses.replace(lay, offload=off) if exp.workflow[n].kind == "train" else lay
                     for n, lay in layouts.items()})
        if plan_memory(exp, plan, profile.capacity_bytes, profile.stack).feasible:
            break
    return fit_micro_batches(exp, profile, plan)


def megatron(exp: Experiment, profile: Profile, recompute: str = "none") -> Plan:
    """Every call on all devices, tp = devices per node, pp = nodes, dp = 1 (stepped down);
    ``recompute="full"``: train calls recompute activations, as Megatron-LM is usually run."""
    try:
        return symmetric_plan(exp, profile, recompute)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def colocate(exp: Experiment, profile: Profile) -> Plan:
    """Every call on all devices with the smallest model-parallel size g = tp·pp (tp inside a
    node first) for which the plan fits; data parallelism over the rest."""
    cl = exp.cluster
    whole = cl.whole()
    plan = None
    for g in divisors(cl.num_devices):
        tp = max(t for t in divisors(cl.devices_per_node) if g % t == 0)
        try:
            plan = _build(exp, profile, lambda _name, g=g, tp=tp: (whole, tp, g // tp))
        except ConfigError:
            continue
        if plan_memory(exp, plan, profile.capacity_bytes, profile.stack).feasible:
            return plan
    if plan is None:
        raise ConfigError("no whole-cluster layout is valid for every call")
    return plan  # the most model-parallel attempt, which does not fit


def _megatron_on(exp: Experiment, mesh: DeviceMesh) -> tuple[DeviceMesh, int, int]:
    dpn = exp.cluster.devices_per_node
    return mesh, min(dpn, mesh.size), max(1, mesh.size // dpn)


def split(exp: Experiment, profile: Profile) -> Plan:
    """Actor and reference on one half of the devices, critic and reward on the other, each
    half Megatron-style (tp across its node, pp across its nodes)."""
    roles = set(exp.models)
    if not roles & {"critic", "reward"}:
        rule = " (its reward is a verifier, models.reward: rule, which holds no model)" if exp.verifier else ""
        raise ConfigError(f"the {exp.algorithm} workflow has no critic or reward model to split from the actor{rule}")
    first, second = _halves(exp)
    wf = exp.workflow
    return _build(exp, profile, lambda n: _megatron_on(exp, second if wf[n].role in ("critic", "reward") else first))


def _real_training(exp: Experiment, mesh: DeviceMesh, role: str) -> tuple[DeviceMesh, int, int]:
    """tp 4, dp 2, pp = nodes on whole nodes; on half a node tp 2 / dp 2 for small models."""
    dpn = exp.cluster.devices_per_node
    if mesh.size >= dpn:
        tp = min(4, dpn)
        return mesh, tp, mesh.size // (tp * min(2, dpn // tp))
    small = exp.models[role].params <= SMALL_MODEL_PARAMS
    return mesh, min(2 if small else 4, mesh.size), 1


def _training_meshes(exp: Experiment, share: float) -> tuple[DeviceMesh, DeviceMesh]:
    """Disjoint actor and critic training meshes, the actor's share of nodes as close to
    ``share`` as leaves both train calls a valid layout (one node: its two halves)."""
    nodes = exp.cluster.nodes
    if nodes < 2:
        return _halves(exp)
    for a in sorted(range(1, nodes), key=lambda a: (abs(a - nodes * share), a)):
        actor, critic = _halves(exp, a / nodes)
        if all(closest_layout(exp, n, m, *_real_training(exp, m, r)[1:]) is not None
               for n, m, r in (("actor_train", actor, "actor"), ("critic_train", critic, "critic"))):
            return actor, critic
    return _halves(exp, share)


def real_heuristic(exp: Experiment, profile: Profile) -> Plan:
    """ReaL's shipped allocation (see the module docstring)."""
    cl, wf = exp.cluster, exp.workflow
    whole = cl.whole()
    params = {r: m.params for r, m in exp.models.items()}
    if "critic" in params:
        actor_mesh, critic_mesh = _training_meshes(exp, params["actor"] / (params["actor"] + params["critic"]))
    else:
        actor_mesh = critic_mesh = whole
    half_a, half_b = _halves(exp) if cl.num_devices > 1 else (whole, whole)

    def rule(name: str) -> tuple[DeviceMesh, int, int]:
        call = wf[name]
        if call.kind == "generate":
            return whole, 1, max(2, cl.nodes)
        if call.kind == "train":
            return _real_training(exp, critic_mesh if call.role == "critic" else actor_mesh, call.role)
        if call.role in ("ref", "actor"):
            tp = min(4, cl.devices_per_node)
            return whole, tp, max(1, cl.num_devices // (tp * 2))
        return _real_training(exp, half_b if call.role == "critic" else half_a, call.role)

    return _build(exp, profile, rule)


BASELINES: dict[str, Callable[[Experiment, Profile], Plan]] = {
    "megatron": megatron, "colocate": colocate, "split": split, "real-heuristic": real_heuristic}


# ---- the frameworks' defaults -----------------------------------------------------------------


def _colocated(exp: Experiment, profile: Profile, gen_tp: int, shard: str, recompute: str,
               offloads: tuple[str, ...] = ("none",)) -> Plan:
    """Every role on all devices (one resource pool): generation in engines of ``gen_tp`` (tp
    steps down where the model does not allow it, dp takes the rest, no pipeline stages), every
    other call data parallel over all devices, the train calls with ``shard``, ``recompute`` and
    the first of ``offloads`` that fits (:func:`_build`)."""
    whole, wf = exp.cluster.whole(), exp.workflow
    return _build(exp, profile, lambda n: (whole, gen_tp if wf[n].kind == "generate" else 1, 1), shard, recompute,
                  offloads)


def verl_default(exp: Experiment, profile: Profile) -> Plan:
    """verl's default single-controller launch: every role on one resource pool of all devices
    (``trainer.n_gpus_per_node``); the vLLM rollout at tp 4 where that divides the model (stepped
    down otherwise) — what verl's example launches for 7–8B models set with
    ``actor_rollout_ref.rollout.tensor_model_parallel_size=4`` (the generated config's default
    is 2, volcengine/verl b178a3cd); the FSDP workers (full sharding) for actor, critic and
    reference, with ``actor_rollout_ref.model.enable_gradient_checkpointing=True`` (the config's
    default, ibid.). Offload: none, the config's default (``actor.fsdp_config.param_offload`` and
    ``optimizer_offload`` false, ibid.); where that does not fit, what verl's recipe for an 8B
    model on one node of 8 GPUs sets — ``param_offload``, ``grad_offload`` and
    ``optimizer_offload`` true (``examples/grpo_trainer/run_qwen3_vl-8b-megatron.sh``, ibid.),
    ``offload: all``. Its recipes also offload the reference's weights
    (``ref.fsdp_config.param_offload=True``), which the plan vocabulary cannot say: only a
    train call offloads."""
    return _colocated(exp, profile, 4, "full", "full", ("none", "all"))


def openrlhf_hybrid(exp: Experiment, profile: Profile) -> Plan:
    """OpenRLHF's hybrid engine (``--colocate_all_models``, flags of OpenRLHF/OpenRLHF c1ba971c's
    ``train_ppo_ray.py``): every model and the vLLM engines on all devices, engines of tp 2
    (``--vllm_tensor_parallel_size 2``), DeepSpeed ZeRO-3 (``--zero_stage 3``) and
    ``--gradient_checkpointing`` for training; with ``--vllm.enable_sleep --ds.enable_sleep``, as
    its README's hybrid-engine recipe and ``examples/scripts/train_ppo_ray_hybrid_engine.sh`` run
    it (OpenRLHF/OpenRLHF 3c3be623): DeepSpeed's ``offload_states`` moves the optimizer state,
    the fp32 master weights and the gradient buffers to the host while vLLM runs, not the bf16
    parameters (``openrlhf/utils/deepspeed/deepspeed_utils.py``, ``offload_deepspeed_states``):
    ``offload: optimizer``."""
    return _colocated(exp, profile, 2, "full", "full", ("optimizer",))


def nemo_rl_default(exp: Experiment, profile: Profile) -> Plan:
    """NeMo-RL's ``examples/configs/grpo_math_1B.yaml`` (NVIDIA-NeMo/RL 7ea279ab, copied in
    ``tests/fixtures/nemo-rl/``): colocated generation (``colocated.enabled: true``), vLLM
    ``tensor_parallel_size: 1`` (one engine per device), the DTensor policy (FSDP2,
    ``dtensor_cfg``, ``tensor_parallel_size: 1``) with ``activation_checkpointing: false``.
    Colocated, its GRPO loop moves the policy's optimizer state and then its parameters to the
    host before generation (``nemo_rl/algorithms/grpo.py``: ``policy.offload_after_refit()``;
    ``dtensor_policy_worker.py``: ``offload_after_refit`` moves the model and the optimizer to
    CPU) and back in ``prepare_for_lp_inference`` / ``prepare_for_training``: ``offload: all``.
    In the plan vocabulary it is :func:`dschat`'s layout with that offload."""
    return _colocated(exp, profile, 1, "full", "none", ("all",))


def dschat(exp: Experiment, profile: Profile) -> Plan:
    """DeepSpeed-Chat's step-3 RLHF (``training/step3_rlhf_finetuning``): ZeRO-3 for actor and
    critic (``--actor_zero_stage 3 --critic_zero_stage 3``), every model on all devices, and
    generation in the hybrid engine at ``--inference_tp_size 1``, its default. No offload: its
    ``--offload`` is ZeRO-Offload, whose Adam steps on the CPU (DeepSpeedCPUAdam), a cost the
    plan vocabulary does not have."""
    return _colocated(exp, profile, 1, "full", "none")


# ---- disaggregated plans: generation on devices of its own, training on the rest ------------

AREAL_GEN_SHARE = 0.75  # AReaL's rule of thumb: 3/4 of the devices generate (arXiv 2505.24298, §6)
AREAL_STALENESS = 2  # the η AReaL's examples train with (max_head_offpolicyness)


def split_points(exp: Experiment) -> list[int]:
    """Device counts ``k`` for which devices ``0..k-1`` and ``k..N-1`` are both valid meshes of
    the cluster (every split the mesh rule admits)."""
    cl = exp.cluster
    n = cl.num_devices
    return [k for k in range(1, n)
            if not cl.mesh_problems(DeviceMesh(0, k)) and not cl.mesh_problems(DeviceMesh(k, n - k))]


def disaggregated(exp: Experiment, profile: Profile, gen_devices: int, gen_tp: int = 1) -> Plan:
    """The actor's generate calls on devices ``0..gen_devices-1`` (engines of ``gen_tp``, dp for
    the rest), every other call data parallel on the remaining devices, training fully sharded
    (FSDP) with activation recompute — AReaL's and verl's ``fully_async_policy`` shape."""
    n = exp.cluster.num_devices
    if gen_devices not in split_points(exp):
        raise ConfigError(f"no split of {n} devices gives generation {gen_devices} of them as valid meshes "
                          f"(valid: {split_points(exp) or 'none'})")
    gen, rest, wf = DeviceMesh(0, gen_devices), DeviceMesh(gen_devices, n - gen_devices), exp.workflow
    return _build(exp, profile, lambda c: (gen, gen_tp, 1) if wf[c].kind == "generate" else (rest, 1, 1),
                  "full", "full")


def _nearest_splits(exp: Experiment, share: float) -> list[int]:
    """Every split point, nearest ``share`` of the devices generating first (ties: more generating)."""
    points = split_points(exp)
    if not points:
        raise ConfigError(f"the cluster's {exp.cluster.num_devices} devices split into no two valid meshes")
    return sorted(points, key=lambda k: (abs(k - share * exp.cluster.num_devices), -k))


def split_starts(exp: Experiment, profile: Profile, shares: tuple[float, ...] = (0.25, 0.5, 0.75)) -> dict[str, Plan]:
    """Disaggregated plans that generate on about each share of the devices (the valid split
    nearest it that builds): starting points for an asynchronous search, whose space of splits is
    large and whose best plans — a streaming rollout's above all — lie far from a synchronous one."""
    out: dict[str, Plan] = {}
    n = exp.cluster.num_devices
    for share in shares:
        for k in _nearest_splits(exp, share) if split_points(exp) else []:
            try:
                plan = disaggregated(exp, profile, k)
            except ConfigError:
                continue
            out.setdefault(f"split {k}+{n - k}", plan)
            break
    return out


def areal_split(exp: Experiment, profile: Profile) -> Plan:
    """AReaL's split: the valid split nearest 3/4 of the devices generating (SGLang engines of
    tp 1) whose calls all have a layout there (the rollout batch must split over the engines),
    FSDP training on the rest; trained with the experiment's staleness η."""
    problems = []
    for k in _nearest_splits(exp, AREAL_GEN_SHARE):
        try:
            return disaggregated(exp, profile, k)
        except ConfigError as exc:
            problems.append(f"{k} generating: {exc}")
    raise ConfigError("no split has a valid layout for every call: " + "; ".join(problems))


def areal_default(exp: Experiment, profile: Profile) -> Plan:
    """AReaL's default launch: :func:`areal_split`, asynchronous (its examples set
    ``max_head_offpolicyness`` 2). Built only for an asynchronous experiment: trained
    synchronously on split devices it is not AReaL's default."""
    if not exp.workflow.asynchronous:
        raise ConfigError(f"areal-default trains asynchronously (max_head_offpolicyness {AREAL_STALENESS}); "
                          "give the experiment async.max_staleness or search with --max-staleness")
    return areal_split(exp, profile)


def balanced(exp: Experiment, profile: Profile) -> Plan:
    """verl's advice for ``fully_async_policy``: the split whose rollout time and training-side
    time (every other call, one after another on the rest) are closest, each priced alone by the
    evaluator's closed forms."""
    costs, best = Costs(exp, profile), None
    for k in split_points(exp):
        try:
            plan = disaggregated(exp, profile, k)
        except ConfigError:
            continue
        sides = [0.0, 0.0]
        for name in exp.workflow.call_names:
            sides[exp.workflow[name].kind != "generate"] += call_s(costs.call(name, plan[name]))
        gap = abs(sides[0] - sides[1])
        if best is None or gap < best[0]:
            best = (gap, plan)
    if best is None:
        raise ConfigError(f"no split of the cluster's {exp.cluster.num_devices} devices has a valid layout for "
                          "every call")
    return best[1]


# name → constructor; beside BASELINES in the search's table, their sources in each docstring
FRAMEWORK_BASELINES: dict[str, Callable[[Experiment, Profile], Plan]] = {
    "verl-default": verl_default, "openrlhf-hybrid": openrlhf_hybrid, "nemo-rl-default": nemo_rl_default,
    "dschat": dschat, "realhf-heuristic": real_heuristic, "areal-default": areal_default}
# the split every framework leaves to its user, beside the colocated default trained synchronously
ASYNC_BASELINES: dict[str, Callable[[Experiment, Profile], Plan]] = {
    "areal-3/4": areal_split, "balanced": balanced, "verl-colocate-sync": verl_default}
SYNCHRONOUS = ("verl-colocate-sync",)  # baselines predicted at staleness 0 whatever the experiment's
ALL_BASELINES = {**BASELINES, **FRAMEWORK_BASELINES, **ASYNC_BASELINES}


RECOMPUTING = ("megatron",)  # baselines that take a ``recompute`` setting for their train calls


def build(name: str, experiment: Experiment, profile: Profile, simulate_it: bool = True,
          recompute: str = "none") -> Baseline:
    """The baseline ``name`` for ``experiment``: its plan, simulated time (when ``simulate_it``
    and it fits) or why it does not fit; ``recompute`` for the baselines in :data:`RECOMPUTING`.
    Unknown names or settings raise :class:`ConfigError`."""
    if name not in ALL_BASELINES:
        raise ConfigError(f"baseline {name!r} is not known{did_you_mean(name, list(ALL_BASELINES))}; known: "
                          f"{', '.join(ALL_BASELINES)}")
    if recompute not in RECOMPUTE_CHOICES:
        raise ConfigError(f"recompute={recompute!r} must be one of {list(RECOMPUTE_CHOICES)}")
    if recompute != "none" and name not in RECOMPUTING:
        raise ConfigError(f"baseline {name!r} takes no recompute setting (only {', '.join(RECOMPUTING)} does)")
    if name in SYNCHRONOUS:
        experiment = experiment.with_staleness(0)
    try:
        plan = ALL_BASELINES[name](experiment, profile, recompute) if name in RECOMPUTING else \
            ALL_BASELINES[name](experiment, profile)
    except ConfigError as exc:
        return Baseline(name, None, None, str(exc))
    memory = plan_memory(experiment, plan, profile.capacity_bytes, profile.stack)
    if not memory.feasible:
        return Baseline(name, plan, None, memory.reasons()[0])
    seconds = simulate(experiment, plan, profile).iteration_s if simulate_it else None
    return Baseline(name, plan, seconds, None)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.baselines", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="experiment YAML file")
    parser.add_argument("--name", required=True, help=f"baseline: {', '.join(ALL_BASELINES)}")
    parser.add_argument("--profile", help="hardware profile name or file (default: the cluster's device)")
    parser.add_argument("--stack", choices=STACK_NAMES,
                        help="software stack to price (default: the experiment's cluster.stack, else megatron-vllm "
                             "on a GPU, executor on a CPU)")
    parser.add_argument("--recompute", default="none", choices=RECOMPUTE_CHOICES,
                        help="activation recompute of the train calls (megatron only; default none)")
    parser.add_argument("--out", help="write the plan JSON here (only when it fits)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.name not in ALL_BASELINES:
        raise ConfigError(f"--name {args.name!r} is not a baseline{did_you_mean(args.name, list(ALL_BASELINES))}; "
                          f"known: {', '.join(ALL_BASELINES)}")
    experiment = load_experiment(args.experiment)
    profile = experiment_profile(experiment, args.profile, args.stack)
    if args.out is not None:
        check_out(args.out)
    base = build(args.name, experiment, profile, recompute=args.recompute)
    memory = plan_memory(experiment, base.plan, profile.capacity_bytes, profile.stack) if base.plan else None
    if args.out is not None and base.feasible:
        atomic_write_text(args.out, base.plan.to_json())
    if args.json:
        print(json.dumps({"name": base.name, "stack": profile.stack, "op_set": op_set(profile),
                          "iteration_s": base.iteration_s,
                          "reason": base.reason,
                          "peak_memory_bytes": memory.peak.peak_bytes if memory else None,
                          "plan": json.loads(base.plan.to_json()) if base.plan else None}, indent=2))
    else:
        print(f"baseline {base.name} for {experiment.name} on profile {profile.name}")
        print(op_set(profile)["text"])
        if base.plan:
            print(base.plan.table())
        if base.feasible:
            print(f"predicted iteration time {base.iteration_s:.3f} s; peak memory "
                  f"{fmt_bytes(memory.peak.peak_bytes)} of {fmt_bytes(memory.capacity_bytes)}")
            if args.out:
                print(f"wrote plan {args.out}")
        elif base.plan is None:
            print(f"no such plan for this experiment: {base.reason}")
        else:
            print(f"does not fit: {base.reason}")
    return 0 if base.feasible else 1


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
