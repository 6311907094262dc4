"""Experiment: workflow + models + cluster, loaded from a strict YAML file.

Schema (every key but the first eight is optional)::

    algorithm: ppo            # ppo | grpo | dpo | remax | sft | rw
    models: {actor: llama2-7b, critic: llama2-7b, ref: llama2-7b, reward: llama2-7b}
                              # preset name, or a path to a Hugging Face config.json
                              # (the executor starts from the weights beside it, if any)
    batch_size: 512           # prompts (pairs for dpo/rw) per iteration
    prompt_len: 128
    gen_len: 128              # generated tokens (response tokens for dpo/rw/sft)
    ppo_minibatches: 4        # optimizer steps per train call
    cluster: {nodes: 1, devices_per_node: 8, device: h100-sxm}
    group_size: 8             # grpo: samples per prompt (default 1)
    seed: 0                   # weights, prompts and sampling
    prompts: prompts.jsonl    # token ids, one JSON list per line; synthetic if absent
    hyperparams: {lr: 1.0e-6, kl_coef: 0.05, clip_eps: 0.2, value_clip: 0.2,
                  gamma: 1.0, lam: 0.95, dpo_beta: 0.1, temperature: 1.0}

Unknown keys, wrong types, unknown presets and impossible values raise
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from estimator import rules
from estimator.cluster import Cluster
from estimator.errors import ConfigError, did_you_mean
from estimator.loading import check_input_path, load_yaml
from estimator.models import ModelSpec, checkpoint_dir, get_model
from estimator.workflow import ALGORITHMS, ROLES, VALUE_ROLES, Workflow, WorkflowParams, build


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
    models: dict[str, ModelSpec]  # role → model (value head for critic/reward)
    params: WorkflowParams
    cluster: Cluster
    hyper: Hyperparams = Hyperparams()
    seed: int = 0
    prompts_path: str | None = None  # JSONL of token ids, or None for synthetic prompts
    name: str = "experiment"
    # role → Hugging Face checkpoint directory its initial weights come from (executor only;
    # roles without one start from seeded weights)
    checkpoints: dict[str, str] = field(default_factory=dict)
    workflow: Workflow = field(init=False, compare=False)

    def __post_init__(self) -> None:
        need = ROLES.get(self.algorithm)
        if need is None:
            raise ConfigError(f"algorithm={self.algorithm!r} must be one of {', '.join(ALGORITHMS)}")
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
        for role, m in self.models.items():
            if m.positions == "learned" and p.prompt_len + p.gen_len > m.max_positions:
                raise ConfigError(f"models.{role}: prompt_len + gen_len = {p.prompt_len + p.gen_len} tokens exceeds "
                                  f"model {m.name!r}'s max_positions={m.max_positions} learned positions")
        object.__setattr__(self, "workflow", build(self.algorithm, p))

    @property
    def tokens_per_iteration(self) -> int:
        return self.workflow.calls[0].workload.seqs * self.params.prompt_len


_REQUIRED = ("algorithm", "models", "batch_size", "prompt_len", "gen_len", "cluster")
_OPTIONAL = ("ppo_minibatches", "group_size", "seed", "prompts", "hyperparams", "name")
_CLUSTER_KEYS = ("nodes", "devices_per_node", "device")


def _unknown_key(where: str, key: str, allowed: tuple[str, ...] | list[str]) -> ConfigError:
    return ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")


# key → upper bound (estimator/rules.py says why each is above any real run)
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
    for role, name in models_raw.items():
        if role not in ROLES[algorithm]:
            raise _unknown_key(f"{where}: models ({algorithm} roles)", role, list(ROLES[algorithm]))
        if not isinstance(name, str):
            raise ConfigError(f"{where}: models.{role}={name!r} must be a preset name or a path")
        try:
            spec = get_model(name, base_dir)
        except ConfigError as exc:
            raise ConfigError(f"{where}: models.{role}: {exc}") from None
        models[role] = spec.as_value_model() if role in VALUE_ROLES else spec
        ckpt = checkpoint_dir(name, base_dir)
        if ckpt is not None:
            checkpoints[role] = str(ckpt)

    ints = {k: _positive_int(where, k, raw[k]) for k in ("batch_size", "prompt_len", "gen_len")}
    ints["ppo_minibatches"] = _positive_int(where, "ppo_minibatches", raw.get("ppo_minibatches", 1))
    ints["group_size"] = _positive_int(where, "group_size", raw.get("group_size", 1))

    cl = _mapping(where, "cluster", raw["cluster"])
    for key in cl:
        if key not in _CLUSTER_KEYS:
            raise _unknown_key(f"{where}: cluster", key, list(_CLUSTER_KEYS))
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
        # estimator.profiles.load_profile, which every command naming one calls
        path = Path(device) if base_dir is None or Path(device).is_absolute() else base_dir / device
        device = str(path)

    seed = rules.integer(f"{where}: seed", raw.get("seed", 0), lo=0, hi=rules.MAX_SEED)
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
    name = raw.get("name", where)
    if not isinstance(name, (str, int, float)) or isinstance(name, bool) or len(str(name)) > 200:
        raise ConfigError(f"{where}: name={str(name)[:60]!r} must be a short string (at most 200 characters)")
    try:
        return Experiment(
            algorithm=algorithm,
            models=models,
            params=WorkflowParams(**ints),
            cluster=Cluster(nodes, dpn, device),
            hyper=_hyperparams(where, raw.get("hyperparams", {})),
            seed=seed,
            prompts_path=prompts,
            name=str(name),
            checkpoints=checkpoints,
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
