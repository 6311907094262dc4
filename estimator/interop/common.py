"""What every exporter shares: a change of the plan and its reason, the projection that records
each change as it makes it, the export it returns, and the settings every framework's config
takes (batch split per rank, model paths); and what every importer shares: the settings of a
config by dotted key, each read once, so that a key no rule read is named (:class:`Settings`),
read from Hydra overrides (:func:`override_settings`) or a YAML overlay
(:func:`overlay_settings`), and a model path back to its preset (:func:`preset_of`).

A projection starts from the plan as given and applies the framework's rules one at a time
(:meth:`Projection.set`); each field a rule changes becomes a :class:`Change` naming the call,
the field, the value in the plan, the value the framework runs and the rule. The projected
plan is a plan of this project's own vocabulary, so the estimator predicts it like any other.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from estimator.base.errors import ConfigError
from estimator.base.loading import parse_yaml
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout, Plan, validate
from estimator.spec.stack import FSDP_VLLM, MEGATRON_VLLM
from estimator.spec.workflow import Call

# a train call's data-parallel sharding: replicated, ZeRO-1 / distributed optimizer, ZeRO-3 / FSDP
SHARD_CHOICES = ("none", "optimizer", "full")

# Hugging Face Hub repositories of the model presets (the model cards' own names), so a
# framework's model path can be filled in; a role read from a local config takes its directory.
HF_REPOS = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
    "codellama-34b": "codellama/CodeLlama-34b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B",
    "opt-125m": "facebook/opt-125m",
    "opt-1.3b": "facebook/opt-1.3b",
    "opt-2.7b": "facebook/opt-2.7b",
    "opt-6.7b": "facebook/opt-6.7b",
    "opt-13b": "facebook/opt-13b",
    "opt-30b": "facebook/opt-30b",
    "opt-66b": "facebook/opt-66b",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}


@dataclass(frozen=True)
class Change:
    """One field of one call's layout that the framework runs differently from the plan."""

    call: str
    field: str
    given: str  # the value in the plan
    exported: str  # the value the framework runs
    why: str  # the framework's rule

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Export:
    """A plan written in one framework's configuration."""

    framework: str
    repo: str  # owner/name on GitHub
    commit: str  # the commit the key names were taken from
    given: Plan
    plan: Plan  # the plan the framework runs: the given one, or its projection
    changes: tuple[Change, ...]
    files: dict[str, str]  # file name → text, written into the export directory
    summary: str  # how the framework runs the plan, in a phrase
    notes: tuple[str, ...] = ()  # what the framework does beside the plan (not a layout change)
    # the production stack (estimator.spec.stack) the framework's trainer runs the plan on, its
    # projection priced on it where the experiment is priced on a production stack (None: the
    # experiment's stack; a framework whose trainer no stack describes)
    stack: str | None = None

    @property
    def projected(self) -> bool:
        return bool(self.changes)

    def record(self, predicted_s: float | None, projected_predicted_s: float | None) -> dict[str, Any]:
        """The ``export.json`` object."""
        return {"framework": self.framework, "repo": self.repo, "commit": self.commit,
                "projected": self.projected, "summary": self.summary,
                "changes": [c.to_dict() for c in self.changes], "notes": list(self.notes),
                "predicted_s": predicted_s, "projected_predicted_s": projected_predicted_s,
                "plan": json.loads(self.given.to_json()), "projected_plan": json.loads(self.plan.to_json()),
                "files": sorted(self.files), "framework_stack": self.stack}


def _text(value: object) -> str:
    return str(value)


class Projection:
    """The plan as a framework runs it, built rule by rule; every changed field is recorded."""

    def __init__(self, experiment: Experiment, plan: Plan):
        self.experiment = experiment
        self.layouts = dict(plan.layouts)
        self.changes: list[Change] = []

    def __getitem__(self, call: str) -> Layout:
        return self.layouts[call]

    def set(self, call: str, why: str, **values: Any) -> None:
        """Give ``call`` these layout fields (``shard`` included), recording each that changes."""
        old = self.layouts[call]
        for key, value in values.items():
            if getattr(old, key) != value:
                self.changes.append(Change(call, key, _text(getattr(old, key)), _text(value), why))
        self.layouts[call] = dataclasses.replace(old, **values)

    def plan(self, framework: str) -> Plan:
        """The projected plan; a framework rule that breaks a plan rule is a bug here, named."""
        plan = Plan(dict(self.layouts))
        problems = validate(plan, self.experiment)
        if problems:
            raise ConfigError(f"{framework}: the projected plan breaks the plan rules: " + "; ".join(problems))
        return plan


def require_algorithm(framework: str, experiment: Experiment, algorithms: tuple[str, ...]) -> None:
    """ConfigError unless the experiment's algorithm is one the framework's exporter writes."""
    if experiment.algorithm not in algorithms:
        raise ConfigError(f"{framework}: the exporter writes {' and '.join(algorithms)} experiments, not "
                          f"{experiment.algorithm}")


def per_rank(call: Call, dp: int, framework: str) -> int:
    """Rows (sequences; pairs for paired data) each data-parallel rank takes per optimizer step;
    a framework splits the step's batch evenly too, so an uneven split is refused by name."""
    units = call.workload.units_per_minibatch
    if units % dp:
        raise ConfigError(f"{framework}: call {call.name}: its batch of {units} rows per optimizer step is not "
                          f"divisible by dp = {dp}, which {framework} needs (every rank takes the same rows)")
    return units // dp


def micro_rows(call: Call, layout: Layout) -> int:
    """Rows per micro-batch and data-parallel rank of a call counted in micro-batches."""
    return max(1, call.workload.units_per_minibatch // (layout.dp * layout.micro_batches))


def micro_batches_for(call: Call, dp: int, rows: int, framework: str) -> int:
    """Micro-batches per rank when each takes at most ``rows`` rows and all are equal: the
    largest divisor of the rank's rows not above ``rows``."""
    mine = per_rank(call, dp, framework)
    size = max(d for d in range(1, min(rows, mine) + 1) if mine % d == 0)
    return mine // size


def model_path(experiment: Experiment, role: str) -> tuple[str, str | None]:
    """The model path a framework config takes for ``role``, and a note where it is a guess: the
    checkpoint directory the experiment names, the preset's Hugging Face repository, or the
    preset's own name (with a note to replace it)."""
    if role in experiment.checkpoints:
        return experiment.checkpoints[role], None
    name = experiment.models[role].name
    if name in HF_REPOS:
        return HF_REPOS[name], None
    return name, (f"models.{role}={name!r} has no Hugging Face repository known to the exporter; "
                  f"replace {name!r} with the checkpoint's path")


def token_caps(experiment: Experiment) -> tuple[int, int]:
    """(prompt, response) token caps: the experiment's lengths at their caps."""
    p = experiment.params
    return p.prompt_len, p.gen_len


def mesh_text(layout: Layout) -> str:
    return f"{layout.mesh} dp{layout.dp} tp{layout.tp} pp{layout.pp}"


def overlay_export(framework: str, repo: str, commit: str, header: str, experiment: Any, plan: Plan,
                   pr: Projection, config: Callable[[Any, Plan], tuple[dict, list[str]]],
                   describe: Callable[[Plan, Any], str]) -> Export:
    """An export whose file is ``config.yaml``, an overlay of the framework's config: ``config``
    of the projected plan (its data and notes) under the comment ``header``; the framework picks
    its trainer by the projected train layout (:func:`trainer_stack`)."""
    projected = pr.plan(framework)
    data, notes = config(experiment, projected)
    text = f"# {header}\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return Export(framework, repo, commit, plan, projected, tuple(pr.changes), {"config.yaml": text},
                  describe(projected, experiment), tuple(notes), trainer_stack(projected))


def trainer_stack(plan: Plan, call: str = "actor_train") -> str:
    """The production stack of a framework that picks its trainer by the train layout's sharding
    (AReaL, NeMo-RL): a fully sharded layout trains with FSDP (DTensor), any other with Megatron."""
    return FSDP_VLLM if plan[call].shard == "full" else MEGATRON_VLLM



# ---- import: a framework config's settings back into the vocabulary ------------------------------

_REQUIRED = object()  # a setting's default when the importer needs it given


def preset_of(path: str) -> str:
    """A model path back to the planner's preset where it is a preset's Hugging Face repository;
    any other path as it is (the experiment reads it as a local ``config.json`` or its directory)."""
    by_repo = {repo: name for name, repo in HF_REPOS.items()}
    return by_repo.get(path, path)


class Settings:
    """A framework config's settings by dotted key, each marked as read when a rule reads it;
    :meth:`finish` names what no rule read. Values are strings (Hydra overrides) or YAML scalars."""

    def __init__(self, values: dict[str, Any], where: str, framework: str):
        self.values, self.where, self.framework = values, where, framework
        self.read: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """The raw value (marked read), ``default`` when the key is not given; a required key
        missing is refused by name."""
        if key not in self.values:
            if default is _REQUIRED:
                raise ConfigError(f"{self.where}: key {key!r} is missing; the importer needs it")
            return default
        self.read.add(key)
        return self.values[key]

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.where}: {key}={value!r} must be a string")
        return value

    def number(self, key: str, kind: type = int, default: Any = _REQUIRED) -> int | float:
        """An integer (``kind`` int) or a finite number; a bool, a fraction where an integer
        belongs or text that is no number is refused by name."""
        return self._as_number(key, self.get(key, default), kind)

    def _as_number(self, key: str, value: Any, kind: type) -> int | float:
        what = "an integer" if kind is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{self.where}: {key}={value!r} is not {what}")
        try:
            out = kind(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{self.where}: {key}={value!r} is not {what}") from None
        if kind is int and (isinstance(out, float) or isinstance(value, float)):
            if not float(out).is_integer():
                raise ConfigError(f"{self.where}: {key}={value!r} is not {what}")
            out = int(out)
        if not math.isfinite(out):
            raise ConfigError(f"{self.where}: {key}={value!r} is not a finite number")
        return kind(out)

    def optional(self, key: str, kind: type = int, default: Any = None) -> int | float | None:
        """A number, or None where the value is null (YAML ``null``, Hydra ``null``)."""
        value = self.get(key, default)
        if value is None or value == "null":
            return None
        return self._as_number(key, value, kind)

    def flag(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self.get(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{self.where}: {key}={value!r} must be True or False")

    def consume(self, *keys: str) -> None:
        """Mark settings read that the export writes and the plan does not vary."""
        for key in keys:
            if key in self.values:
                self.read.add(key)

    def unread(self) -> list[str]:
        return sorted(set(self.values) - self.read)

    def finish(self) -> None:
        """Refuse, by name, every key no rule read."""
        unread = self.unread()
        if unread:
            raise ConfigError(f"{self.where}: key(s) {unread} are not ones the importer reads; it reads what "
                              f"python -m estimator.export {self.framework} writes")


def override_settings(text: str, where: str, framework: str) -> Settings:
    """``key=value`` per line (blank lines and ``#`` comments skipped); a line without ``=`` or a
    key given twice is refused by name."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise ConfigError(f"{where} line {n}: {line!r} is not key=value")
        if key in out:
            raise ConfigError(f"{where} line {n}: key {key!r} is given twice")
        out[key] = value
    return Settings(out, where, framework)


def overlay_settings(text: str, where: str, framework: str) -> Settings:
    """A YAML overlay's leaves by dotted key (``policy.generation.vllm_cfg.tensor_parallel_size``);
    an empty mapping is a leaf of its own. Strict YAML: a key given twice is refused."""
    data = parse_yaml(text, where)
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: key {prefix}{key!r} must be a string")
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(data, "")
    return Settings(out, where, framework)
