"""Experiment: workflow + models + cluster, loaded from a strict YAML file.

Schema (every key but the first eight is optional)::

    algorithm: ppo            # ppo | grpo | dpo | remax | sft | rw
    models: {actor: llama2-7b, critic: llama2-7b, ref: llama2-7b, reward: llama2-7b}
                              # preset name, or a path to a Hugging Face config.json
                              # (the executor starts from the weights beside it, if any);
                              # reward: rule (ppo, grpo, remax) — a verifier, no reward model
    batch_size: 512           # prompts (pairs for dpo/rw) per iteration
    prompt_len: 128
    gen_len: 128              # generated tokens (response tokens for dpo/rw/sft); or, where the
                              # algorithm generates, a distribution: {max: 4096, mean: 795},
                              # {max: 4096, mean: 795, p99: 3500 | sigma: 1.2}, {max: 4096,
                              # lengths: FILE}, each with group_corr (grpo); prompt_len alike
                              # (estimator.spec.lengths)
    ppo_minibatches: 4        # optimizer steps per train call
    cluster: {nodes: 1, devices_per_node: 8, device: h100-sxm}
                              # optional stack: executor | megatron-vllm | fsdp-vllm, the software
                              # it is priced for (estimator.spec.stack; default: megatron-vllm on a
                              # GPU profile, executor on a CPU one, estimator.profile.pricing);
                              # optional micro_batching: packed | dynamic | padded, how the
                              # trainer cuts its token budgets (default: packed on a production
                              # stack, padded on the executor; estimator.spec.stack)
    group_size: 8             # grpo: samples per prompt (default 1)
    seed: 0                   # weights, prompts and sampling
    kv_fraction: 0.9          # device memory a generation engine may hold (vLLM's
                              # gpu_memory_utilization); used where generation runs as
                              # continuous batching (estimator.cost.rollout)
    prompts: prompts.jsonl    # token ids, one JSON list per line; synthetic if absent
    hyperparams: {lr: 1.0e-6, kl_coef: 0.05, clip_eps: 0.2, value_clip: 0.2,
                  gamma: 1.0, lam: 0.95, dpo_beta: 0.1, temperature: 1.0}
    reward_s_per_sample: 0.002  # with reward: rule: host seconds the verifier takes per sequence
                              # (default 0), charged by the estimator only
    old_logprobs: recompute   # ppo, grpo, remax: from_generation (default) | recompute
    async: {max_staleness: 1} # ppo, grpo, remax: asynchronous training — the rollouts trained on
                              # may come from a policy up to η versions old (default 0:
                              # synchronous; estimator.spec.workflow.STALENESS_EQUIVALENTS
                              # translates AReaL's, verl's, NeMo-RL's and OpenRLHF's settings);
                              # streaming: off (default) | recompute | keep — ppo, grpo with
                              # η ≥ 1: a rollout on devices of its own serves consecutive
                              # iterations as one stream, trained on as trajectories finish
                              # (estimator.spec.stream)

A verifier reward (``models.reward: rule``) holds no model: the reward role has no weights, no
memory and no layout, and no ``reward_inf`` call runs; each generate call scores the sequences
it produced on its last pipeline stage's hosts right after generating them, so ``rewards``
(``rewards_greedy`` for ReMax's greedy call) is one of its outputs. The executor applies a
deterministic rule (:mod:`executor.verifier`; a real task plugs in its checker) and measures
what that rule costs; the estimator charges ``reward_s_per_sample`` × the sequences of each
data-parallel replica at the end of the generate call, a host span ``reward`` in the predicted
timeline, so an expensive checker (a sandbox, a proof checker) can be modelled without being
run. ``old_logprobs: recompute`` adds an ``actor_inf`` call: the actor's forward over the
rollout computes ``old_logp`` with the weights that generated it, on a layout of its own, and
the generate call writes only the sequences (see :mod:`estimator.spec.workflow`).

Unknown keys, wrong types, unknown presets and impossible values raise
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from estimator.base import rules
from estimator.base.errors import ConfigError, did_you_mean
from estimator.base.loading import check_input_path, load_yaml
from estimator.spec.cluster import Cluster
from estimator.spec.lengths import parse_lengths
from estimator.spec.models import ModelSpec, checkpoint_dir, get_model
from estimator.spec.stack import MICRO_BATCHING, get_stack
from estimator.spec.workflow import (
    ALGORITHMS,
    GENERATING,
    MAX_STALENESS,
    OLD_LOGPROBS,
    REWARD_RULE,
    ROLES,
    STREAMING,
    VALUE_ROLES,
    Workflow,
    WorkflowParams,
    build,
    model_roles,
)


@dataclass(frozen=True)
class Hyperparams:
    """Optimisation constants of the RLHF losses (the executor computes with them)."""

    lr: float = 1e-6  # Adam learning rate
    kl_coef: float = 0.05  # KL penalty against the reference, per token
    clip_eps: float = 0.2  # PPO ratio clip
    value_clip: float = 0.2  # critic value clip
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    dpo_beta: float = 0.1  # DPO temperature
    temperature: float = 1.0  # sampling temperature of generation


@dataclass(frozen=True)
class Experiment:
    """Everything a plan is made for: algorithm, models per role, workload, cluster."""

    algorithm: str
    models: dict[str, ModelSpec]  # role → model (value head for critic/reward); no reward under a verifier
    params: WorkflowParams
    cluster: Cluster
    hyper: Hyperparams = Hyperparams()
    seed: int = 0
    # share of each device's memory a continuous-batching generation engine may hold (weights,
    # activations and its KV pool), vLLM's gpu_memory_utilization (estimator.cost.rollout)
    kv_fraction: float = 0.9
    prompts_path: str | None = None  # JSONL of token ids, or None for synthetic prompts
    name: str = "experiment"
    # role → Hugging Face checkpoint directory its initial weights come from (executor only;
    # roles without one start from seeded weights)
    checkpoints: dict[str, str] = field(default_factory=dict)
    # verifier (params.verifier): host seconds its rule takes per sequence; the estimator charges
    # it at the end of each generate call, the executor measures its own rule instead
    reward_s_per_sample: float = 0.0
    # the software stack it is priced for (estimator.spec.stack); None: the device's default
    stack: str | None = None
    # how the trainer cuts micro-batches (estimator.spec.stack.MICRO_BATCHING); None: the stack's
    micro_batching: str | None = None
    workflow: Workflow = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.algorithm not in ROLES:
            raise ConfigError(f"algorithm={self.algorithm!r} must be one of {', '.join(ALGORITHMS)}")
        self._check_options()
        need = model_roles(self.algorithm, self.params.verifier)
        missing = [r for r in need if r not in self.models]
        extra = [r for r in self.models if r not in need]
        if missing or extra:
            raise ConfigError(f"models: algorithm {self.algorithm} needs roles {list(need)}"
                              + (f"; missing {missing}" if missing else "")
                              + (f"; not used {extra}" if extra else ""))
        p = self.params
        if p.batch_size % p.ppo_minibatches:
            raise ConfigError(f"ppo_minibatches={p.ppo_minibatches} must divide batch_size={p.batch_size}")
        if self.algorithm != "grpo" and p.group_size != 1:
            raise ConfigError(f"group_size={p.group_size} applies to grpo only")
        for key, dist in (("prompt_len", p.prompt_lengths), ("gen_len", p.gen_lengths)):
            if not dist.fixed and self.algorithm not in GENERATING:
                raise ConfigError(f"{key}: a length distribution applies to algorithms that generate "
                                  f"({', '.join(GENERATING)}), not to {self.algorithm}; give an integer")
            if dist.group_corr and (self.algorithm != "grpo" or p.group_size == 1):
                raise ConfigError(f"{key}.group_corr={dist.group_corr:g} applies to grpo with group_size > 1")
        for role, m in self.models.items():
            if m.positions == "learned" and p.prompt_len + p.gen_len > m.max_positions:
                raise ConfigError(f"models.{role}: prompt_len + gen_len = {p.prompt_len + p.gen_len} tokens exceeds "
                                  f"model {m.name!r}'s max_positions={m.max_positions} learned positions")
        object.__setattr__(self, "workflow", build(self.algorithm, p))

    def _check_options(self) -> None:
        """The verifier and the old log-probs apply to the algorithms that generate; the stack
        is a known one."""
        p, alg = self.params, self.algorithm
        if self.stack is not None:
            get_stack(self.stack)
        if self.micro_batching is not None and self.micro_batching not in MICRO_BATCHING:
            raise ConfigError(f"cluster.micro_batching={self.micro_batching!r} must be one of "
                              f"{', '.join(MICRO_BATCHING)}")
        if p.verifier and alg not in GENERATING:
            raise ConfigError(f"models.reward={REWARD_RULE!r}: a verifier scores generated responses, so it applies "
                              f"to {', '.join(GENERATING)}, not to {alg}")
        if p.old_logprobs != OLD_LOGPROBS[0] and alg not in GENERATING:
            raise ConfigError(f"old_logprobs={p.old_logprobs!r} applies to algorithms that generate "
                              f"({', '.join(GENERATING)}), not to {alg}")
        r = self.reward_s_per_sample
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0.0 <= r <= rules.MAX_HOST_S_PER_SAMPLE:
            raise ConfigError(f"reward_s_per_sample={r!r} must be a number of seconds in "
                              f"[0, {rules.MAX_HOST_S_PER_SAMPLE:g}]")
        if r and not p.verifier:
            raise ConfigError(f"reward_s_per_sample={r:g} applies to a verifier reward only "
                              f"(models.reward: {REWARD_RULE})")

    @property
    def max_staleness(self) -> int:
        """η: policy versions the actor's rollouts may lag (0: synchronous)."""
        return self.params.max_staleness

    def with_staleness(self, eta: int, streaming: str | None = None) -> Experiment:
        """The same experiment trained with staleness ``eta``, its rollout served as ``streaming``
        says (None: as now where ``eta`` allows a stream, else off)."""
        if streaming is None:
            streaming = self.params.streaming if eta >= 1 else "off"
        return replace(self, params=replace(self.params, max_staleness=eta, streaming=streaming))

    @property
    def streaming(self) -> str:
        """How a standing rollout copy serves (:data:`~estimator.spec.workflow.STREAMING`)."""
        return self.params.streaming

    @property
    def verifier(self) -> bool:
        """Whether a rule scores the rollouts (``models.reward: rule``) instead of a reward model."""
        return self.params.verifier

    @property
    def tokens_per_iteration(self) -> int:
        return self.workflow.calls[0].workload.seqs * self.params.prompt_len

    @property
    def rollout_rows(self) -> int:
        """Sequences one iteration generates (prompts × the group); 0 without generation."""
        gens = [c.workload.seqs for c in self.workflow.calls if c.kind == "generate"]
        return max(gens, default=0)

    def lengths(self, iteration: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, response) tokens of every generated row of ``iteration``, by global row: a
        pure function of (seed, iteration, row), the same for the estimator and the executor."""
        p, rows = self.params, self.rollout_rows
        return (p.prompt_lengths.draw(self.seed, iteration, rows, "prompt", p.group_size),
                p.gen_lengths.draw(self.seed, iteration, rows, "gen", p.group_size))


_REQUIRED = ("algorithm", "models", "batch_size", "prompt_len", "gen_len", "cluster")
_OPTIONAL = ("ppo_minibatches", "group_size", "seed", "prompts", "hyperparams", "name", "kv_fraction",
             "reward_s_per_sample", "old_logprobs", "async")
_CLUSTER_KEYS = ("nodes", "devices_per_node", "device")
_CLUSTER_OPTIONAL = ("stack", "micro_batching")


def _unknown_key(where: str, key: str, allowed: tuple[str, ...] | list[str]) -> ConfigError:
    return ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")


# key → upper bound (estimator/base/rules.py says why each is above any real run)
_INT_LIMITS = {"batch_size": rules.MAX_BATCH, "prompt_len": rules.MAX_SEQ_TOKENS, "gen_len": rules.MAX_SEQ_TOKENS,
               "ppo_minibatches": rules.MAX_BATCH, "group_size": rules.MAX_GROUP, "cluster.nodes": rules.MAX_DEVICES,
               "cluster.devices_per_node": rules.MAX_DEVICES_PER_NODE}
# hyperparameter → (upper bound, must be > 0): discount and GAE lambda are fractions; an Adam
# step above 1 or a clip/temperature/coefficient above 1,000 is no real setting
_HYPER_LIMITS = {"lr": (1.0, True), "kl_coef": (1e3, False), "clip_eps": (1e3, False),
                 "value_clip": (1e3, False), "gamma": (1.0, False), "lam": (1.0, False),
                 "dpo_beta": (1e3, False), "temperature": (1e3, True)}


def _positive_int(where: str, key: str, value: Any) -> int:
    return rules.integer(f"{where}: {key}", value, lo=1, hi=_INT_LIMITS[key])


def _mapping(where: str, key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__} {value!r}")
    return value


def _hyperparams(where: str, raw: Any) -> Hyperparams:
    raw = _mapping(where, "hyperparams", raw)
    names = [f.name for f in fields(Hyperparams)]
    values = {}
    for k, v in raw.items():
        if k not in names:
            raise _unknown_key(f"{where}: hyperparams", k, names)
        hi, positive = _HYPER_LIMITS[k]
        values[k] = rules.real(f"{where}: hyperparams.{k}", v, lo=0.0, hi=hi, positive=positive)
    return Hyperparams(**values)


def _rollout_options(where: str, raw: dict, algorithm: str, verifier: bool) -> dict[str, Any]:
    """``old_logprobs`` and ``reward_s_per_sample``, each checked against the rule it needs."""
    old = raw.get("old_logprobs", OLD_LOGPROBS[0])
    if "old_logprobs" in raw and algorithm not in GENERATING:
        raise ConfigError(f"{where}: old_logprobs={old!r} applies to algorithms that generate "
                          f"({', '.join(GENERATING)}), not to {algorithm}")
    if not isinstance(old, str) or old not in OLD_LOGPROBS:
        raise ConfigError(f"{where}: old_logprobs={old!r} must be one of {', '.join(OLD_LOGPROBS)}")
    seconds = 0.0
    if "reward_s_per_sample" in raw:
        if not verifier:
            raise ConfigError(f"{where}: reward_s_per_sample applies to a verifier reward only: give "
                              f"models.reward: {REWARD_RULE}")
        seconds = rules.real(f"{where}: reward_s_per_sample", raw["reward_s_per_sample"], lo=0.0,
                             hi=rules.MAX_HOST_S_PER_SAMPLE)
    eta, streaming = _asynchrony(where, raw, algorithm)
    return {"old_logprobs": old, "reward_s_per_sample": seconds, "max_staleness": eta, "streaming": streaming}


def _asynchrony(where: str, raw: dict, algorithm: str) -> tuple[int, str]:
    """``async: {max_staleness: η, streaming: …}``: η policy versions, for the algorithms that
    generate, and how a standing rollout copy serves (:data:`STREAMING`)."""
    if "async" not in raw:
        return 0, "off"
    block = _mapping(where, "async", raw["async"])
    for key in block:
        if key not in ("max_staleness", "streaming"):
            raise _unknown_key(f"{where}: async", key, ["max_staleness", "streaming"])
    if "max_staleness" not in block:
        raise ConfigError(f"{where}: async needs max_staleness (policy versions a rollout may lag; 0: synchronous)")
    eta = rules.integer(f"{where}: async.max_staleness", block["max_staleness"], lo=0, hi=MAX_STALENESS)
    if eta and algorithm not in GENERATING:
        raise ConfigError(f"{where}: async.max_staleness={eta} applies to algorithms that generate "
                          f"({', '.join(GENERATING)}), not to {algorithm}")
    streaming = block.get("streaming", "off")
    if streaming not in STREAMING:
        raise ConfigError(f"{where}: async.streaming={streaming!r} must be one of {', '.join(STREAMING)}")
    if streaming != "off" and eta < 1:
        raise ConfigError(f"{where}: async.streaming={streaming} needs max_staleness ≥ 1, not {eta}")
    return eta, streaming


def experiment_from_dict(raw: Any, where: str = "experiment", base_dir: Path | None = None) -> Experiment:
    """Build an Experiment from parsed YAML, checking every key."""
    raw = _mapping(where, "the document", raw)
    allowed = _REQUIRED + _OPTIONAL
    for key in raw:
        if key not in allowed:
            raise _unknown_key(where, key, list(allowed))
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    algorithm = raw["algorithm"]
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"{where}: algorithm={algorithm!r} must be one of {', '.join(ALGORITHMS)}")

    models_raw = _mapping(where, "models", raw["models"])
    models, checkpoints = {}, {}
    verifier = False
    for role, name in models_raw.items():
        if role not in ROLES[algorithm]:
            raise _unknown_key(f"{where}: models ({algorithm} roles)", role, list(ROLES[algorithm]))
        if not isinstance(name, str):
            raise ConfigError(f"{where}: models.{role}={name!r} must be a preset name or a path")
        if name == REWARD_RULE:
            if role != "reward":
                raise ConfigError(f"{where}: models.{role}={name!r}: only the reward role may be a rule (a verifier)")
            verifier = True
            continue
        try:
            spec = get_model(name, base_dir)
        except ConfigError as exc:
            raise ConfigError(f"{where}: models.{role}: {exc}") from None
        models[role] = spec.as_value_model() if role in VALUE_ROLES else spec
        ckpt = checkpoint_dir(name, base_dir)
        if ckpt is not None:
            checkpoints[role] = str(ckpt)

    ints = {"batch_size": _positive_int(where, "batch_size", raw["batch_size"])}
    dists = {k: parse_lengths(raw[k], f"{where}: {k}", _INT_LIMITS[k], base_dir) for k in ("prompt_len", "gen_len")}
    ints |= {k: d.max for k, d in dists.items()}
    ints["ppo_minibatches"] = _positive_int(where, "ppo_minibatches", raw.get("ppo_minibatches", 1))
    ints["group_size"] = _positive_int(where, "group_size", raw.get("group_size", 1))

    cl = _mapping(where, "cluster", raw["cluster"])
    for key in cl:
        if key not in _CLUSTER_KEYS + _CLUSTER_OPTIONAL:
            raise _unknown_key(f"{where}: cluster", key, list(_CLUSTER_KEYS + _CLUSTER_OPTIONAL))
    missing = [k for k in _CLUSTER_KEYS if k not in cl]
    if missing:
        raise ConfigError(f"{where}: cluster is missing key(s) {', '.join(missing)}")
    nodes = _positive_int(where, "cluster.nodes", cl["nodes"])
    dpn = _positive_int(where, "cluster.devices_per_node", cl["devices_per_node"])
    if nodes * dpn > rules.MAX_DEVICES:
        raise ConfigError(f"{where}: cluster of {nodes}·{dpn} = {nodes * dpn:,} devices exceeds the limit "
                          f"{rules.MAX_DEVICES:,}")
    device = cl["device"]
    if not isinstance(device, str) or not device.strip():
        raise ConfigError(f"{where}: cluster.device={device!r} must be a profile name or a path to a profile .json")
    if device.endswith(".json") or "/" in device:
        # relative to the experiment file; the profile itself is loaded and checked by
        # estimator.profile.profiles.load_profile, which every command naming one calls
        path = Path(device) if base_dir is None or Path(device).is_absolute() else base_dir / device
        device = str(path)

    stack = cl.get("stack")
    if stack is not None:
        get_stack(stack, f"{where}: cluster.stack")
    micro_batching = cl.get("micro_batching")
    if micro_batching is not None and micro_batching not in MICRO_BATCHING:
        raise ConfigError(f"{where}: cluster.micro_batching={micro_batching!r} must be one of "
                          f"{', '.join(MICRO_BATCHING)}")
    seed = rules.integer(f"{where}: seed", raw.get("seed", 0), lo=0, hi=rules.MAX_SEED)
    kv_fraction = rules.real(f"{where}: kv_fraction", raw.get("kv_fraction", 0.9), lo=0.0, hi=1.0, positive=True)
    if ints["prompt_len"] + ints["gen_len"] > rules.MAX_SEQ_TOKENS:
        raise ConfigError(f"{where}: prompt_len + gen_len = {ints['prompt_len'] + ints['gen_len']:,} tokens exceeds "
                          f"the limit {rules.MAX_SEQ_TOKENS:,} per sequence")
    if ints["batch_size"] * ints["group_size"] > rules.MAX_BATCH:
        raise ConfigError(f"{where}: batch_size·group_size = {ints['batch_size'] * ints['group_size']:,} sequences "
                          f"exceeds the limit {rules.MAX_BATCH:,} per iteration")
    prompts = raw.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, str) or not prompts:
            raise ConfigError(f"{where}: prompts={prompts!r} must be a path to a JSONL file")
        path = Path(prompts) if base_dir is None or Path(prompts).is_absolute() else base_dir / prompts
        try:
            prompts = str(check_input_path(path, "prompts file"))
        except ConfigError as exc:
            raise ConfigError(f"{where}: prompts={prompts!r}: {exc}") from None
    options = _rollout_options(where, raw, algorithm, verifier)
    name = raw.get("name", where)
    if not isinstance(name, (str, int, float)) or isinstance(name, bool) or len(str(name)) > 200:
        raise ConfigError(f"{where}: name={str(name)[:60]!r} must be a short string (at most 200 characters)")
    try:
        return Experiment(
            algorithm=algorithm,
            models=models,
            params=WorkflowParams(**ints, prompt_lengths=dists["prompt_len"], gen_lengths=dists["gen_len"],
                                  verifier=verifier, old_logprobs=options["old_logprobs"],
                                  max_staleness=options["max_staleness"], streaming=options["streaming"]),
            cluster=Cluster(nodes, dpn, device),
            hyper=_hyperparams(where, raw.get("hyperparams", {})),
            seed=seed,
            kv_fraction=kv_fraction,
            prompts_path=prompts,
            name=str(name),
            checkpoints=checkpoints,
            reward_s_per_sample=options["reward_s_per_sample"],
            stack=stack,
            micro_batching=micro_batching,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_experiment(path: str | Path) -> Experiment:
    """Load and check an experiment YAML file."""
    raw = load_yaml(path, "experiment file")
    path = Path(path)
    if "name" not in raw:
        raw = {**raw, "name": path.stem}
    return experiment_from_dict(raw, where=f"experiment {path}", base_dir=path.parent)
