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
are as the plan counts them; vLLM with pipeline stages runs one virtual engine per stage
(micro-batches = pp). NeMo-RL's GRPO has no critic and no reward model call (rewards come
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

The importer (:func:`import_config`) reads such an overlay back, or a config of the same keys:
the policy's model (as actor and reference), ``grpo.num_prompts_per_step`` prompts of
``num_generations_per_prompt`` samples, ``train_global_batch_size`` samples per optimizer step,
the prompt cap ``data.max_input_seq_length`` and the response cap ``generation.max_new_tokens``
(cut to what ``vllm_cfg.max_model_len`` leaves after a prompt), the cluster; the policy's
workers on Megatron (``shard: optimizer`` unless ``megatron_cfg.optimizer.use_distributed_optimizer``
is False) or DTensor (``shard: full``), over more than one data-parallel rank; micro-batches by
``train_micro_batch_size`` and ``logprob_batch_size`` rows, or token budgets under dynamic batching
or sequence packing (``train_mb_tokens``, ``logprob_mb_tokens``; packing leaves out padding, which
the plan's budget counts, said in a note); generation on every device when colocated, otherwise
the policy's cluster first (``grpo.setup`` creates it before the inference cluster) and
generation on the devices ``colocated.resources`` gives it. NeMo-RL always recomputes the previous
log-probs, so the experiment has ``old_logprobs: recompute``. Where a key is not given it takes
the value of ``examples/configs/grpo_math_1B.yaml`` at the commit above: ``cluster`` 1 node of 1
GPU, ``model_name`` Qwen/Qwen2.5-1.5B, 32 prompts × 16 generations, ``train_global_batch_size``
512, ``train_micro_batch_size`` 4 (``logprob_batch_size`` the same), ``max_total_sequence_length``
512 (the prompt and response caps and ``max_model_len`` default to it), DTensor with tp 1 and no
activation checkpointing, sequence packing on with ``max_total_sequence_length ×
train_micro_batch_size`` tokens, colocated vLLM with tp 1, pp 1 and ``gpu_memory_utilization``
0.6, ``temperature`` 1.0, ``reference_policy_kl_penalty`` 0.01, ``ratio_clip_min`` and
``ratio_clip_max`` 0.2, ``lr`` 5e-6.
"""

from __future__ import annotations

from math import gcd

from estimator.base.errors import ConfigError
from estimator.interop.common import (
    Export,
    Projection,
    Settings,
    micro_batches_for,
    micro_rows,
    model_path,
    overlay_export,
    overlay_settings,
    per_rank,
    preset_of,
    token_caps,
)
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment, experiment_from_dict
from estimator.spec.plan import Layout, Plan
from estimator.spec.stack import FSDP_VLLM, MEGATRON_VLLM

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
    gen = pr["actor_gen"]
    if gen.micro_batches != gen.pp:
        pr.set("actor_gen", "vLLM runs one virtual engine per pipeline stage (micro-batches = pp)",
               micro_batches=gen.pp)
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
    # grpo.setup: on one node gpus_per_node devices of it; on several, num_nodes whole nodes with gpus_per_node
    # equal to cluster.gpus_per_node (it asserts both)
    resources = {} if colocated else ({"gpus_per_node": cl.devices_per_node,
                                       "num_nodes": gen.mesh.size // cl.devices_per_node}
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
    else:
        notes.append("Ray places the policy's and the inference cluster's workers; the plan's device ranges are the "
                     "placement the predictions assume, the same time wherever the devices are alike")
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


# ---- import: the overlay back into an experiment and a plan -----------------------------------

WHERE = "nemo-rl config"
P = "policy"
G = "policy.generation"


def _lengths(r: Settings) -> tuple[int, int, list[str]]:
    """(prompt, response) caps: the response is what ``max_new_tokens`` allows within the
    engine's ``max_model_len`` after the longest prompt."""
    total = r.number(f"{P}.max_total_sequence_length", int, 512)
    prompt = r.number("data.max_input_seq_length", int, total)
    model_len = r.number(f"{G}.vllm_cfg.max_model_len", int, total)
    new = r.number(f"{G}.max_new_tokens", int, total)
    gen = min(new, model_len - prompt)
    if gen < 1 and not r.has("data.max_input_seq_length"):
        raise ConfigError(f"{WHERE}: data.max_input_seq_length is not given: its default, max_total_sequence_length="
                          f"{total}, leaves no room for a response; give the prompts' cap")
    if gen < 1:
        raise ConfigError(f"{WHERE}: data.max_input_seq_length={prompt} leaves no room for a response within "
                          f"{G}.vllm_cfg.max_model_len={model_len}")
    notes = [] if gen == new else [f"responses end at {gen} tokens, the room {G}.vllm_cfg.max_model_len={model_len} "
                                   f"leaves after a prompt of {prompt} ({G}.max_new_tokens={new})"]
    return prompt, gen, notes


def read_experiment(r: Settings, device: str) -> tuple[dict, list[str]]:
    """The GRPO experiment the overlay describes (lengths at their caps; old log-probs recomputed,
    as NeMo-RL always does), as the experiment file's mapping, and notes."""
    model = preset_of(r.text(f"{P}.model_name", "Qwen/Qwen2.5-1.5B"))
    prompts = r.number("grpo.num_prompts_per_step", int, 32)
    group = r.number("grpo.num_generations_per_prompt", int, 16)
    step = r.number(f"{P}.train_global_batch_size", int, 512)
    if step < 1 or (prompts * group) % step:
        raise ConfigError(f"{WHERE}: {P}.train_global_batch_size={step} must divide the {prompts * group} samples of "
                          "a step (num_prompts_per_step × num_generations_per_prompt)")
    prompt, gen, notes = _lengths(r)
    notes.append("NeMo-RL stops each response at its end-of-sequence token; the config keeps only the cap, at which "
                 "the prediction takes every response unless given their mean")
    lo, hi = r.number("loss_fn.ratio_clip_min", float, 0.2), r.number("loss_fn.ratio_clip_max", float, 0.2)
    if hi != lo:
        notes.append(f"loss_fn.ratio_clip_max={hi:g} differs from ratio_clip_min={lo:g}: the experiment keeps one "
                     "clip (the lower), which no time depends on")
    megatron = r.flag(f"{P}.megatron_cfg.enabled", False)
    lr = r.number(f"{P}.megatron_cfg.optimizer.lr" if megatron else f"{P}.optimizer.kwargs.lr", float, 5e-6)
    if r.text(f"{P}.precision", "bfloat16") != "bfloat16":
        raise ConfigError(f"{WHERE}: {P}.precision={r.values[f'{P}.precision']!r}: the planner prices bfloat16")
    raw = {"algorithm": "grpo", "models": {"actor": model, "ref": model, "reward": "rule"}, "batch_size": prompts,
           "group_size": group, "prompt_len": prompt, "gen_len": gen, "ppo_minibatches": prompts * group // step,
           "kv_fraction": r.number(f"{G}.vllm_cfg.gpu_memory_utilization", float, 0.6), "old_logprobs": "recompute",
           "hyperparams": {"lr": lr, "kl_coef": r.number("loss_fn.reference_policy_kl_penalty", float, 0.01),
                           "clip_eps": lo, "temperature": r.number(f"{G}.temperature", float, 1.0)},
           "cluster": {"nodes": r.number("cluster.num_nodes", int, 1),
                       "devices_per_node": r.number("cluster.gpus_per_node", int, 1), "device": device,
                       "stack": MEGATRON_VLLM if megatron else FSDP_VLLM}}
    return raw, notes


def _meshes(r: Settings, experiment: Experiment) -> tuple[DeviceMesh, DeviceMesh]:
    """(policy, generation) devices: all of them with colocated generation; otherwise the policy's
    cluster first, as ``grpo.setup`` creates it before the inference cluster."""
    cl = experiment.cluster
    n, per = cl.num_devices, cl.devices_per_node
    if r.flag(f"{G}.colocated.enabled", True):
        return DeviceMesh(0, n), DeviceMesh(0, n)
    gpus = r.optional(f"{G}.colocated.resources.gpus_per_node", int, None)
    nodes = r.optional(f"{G}.colocated.resources.num_nodes", int, None)
    key = f"{G}.colocated.resources"
    if cl.nodes == 1:
        if not gpus or gpus >= per or nodes not in (None, 1):
            raise ConfigError(f"{WHERE}: {key}.gpus_per_node={gpus}, num_nodes={nodes}: on one node, generation "
                              f"apart takes 1 to {per - 1} of its {per} devices (num_nodes 1 or null)")
        return DeviceMesh(0, per - gpus), DeviceMesh(per - gpus, gpus)
    if not nodes or nodes >= cl.nodes or gpus != per:
        raise ConfigError(f"{WHERE}: {key}.num_nodes={nodes}, gpus_per_node={gpus}: on {cl.nodes} nodes, generation "
                          f"apart takes 1 to {cl.nodes - 1} whole nodes (gpus_per_node {per})")
    return DeviceMesh(0, n - nodes * per), DeviceMesh(n - nodes * per, nodes * per)


def _policy(r: Settings) -> tuple[int, int, str, bool]:
    """(tp, pp, shard, recompute) of the policy's workers: Megatron or DTensor (FSDP2)."""
    megatron, dtensor = r.flag(f"{P}.megatron_cfg.enabled", False), r.flag(f"{P}.dtensor_cfg.enabled", True)
    if megatron == dtensor:
        raise ConfigError(f"{WHERE}: {P}.megatron_cfg.enabled={megatron} and {P}.dtensor_cfg.enabled={dtensor}: "
                          "exactly one policy backend runs")
    if megatron:
        m = f"{P}.megatron_cfg"
        shard = "optimizer" if r.flag(f"{m}.optimizer.use_distributed_optimizer", True) else "none"
        return (r.number(f"{m}.tensor_model_parallel_size", int, 1), r.number(f"{m}.pipeline_model_parallel_size",
                int, 1), shard, r.flag(f"{m}.activation_checkpointing", False))
    d = f"{P}.dtensor_cfg"
    return r.number(f"{d}.tensor_parallel_size", int, 1), 1, "full", r.flag(f"{d}.activation_checkpointing", False)


def _micro_batches(r: Settings, experiment: Experiment, dp: int) -> tuple[dict, dict, list[str]]:
    """The train and the log-prob calls' micro-batching: token budgets under dynamic batching or
    sequence packing (``train_mb_tokens``, ``logprob_mb_tokens``), else rows per micro-batch."""
    wf = experiment.workflow
    total = r.number(f"{P}.max_total_sequence_length", int, 512)
    rows = r.number(f"{P}.train_micro_batch_size", int, 4)
    log_rows = r.number(f"{P}.logprob_batch_size", int, rows)
    dynamic = r.flag(f"{P}.dynamic_batching.enabled", False)
    packing = r.flag(f"{P}.sequence_packing.enabled", True)
    if dynamic and packing:
        raise ConfigError(f"{WHERE}: {P}.dynamic_batching and {P}.sequence_packing are both enabled; NeMo-RL runs one")
    if dynamic or packing:
        key = f"{P}.{'dynamic_batching' if dynamic else 'sequence_packing'}"
        r.consume(f"{key}.sequence_length_round", f"{key}.algorithm", f"{key}.microbatch_order")
        budgets = (r.number(f"{key}.train_mb_tokens", int, total * rows),
                   r.number(f"{key}.logprob_mb_tokens", int, total * log_rows))
        notes = [] if dynamic else [f"sequence packing fills each micro-batch with up to {key}.train_mb_tokens tokens "
                                    "without padding; the plan's token budget counts each micro-batch padded to its "
                                    "longest row, so it is read as a budget of that many tokens"]
        return ({"micro_batches": 1, "max_tokens_per_micro_batch": budgets[0]},
                {"micro_batches": 1, "max_tokens_per_micro_batch": budgets[1]}, notes)
    out = []
    for call, n in (("actor_train", rows), ("ref_inf", log_rows)):
        units = wf[call].workload.units_per_minibatch
        if n < 1 or units % (dp * n):
            raise ConfigError(f"{WHERE}: {n} rows per micro-batch do not split call {call}'s {units} rows per step "
                              f"over dp = {dp}")
        out.append({"micro_batches": units // (dp * n)})
    return out[0], out[1], []


def read_plan(r: Settings, experiment: Experiment) -> tuple[Plan, list[str]]:
    """The plan: the policy's workers (training and both log-prob calls) and vLLM generation."""
    wf = experiment.workflow
    backend = r.text(f"{G}.backend", "vllm")
    if backend != "vllm":
        raise ConfigError(f"{WHERE}: {G}.backend={backend!r}: the importer reads vLLM generation")
    policy, gen_mesh = _meshes(r, experiment)
    tp, pp, shard, recompute = _policy(r)
    if tp < 1 or pp < 1 or policy.size % (tp * pp):
        raise ConfigError(f"{WHERE}: the policy's tp {tp} · pp {pp} must divide its {policy.size} devices")
    dp = policy.size // (tp * pp)
    train, logprob, notes = _micro_batches(r, experiment, dp)
    home = {"mesh": str(policy), "dp": dp, "tp": tp, "pp": pp}
    calls = {"actor_train": home | train | ({"recompute": "full"} if recompute else {})
             | ({"shard": shard} if dp > 1 else {}),
             "actor_inf": home | logprob, "ref_inf": home | logprob}
    gtp, gpp = r.number(f"{G}.vllm_cfg.tensor_parallel_size", int, 1), r.number(f"{G}.vllm_cfg.pipeline_parallel_size",
                                                                               int, 1)
    if gtp < 1 or gpp < 1 or gen_mesh.size % (gtp * gpp):
        raise ConfigError(f"{WHERE}: vLLM's tp {gtp} · pp {gpp} must divide generation's {gen_mesh.size} devices")
    gen = {"mesh": str(gen_mesh), "dp": gen_mesh.size // (gtp * gpp), "tp": gtp, "pp": gpp, "micro_batches": gpp}
    gen |= {"max_concurrency": cap} if (cap := r.optional(f"{G}.vllm_kwargs.max_num_seqs", int, None)) else {}
    calls["actor_gen"] = gen
    # colocated, the policy goes to the host before every generation; apart, the optimizer state
    # leaves while the policy computes log-probs where offload_optimizer_for_logprob says so
    if policy == gen_mesh:
        calls["actor_train"]["offload"] = "all"
        r.consume("policy.offload_optimizer_for_logprob")  # colocated, the whole policy moves anyway
    elif r.flag("policy.offload_optimizer_for_logprob", False):
        calls["actor_train"]["offload"] = "optimizer"
    if policy == gen_mesh:
        notes.append("generation colocated with the policy: NeMo-RL moves the policy to the host while vLLM generates "
                     "(the plan's offload: all) and puts vLLM to sleep while the policy trains")
    else:
        notes.append("generation apart: the policy is placed on the first devices, generation on the rest (NeMo-RL "
                     "creates the training cluster first; Ray places both); the prediction is the same where the "
                     "devices are alike")
    return Plan.from_data({"calls": {c: calls[c] for c in wf.call_names}}, where=WHERE), notes


def import_config(text: str, device: str) -> tuple[dict, Plan, list[str]]:
    """The experiment (as an experiment file's mapping, on ``device``), the plan a NeMo-RL GRPO
    overlay describes, and notes; a key the importer does not read is refused by name."""
    r = overlay_settings(text, WHERE, FRAMEWORK)
    raw, notes = read_experiment(r, device)
    experiment = experiment_from_dict(raw, where=WHERE)
    plan, more = read_plan(r, experiment)
    r.finish()
    return raw, plan, notes + more
