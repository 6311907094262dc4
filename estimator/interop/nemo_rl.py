"""NeMo-RL: a plan as an overlay of NeMo-RL's GRPO config.

Key names and rules are taken from NVIDIA-NeMo/RL at commit
7ea279abfbeb698b092856d0dab61e7cf39bc909 (2026-08-22):

- ``examples/configs/grpo_math_1B.yaml``, the GRPO config the examples start from (copied into
  ``tests/fixtures/nemo-rl/``; every key written here is looked up in it);
- ``nemo_rl/algorithms/grpo.py`` (``setup``): the policy's workers run on every device when
  generation is colocated (``policy.generation.colocated.enabled``); otherwise generation
  takes ``colocated.resources.gpus_per_node`` devices of a single node (or
  ``colocated.resources.num_nodes`` whole nodes) and the policy the rest; the previous and the
  reference log-probs are computed by the policy's workers (``get_logprobs``,
  ``get_reference_policy_logprobs``), one ``logprob_batch_size`` for both;
- ``nemo_rl/models/generation/vllm/vllm_worker.py``: ``policy.generation.vllm_kwargs`` is passed
  to the vLLM engine, which is where its ``max_num_seqs`` goes.

The policy trains with DTensor (FSDP2: ``shard: full``; tensor parallelism, no pipeline stages)
or with Megatron (``megatron_cfg``: tensor and pipeline parallelism, a distributed optimizer
for ``shard: optimizer``); a sharded plan with pipeline stages runs on Megatron with the
optimizer state sharded. One dynamic-batching switch serves training and log-probs
(``train_mb_tokens``, ``logprob_mb_tokens``); sequence packing is switched off so micro-batches
are as the plan counts them. NeMo-RL's GRPO has no critic and no reward model call (rewards come
from its environments): such experiments are refused.

Offload is not a switch with colocated generation: ``grpo.py`` always calls
``policy.offload_after_refit()`` before generating ("unload optimizer to make space for
generation"), which moves the policy's optimizer state and then its parameters to the host
(``dtensor_policy_worker.py``), and ``prepare_for_lp_inference`` / ``prepare_for_training`` move
them back — the plan's ``offload: all``, which the projection sets. With generation apart, only
``policy.offload_optimizer_for_logprob`` moves the optimizer state out while the policy computes
log-probs, the only other calls on its devices: ``offload: optimizer``; the parameters stay.
(``dtensor_cfg.cpu_offload`` is FSDP2's CPU offload policy, parameters kept on the host through
every pass, which the plan vocabulary does not have.)
"""

from __future__ import annotations

from math import gcd

from estimator.base.errors import ConfigError
from estimator.interop.common import (
    Export,
    Projection,
    micro_batches_for,
    micro_rows,
    model_path,
    overlay_export,
    per_rank,
    token_caps,
)
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout, Plan

FRAMEWORK = "nemo-rl"
REPO = "NVIDIA-NeMo/RL"
COMMIT = "7ea279abfbeb698b092856d0dab61e7cf39bc909"
POLICY_CALLS = ("actor_train", "actor_inf", "ref_inf")  # the policy's workers run all three


def _refuse(experiment: Experiment) -> None:
    if experiment.algorithm != "grpo":
        raise ConfigError(f"nemo-rl: the exporter writes NeMo-RL's GRPO config, not {experiment.algorithm}")
    if "reward_inf" in experiment.workflow:
        raise ConfigError("nemo-rl: NeMo-RL's GRPO scores rollouts in its environments, it has no reward-model "
                          "call; give models.reward: rule to export this experiment")


def _policy_mesh(experiment: Experiment, gen: DeviceMesh, actor: Layout) -> DeviceMesh | None:
    """The policy's devices when generation runs on ``gen`` apart: the rest of the cluster, or
    None when generation does not take what NeMo-RL can give it (a run at one end of the
    devices; whole nodes on several) or the actor's training cannot run on the rest with its
    tp and pp (its batch split evenly over the data-parallel ranks left)."""
    cl = experiment.cluster
    n, per = cl.num_devices, cl.devices_per_node
    if gen.first == 0 and gen.size < n:
        rest = DeviceMesh(gen.size, n - gen.size)
    elif gen.last == n - 1 and gen.first > 0:
        rest = DeviceMesh(0, gen.first)
    else:
        return None
    if cl.mesh_problems(rest) or (cl.nodes > 1 and gen.size % per):
        return None
    model_parallel = actor.tp * actor.pp
    units = experiment.workflow["actor_train"].workload.units_per_minibatch
    if rest.size % model_parallel or units % (rest.size // model_parallel) or cl.tp_problem(rest, actor.tp):
        return None
    return rest


def project(experiment: Experiment, plan: Plan) -> Projection:
    """The plan as NeMo-RL's GRPO runs it (the module docstring's rules)."""
    _refuse(experiment)
    pr = Projection(experiment, plan)
    wf, n = experiment.workflow, experiment.cluster.num_devices
    full = DeviceMesh(0, n)
    actor = pr["actor_train"]
    if actor.pp > 1 and actor.shard == "full":
        pr.set("actor_train", "NeMo-RL's DTensor policy (which shards parameters) has no pipeline stages; its "
                              "Megatron policy shards the optimizer state", shard="optimizer")
    gen, home = pr["actor_gen"], pr["actor_train"].mesh
    apart = _policy_mesh(experiment, gen.mesh, pr["actor_train"])
    if gen.mesh == home == full:
        target = full
    elif apart is not None and apart == home:
        target = home
    elif apart is not None and not gen.mesh.overlaps(home):
        target = apart
    else:
        target = full
        if gen.mesh != full:
            pr.set("actor_gen", "NeMo-RL generates on every device (colocated) or on devices the policy does not use",
                   mesh=full, dp=n // (gen.tp * gen.pp))
    if pr["actor_train"].mesh != target:
        lay = pr["actor_train"]
        dp = target.size // (lay.tp * lay.pp)
        pr.set("actor_train", "NeMo-RL's policy workers take every device: all of them with colocated generation, "
                              "else those generation does not",
               mesh=target, dp=dp, micro_batches=_micro(wf["actor_train"], lay, dp))
    home = pr["actor_train"]
    for c in ("actor_inf", "ref_inf"):
        if c in wf:
            lay = pr[c]
            pr.set(c, f"NeMo-RL computes {'previous' if c == 'actor_inf' else 'reference'} log-probs in the policy's "
                      "workers", mesh=home.mesh, dp=home.dp, tp=home.tp, pp=home.pp,
                   micro_batches=_micro(wf[c], lay, home.dp))
    home = pr["actor_train"]
    if pr["actor_gen"].mesh == home.mesh and home.offload != "all":
        pr.set("actor_train", "NeMo-RL's colocated GRPO moves the policy's optimizer state and parameters to the "
                              "host before every generation (offload_after_refit) and back for log-probs and "
                              "training", offload="all")
    elif pr["actor_gen"].mesh != home.mesh and home.offload == "all":
        pr.set("actor_train", "with generation apart NeMo-RL moves only the optimizer state to the host, while the "
                              "policy computes log-probs (policy.offload_optimizer_for_logprob)", offload="optimizer")
    _batches(experiment, pr)
    return pr


def _micro(call, layout, dp: int) -> int:
    return 1 if layout.token_budget else micro_batches_for(call, dp, micro_rows(call, layout), FRAMEWORK)


def _batches(experiment: Experiment, pr: Projection) -> None:
    """One logprob batch size for both log-prob calls; one dynamic-batching switch for all."""
    wf = experiment.workflow
    calls = [c for c in POLICY_CALLS if c in wf]
    if any(pr[c].token_budget for c in calls):
        for c in calls:
            lay = pr[c]
            if not lay.token_budget:
                budget = max(micro_rows(wf[c], lay) * wf[c].workload.seq_len, wf[c].workload.seq_len)
                pr.set(c, "NeMo-RL's dynamic batching is one switch for training and log-probs",
                       micro_batches=1, max_tokens_per_micro_batch=budget)
        infs = [c for c in calls if wf[c].kind == "inference"]
        budget = min((pr[c].max_tokens_per_micro_batch for c in infs), default=0)
        for c in infs:
            pr.set(c, "NeMo-RL has one logprob_mb_tokens for both log-prob calls", max_tokens_per_micro_batch=budget)
        return
    infs = [c for c in calls if wf[c].kind == "inference"]
    rows = 0
    for c in infs:
        rows = gcd(rows, micro_rows(wf[c], pr[c]))
    for c in infs:
        pr.set(c, f"NeMo-RL has one policy.logprob_batch_size for both log-prob calls: {rows}, the largest "
                  "dividing each", micro_batches=per_rank(wf[c], pr[c].dp, FRAMEWORK) // rows)


def config(experiment: Experiment, plan: Plan) -> tuple[dict, list[str]]:
    """The overlay for a plan NeMo-RL runs as given, and notes."""
    wf, p, h, cl = experiment.workflow, experiment.params, experiment.hyper, experiment.cluster
    prompt_cap, gen_cap = token_caps(experiment)
    actor, gen = plan["actor_train"], plan["actor_gen"]
    megatron = actor.shard != "full"
    path, note = model_path(experiment, "actor")
    notes = [note] if note else []
    infs = [c for c in ("actor_inf", "ref_inf") if c in wf]
    policy: dict = {"model_name": path, "precision": "bfloat16", "max_total_sequence_length": prompt_cap + gen_cap,
                    "train_global_batch_size": wf["actor_train"].workload.units_per_minibatch,
                    "sequence_packing": {"enabled": False}}
    if actor.token_budget:
        policy["dynamic_batching"] = {"enabled": True, "train_mb_tokens": actor.max_tokens_per_micro_batch}
        if infs:
            policy["dynamic_batching"]["logprob_mb_tokens"] = plan[infs[0]].max_tokens_per_micro_batch
    else:
        policy["dynamic_batching"] = {"enabled": False}
        policy["train_micro_batch_size"] = micro_rows(wf["actor_train"], actor)
        if infs:
            policy["logprob_batch_size"] = micro_rows(wf[infs[0]], plan[infs[0]])
    checkpointing = actor.recompute == "full"
    if megatron:
        policy["dtensor_cfg"] = {"enabled": False}
        optimizer = {"lr": h.lr, "use_distributed_optimizer": actor.shard == "optimizer"}
        policy["megatron_cfg"] = {"enabled": True, "tensor_model_parallel_size": actor.tp,
                                  "pipeline_model_parallel_size": actor.pp, "activation_checkpointing": checkpointing,
                                  "optimizer": optimizer}
    else:
        policy["dtensor_cfg"] = {"enabled": True, "tensor_parallel_size": actor.tp,
                                 "activation_checkpointing": checkpointing}
        policy["megatron_cfg"] = {"enabled": False}
        policy["optimizer"] = {"kwargs": {"lr": h.lr}}
    colocated = gen.mesh == actor.mesh
    resources = {} if colocated else ({"gpus_per_node": None, "num_nodes": gen.mesh.size // cl.devices_per_node}
                                      if cl.nodes > 1 else {"gpus_per_node": gen.mesh.size, "num_nodes": 1})
    policy["generation"] = {
        "backend": "vllm", "max_new_tokens": gen_cap, "temperature": h.temperature,
        "vllm_cfg": {"tensor_parallel_size": gen.tp, "pipeline_parallel_size": gen.pp,
                     "gpu_memory_utilization": experiment.kv_fraction, "max_model_len": prompt_cap + gen_cap},
        "colocated": {"enabled": colocated} | ({"resources": resources} if resources else {})}
    if gen.max_concurrency:
        policy["generation"]["vllm_kwargs"] = {"max_num_seqs": gen.max_concurrency}
    if not colocated and actor.offload == "optimizer":
        policy["offload_optimizer_for_logprob"] = True
    out = {"cluster": {"gpus_per_node": cl.devices_per_node, "num_nodes": cl.nodes},
           "grpo": {"num_prompts_per_step": p.batch_size, "num_generations_per_prompt": p.group_size},
           "loss_fn": {"reference_policy_kl_penalty": h.kl_coef, "ratio_clip_min": h.clip_eps,
                       "ratio_clip_max": h.clip_eps},
           "policy": policy, "data": {"max_input_seq_length": prompt_cap}}
    if p.old_logprobs == "from_generation":
        notes.append("NeMo-RL recomputes the previous log-probs in the policy's workers before training, a forward "
                     "pass this experiment (old_logprobs: from_generation) does not have; the predictions do not "
                     "include it (set old_logprobs: recompute to plan for it)")
    if colocated:
        notes.append("generation colocated with the policy: NeMo-RL puts vLLM to sleep while the policy trains, as "
                     "the plan's memory model assumes (the engine holds memory only while it generates)")
    return out, notes


def describe(plan: Plan, experiment: Experiment) -> str:
    gen, actor = plan["actor_gen"], plan["actor_train"]
    kind = f"Megatron tp {actor.tp} pp {actor.pp}" if actor.shard != "full" else f"DTensor tp {actor.tp}"
    where = ("colocated on all devices" if gen.mesh == actor.mesh
             else f"generation on {gen.mesh}, policy on {actor.mesh}")
    return f"{where}, vLLM tp {gen.tp} pp {gen.pp} × {gen.dp}, policy {kind} dp {actor.dp}"


def export(experiment: Experiment, plan: Plan) -> Export:
    """The plan as an overlay of NeMo-RL's GRPO config, ``config.yaml``."""
    header = (f"NeMo-RL config overlay ({REPO}@{COMMIT[:8]}): pass it as the GRPO config's overrides, e.g. "
              "merged over examples/configs/grpo_math_1B.yaml")
    return overlay_export(FRAMEWORK, REPO, COMMIT, header, experiment, plan, project(experiment, plan), config,
                          describe)
