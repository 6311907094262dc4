"""Hugging Face checkpoints: a directory with ``config.json`` and ``*.safetensors`` files.

Tensor names are the LLaMA ones with a ``model.`` prefix on the trunk
(``model.layers.0.self_attn.q_proj.weight``); ``lm_head.weight`` has none. A scalar value head
is read from ``value_head.weight`` or from ``score.weight`` (``LlamaForSequenceClassification``
with one label). Loading can read only the slices a device holds, so a large model never has
to fit in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from estimator.errors import ConfigError
from estimator.models import ModelSpec, from_hf_config
from estimator.sharding import Box, full_boxes, param_inventory
from executor.model import Params, box_index

TRUNK_PREFIX = "model."
_VALUE_HEAD_NAMES = ("value_head.weight", "score.weight")


def checkpoint_names(name: str) -> tuple[str, ...]:
    """Names a parameter may carry in a checkpoint, preferred first."""
    if name == "value_head.weight":
        return _VALUE_HEAD_NAMES
    if name == "lm_head.weight":
        return (name,)
    return (TRUNK_PREFIX + name, name)


def _index(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name → the safetensors file that holds it."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"checkpoint {str(path)!r} has no *.safetensors files")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            out.update((k, f) for k in fh.keys())
    return out


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, model: ModelSpec | None = None,
            boxes: dict[str, Box] | None = None, fresh_head: bool = False) -> tuple[ModelSpec, Params]:
    """Read a checkpoint into a params dict keyed by :func:`param_inventory` names.

    ``model`` defaults to the spec of ``config.json`` (give ``spec.as_value_model()`` to load a
    critic). ``boxes`` (name → global box, e.g. :func:`estimator.sharding.shard`) reads only
    those slices of those parameters; by default every parameter is read whole. With
    ``fresh_head``, a value model's head that the checkpoint lacks (a language model's
    checkpoint) is left out of the result for the caller to initialise. Raises
    :class:`ConfigError` naming any tensor that is missing or has the wrong shape.
    """
    path = Path(path)
    spec = model or from_hf_config(path)
    index = _index(path)
    out: Params = {}
    for name, box in _wanted(path, index, spec, boxes, fresh_head).items():
        key = _found(name, index)
        with safe_open(index[key], framework="pt") as fh:
            out[name] = fh.get_slice(key)[box_index(box)].to(dtype)
    return spec, out


def check_checkpoint(path: str | Path, model: ModelSpec) -> None:
    """Raise :class:`ConfigError` naming every tensor of ``model`` that the checkpoint in ``path``
    lacks or holds in the wrong shape (reads headers only), as ``load_hf(..., fresh_head=True)``
    would."""
    path = Path(path)
    _wanted(path, _index(path), model, None, fresh_head=True)


def _wanted(path: Path, index: dict[str, Path], model: ModelSpec, boxes: dict[str, Box] | None,
            fresh_head: bool) -> dict[str, Box]:
    """The boxes to read (default: every parameter whole), less a value head the checkpoint
    lacks when ``fresh_head``; raises :class:`ConfigError` naming every missing or misshapen
    tensor."""
    wanted = boxes if boxes is not None else full_boxes(model)
    if fresh_head and model.head == "value" and not any(n in index for n in _VALUE_HEAD_NAMES):
        wanted = {n: b for n, b in wanted.items() if n != "value_head.weight"}
    problems = _check(path, index, {p.name: p for p in param_inventory(model)}, wanted)
    if problems:
        raise ConfigError(f"checkpoint {str(path)!r}: " + "; ".join(problems))
    return wanted


def _found(name: str, index: dict[str, Path]) -> str | None:
    return next((k for k in checkpoint_names(name) if k in index), None)


def _check(path: Path, index: dict[str, Path], inventory: dict, wanted: dict[str, Box]) -> list[str]:
    problems = []
    for name in wanted:
        if name not in inventory:
            problems.append(f"{name!r} is not a parameter of the model")
            continue
        key = _found(name, index)
        if key is None:
            problems.append(f"tensor {checkpoint_names(name)[0]!r} is missing")
            continue
        with safe_open(index[key], framework="pt") as fh:
            shape = tuple(fh.get_slice(key).get_shape())
        if shape != inventory[name].shape:
            problems.append(f"tensor {key!r} has shape {list(shape)}, expected {list(inventory[name].shape)}")
    return problems


def save_hf(path: str | Path, model: ModelSpec, params: Params) -> None:
    """Write full ``params`` as ``model.safetensors`` plus a LLaMA ``config.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {checkpoint_names(n)[0]: t.detach().contiguous().cpu() for n, t in params.items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")


def hf_config(model: ModelSpec) -> dict:
    """A ``config.json`` that :func:`estimator.models.from_hf_config` reads back as ``model``
    (up to the head kind, which configs do not carry)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": model.layers,
        "hidden_size": model.hidden,
        "intermediate_size": model.ffn,
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.kv_heads,
        "vocab_size": model.vocab,
        "tie_word_embeddings": model.tied_embeddings,
        "attention_bias": model.qkv_bias,
        "rope_theta": model.rope_theta,
        "rms_norm_eps": model.norm_eps,
        "hidden_act": "silu",
    }
