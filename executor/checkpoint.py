"""Hugging Face checkpoints checked without torch: tensor names and shapes from the safetensors
headers (read by :func:`estimator.base.loading.read_safetensors_header`), so ``executor.run`` refuses
a checkpoint that does not fit its model before any process starts::

    from executor.checkpoint import check_checkpoint
    check_checkpoint("ckpt/", experiment.models["actor"])   # ConfigError naming every problem

Tensor names are the LLaMA ones with a ``model.`` prefix on the trunk
(``model.layers.0.self_attn.q_proj.weight``); ``lm_head.weight`` has none. A scalar value head
is read from ``value_head.weight`` or from ``score.weight`` (``LlamaForSequenceClassification``
with one label).
"""

from __future__ import annotations

from pathlib import Path

from estimator.base.errors import ConfigError
from estimator.base.loading import read_safetensors_header
from estimator.spec.models import ModelSpec
from estimator.spec.sharding import Box, full_boxes, param_inventory

TRUNK_PREFIX = "model."
VALUE_HEAD_NAMES = ("value_head.weight", "score.weight")


def checkpoint_names(name: str) -> tuple[str, ...]:
    """Names a parameter may carry in a checkpoint, preferred first."""
    if name == "value_head.weight":
        return VALUE_HEAD_NAMES
    if name == "lm_head.weight":
        return (name,)
    return (TRUNK_PREFIX + name, name)


def checkpoint_index(path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Checkpoint tensor name → (the safetensors file that holds it, its shape)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"checkpoint {str(path)!r} has no *.safetensors files")
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        header = read_safetensors_header(f, "checkpoint file")
        out.update((k, (f, tuple(v["shape"]))) for k, v in header.items())
    return out


def check_checkpoint(path: str | Path, model: ModelSpec) -> None:
    """Raise :class:`ConfigError` naming every tensor of ``model`` that the checkpoint in ``path``
    lacks or holds in the wrong shape (reads headers only), as ``load_hf(..., fresh_head=True)``
    would."""
    path = Path(path)
    wanted_boxes(path, checkpoint_index(path), model, None, fresh_head=True)


def wanted_boxes(path: Path, index: dict, model: ModelSpec, boxes: dict[str, Box] | None,
                 fresh_head: bool) -> dict[str, Box]:
    """The boxes to read (default: every parameter whole), less a value head the checkpoint
    lacks when ``fresh_head``; raises :class:`ConfigError` naming every missing or misshapen
    tensor."""
    refuse_family(path, model)
    wanted = boxes if boxes is not None else full_boxes(model)
    if fresh_head and model.head == "value" and not any(n in index for n in VALUE_HEAD_NAMES):
        wanted = {n: b for n, b in wanted.items() if n != "value_head.weight"}
    problems = _check(index, {p.name: p for p in param_inventory(model)}, wanted)
    if problems:
        raise ConfigError(f"checkpoint {str(path)!r}: " + "; ".join(problems))
    return wanted


LOADABLE_FAMILIES = ("llama", "qwen2")


def refuse_family(path: Path, model: ModelSpec) -> None:
    """GPT-2, OPT and GPT-NeoX checkpoints name and lay out their tensors differently (fused
    q/k/v, Conv1D weights, OPT's offset position rows); reading them is not supported, so they
    are refused rather than loaded wrongly."""
    if model.family not in LOADABLE_FAMILIES:
        raise ConfigError(f"checkpoint {str(path)!r}: loading {model.family} weights is not supported "
                          f"(only {', '.join(LOADABLE_FAMILIES)} checkpoints); give the config alone to "
                          "start the model from seeded weights")


def found_name(name: str, index: dict) -> str | None:
    """The name parameter ``name`` has in the checkpoint, or None."""
    return next((k for k in checkpoint_names(name) if k in index), None)


def _check(index: dict[str, tuple[Path, tuple[int, ...]]], inventory: dict, wanted: dict[str, Box]) -> list[str]:
    problems = []
    for name in wanted:
        if name not in inventory:
            problems.append(f"{name!r} is not a parameter of the model")
            continue
        key = found_name(name, index)
        if key is None:
            problems.append(f"tensor {checkpoint_names(name)[0]!r} is missing")
            continue
        shape = index[key][1]
        if shape != inventory[name].shape:
            problems.append(f"tensor {key!r} has shape {list(shape)}, expected {list(inventory[name].shape)}")
    return problems
