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

from estimator.base.errors import ConfigError
from estimator.spec.models import ModelSpec, from_hf_config
from estimator.spec.sharding import Box
from executor.checkpoint import (
    TRUNK_PREFIX,
    check_checkpoint,
    checkpoint_index,
    checkpoint_names,
    found_name,
    wanted_boxes,
)
from executor.model import Params, box_index

__all__ = ["TRUNK_PREFIX", "check_checkpoint", "checkpoint_names", "hf_config", "load_hf", "save_hf"]

def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, model: ModelSpec | None = None,
            boxes: dict[str, Box] | None = None, fresh_head: bool = False) -> tuple[ModelSpec, Params]:
    """Read a checkpoint into a params dict keyed by :func:`param_inventory` names.

    ``model`` defaults to the spec of ``config.json`` (give ``spec.as_value_model()`` to load a
    critic). ``boxes`` (name → global box, e.g. :func:`estimator.spec.sharding.shard`) reads only
    those slices of those parameters; by default every parameter is read whole. With
    ``fresh_head``, a value model's head that the checkpoint lacks (a language model's
    checkpoint) is left out of the result for the caller to initialise. Raises
    :class:`ConfigError` naming any tensor that is missing or has the wrong shape.
    """
    path = Path(path)
    spec = model or from_hf_config(path)
    index = checkpoint_index(path)
    out: Params = {}
    for name, box in wanted_boxes(path, index, spec, boxes, fresh_head).items():
        key = found_name(name, index)
        with safe_open(index[key][0], framework="pt") as fh:
            out[name] = fh.get_slice(key)[box_index(box)].to(dtype)
    return spec, out


def save_hf(path: str | Path, model: ModelSpec, params: Params) -> None:
    """Write full ``params`` as ``model.safetensors`` plus a LLaMA ``config.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {checkpoint_names(n)[0]: t.detach().contiguous().cpu() for n, t in params.items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")


def hf_config(model: ModelSpec) -> dict:
    """A ``config.json`` that :func:`estimator.spec.models.from_hf_config` reads back as ``model``
    (up to the head kind, which configs do not carry); LLaMA and Qwen2 architectures only."""
    if model.family not in ("llama", "qwen2"):
        raise ConfigError(f"model {model.name!r}: writing a {model.family} checkpoint is not supported "
                          "(LLaMA-style configs only)")
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
