"""OpenRLHF: a plan as the launch command of ``openrlhf.cli.train_ppo_ray``.

Flag names and rules are taken from OpenRLHF/OpenRLHF at commit
3c3be6234e0cb353e76bb8019947db9dfe99fca7 (2026-08-13), ``openrlhf/cli/train_ppo_ray.py``: its
argparse (the dotted spelling, ``--actor.num_gpus_per_node``, introduced by commit ed62d0e2 of
2026-04-19) and its ``train()``; the earlier flat spelling (``--actor_num_gpus_per_node``,
``--zero_stage``) from the same file at commit c1ba971c3029c8776eedee5819525e8bfb9febc4
(2026-04-13), the last before the rename, written with ``legacy_flags``. Both argparse files are
copied into ``tests/fixtures/openrlhf/``; every flag written here is checked against them.

What OpenRLHF can express, from ``train()``:

- each role (actor, ref, critic, reward) is a Ray actor group of ``num_nodes ×
  num_gpus_per_node`` DeepSpeed ranks; the actor's log-probs run in the actor's group, the
  critic's values in the critic's;
- vLLM engines (``--vllm.num_engines`` of ``--vllm.tensor_parallel_size`` devices) generate,
  with no pipeline stages and no cap on running requests among the flags;
- placement: ``--train.colocate_all`` puts every role and the engines on the same devices;
  otherwise each group has devices of its own, except actor with ref
  (``--train.colocate_actor_ref``) and critic with reward (``--train.colocate_critic_reward``);
- one DeepSpeed setting for every model: ``--ds.zero_stage`` (0 replicated, 1 optimizer state,
  3 parameters too: the plan's ``shard`` none / optimizer / full), ``--ds.tensor_parallel_size``
  (AutoTP), no pipeline parallelism (a train call's stages become data-parallel ranks, and ZeRO-3
  shards what the stages split); ``--actor.gradient_checkpointing_enable`` for actor and
  critic alike;
- one offload setting for every DeepSpeed model: ``--ds.enable_sleep`` makes DeepSpeed's
  ``offload_states`` move the optimizer state, the fp32 master weights and the gradient buffers
  to the host while the engines run, and back for training (``ppo_actor.py``, ``ppo_critic.py``;
  ``offload_deepspeed_states`` in ``openrlhf/utils/deepspeed/deepspeed_utils.py`` leaves the bf16
  parameters on the GPU): the plan's ``offload: optimizer``, written with ``--vllm.enable_sleep``
  (the engines drop their weights and KV cache between generations, what the plan's memory
  model assumes) as OpenRLHF's hybrid-engine recipe does; ``offload: all`` runs as
  ``optimizer``;
- one micro-batch size for training (``--train.micro_batch_size``, rows per GPU) and one for
  the experience passes (``--rollout.micro_batch_size``), or one dynamic-batch switch with a
  token budget for each (``--train.max_tokens_per_gpu``, ``--rollout.max_tokens_per_gpu``).

The projection applies these in that order and lists every change; the common micro-batch size
is the largest that divides every call's (the smallest memory any call asked for), the common
tp the actor's training tp where it fits every group, the recompute, shard and offload setting
the actor's.
"""

from __future__ import annotations

import shlex
from math import gcd

from estimator.base.errors import ConfigError
from estimator.interop.common import (
    Export,
    Projection,
    micro_batches_for,
    micro_rows,
    model_path,
    per_rank,
    preset_of,
    require_algorithm,
    token_caps,
)
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment, experiment_from_dict
from estimator.spec.plan import Plan

FRAMEWORK = "openrlhf"
REPO = "OpenRLHF/OpenRLHF"
COMMIT = "3c3be6234e0cb353e76bb8019947db9dfe99fca7"
LEGACY_COMMIT = "c1ba971c3029c8776eedee5819525e8bfb9febc4"
ENTRY = "python3 -m openrlhf.cli.train_ppo_ray"
ZERO_STAGE = {"none": 0, "optimizer": 1, "full": 3}
# --ds.zero_stage read back: ZeRO-2 also shards the gradients, which `optimizer` reduce-scatters already
ZERO_READ = {0: "none", 1: "optimizer", 2: "optimizer", 3: "full"}
# the role groups and the call that places each (its home); the engines are "vllm"
GROUP_CALL = {"vllm": "actor_gen", "actor": "actor_train", "ref": "ref_inf", "critic": "critic_train",
              "reward": "reward_inf"}
COLOCATED_PAIRS = ({"actor", "ref"}, {"critic", "reward"})
# dotted flag (2026) → the flat flag before commit ed62d0e2
LEGACY = {
    "--actor.num_nodes": "--actor_num_nodes", "--actor.num_gpus_per_node": "--actor_num_gpus_per_node",
    "--ref.num_nodes": "--ref_num_nodes", "--ref.num_gpus_per_node": "--ref_num_gpus_per_node",
    "--critic.num_nodes": "--critic_num_nodes", "--critic.num_gpus_per_node": "--critic_num_gpus_per_node",
    "--reward.num_nodes": "--reward_num_nodes", "--reward.num_gpus_per_node": "--reward_num_gpus_per_node",
    "--train.colocate_all": "--colocate_all_models", "--train.colocate_actor_ref": "--colocate_actor_ref",
    "--train.colocate_critic_reward": "--colocate_critic_reward",
    "--vllm.num_engines": "--vllm_num_engines", "--vllm.tensor_parallel_size": "--vllm_tensor_parallel_size",
    "--vllm.gpu_memory_utilization": "--vllm_gpu_memory_utilization",
    "--ds.zero_stage": "--zero_stage", "--ds.tensor_parallel_size": "--ds_tensor_parallel_size",
    "--ds.param_dtype": "--param_dtype", "--ds.packing_samples": "--packing_samples",
    "--actor.gradient_checkpointing_enable": "--gradient_checkpointing",
    "--train.micro_batch_size": "--micro_train_batch_size", "--train.batch_size": "--train_batch_size",
    "--rollout.micro_batch_size": "--micro_rollout_batch_size", "--rollout.batch_size": "--rollout_batch_size",
    "--rollout.n_samples_per_prompt": "--n_samples_per_prompt", "--data.max_len": "--max_len",
    "--rollout.max_new_tokens": "--max_new_tokens", "--train.max_epochs": "--max_epochs",
    "--train.dynamic_batch_enable": "--use_dynamic_batch", "--train.max_tokens_per_gpu": "--train_max_tokens_per_gpu",
    "--rollout.max_tokens_per_gpu": "--rollout_max_tokens_per_gpu",
    "--ds.enable_sleep": "--deepspeed_enable_sleep", "--vllm.enable_sleep": "--vllm_enable_sleep",
    "--actor.model_name_or_path": "--pretrain", "--critic.model_name_or_path": "--critic_pretrain",
    "--reward.model_name_or_path": "--reward_pretrain",
    "--actor.adam.lr": "--actor_learning_rate", "--critic.adam.lr": "--critic_learning_rate",
    "--algo.kl.init_coef": "--init_kl_coef", "--algo.kl.use_loss": "--use_kl_loss",
    "--algo.kl.estimator": "--kl_estimator", "--algo.advantage.estimator": "--advantage_estimator",
    "--actor.eps_clip": "--eps_clip", "--critic.value_clip": "--value_clip", "--algo.advantage.gamma": "--gamma",
    "--algo.advantage.lambd": "--lambd", "--rollout.temperature": "--temperature",
}


def _groups(experiment: Experiment, pr: Projection) -> dict[str, DeviceMesh]:
    wf = experiment.workflow
    return {g: pr[c].mesh for g, c in GROUP_CALL.items() if c in wf}


def placement(groups: dict[str, DeviceMesh], devices: int) -> str | None:
    """``colocate_all``, ``separate`` (each group its own devices, the allowed pairs shared), or
    None when OpenRLHF cannot place the groups so."""
    if all(m == DeviceMesh(0, devices) for m in groups.values()):
        return "colocate_all"
    names = sorted(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ma, mb = groups[a], groups[b]
            if ma == mb and {a, b} in COLOCATED_PAIRS:
                continue
            if ma.overlaps(mb):
                return None
    return "separate"


def project(experiment: Experiment, plan: Plan) -> Projection:
    """The plan as OpenRLHF runs it (the module docstring's rules, in order)."""
    require_algorithm(FRAMEWORK, experiment, ("ppo", "grpo"))
    pr = Projection(experiment, plan)
    wf, n = experiment.workflow, experiment.cluster.num_devices
    gen = pr["actor_gen"]
    engines, rows = gen.mesh.size // gen.tp, wf["actor_gen"].workload.units_per_minibatch
    if rows % engines:
        raise ConfigError(f"{FRAMEWORK}: call actor_gen: without pipeline stages its mesh {gen.mesh} makes {engines} "
                          f"vLLM engines of tp {gen.tp}, and plans split the batch of {rows} sequences evenly over "
                          "them, which it does not; give generation a mesh whose size over tp divides the batch")
    pr.set("actor_gen", "OpenRLHF generates in vLLM engines of --vllm.tensor_parallel_size devices, no pipeline "
                        "stages", pp=1, dp=engines, micro_batches=1)
    if pr["actor_gen"].max_concurrency:
        pr.set("actor_gen", "OpenRLHF has no flag for vLLM's max_num_seqs; the engine's KV pool bounds the "
                            "running requests", max_concurrency=0)
    for inf, train in (("actor_inf", "actor_train"), ("critic_inf", "critic_train")):
        if inf in wf and train in wf:
            home = pr[train]
            pr.set(inf, f"OpenRLHF runs {inf} in the {wf[train].role}'s DeepSpeed group",
                   mesh=home.mesh, dp=home.dp, tp=home.tp, pp=home.pp,
                   micro_batches=_micro(wf[inf], pr[inf], home.dp))
    ds_calls = [c for c in wf.call_names if wf[c].kind != "generate"]
    for c in ds_calls:
        lay = pr[c]
        if lay.pp > 1:
            # the stages become data-parallel ranks; a train call's parameters, gradients and optimizer state,
            # split over the stages in the plan, are split over those ranks by ZeRO-3 instead
            shard = {"shard": "full"} if wf[c].kind == "train" else {}
            pr.set(c, "OpenRLHF's DeepSpeed models have no pipeline parallelism: the stages become data-parallel "
                      "ranks" + (", ZeRO-3 shards the state the stages split" if shard else ""),
                   pp=1, dp=lay.dp * lay.pp, micro_batches=_micro(wf[c], lay, lay.dp * lay.pp), **shard)
    if placement(_groups(experiment, pr), n) is None:
        for c in wf.call_names:
            lay = pr[c]
            dp = n // (lay.tp * lay.pp)
            pr.set(c, "OpenRLHF shares devices only among all roles (--train.colocate_all) or between actor and "
                      "ref, critic and reward; the plan's meshes overlap otherwise",
                   mesh=DeviceMesh(0, n), dp=dp, micro_batches=_micro(wf[c], lay, dp) if c in ds_calls else 1)
    tp = pr["actor_train"].tp
    for c in ds_calls:
        tp = gcd(tp, pr[c].mesh.size)
    for c in ds_calls:
        lay = pr[c]
        if lay.tp != tp:
            dp = lay.mesh.size // tp
            pr.set(c, f"OpenRLHF has one --ds.tensor_parallel_size for every model: {tp}",
                   tp=tp, dp=dp, micro_batches=_micro(wf[c], lay, dp))
    _one_micro_size(experiment, pr, [c for c in ds_calls if wf[c].kind == "train"], "--train.micro_batch_size")
    _one_micro_size(experiment, pr, [c for c in ds_calls if wf[c].kind == "inference"],
                    "--rollout.micro_batch_size")
    if pr["actor_train"].offload == "all":
        pr.set("actor_train", "OpenRLHF's --ds.enable_sleep offloads DeepSpeed's optimizer state, master weights and "
                              "gradient buffers, not its bf16 parameters", offload="optimizer")
    actor = pr["actor_train"]
    for c in ds_calls:
        if wf[c].kind == "train" and c != "actor_train":
            pr.set(c, "OpenRLHF's --actor.gradient_checkpointing_enable, --ds.zero_stage and --ds.enable_sleep apply "
                      "to every model", recompute=actor.recompute, shard=actor.shard, offload=actor.offload)
    return pr


def _micro(call, layout, dp: int) -> int:
    """Micro-batches keeping the rows per micro-batch at a new dp (1 under a token budget)."""
    if layout.token_budget:
        return 1
    return micro_batches_for(call, dp, micro_rows(call, layout), FRAMEWORK)


def _one_micro_size(experiment: Experiment, pr: Projection, calls: list[str], flag: str) -> None:
    """One micro-batch size (or, with any token budget, dynamic batches) for these calls."""
    if not calls:
        return
    wf = experiment.workflow
    budgets = [pr[c].max_tokens_per_micro_batch for c in calls if pr[c].token_budget]
    dynamic = any(pr[c].token_budget for c in wf.call_names if wf[c].kind != "generate")
    if dynamic:
        # dynamic batching is one switch (--train.dynamic_batch_enable) for training and the experience passes
        budget = min(budgets) if budgets else min(micro_rows(wf[c], pr[c]) * wf[c].workload.seq_len for c in calls)
        budget = max(budget, max(wf[c].workload.seq_len for c in calls))
        for c in calls:
            pr.set(c, f"OpenRLHF's dynamic batches are one switch with one token budget per GPU for {flag}'s calls",
                   micro_batches=1, max_tokens_per_micro_batch=budget)
        return
    rows = 0
    for c in calls:
        rows = gcd(rows, micro_rows(wf[c], pr[c]))
    for c in calls:
        pr.set(c, f"OpenRLHF has one {flag} (rows per GPU) for these calls: {rows}, the largest dividing each",
               micro_batches=per_rank(wf[c], pr[c].dp, FRAMEWORK) // rows)


def _gpus(mesh: DeviceMesh, per_node: int) -> tuple[int, int]:
    """(num_nodes, num_gpus_per_node) of a group on ``mesh``: its GPUs on one node, else in
    bundles of as many as divide both its size and a node (Ray places each bundle of
    ``num_gpus_per_node`` GPUs on one node: 12 GPUs on nodes of 8 are 3 bundles of 4)."""
    if mesh.size <= per_node:
        return 1, mesh.size
    bundle = gcd(mesh.size, per_node)
    return mesh.size // bundle, bundle


def flags(experiment: Experiment, plan: Plan, shard: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(flag, value or None for a switch) in the 2026 spelling, and notes, for a plan OpenRLHF
    runs as given, its train calls sharded as ``shard`` says."""
    wf, p, h, cl = experiment.workflow, experiment.params, experiment.hyper, experiment.cluster
    prompt_cap, gen_cap = token_caps(experiment)
    groups = {g: plan[c].mesh for g, c in GROUP_CALL.items() if c in wf}
    out: list[tuple[str, str | None]] = []
    for g in ("actor", "ref", "critic", "reward"):
        if g in groups:
            nodes, per = _gpus(groups[g], cl.devices_per_node)
            out += [(f"--{g}.num_nodes", str(nodes)), (f"--{g}.num_gpus_per_node", str(per))]
    if placement(groups, cl.num_devices) == "colocate_all":
        out.append(("--train.colocate_all", None))
    else:
        out += [("--train.colocate_actor_ref", None)] if groups.get("actor") == groups.get("ref") else []
        if "critic" in groups and groups.get("critic") == groups.get("reward"):
            out.append(("--train.colocate_critic_reward", None))
    gen = plan["actor_gen"]
    out += [("--vllm.num_engines", str(gen.dp)), ("--vllm.tensor_parallel_size", str(gen.tp)),
            ("--vllm.gpu_memory_utilization", f"{experiment.kv_fraction:g}")]
    actor = plan["actor_train"]
    out += [("--ds.zero_stage", str(ZERO_STAGE[shard])), ("--ds.tensor_parallel_size", str(actor.tp)),
            ("--ds.param_dtype", "bf16")]
    out += [("--actor.gradient_checkpointing_enable", None)] if actor.recompute == "full" else []
    out += [("--vllm.enable_sleep", None), ("--ds.enable_sleep", None)] if actor.offload != "none" else []
    out += _batch_flags(experiment, plan)
    out += [("--rollout.batch_size", str(p.batch_size)), ("--rollout.n_samples_per_prompt", str(p.group_size)),
            ("--train.batch_size", str(wf["actor_train"].workload.units_per_minibatch)),
            ("--train.max_epochs", "1"), ("--data.max_len", str(prompt_cap + gen_cap)),
            ("--rollout.max_new_tokens", str(gen_cap)), ("--rollout.temperature", f"{h.temperature:g}")]
    notes: list[str] = []
    for role, flag in (("actor", "--actor.model_name_or_path"), ("critic", "--critic.model_name_or_path"),
                       ("reward", "--reward.model_name_or_path")):
        if role in experiment.models and (role != "critic" or "critic_train" in wf):
            path, note = model_path(experiment, role)
            out.append((flag, path))
            notes += [note] if note else []
    out += [("--actor.adam.lr", f"{h.lr:g}"), ("--actor.eps_clip", f"{h.clip_eps:g}"),
            ("--algo.kl.init_coef", f"{h.kl_coef:g}")]
    if experiment.algorithm == "grpo":
        out += [("--algo.advantage.estimator", "group_norm"), ("--algo.kl.use_loss", None),
                ("--algo.kl.estimator", "k3")]
    else:
        out += [("--algo.advantage.estimator", "gae"), ("--critic.adam.lr", f"{h.lr:g}"),
                ("--critic.value_clip", f"{h.value_clip:g}"), ("--algo.advantage.gamma", f"{h.gamma:g}"),
                ("--algo.advantage.lambd", f"{h.lam:g}")]
    if placement(groups, cl.num_devices) == "separate":
        notes.append("Ray places each group on devices of its own; the plan's device ranges are the placement "
                     "the predictions assume")
    if experiment.verifier:
        notes.append("verifier rewards: pass your checker with --reward.remote_url (an HTTP endpoint or a "
                     "reward-function .py file); the command passes its extra arguments through")
    if p.old_logprobs == "from_generation":
        notes.append("OpenRLHF recomputes the old log-probs with the actor's DeepSpeed group before training, a "
                     "forward pass this experiment (old_logprobs: from_generation) does not have; the "
                     "predictions do not include it (set old_logprobs: recompute to plan for it)")
    return out, notes


def _batch_flags(experiment: Experiment, plan: Plan) -> list[tuple[str, str | None]]:
    wf = experiment.workflow
    trains = [c for c in wf.call_names if wf[c].kind == "train"]
    infs = [c for c in wf.call_names if wf[c].kind == "inference"]
    if any(plan[c].token_budget for c in trains + infs):
        out = [("--train.dynamic_batch_enable", None), ("--ds.packing_samples", None),
               ("--train.max_tokens_per_gpu", str(plan[trains[0]].max_tokens_per_micro_batch))]
        return out + ([("--rollout.max_tokens_per_gpu", str(plan[infs[0]].max_tokens_per_micro_batch))] if infs else [])
    out = [("--train.micro_batch_size", str(micro_rows(wf[trains[0]], plan[trains[0]])))]
    return out + ([("--rollout.micro_batch_size", str(micro_rows(wf[infs[0]], plan[infs[0]])))] if infs else [])


def command(pairs: list[tuple[str, str | None]], legacy: bool) -> str:
    """The launch command, one flag per line; extra arguments (the dataset, logging) pass through."""
    lines = [f"{ENTRY} \\"]
    for flag, value in pairs:
        name = LEGACY[flag] if legacy else flag
        lines.append(f"   {name} {value} \\" if value is not None else f"   {name} \\")
    if legacy:
        head = f"# OpenRLHF's flat flags (before commit ed62d0e2) of {REPO}@{LEGACY_COMMIT[:8]}"
    else:
        head = f"# OpenRLHF's dotted flags of {REPO}@{COMMIT[:8]}"
    head = ["#!/usr/bin/env bash", head + "; give the prompt dataset and logging as extra arguments",
            "set -euo pipefail"]
    return "\n".join(head + lines + ['   "$@"']) + "\n"


def describe(plan: Plan, experiment: Experiment, shard: str) -> str:
    gen, actor = plan["actor_gen"], plan["actor_train"]
    where = placement({g: plan[c].mesh for g, c in GROUP_CALL.items() if c in experiment.workflow},
                      experiment.cluster.num_devices)
    return (f"{'every role and engine on all devices' if where == 'colocate_all' else 'roles on their own devices'}"
            f", {gen.dp} vLLM engines of tp {gen.tp}, DeepSpeed ZeRO-{ZERO_STAGE[shard]} tp {actor.tp} "
            f"dp {actor.dp} for the actor")


def export(experiment: Experiment, plan: Plan, legacy_flags: bool = False) -> Export:
    """The plan as OpenRLHF's launch command, ``command.sh`` (with ``legacy_flags``, the flat
    spelling of OpenRLHF before commit ed62d0e2)."""
    pr = project(experiment, plan)
    projected = pr.plan(FRAMEWORK)
    shard = projected["actor_train"].shard  # one ZeRO stage for every model
    pairs, notes = flags(experiment, projected, shard)
    return Export(FRAMEWORK, REPO, LEGACY_COMMIT if legacy_flags else COMMIT, plan, projected, tuple(pr.changes),
                  {"command.sh": command(pairs, legacy_flags)}, describe(projected, experiment, shard), tuple(notes))


# ---- import: the launch command back into an experiment and a plan ----------------------------

SWITCHES = {"--train.colocate_all", "--train.colocate_actor_ref", "--train.colocate_critic_reward",
            "--actor.gradient_checkpointing_enable", "--train.dynamic_batch_enable", "--ds.packing_samples",
            "--algo.kl.use_loss", "--ds.enable_sleep", "--vllm.enable_sleep"}
GROUP_FLAGS = {f"--{g}.{k}" for g in ("actor", "ref", "critic", "reward") for k in ("num_nodes", "num_gpus_per_node")}


def _arguments(text: str) -> dict[str, str | None]:
    """Flag → value (None for a switch) of the launch command, in the dotted spelling; the flat
    spelling is read too. An unknown flag or one given twice is refused by name."""
    body = text.replace("\\\n", " ")
    lines = [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    tokens = shlex.split(" ".join(lines))
    if ENTRY not in " ".join(tokens):
        raise ConfigError(f"openrlhf command: no {ENTRY!r} in it")
    tokens = tokens[tokens.index("openrlhf.cli.train_ppo_ray") + 1:]
    dotted = {v: k for k, v in LEGACY.items()}
    known = set(LEGACY) | GROUP_FLAGS
    out: dict[str, str | None] = {}
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        if flag == "$@":
            i += 1
            continue
        name = dotted.get(flag, flag)
        if name not in known:
            raise ConfigError(f"openrlhf command: flag {flag!r} is not one the importer reads; it reads what "
                              "python -m estimator.export openrlhf writes")
        if name in out:
            raise ConfigError(f"openrlhf command: flag {flag!r} is given twice")
        if name in SWITCHES:
            out[name], i = None, i + 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"openrlhf command: flag {flag!r} has no value")
            out[name], i = tokens[i + 1], i + 2
    return out


def _int(args: dict, flag: str, default: int | None = None) -> int:
    if flag not in args:
        if default is None:
            raise ConfigError(f"openrlhf command: flag {flag} is missing; the importer needs it")
        return default
    try:
        return int(args[flag])
    except (TypeError, ValueError):
        raise ConfigError(f"openrlhf command: {flag} {args[flag]!r} is not an integer") from None


def _float(args: dict, flag: str, default: float) -> float:
    try:
        return float(args.get(flag, default))
    except (TypeError, ValueError):
        raise ConfigError(f"openrlhf command: {flag} {args[flag]!r} is not a number") from None


def _read_groups(args: dict) -> tuple[dict[str, int], int, int, bool]:
    """Devices per group (vllm, actor, ref, critic, reward), the cluster's nodes and devices per
    node, and whether every group shares all devices. Separate groups are laid out in that order:
    Ray places them, the plan needs a placement."""
    sizes = {g: _int(args, f"--{g}.num_nodes", 1) * _int(args, f"--{g}.num_gpus_per_node", 8)
             for g in ("actor", "ref", "critic", "reward") if f"--{g}.num_gpus_per_node" in args}
    sizes["vllm"] = _int(args, "--vllm.num_engines") * _int(args, "--vllm.tensor_parallel_size")
    colocated = "--train.colocate_all" in args
    per_node = max(_int(args, f"--{g}.num_gpus_per_node") for g in sizes if g != "vllm")
    if colocated:
        total = sizes["actor"]
    else:
        shared = {"ref": "--train.colocate_actor_ref", "reward": "--train.colocate_critic_reward"}
        total = sum(n for g, n in sizes.items() if not (g in shared and shared[g] in args))
        per_node = per_node if any(_int(args, f"--{g}.num_nodes", 1) > 1 for g in sizes if g != "vllm") else total
    if total % per_node:
        raise ConfigError(f"openrlhf command: {total} devices in all do not fill nodes of {per_node}")
    return sizes, total // per_node, per_node, colocated


def import_command(text: str, device: str) -> tuple[dict, Plan, list[str]]:
    """The experiment (as an experiment file's mapping, on ``device``), the plan an OpenRLHF
    launch command describes and notes: OpenRLHF recomputes old log-probs, so the experiment has
    an ``actor_inf`` call on the actor's layout; a ZeRO stage above 0 is read into ``shard`` where
    the layouts carry it, and named in a note otherwise."""
    args = _arguments(text)
    sizes, nodes, per_node, colocated = _read_groups(args)
    grpo = args.get("--algo.advantage.estimator") == "group_norm"
    actor = args.get("--actor.model_name_or_path")
    if actor is None:
        raise ConfigError("openrlhf command: flag --actor.model_name_or_path is missing; the importer needs it")
    models = {"actor": preset_of(actor), "ref": preset_of(actor)}
    if not grpo:
        models["critic"] = preset_of(args.get("--critic.model_name_or_path", actor))
    reward = args.get("--reward.model_name_or_path")
    models["reward"] = preset_of(reward) if reward else "rule"
    batch, group = _int(args, "--rollout.batch_size"), _int(args, "--rollout.n_samples_per_prompt", 1)
    step = _int(args, "--train.batch_size")
    if step < 1 or (batch * group) % step:
        raise ConfigError(f"openrlhf command: --train.batch_size {step} must divide the {batch * group} samples of "
                          "an iteration")
    gen = _int(args, "--rollout.max_new_tokens")
    raw = {"algorithm": "grpo" if grpo else "ppo", "models": models, "batch_size": batch,
           "prompt_len": _int(args, "--data.max_len") - gen, "gen_len": gen, "ppo_minibatches": batch * group // step,
           "kv_fraction": _float(args, "--vllm.gpu_memory_utilization", 0.9), "old_logprobs": "recompute",
           "hyperparams": {"lr": _float(args, "--actor.adam.lr", 1e-6),
                           "clip_eps": _float(args, "--actor.eps_clip", 0.2),
                           "kl_coef": _float(args, "--algo.kl.init_coef", 0.01),
                           "temperature": _float(args, "--rollout.temperature", 1.0)},
           "cluster": {"nodes": nodes, "devices_per_node": per_node, "device": device}}
    if grpo:
        raw["group_size"] = group
    else:
        raw["hyperparams"] |= {"value_clip": _float(args, "--critic.value_clip", 0.5),
                               "gamma": _float(args, "--algo.advantage.gamma", 1.0),
                               "lam": _float(args, "--algo.advantage.lambd", 1.0)}
    experiment = experiment_from_dict(raw, where="openrlhf command")
    plan, notes = _read_plan(args, experiment, sizes, colocated)
    return raw, plan, notes


def _read_plan(args: dict, experiment: Experiment, sizes: dict[str, int],
               colocated: bool) -> tuple[Plan, list[str]]:
    wf, n = experiment.workflow, experiment.cluster.num_devices
    meshes: dict[str, DeviceMesh] = {}
    first = 0
    for g in ("vllm", "actor", "ref", "critic", "reward"):
        if g not in sizes:
            continue
        if colocated:
            meshes[g] = DeviceMesh(0, n)
        elif g == "ref" and "--train.colocate_actor_ref" in args:
            meshes[g] = meshes["actor"]
        elif g == "reward" and "--train.colocate_critic_reward" in args and "critic" in meshes:
            meshes[g] = meshes["critic"]
        else:
            meshes[g], first = DeviceMesh(first, sizes[g]), first + sizes[g]
    zero = _int(args, "--ds.zero_stage", 2)
    shard = ZERO_READ.get(zero)
    if shard is None:
        raise ConfigError(f"openrlhf command: --ds.zero_stage {zero}: the importer reads 0, 1, 2 and 3")
    notes: list[str] = []
    tp_ds, gen_tp = _int(args, "--ds.tensor_parallel_size", 1), _int(args, "--vllm.tensor_parallel_size")
    calls: dict[str, dict] = {}
    for c in wf.call_names:
        call = wf[c]
        group = {"actor_gen": "vllm", "actor_inf": "actor", "actor_train": "actor", "ref_inf": "ref",
                 "critic_inf": "critic", "critic_train": "critic", "reward_inf": "reward"}[c]
        mesh = meshes[group]
        tp = gen_tp if call.kind == "generate" else tp_ds
        lay = {"mesh": str(mesh), "dp": mesh.size // tp, "tp": tp, "pp": 1, "micro_batches": 1}
        if call.kind != "generate":
            lay |= _read_micro(args, call, lay["dp"])
        if call.kind == "train":
            lay |= {"recompute": "full"} if "--actor.gradient_checkpointing_enable" in args else {}
            lay |= {"shard": shard} if shard != "none" else {}
            lay |= {"offload": "optimizer"} if "--ds.enable_sleep" in args else {}
        calls[c] = lay
    return Plan.from_data({"calls": calls}, where="openrlhf command"), notes


def _read_micro(args: dict, call, dp: int) -> dict:
    train = call.kind == "train"
    if "--train.dynamic_batch_enable" in args:
        flag = "--train.max_tokens_per_gpu" if train else "--rollout.max_tokens_per_gpu"
        return {"max_tokens_per_micro_batch": _int(args, flag, _int(args, "--train.max_tokens_per_gpu"))}
    flag = "--train.micro_batch_size" if train else "--rollout.micro_batch_size"
    rows, units = _int(args, flag, 1), call.workload.units_per_minibatch
    if rows < 1 or units % (dp * rows):
        raise ConfigError(f"openrlhf command: {flag} {rows}: call {call.name}'s {units} rows per step do not split "
                          f"into micro-batches of {rows} over dp = {dp}")
    return {"micro_batches": units // (dp * rows)}
