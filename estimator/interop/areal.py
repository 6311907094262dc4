"""AReaL: a plan as an overlay of AReaL's GRPO/PPO experiment config, with its backend strings.

Key names, the allocation grammar and the placement rules are taken from inclusionAI/AReaL at
commit 4aef98d8d818af55b43621aaadba047ae10f4e77 (2026-05-21), copied into
``tests/fixtures/areal/`` (every key written here is walked through its dataclasses, every
backend string matched against its grammar):

- ``areal/api/cli_args.py``: ``PPOConfig`` / ``GRPOConfig`` — ``rollout`` (an
  ``InferenceEngineConfig``), ``actor``, ``ref``, ``critic`` (train engines, each with its own
  ``backend``, ``mb_spec`` and ``scheduling_strategy``), ``gconfig``, ``sglang``, ``cluster``;
- ``areal/api/alloc_mode.py`` (``ALLOCATION_GRAMMAR``) and ``docs/en/reference/alloc_mode.md``:
  a backend string is ``<backend>:<dims>``, ``sglang`` / ``vllm`` with ``d``, ``t``, ``p`` for
  generation (``d`` servers of ``t × p`` devices), ``fsdp`` with ``d``, ``t`` (no pipeline
  stages) and ``megatron`` with ``d``, ``p``, ``t`` for training;
- ``areal/trainer/rl_trainer.py``: the rollout servers run on devices of their own
  (``scheduling_strategy: separation``) or on the actor's (``colocation`` with target
  ``actor``, which needs ``enable_offload`` and ``actor.weight_update_mode: disk``); the
  reference and the critic are colocated with the actor, as AReaL's examples configure them.

The projection: ``actor_inf`` (AReaL's ``recompute_logprob``) runs in the actor's engine with its
``mb_spec``, ``critic_inf`` in the critic's; the reference and the critic on the actor's devices;
generation either on the actor's devices or on devices no training engine uses; FSDP (``shard:
full``) has no pipeline stages, so a sharded train call with ``pp > 1`` runs on Megatron with a
distributed optimizer (``shard: optimizer``); a reference engine on FSDP has no pipeline stages
either. Generation runs synchronously (``max_head_offpolicyness: 0``), as the plan predicts.
A reward model is refused: AReaL's PPO experiment scores rollouts with a reward function.

Offload: an engine with ``offload: true`` (``TrainEngineConfig``; the experiment's
``enable_offload`` switches torch_memory_saver on) pauses its whole CUDA memory — parameters,
gradients, optimizer state — between its calls and resumes it for each
(``areal/trainer/rl_trainer.py``, ``fsdp_engine.py``: ``offload`` / ``onload``): the plan's
``offload: all``; ``optimizer`` alone has no spelling and runs as ``all``. A rollout colocated
with the actor always offloads the actor (``_should_offload_actor``), so the projection sets
``all`` there.
"""

from __future__ import annotations

from estimator.base.errors import ConfigError
from estimator.interop.common import (
    Export,
    Projection,
    micro_batches_for,
    micro_rows,
    model_path,
    overlay_export,
    token_caps,
)
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout, Plan

FRAMEWORK = "areal"
REPO = "inclusionAI/AReaL"
COMMIT = "4aef98d8d818af55b43621aaadba047ae10f4e77"
ENGINE_CALLS = {"actor": ("actor_train", "actor_inf"), "ref": ("ref_inf",), "critic": ("critic_train", "critic_inf")}


def _backend(lay: Layout, megatron: bool) -> str:
    return f"megatron:d{lay.dp}p{lay.pp}t{lay.tp}" if megatron else f"fsdp:d{lay.dp}t{lay.tp}"


def _refuse(experiment: Experiment) -> None:
    if experiment.algorithm not in ("ppo", "grpo"):
        raise ConfigError(f"areal: the exporter writes AReaL's PPO/GRPO experiments, not {experiment.algorithm}")
    if "reward_inf" in experiment.workflow:
        raise ConfigError(f"areal: AReaL's PPOConfig at commit {COMMIT[:8]} has no reward-model engine (its rewards "
                          "are functions of the rollout); give models.reward: rule to export this experiment")


def project(experiment: Experiment, plan: Plan) -> Projection:
    """The plan as AReaL runs it (the module docstring's rules)."""
    _refuse(experiment)
    pr = Projection(experiment, plan)
    wf = experiment.workflow
    actor = pr["actor_train"]
    if actor.pp > 1 and actor.shard == "full":
        pr.set("actor_train", "AReaL's FSDP backend (which shards parameters) has no pipeline stages; its Megatron "
                              "backend shards the optimizer state", shard="optimizer")
    megatron = pr["actor_train"].shard != "full"
    for c in ("ref_inf", "critic_train"):
        if c in wf:
            _on_actor_devices(pr, experiment, c, megatron)
    for inf, train in (("actor_inf", "actor_train"), ("critic_inf", "critic_train")):
        if inf in wf and train in wf:
            home = pr[train]
            pr.set(inf, f"AReaL runs {inf} in the {wf[train].role}'s engine, with its mb_spec",
                   dp=home.dp, tp=home.tp, pp=home.pp, mesh=home.mesh, micro_batches=home.micro_batches,
                   max_tokens_per_micro_batch=home.max_tokens_per_micro_batch)
    if "critic_train" in wf and pr["critic_train"].shard != pr["actor_train"].shard:
        pr.set("critic_train", "the critic takes the actor's training backend", shard=pr["actor_train"].shard)
    gen, home = pr["actor_gen"], pr["actor_train"].mesh
    if gen.mesh != home and gen.mesh.overlaps(home):
        pr.set("actor_gen", "AReaL runs its rollout servers on the actor's devices (colocation) or on devices of "
                            "their own (separation)", mesh=home, dp=home.size // (gen.tp * gen.pp))
    if pr["actor_gen"].mesh == home and pr["actor_train"].offload != "all":
        pr.set("actor_train", "AReaL offloads the actor's engine whenever the rollout is colocated with it "
                              "(torch_memory_saver: parameters, gradients and optimizer state)", offload="all")
    for c in ("actor_train", "critic_train"):
        if c in wf and pr[c].offload == "optimizer":
            pr.set(c, "AReaL's engine offload (offload: true) pauses all of the engine's memory, not the optimizer "
                      "state alone", offload="all")
    return pr


def _on_actor_devices(pr: Projection, experiment: Experiment, call: str, megatron: bool) -> None:
    """Reference and critic engines are colocated with the actor; FSDP has no pipeline stages."""
    wf, home, lay = experiment.workflow, pr["actor_train"].mesh, pr[call]
    pp = lay.pp if megatron else 1
    if lay.mesh != home or pp != lay.pp:
        tp = min(lay.tp, home.size)
        pp = min(pp, home.size // tp)
        dp = home.size // (tp * pp)
        mb = lay.micro_batches if lay.token_budget else micro_batches_for(wf[call], dp, micro_rows(wf[call], lay),
                                                                          FRAMEWORK)
        why = (f"AReaL colocates the {wf[call].role} with the actor (scheduling_strategy colocation)"
               if lay.mesh != home else "AReaL's FSDP backend has no pipeline stages")
        pr.set(call, why, mesh=home, dp=dp, tp=tp, pp=pp, micro_batches=mb)


def _mb_spec(lay: Layout) -> dict:
    if lay.token_budget:
        return {"n_mbs": 1, "max_tokens_per_mb": lay.max_tokens_per_micro_batch}
    return {"n_mbs": lay.micro_batches, "max_tokens_per_mb": None}


def _train_engine(experiment: Experiment, plan: Plan, call: str, megatron: bool) -> dict:
    lay, h = plan[call], experiment.hyper
    out = {"backend": _backend(lay, megatron), "mb_spec": _mb_spec(lay),
           "gradient_checkpointing": lay.recompute == "full",
           "optimizer": {"type": "adam", "lr": h.lr},
           "ppo_n_minibatches": experiment.params.ppo_minibatches, "dtype": "bfloat16"}
    if lay.offload == "all":
        out["offload"] = True
    if megatron:
        out["megatron"] = {"ddp": {"use_distributed_optimizer": lay.shard == "optimizer"}}
        if lay.recompute == "full":
            out["megatron"] |= {"recompute_granularity": "full", "recompute_method": "uniform",
                                "recompute_num_layers": 1}
    return out


def config(experiment: Experiment, plan: Plan) -> tuple[dict, list[str]]:
    """The overlay (nested keys of AReaL's config) for a plan AReaL runs as given, and notes."""
    wf, p, h, cl = experiment.workflow, experiment.params, experiment.hyper, experiment.cluster
    prompt_cap, gen_cap = token_caps(experiment)
    megatron = plan["actor_train"].shard != "full"
    gen = plan["actor_gen"]
    colocated = gen.mesh == plan["actor_train"].mesh
    notes: list[str] = []
    path, note = model_path(experiment, "actor")
    notes += [note] if note else []
    actor = _train_engine(experiment, plan, "actor_train", megatron) | {
        "path": path, "recompute_logprob": p.old_logprobs == "recompute", "use_decoupled_loss": False,
        "eps_clip": h.clip_eps, "kl_ctl": h.kl_coef, "discount": h.gamma, "gae_lambda": h.lam,
        "temperature": h.temperature}
    out: dict = {"cluster": {"n_nodes": cl.nodes, "n_gpus_per_node": cl.devices_per_node},
                 "rollout": {"backend": f"sglang:d{gen.dp}p{gen.pp}t{gen.tp}", "max_head_offpolicyness": 0,
                             "max_concurrent_rollouts": wf["actor_gen"].workload.seqs,
                             "consumer_batch_size": p.batch_size},
                 "sglang": {"mem_fraction_static": experiment.kv_fraction,
                            "max_running_requests": gen.max_concurrency or None,
                            "context_length": prompt_cap + gen_cap},
                 "gconfig": {"n_samples": p.group_size, "max_new_tokens": gen_cap,
                             "min_new_tokens": gen_cap if p.gen_lengths.fixed else 0, "temperature": h.temperature},
                 "train_dataset": {"batch_size": p.batch_size, "max_length": prompt_cap},
                 "actor": actor}
    if colocated:
        out["rollout"]["scheduling_strategy"] = {"type": "colocation", "target": "actor"}
        out["enable_offload"] = True
        actor["weight_update_mode"] = "disk"
        notes.append("rollout colocated with the actor: AReaL moves weights to the rollout servers through disk, "
                     "which the predictions do not charge")
    else:
        out["rollout"]["scheduling_strategy"] = {"type": "separation"}
    if any(plan[c].offload == "all" for c in ("actor_train", "critic_train") if c in wf):
        out["enable_offload"] = True  # an engine's offload needs torch_memory_saver
    ref = plan["ref_inf"]
    out["ref"] = {"backend": _backend(ref, megatron), "path": path, "mb_spec": _mb_spec(ref), "optimizer": None,
                  "scheduling_strategy": {"type": "colocation", "target": "actor"}}
    if "critic_train" in wf:
        cpath, note = model_path(experiment, "critic")
        notes += [note] if note else []
        out["critic"] = _train_engine(experiment, plan, "critic_train", megatron) | {
            "path": cpath, "is_critic": True, "eps_clip": h.value_clip,
            "scheduling_strategy": {"type": "colocation", "target": "actor"}}
    if experiment.verifier:
        notes.append("verifier rewards: AReaL's training script passes the reward function to the workflow")
    return out, notes


def describe(plan: Plan, experiment: Experiment) -> str:
    gen, actor = plan["actor_gen"], plan["actor_train"]
    where = "on the actor's devices" if gen.mesh == actor.mesh else f"on devices {gen.mesh}"
    megatron = actor.shard != "full"
    return f"rollout sglang:d{gen.dp}p{gen.pp}t{gen.tp} {where}, actor {_backend(actor, megatron)} on {actor.mesh}"


def export(experiment: Experiment, plan: Plan) -> Export:
    """The plan as an overlay of AReaL's config, ``config.yaml``."""
    header = (f"AReaL config overlay ({REPO}@{COMMIT[:8]}, areal/api/cli_args.py): merge over your experiment's "
              "config")
    return overlay_export(FRAMEWORK, REPO, COMMIT, header, experiment, plan, project(experiment, plan), config,
                          describe)
