"""What every exporter shares: a change of the plan and its reason, the projection that records
each change as it makes it, the export it returns, and the settings every framework's config
takes (batch split per rank, model paths).

A projection starts from the plan as given and applies the framework's rules one at a time
(:meth:`Projection.set`); each field a rule changes becomes a :class:`Change` naming the call,
the field, the value in the plan, the value the framework runs and the rule. The projected
plan is a plan of this project's own vocabulary, so the estimator predicts it like any other.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from estimator.base.errors import ConfigError
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout, Plan, validate
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
                "files": sorted(self.files)}


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
    of the projected plan (its data and notes) under the comment ``header``."""
    projected = pr.plan(framework)
    data, notes = config(experiment, projected)
    text = f"# {header}\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return Export(framework, repo, commit, plan, projected, tuple(pr.changes), {"config.yaml": text},
                  describe(projected, experiment), tuple(notes))

