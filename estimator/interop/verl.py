"""verl: a plan as Hydra overrides of verl's PPO trainer on its Megatron backend.

Key names and rules are taken from volcengine/verl at commit
b178a3cd56f58b2d502255daba591e92833930a7 (2026-01-29):

- ``verl/trainer/config/_generated_ppo_megatron_trainer.yaml``, the resolved default config of
  ``python -m verl.trainer.main_ppo --config-name ppo_megatron_trainer`` (copied into
  ``tests/fixtures/verl/``; every key written here is checked against it);
- ``verl/trainer/main_ppo.py`` (``init_resource_pool_mgr``): every role is mapped to one
  ``global_pool`` of ``trainer.n_gpus_per_node × trainer.nnodes`` devices;
- ``verl/workers/config/rollout.py``: a vLLM or SGLang rollout refuses
  ``pipeline_model_parallel_size > 1``; ``verl/workers/rollout/replica.py``: a rollout replica
  takes ``tensor_model_parallel_size × data_parallel_size × pipeline_model_parallel_size``
  devices, so replicas of ``tp`` devices with ``data_parallel_size=1`` are the plan's engines;
- ``verl/workers/megatron_workers.py``: the actor's old log-probs (``compute_log_prob``) run in
  the actor's worker with the ``rollout.log_prob_*`` micro-batch settings; the critic's values
  (``compute_values``) run in the critic's worker with its training micro-batch size and
  ``forward_max_token_len_per_gpu``; the reference and the reward model are workers of their
  own with their own Megatron degrees.

The Megatron backend is the one of verl's backends that takes a train call's tensor- and
pipeline-parallel degrees; its data-parallel ranks keep a full replica of the parameters and
gradients, and ``use_distributed_optimizer`` shards the optimizer state (``shard: optimizer``).

The projection (each rule is a :class:`~estimator.interop.common.Change` with its reason):

1. every call runs on all devices (one resource pool), its tp and pp kept, dp the rest;
2. generation: vLLM replicas of ``tp`` devices, no pipeline stages (pp 1, one engine each);
3. ``actor_inf`` on the actor's training layout, ``critic_inf`` on the critic's; the critic's
   values take its training micro-batch size, and its token budget switch;
4. ``shard: full`` (ZeRO-3) has no Megatron spelling: the optimizer state is sharded instead;
5. micro-batches keep their rows per micro-batch where the new dp allows (verl counts a
   micro-batch in rows per GPU).

Offload (``Layout.offload`` of a train call) is the Megatron engine's own switches
(``McoreEngineConfig``: ``{actor,critic}.megatron.{param,grad,optimizer}_offload``, false by
default): ``optimizer`` sets ``optimizer_offload=True``; ``all`` sets all three, as verl's recipe
for an 8B model on 8 GPUs does (``examples/grpo_trainer/run_qwen3_vl-8b-megatron.sh``). The
worker loads what is offloaded before each of its calls and offloads it after
(``megatron_workers.py``: ``update_actor``, ``compute_log_prob``, the rollout's weight sync), as
the plan's ``all`` charges. Nothing is written for a plan that keeps its state on the devices.

A generate call without ``max_concurrency`` gets ``rollout.max_num_seqs`` equal to the rows of a
replica, so the KV pool decides, as in the plan.
"""

from __future__ import annotations

from estimator.base.errors import ConfigError
from estimator.interop.common import (
    Export,
    Projection,
    Settings,
    micro_batches_for,
    micro_rows,
    model_path,
    override_settings,
    per_rank,
    preset_of,
    require_algorithm,
    token_caps,
)
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment, experiment_from_dict
from estimator.spec.plan import Plan
from estimator.spec.stack import MEGATRON_VLLM

FRAMEWORK = "verl"
REPO = "volcengine/verl"
COMMIT = "b178a3cd56f58b2d502255daba591e92833930a7"
CONFIG_NAME = "ppo_megatron_trainer"
ENTRY = f"python -m verl.trainer.main_ppo --config-name {CONFIG_NAME}"

ARO = "actor_rollout_ref"
# Megatron degrees of each call's worker
MEGATRON = {"actor_train": f"{ARO}.actor.megatron", "ref_inf": f"{ARO}.ref.megatron",
            "critic_train": "critic.megatron", "reward_inf": "reward_model.megatron"}
# (micro-batch rows key, token budget switch, token budget key) per call
MICRO = {
    "actor_train": (f"{ARO}.actor.ppo_micro_batch_size_per_gpu", f"{ARO}.actor.use_dynamic_bsz",
                    f"{ARO}.actor.ppo_max_token_len_per_gpu"),
    "actor_inf": (f"{ARO}.rollout.log_prob_micro_batch_size_per_gpu", f"{ARO}.rollout.log_prob_use_dynamic_bsz",
                  f"{ARO}.rollout.log_prob_max_token_len_per_gpu"),
    "ref_inf": (f"{ARO}.ref.log_prob_micro_batch_size_per_gpu", f"{ARO}.ref.log_prob_use_dynamic_bsz",
                f"{ARO}.ref.log_prob_max_token_len_per_gpu"),
    "critic_train": ("critic.ppo_micro_batch_size_per_gpu", "critic.use_dynamic_bsz",
                     "critic.ppo_max_token_len_per_gpu"),
    "critic_inf": (None, None, "critic.forward_max_token_len_per_gpu"),
    "reward_inf": ("reward_model.micro_batch_size_per_gpu", "reward_model.use_dynamic_bsz",
                   "reward_model.forward_max_token_len_per_gpu"),
}
# Layout.offload → the Megatron engine's offload switches set to True (the others stay false)
OFFLOAD_KEYS = {"none": (), "optimizer": ("optimizer_offload",),
                "all": ("param_offload", "grad_offload", "optimizer_offload")}
RECOMPUTE = ("override_transformer_config.recompute_granularity=full",
             "override_transformer_config.recompute_method=uniform",
             "override_transformer_config.recompute_num_layers=1")


def _bool(value: bool) -> str:
    return "True" if value else "False"


def project(experiment: Experiment, plan: Plan) -> Projection:
    """The plan as verl's Megatron PPO trainer runs it (the module docstring's rules)."""
    require_algorithm(FRAMEWORK, experiment, ("ppo", "grpo"))
    pr = Projection(experiment, plan)
    wf, n = experiment.workflow, experiment.cluster.num_devices
    full = DeviceMesh(0, n)
    for c in wf.call_names:
        lay = pr[c]
        if wf[c].kind == "generate":
            pr.set(c, "verl runs generation in vLLM replicas of tensor_model_parallel_size devices; its vLLM rollout "
                      "has no pipeline stages (RolloutConfig refuses pipeline_model_parallel_size > 1)",
                   pp=1, dp=lay.mesh.size // lay.tp, micro_batches=1)
            lay = pr[c]
        if lay.mesh != full:
            dp = n // (lay.tp * lay.pp)
            mb = lay.micro_batches if lay.token_budget or wf[c].kind == "generate" else \
                micro_batches_for(wf[c], dp, micro_rows(wf[c], lay), FRAMEWORK)
            pr.set(c, f"verl's main trainer puts every role on one resource pool of all {n} devices",
                   mesh=full, dp=dp, micro_batches=mb)
    for inf, train in (("actor_inf", "actor_train"), ("critic_inf", "critic_train")):
        if inf in wf and train in wf:
            home, lay = pr[train], pr[inf]
            why = f"verl runs {inf} in the {wf[train].role}'s training worker, on its Megatron layout"
            mb = lay.micro_batches if lay.token_budget else \
                micro_batches_for(wf[inf], home.dp, micro_rows(wf[inf], lay), FRAMEWORK)
            pr.set(inf, why, dp=home.dp, tp=home.tp, pp=home.pp, micro_batches=mb)
    if "critic_inf" in wf and "critic_train" in wf:
        _critic_values(pr, experiment)
    for c in wf.call_names:
        if wf[c].kind == "train" and pr[c].shard == "full":
            pr.set(c, "verl's Megatron backend shards the optimizer state (use_distributed_optimizer), "
                      "not parameters and gradients", shard="optimizer")
    return pr


def _critic_values(pr: Projection, experiment: Experiment) -> None:
    """The critic's values take its training micro-batch rows and its token budget switch."""
    wf = experiment.workflow
    train, inf = pr["critic_train"], pr["critic_inf"]
    why = "verl's critic computes values with its training micro-batch size and dynamic-batch switch"
    if train.token_budget and not inf.token_budget:
        budget = micro_rows(wf["critic_inf"], inf) * wf["critic_inf"].workload.seq_len
        pr.set("critic_inf", why, micro_batches=1, max_tokens_per_micro_batch=budget)
    elif not train.token_budget:
        mb = micro_batches_for(wf["critic_inf"], inf.dp, micro_rows(wf["critic_train"], train), FRAMEWORK)
        pr.set("critic_inf", why, micro_batches=mb, max_tokens_per_micro_batch=0)


def overrides(experiment: Experiment, plan: Plan) -> tuple[list[str], list[str]]:
    """Hydra overrides (``key=value``) for a plan verl can run as given, and notes."""
    wf, p, h = experiment.workflow, experiment.params, experiment.hyper
    prompt_cap, gen_cap = token_caps(experiment)
    out = [f"trainer.nnodes={experiment.cluster.nodes}",
           f"trainer.n_gpus_per_node={experiment.cluster.devices_per_node}",
           f"data.train_batch_size={p.batch_size}", f"data.max_prompt_length={prompt_cap}",
           f"data.max_response_length={gen_cap}",
           f"algorithm.adv_estimator={'grpo' if experiment.algorithm == 'grpo' else 'gae'}",
           f"algorithm.gamma={h.gamma:g}", f"algorithm.lam={h.lam:g}"]
    notes: list[str] = []
    path, note = model_path(experiment, "actor")
    out += [f"{ARO}.model.path={path}", f"{ARO}.actor.optim.lr={h.lr:g}",
            f"{ARO}.actor.ppo_mini_batch_size={p.batch_size // p.ppo_minibatches}",
            f"{ARO}.actor.ppo_epochs=1", f"{ARO}.actor.clip_ratio={h.clip_eps:g}"]
    notes += [note] if note else []
    if experiment.algorithm == "grpo":  # GRPO's KL term is a loss against the reference
        out += [f"{ARO}.actor.use_kl_loss=True", f"{ARO}.actor.kl_loss_coef={h.kl_coef:g}",
                "algorithm.use_kl_in_reward=False"]
    else:
        out += [f"{ARO}.actor.use_kl_loss=False", "algorithm.use_kl_in_reward=True",
                f"algorithm.kl_ctrl.kl_coef={h.kl_coef:g}"]
    out += _rollout(experiment, plan)
    for c in wf.call_names:
        out += _megatron(experiment, plan, c) + _micro(experiment, plan, c)
    if "critic_train" in wf:
        path, note = model_path(experiment, "critic")
        out += [f"critic.model.path={path}", f"critic.optim.lr={h.lr:g}", f"critic.cliprange_value={h.value_clip:g}"]
        notes += [note] if note else []
    if "reward_inf" in wf:
        path, note = model_path(experiment, "reward")
        out += ["reward_model.enable=True", "reward_model.use_reward_loop=False", "reward_model.strategy=megatron",
                "reward_model.enable_resource_pool=False", f"reward_model.model.path={path}"]
        notes += [note] if note else []
    else:
        out += ["reward_model.enable=False"]
        if experiment.verifier:
            notes.append("verifier rewards: give your checker with custom_reward_function.path and "
                         "custom_reward_function.name")
    if p.old_logprobs == "from_generation":
        notes.append("verl recomputes the old log-probs with the actor (compute_log_prob) before training, a "
                     "forward pass this experiment (old_logprobs: from_generation) does not have; the "
                     "predictions do not include it (set old_logprobs: recompute to plan for it)")
    return out, notes


def _rollout(experiment: Experiment, plan: Plan) -> list[str]:
    gen = plan["actor_gen"]
    rows = experiment.workflow["actor_gen"].workload.seqs // gen.dp
    return [f"{ARO}.rollout.name=vllm", f"{ARO}.rollout.tensor_model_parallel_size={gen.tp}",
            f"{ARO}.rollout.data_parallel_size=1", f"{ARO}.rollout.pipeline_model_parallel_size=1",
            f"{ARO}.rollout.n={experiment.params.group_size}",
            f"{ARO}.rollout.gpu_memory_utilization={experiment.kv_fraction:g}",
            f"{ARO}.rollout.max_num_seqs={gen.max_concurrency or rows}",
            f"{ARO}.rollout.temperature={experiment.hyper.temperature:g}"]


def _megatron(experiment: Experiment, plan: Plan, call: str) -> list[str]:
    if call not in MEGATRON:
        return []
    lay, key = plan[call], MEGATRON[call]
    out = [f"{key}.tensor_model_parallel_size={lay.tp}", f"{key}.pipeline_model_parallel_size={lay.pp}"]
    if experiment.workflow[call].kind == "train":
        out.append(f"{key}.use_distributed_optimizer={_bool(lay.shard == 'optimizer')}")
        if lay.recompute == "full":
            out += [f"{key}.{r}" for r in RECOMPUTE]
        out += [f"{key}.{k}=True" for k in OFFLOAD_KEYS[lay.offload]]
    return out


def _micro(experiment: Experiment, plan: Plan, call: str) -> list[str]:
    if call not in MICRO:
        return []
    rows_key, switch, budget_key = MICRO[call]
    lay, wf = plan[call], experiment.workflow
    if lay.token_budget:
        return ([f"{switch}=True"] if switch else []) + [f"{budget_key}={lay.max_tokens_per_micro_batch}"]
    per_rank(wf[call], lay.dp, FRAMEWORK)
    return ([f"{switch}=False"] if switch else []) + \
        ([f"{rows_key}={micro_rows(wf[call], lay)}"] if rows_key else [])


def describe(plan: Plan, experiment: Experiment) -> str:
    gen = plan["actor_gen"]
    trains = ", ".join(f"{c} tp{plan[c].tp} pp{plan[c].pp} dp{plan[c].dp}"
                       for c in experiment.workflow.call_names if experiment.workflow[c].kind == "train")
    return (f"every call on all {experiment.cluster.num_devices} devices, generation in {gen.dp} vLLM replicas "
            f"of tp {gen.tp}, {trains}")


def export(experiment: Experiment, plan: Plan) -> Export:
    """The plan in verl's configuration: ``overrides.txt``, one Hydra override per line, for
    ``python -m verl.trainer.main_ppo --config-name ppo_megatron_trainer``."""
    pr = project(experiment, plan)
    projected = pr.plan(FRAMEWORK)
    lines, notes = overrides(experiment, projected)
    return Export(FRAMEWORK, REPO, COMMIT, plan, projected, tuple(pr.changes),
                  {"overrides.txt": "\n".join(lines) + "\n"}, describe(projected, experiment), tuple(notes),
                  MEGATRON_VLLM)  # the Megatron trainer of ppo_megatron_trainer


# ---- import: the overrides back into an experiment and a plan ---------------------------------

def read_experiment(r: Settings, device: str) -> dict:
    """The experiment the overrides describe (response lengths at their caps, as a config keeps
    only the caps), as the experiment file's mapping."""
    algorithm = {"grpo": "grpo", "gae": "ppo"}.get(r.text("algorithm.adv_estimator"))
    if algorithm is None:
        raise ConfigError(f"verl overrides: algorithm.adv_estimator={r.values['algorithm.adv_estimator']!r}: the "
                          "importer reads grpo and gae (ppo)")
    actor = preset_of(r.text(f"{ARO}.model.path"))
    models = {"actor": actor, "ref": actor}
    if algorithm == "ppo":
        models["critic"] = preset_of(r.text("critic.model.path"))
    reward = r.flag("reward_model.enable", "False")
    models["reward"] = preset_of(r.text("reward_model.model.path")) if reward else "rule"
    batch = r.number("data.train_batch_size")
    mini = r.number(f"{ARO}.actor.ppo_mini_batch_size")
    if mini <= 0 or batch % mini:
        raise ConfigError(f"verl overrides: {ARO}.actor.ppo_mini_batch_size={mini} must divide "
                          f"data.train_batch_size={batch}")
    hyper = {"lr": r.number(f"{ARO}.actor.optim.lr", float, "1e-6"),
             "clip_eps": r.number(f"{ARO}.actor.clip_ratio", float, "0.2"),
             "gamma": r.number("algorithm.gamma", float, "1.0"), "lam": r.number("algorithm.lam", float, "1.0"),
             "temperature": r.number(f"{ARO}.rollout.temperature", float, "1.0")}
    if r.has(f"{ARO}.actor.kl_loss_coef"):
        hyper["kl_coef"] = r.number(f"{ARO}.actor.kl_loss_coef", float)
    if r.has("algorithm.kl_ctrl.kl_coef"):
        hyper["kl_coef"] = r.number("algorithm.kl_ctrl.kl_coef", float)
    if r.has("critic.cliprange_value"):
        hyper["value_clip"] = r.number("critic.cliprange_value", float)
    for key in (f"{ARO}.actor.use_kl_loss", "algorithm.use_kl_in_reward", f"{ARO}.actor.ppo_epochs",
                f"{ARO}.rollout.name", f"{ARO}.rollout.data_parallel_size",
                f"{ARO}.rollout.pipeline_model_parallel_size", "reward_model.use_reward_loop", "reward_model.strategy",
                "reward_model.enable_resource_pool", "critic.optim.lr"):
        if r.has(key):
            r.text(key)  # settings the export writes and the plan does not vary
    raw = {"algorithm": algorithm, "models": models, "batch_size": batch,
           "prompt_len": r.number("data.max_prompt_length"), "gen_len": r.number("data.max_response_length"),
           "ppo_minibatches": batch // mini, "kv_fraction": r.number(f"{ARO}.rollout.gpu_memory_utilization", float),
           "hyperparams": hyper,
           "cluster": {"nodes": r.number("trainer.nnodes"), "devices_per_node": r.number("trainer.n_gpus_per_node"),
                       "device": device, "stack": MEGATRON_VLLM}}
    if algorithm == "grpo":
        raw["group_size"] = r.number(f"{ARO}.rollout.n")
    elif r.has(f"{ARO}.rollout.n"):
        r.text(f"{ARO}.rollout.n")
    if r.has(MICRO["actor_inf"][1]):  # the actor's log-prob micro-batches: an actor_inf call
        raw["old_logprobs"] = "recompute"
    return raw


def _layout(r: Settings, experiment: Experiment, call: str, megatron: str | None, n: int) -> dict:
    wf = experiment.workflow
    tp = r.number(f"{megatron}.tensor_model_parallel_size") if megatron else 1
    pp = r.number(f"{megatron}.pipeline_model_parallel_size") if megatron else 1
    if tp < 1 or pp < 1 or n % (tp * pp):
        raise ConfigError(f"verl overrides: call {call}: tp {tp} · pp {pp} must divide the {n} devices")
    out = {"mesh": f"0-{n - 1}", "dp": n // (tp * pp), "tp": tp, "pp": pp, "micro_batches": 1}
    rows_key, switch, budget_key = MICRO[call]
    if call == "critic_inf":
        rows_key, switch = MICRO["critic_train"][:2]
    if r.flag(switch, "False"):
        out["max_tokens_per_micro_batch"] = r.number(budget_key)
        return out
    rows = r.number(rows_key)
    per = wf[call].workload.units_per_minibatch
    if rows < 1 or per % (out["dp"] * rows):
        raise ConfigError(f"verl overrides: {rows_key}={rows}: call {call}'s {per} rows per step do not split into "
                          f"micro-batches of {rows} over dp = {out['dp']}")
    out["micro_batches"] = per // (out["dp"] * rows)
    return out


def read_plan(r: Settings, experiment: Experiment) -> Plan:
    """The plan the overrides describe: every call on all devices (one resource pool)."""
    wf, n = experiment.workflow, experiment.cluster.num_devices
    tp = r.number(f"{ARO}.rollout.tensor_model_parallel_size")
    if tp < 1 or n % tp:
        raise ConfigError(f"verl overrides: {ARO}.rollout.tensor_model_parallel_size={tp} must divide the {n} devices")
    seqs = r.number(f"{ARO}.rollout.max_num_seqs")
    rows = wf["actor_gen"].workload.seqs // (n // tp)
    calls = {"actor_gen": {"mesh": f"0-{n - 1}", "dp": n // tp, "tp": tp, "pp": 1, "micro_batches": 1}}
    if seqs < rows:  # a replica's rows as the cap: the KV pool decides, as max_concurrency 0 says
        calls["actor_gen"]["max_concurrency"] = seqs
    homes = {"actor_inf": "actor_train", "critic_inf": "critic_train"}
    for c in wf.call_names:
        if c == "actor_gen":
            continue
        megatron = MEGATRON.get(homes.get(c, c))
        calls[c] = _layout(r, experiment, c, megatron, n)
        key = MEGATRON.get(c)
        if wf[c].kind == "train":
            if r.flag(f"{key}.use_distributed_optimizer", "False") and calls[c]["dp"] > 1:
                calls[c]["shard"] = "optimizer"  # Megatron's distributed optimizer: ZeRO-1
            if r.text(f"{key}.{RECOMPUTE[0].split('=')[0]}", "null") == "full":
                calls[c]["recompute"] = "full"
                for rule in RECOMPUTE[1:]:
                    r.text(f"{key}.{rule.split('=')[0]}", "")
            offload = _offload(r, key)
            if offload != "none":
                calls[c]["offload"] = offload
    return Plan.from_data({"calls": calls}, where="verl overrides")


def _offload(r: Settings, key: str) -> str:
    """A train worker's offload switches back to ``Layout.offload``; a combination no setting
    stands for is refused by name."""
    on = tuple(k for k in OFFLOAD_KEYS["all"] if r.flag(f"{key}.{k}", "False"))
    for setting, keys in OFFLOAD_KEYS.items():
        if on == keys:
            return setting
    raise ConfigError(f"verl overrides: {key}: offload switches {', '.join(f'{k}=True' for k in on)} have no plan "
                      "spelling: a plan offloads the optimizer state (optimizer_offload) or the parameters, "
                      "gradients and optimizer state together (all three)")


def import_overrides(text: str, device: str) -> tuple[dict, Plan, list[str]]:
    """The experiment (as an experiment file's mapping, on ``device``), the plan that verl
    overrides describe and notes (none: what it cannot carry it refuses); a key the importer
    does not read is refused by name."""
    r = override_settings(text, "verl overrides", FRAMEWORK)
    raw = read_experiment(r, device)
    experiment = experiment_from_dict(raw, where="verl overrides")
    plan = read_plan(r, experiment)
    r.finish()
    return raw, plan, []
