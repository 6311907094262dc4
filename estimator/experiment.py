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

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from estimator.cluster import Cluster
from estimator.errors import ConfigError
from estimator.models import ModelSpec, checkpoint_dir, get_model
from estimator.profiles import known_profiles
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
        object.__setattr__(self, "workflow", build(self.algorithm, p))

    @property
    def tokens_per_iteration(self) -> int:
        return self.workflow.calls[0].workload.seqs * self.params.prompt_len


_REQUIRED = ("algorithm", "models", "batch_size", "prompt_len", "gen_len", "cluster")
_OPTIONAL = ("ppo_minibatches", "group_size", "seed", "prompts", "hyperparams", "name")
_CLUSTER_KEYS = ("nodes", "devices_per_node", "device")


def _unknown_key(where: str, key: str, allowed: tuple[str, ...] | list[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _positive_int(where: str, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: {key}={value!r} must be an integer")
    if value < 1:
        raise ConfigError(f"{where}: {key}={value} must be at least 1")
    return value


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
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"{where}: hyperparams.{k}={v!r} must be a number")
        strict = k in ("lr", "temperature")
        if v < 0 or (strict and v == 0):
            rule = "positive" if strict else "non-negative"
            raise ConfigError(f"{where}: hyperparams.{k}={v} must be {rule}")
        values[k] = float(v)
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
    device = cl["device"]
    if not isinstance(device, str):
        raise ConfigError(f"{where}: cluster.device={device!r} must be a profile name")
    if device.endswith(".json") or "/" in device:
        path = Path(device) if base_dir is None or Path(device).is_absolute() else base_dir / device
        if not path.is_file():
            raise ConfigError(f"{where}: cluster.device={device!r}: profile file {str(path)!r} does not exist")
        device = str(path)
    elif device not in known_profiles():
        raise ConfigError(f"{where}: cluster.device={device!r} is not a known hardware profile; "
                          f"known: {', '.join(known_profiles())} (or a path to a profile .json)")

    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"{where}: seed={seed!r} must be a non-negative integer")
    prompts = raw.get("prompts")
    if prompts is not None:
        if not isinstance(prompts, str):
            raise ConfigError(f"{where}: prompts={prompts!r} must be a path to a JSONL file")
        path = Path(prompts) if base_dir is None or Path(prompts).is_absolute() else base_dir / prompts
        if not path.is_file():
            raise ConfigError(f"{where}: prompts={prompts!r}: file {str(path)!r} does not exist")
        prompts = str(path)
    name = raw.get("name", where)
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
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"experiment file {str(path)!r}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"experiment {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    raw = raw if raw is not None else {}
    if isinstance(raw, dict) and "name" not in raw:
        raw = {**raw, "name": path.stem}
    return experiment_from_dict(raw, where=f"experiment {path}", base_dir=path.parent)
