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
either; an SGLang server with pipeline stages runs one micro-batch per stage
(sgl-project/sglang 00ff98d3, ``python/sglang/srt/managers/scheduler_pp_mixin.py``,
``init_pp_loop_state``: ``pp_size + pp_async_batch_depth`` running batches, the depth 0 by
default). ``max_head_offpolicyness`` is the experiment's ``async.max_staleness`` (AReaL's η; 0 is
synchronous).
A reward model is refused: AReaL's PPO experiment scores rollouts with a reward function.

Offload: an engine with ``offload: true`` (``TrainEngineConfig``; the experiment's
``enable_offload`` switches torch_memory_saver on) pauses its whole CUDA memory — parameters,
gradients, optimizer state — between its calls and resumes it for each
(``areal/trainer/rl_trainer.py``, ``fsdp_engine.py``: ``offload`` / ``onload``): the plan's
``offload: all``; ``optimizer`` alone has no spelling and runs as ``all``. A rollout colocated
with the actor always offloads the actor (``_should_offload_actor``), so the projection sets
``all`` there.

The importer (:func:`import_config`) reads such an overlay back, or a config of the same keys:
each engine's backend string by the grammar above (``c`` and ``e`` above 1, which plans do not
carry, refused by name), or the deprecated top-level ``allocation_mode`` (``sglang:d4t2+fsdp:d4``
apart, ``sglang:d4t2|fsdp:d8`` colocated); an empty ``critic.backend`` or ``ref.backend`` takes the
actor's. Devices, as AReaL gives them: an engine with ``scheduling_strategy: colocation`` (target
``actor``) runs on the actor's devices; the others (``separation``, the default) take devices of
their own in the order ``RLTrainer`` creates them and the local scheduler counts them out
(``areal/infra/scheduler/local.py``, ``_allocate_gpus``): actor, critic, reference, then the
rollout servers; under the legacy ``allocation_mode`` the launcher
(``areal/infra/launcher/local.py``) starts the servers first and the trainer after. FSDP is
``shard: full``, Megatron ``shard: optimizer`` unless ``megatron.ddp.use_distributed_optimizer``
is False (over more than one data-parallel rank); ``mb_spec`` gives the micro-batches or the token
budget; ``recompute_logprob`` an ``actor_inf`` call on the actor's layout; a critic makes it PPO,
none GRPO with ``gconfig.n_samples`` per prompt; rewards are the workflow's function (``reward:
rule``). Where a key is not given it takes AReaL's default at the commit above
(``cli_args.py``): ``cluster.n_nodes`` 32 (said in a note), ``n_gpus_per_node`` 8,
``train_dataset.batch_size`` and ``rollout.consumer_batch_size`` 1, ``gconfig.n_samples`` 1,
``max_new_tokens`` 16384, ``min_new_tokens`` 0, ``temperature`` 1.0, ``mb_spec.n_mbs`` 1 without a
token budget, ``gradient_checkpointing`` False, ``ppo_n_minibatches`` 4, ``recompute_logprob``
False, ``kl_ctl`` 0.1, ``eps_clip`` 0.2 (critic 0.5), ``discount`` and ``gae_lambda`` 1.0,
``optimizer.lr`` 1e-3, ``sglang.mem_fraction_static`` and ``vllm.gpu_memory_utilization`` 0.9,
``sglang.max_running_requests`` none, ``vllm.max_num_seqs`` 256, ``scheduling_strategy``
separation, ``rollout.max_head_offpolicyness`` 0 (above 0 it is the experiment's
``async.max_staleness``, AReaL's η). Refused with the reason: a ``consumer_batch_size`` other
than the batch, no prompt cap (``train_dataset.max_length``), no reference model.
"""

from __future__ import annotations

import re

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
    preset_of,
    token_caps,
)
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment, experiment_from_dict
from estimator.spec.plan import Layout, Plan
from estimator.spec.stack import FSDP_VLLM, MEGATRON_VLLM

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
    gen = pr["actor_gen"]
    if gen.micro_batches != gen.pp:
        pr.set("actor_gen", "an SGLang server runs one micro-batch per pipeline stage (SchedulerPPMixin."
                            "event_loop_pp), micro-batches = pp", micro_batches=gen.pp)
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
                 "rollout": {"backend": f"sglang:d{gen.dp}p{gen.pp}t{gen.tp}",
                             "max_head_offpolicyness": experiment.max_staleness,
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
        notes.append("AReaL's scheduler places the engines (the local one: the actor's workers first, the rollout "
                     "servers on the next devices); the plan's device ranges are the placement the predictions "
                     "assume, the same time wherever the devices are alike")
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


# ---- import: the config back into an experiment and a plan ------------------------------------

WHERE = "areal config"
INFER_BACKENDS, TRAIN_BACKENDS = ("sglang", "vllm"), ("fsdp", "megatron")
# letters of ALLOCATION_GRAMMAR's INF_DIM_TYPE and DIM_TYPE
INFER_DIMS, TRAIN_DIMS = "dtp", "pdtce"
ENGINE_ORDER = ("actor", "critic", "ref", "rollout")  # RLTrainer creates their workers in this order
DEFAULT_NODES = 32  # ClusterSpecConfig.n_nodes


def parse_backend(text: object, key: str, inference: bool) -> tuple[str, dict[str, int]]:
    """``<backend>[\\[name\\]]:<dims>`` of ALLOCATION_GRAMMAR (``sglang:d4t2``, ``megatron:d2p2t4``)
    as the backend and its degrees ``d``, ``t``, ``p`` (1 where not given); context and expert
    parallelism above 1, which plans do not carry, and the MoE hybrid form are refused by name."""
    backends, letters = (INFER_BACKENDS, INFER_DIMS) if inference else (TRAIN_BACKENDS, TRAIN_DIMS)
    m = re.fullmatch(r"\s*(\w+)(?:\[\w+\])?:((?:[a-z][1-9][0-9]*)+)\s*", str(text))
    if m is None or m.group(1) not in backends:
        raise ConfigError(f"{WHERE}: {key}={text!r} is not a backend string the importer reads: "
                          f"{'|'.join(backends)}:<dims> with dims from {', '.join(letters)} (e.g. "
                          f"{'sglang:d4t2' if inference else 'fsdp:d4t2, megatron:d2p2t2'})")
    dims: dict[str, int] = {}
    for letter, size in re.findall(r"([a-z])([0-9]+)", m.group(2)):
        if letter not in letters or letter in dims:
            raise ConfigError(f"{WHERE}: {key}={text!r}: dimension {letter!r} is "
                              f"{'given twice' if letter in dims else 'not one of ' + ', '.join(letters)}")
        dims[letter] = int(size)
    for letter, what in (("c", "context"), ("e", "expert")):
        if dims.get(letter, 1) > 1:
            raise ConfigError(f"{WHERE}: {key}={text!r}: {what} parallelism ({letter}{dims[letter]}) is not in the "
                              "planner's layouts")
    if m.group(1) == "fsdp" and dims.get("p", 1) > 1:
        raise ConfigError(f"{WHERE}: {key}={text!r}: AReaL's FSDP backend has no pipeline stages (p)")
    return m.group(1), {k: dims.get(k, 1) for k in "dtp"}


def _legacy_allocation(r: Settings) -> tuple[str, str, bool] | None:
    """(rollout backend, train backend, colocated) of a deprecated top-level ``allocation_mode``
    (``sglang:d4t2+fsdp:d4`` disaggregated, ``sglang:d4t2|fsdp:d8`` colocated), None where absent."""
    mode = r.get("allocation_mode", "")
    if not mode:
        return None
    if r.has("rollout.backend") or r.has("actor.backend"):
        raise ConfigError(f"{WHERE}: allocation_mode={mode!r} and the engines' backend fields both give the "
                          "allocation; give one (allocation_mode is deprecated at this commit)")
    colocated = "|" in str(mode)
    parts = [p.strip() for p in re.split(r"[+|]", str(mode))]
    if len(parts) != 2 or ("+" in str(mode) and colocated):
        raise ConfigError(f"{WHERE}: allocation_mode={mode!r}: the importer reads one generation and one training "
                          "allocation, joined by + (apart) or | (colocated)")
    infer = [p for p in parts if p.split(":")[0].split("[")[0] in INFER_BACKENDS]
    train = [p for p in parts if p not in infer]
    if len(infer) != 1:
        raise ConfigError(f"{WHERE}: allocation_mode={mode!r}: needs exactly one of {', '.join(INFER_BACKENDS)}")
    return infer[0], train[0], colocated


class _Engines:
    """Each engine's backend, degrees and devices, placed as AReaL places them (module docstring)."""

    def __init__(self, r: Settings, n: int, has_critic: bool):
        self.r, self.n = r, n
        legacy = _legacy_allocation(r)
        rollout = legacy[0] if legacy else r.get("rollout.backend")
        actor = legacy[1] if legacy else r.get("actor.backend")
        self.backends = {"rollout": parse_backend(rollout, "rollout.backend", True),
                         "actor": parse_backend(actor, "actor.backend", False)}
        for name in ("critic", "ref"):
            if name != "critic" or has_critic:
                given = r.get(f"{name}.backend", "") or actor  # an empty backend falls back to the actor's
                self.backends[name] = parse_backend(given, f"{name}.backend", False)
        self.meshes = self._place(legacy)

    def world(self, name: str) -> int:
        d = self.backends[name][1]
        return d["d"] * d["t"] * d["p"]

    def _strategy(self, name: str) -> str | None:
        """None for devices of its own (separation), else the engine whose devices it takes."""
        kind = self.r.get(f"{name}.scheduling_strategy.type", "separation")
        target = self.r.get(f"{name}.scheduling_strategy.target", None)
        self.r.consume(f"{name}.scheduling_strategy.fork")
        if kind == "separation":
            return None
        if kind != "colocation" or target != "actor" or name == "actor":
            raise ConfigError(f"{WHERE}: {name}.scheduling_strategy type={kind!r} target={target!r}: the importer "
                              "reads separation, and colocation with the actor for the other engines")
        return "actor"

    def _place(self, legacy: tuple[str, str, bool] | None) -> dict[str, DeviceMesh]:
        if legacy is not None:  # the legacy launcher starts the servers first, then the trainer
            order, shared = ("rollout", "actor"), {"critic": "actor", "ref": "actor"}
            shared |= {"rollout": "actor"} if legacy[2] else {}
            order = ("actor",) if legacy[2] else order
        else:
            order = tuple(e for e in ENGINE_ORDER if e in self.backends)
            shared = {e: t for e in order if (t := self._strategy(e)) is not None}
            order = tuple(e for e in order if e not in shared)
        meshes, first = {}, 0
        for name in order:
            size = self.world(name)
            if first + size > self.n:
                raise ConfigError(f"{WHERE}: the engines of devices of their own need {first + size} devices "
                                  f"({', '.join(f'{e} {self.world(e)}' for e in order)}), the cluster has {self.n}")
            meshes[name], first = DeviceMesh(first, size), first + size
        for name, target in shared.items():
            if name in self.backends:
                if self.world(name) != self.world(target):
                    raise ConfigError(f"{WHERE}: {name} on the {target}'s devices takes {self.world(name)} devices, "
                                      f"the {target} {self.world(target)}: a colocated engine spans its target's")
                meshes[name] = meshes[target]
        return meshes


def _mb(r: Settings, engine: str) -> dict:
    """``mb_spec``: a count of micro-batches, or a token budget (one micro-batch count, 1)."""
    n_mbs = r.optional(f"{engine}.mb_spec.n_mbs", int, 1) or 1
    budget = r.optional(f"{engine}.mb_spec.max_tokens_per_mb", int, None)
    r.consume(f"{engine}.mb_spec.granularity", f"{engine}.mb_spec.packing_algorithm")
    if budget is None:
        return {"micro_batches": n_mbs}
    if n_mbs != 1:
        raise ConfigError(f"{WHERE}: {engine}.mb_spec n_mbs={n_mbs} with max_tokens_per_mb={budget}: a plan cuts "
                          "micro-batches by a count or by a token budget, not both")
    return {"micro_batches": 1, "max_tokens_per_micro_batch": budget}


def _train_layout(r: Settings, eng: _Engines, engine: str) -> dict:
    backend, d = eng.backends[engine]
    lay = {"mesh": str(eng.meshes[engine]), "dp": d["d"], "tp": d["t"], "pp": d["p"]} | _mb(r, engine)
    if engine == "ref":
        return lay
    lay |= {"recompute": "full"} if r.flag(f"{engine}.gradient_checkpointing", False) else {}
    r.consume(*(f"{engine}.megatron.{k}" for k in ("recompute_granularity", "recompute_method",
                                                    "recompute_num_layers")))
    if backend == "fsdp":
        shard = "full"
    else:  # MegatronEngineConfig.ddp (DistributedDataParallelConfig) shards the optimizer by default
        shard = "optimizer" if r.flag(f"{engine}.megatron.ddp.use_distributed_optimizer", True) else "none"
    lay |= {"offload": "all"} if r.flag(f"{engine}.offload", False) else {}  # the engine's whole memory
    return lay | ({"shard": shard} if d["d"] > 1 else {})


def read_experiment(r: Settings, device: str) -> tuple[dict, _Engines, list[str]]:
    """The experiment the config describes (lengths at their caps), as the experiment file's
    mapping; the engines; and notes."""
    critic = any(k.startswith("critic.") for k in r.values)
    notes = []
    if not any(k.startswith("ref.") for k in r.values) or r.number("actor.kl_ctl", float, 0.1) == 0:
        raise ConfigError(f"{WHERE}: AReaL runs no reference model here (no ref section, or actor.kl_ctl 0), and "
                          "the planner's PPO and GRPO workflows compute reference log-probs")
    lag = r.number("rollout.max_head_offpolicyness", int, 0)  # η, the experiment's async.max_staleness
    batch = r.number("train_dataset.batch_size", int, 1)
    consumer = r.number("rollout.consumer_batch_size", int, 1)
    if consumer != batch:
        raise ConfigError(f"{WHERE}: rollout.consumer_batch_size={consumer} differs from train_dataset.batch_size="
                          f"{batch}: a plan trains on the batch it generates")
    prompt = r.optional("train_dataset.max_length", int, None)
    if prompt is None:
        raise ConfigError(f"{WHERE}: train_dataset.max_length is not given (AReaL's default keeps prompts of any "
                          "length); the planner needs the prompts' cap")
    samples = r.number("gconfig.n_samples", int, 1)
    if critic and samples != 1:
        raise ConfigError(f"{WHERE}: gconfig.n_samples={samples} with a critic: the planner's PPO samples once per "
                          "prompt (GRPO, without a critic, samples a group)")
    actor = r.text("actor.path")
    models = {"actor": preset_of(actor), "ref": preset_of(r.text("ref.path", actor)), "reward": "rule"}
    models |= {"critic": preset_of(r.text("critic.path"))} if critic else {}
    gen = r.number("gconfig.max_new_tokens", int, 16384)
    if r.number("gconfig.min_new_tokens", int, 0) < gen:
        notes.append("AReaL stops each response at its end-of-sequence token (gconfig.min_new_tokens below "
                     "max_new_tokens); the config keeps only the cap, at which the prediction takes every response "
                     "unless given their mean")
    if not r.has("cluster.n_nodes"):
        notes.append(f"cluster.n_nodes is not given: AReaL's default, {DEFAULT_NODES} nodes")
    cluster = {"nodes": r.number("cluster.n_nodes", int, DEFAULT_NODES),
               "devices_per_node": r.number("cluster.n_gpus_per_node", int, 8), "device": device}
    eng = _Engines(r, cluster["nodes"] * cluster["devices_per_node"], critic)
    cluster["stack"] = MEGATRON_VLLM if eng.backends["actor"][0] == "megatron" else FSDP_VLLM
    kv = "vllm.gpu_memory_utilization" if eng.backends["rollout"][0] == "vllm" else "sglang.mem_fraction_static"
    hyper = {"lr": r.number("actor.optimizer.lr", float, 1e-3), "kl_coef": r.number("actor.kl_ctl", float, 0.1),
             "clip_eps": r.number("actor.eps_clip", float, 0.2), "gamma": r.number("actor.discount", float, 1.0),
             "lam": r.number("actor.gae_lambda", float, 1.0),
             "temperature": r.number("gconfig.temperature", float, 1.0)}
    hyper |= {"value_clip": r.number("critic.eps_clip", float, 0.5)} if critic else {}
    raw = {"algorithm": "ppo" if critic else "grpo", "models": models, "batch_size": batch, "prompt_len": prompt,
           "gen_len": gen, "ppo_minibatches": r.number("actor.ppo_n_minibatches", int, 4),
           "kv_fraction": r.number(kv, float, 0.9),
           "old_logprobs": "recompute" if r.flag("actor.recompute_logprob", False) else "from_generation",
           "hyperparams": hyper, "cluster": cluster}
    raw |= {"group_size": samples} if not critic else {}
    raw |= {"async": {"max_staleness": lag}} if lag else {}
    r.consume("rollout.max_concurrent_rollouts", "sglang.context_length", "vllm.max_model_len", "enable_offload",
              "actor.use_decoupled_loss", "actor.temperature", "actor.dtype", "actor.weight_update_mode",
              "actor.optimizer.type", "ref.optimizer", "ref.dtype", "critic.is_critic", "critic.optimizer.type",
              "critic.optimizer.lr", "critic.ppo_n_minibatches", "critic.dtype")
    return raw, eng, notes


def read_plan(r: Settings, experiment: Experiment, eng: _Engines) -> tuple[Plan, list[str]]:
    """The plan the config describes: each engine's layout on the devices AReaL gives it."""
    wf = experiment.workflow
    calls = {"actor_train": _train_layout(r, eng, "actor")}
    train_only = ("recompute", "shard", "offload")
    if eng.meshes["rollout"] == eng.meshes["actor"]:  # a colocated rollout always offloads the actor
        calls["actor_train"]["offload"] = "all"
    if "actor_inf" in wf:
        calls["actor_inf"] = {k: v for k, v in calls["actor_train"].items() if k not in train_only}
    calls["ref_inf"] = _train_layout(r, eng, "ref")
    if "critic_train" in wf:
        calls["critic_train"] = _train_layout(r, eng, "critic")
        calls["critic_inf"] = {k: v for k, v in calls["critic_train"].items() if k not in train_only}
    backend, d = eng.backends["rollout"]
    gen = {"mesh": str(eng.meshes["rollout"]), "dp": d["d"], "tp": d["t"], "pp": d["p"], "micro_batches": d["p"]}
    if backend == "sglang":
        gen |= {"max_concurrency": cap} if (cap := r.optional("sglang.max_running_requests", int, None)) else {}
    else:  # vLLM's max_num_seqs caps a server's running requests (256 by default)
        cap, rows = r.number("vllm.max_num_seqs", int, 256), wf["actor_gen"].workload.seqs // d["d"]
        gen |= {"max_concurrency": cap} if cap < rows else {}
    calls["actor_gen"] = gen
    notes = []
    if eng.meshes["rollout"] == eng.meshes["actor"]:
        notes.append("rollout colocated with the actor: AReaL offloads the actor's engine between generation and "
                     "training, the plan's offload: all")
    else:
        notes.append("engines on devices of their own are placed in the order AReaL's local scheduler gives them "
                     "devices (actor, critic, reference, rollout servers; the legacy allocation_mode launcher starts "
                     "the servers first); Ray or Slurm may place them otherwise, the prediction is the same where "
                     "the devices are alike")
    return Plan.from_data({"calls": {c: calls[c] for c in wf.call_names}}, where=WHERE), notes


def import_config(text: str, device: str) -> tuple[dict, Plan, list[str]]:
    """The experiment (as an experiment file's mapping, on ``device``), the plan an AReaL config
    overlay describes, and notes; a key the importer does not read is refused by name."""
    r = overlay_settings(text, WHERE, FRAMEWORK)
    raw, eng, notes = read_experiment(r, device)
    experiment = experiment_from_dict(raw, where=WHERE)
    plan, more = read_plan(r, experiment, eng)
    r.finish()
    return raw, plan, notes + more
