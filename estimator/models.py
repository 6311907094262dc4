"""ModelSpec: the shape of a decoder-only transformer, its presets, and Hugging Face configs.

Parameter count (LLaMA family, untied embeddings; counted from the layer shapes of the LLaMA
architecture, Touvron et al. 2023, arXiv 2302.13971, with grouped-query attention's ``g`` key/value
heads of width ``d = h/a``): ``L·(2h² + 2·h·g·d + 3·h·f + 2h) + h + 2·V·h`` — per block the
q and o projections, k and v, the three SwiGLU matrices and two RMSNorm weights — plus q/k/v
biases for Qwen2-style models, minus one ``V·h`` for tied embeddings, and a scalar value head
(``h`` weights) in place of the LM head for critics and reward models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from estimator import rules
from estimator.errors import ConfigError
from estimator.loading import is_dir, load_json

HEAD_KINDS = ("lm", "value")
BF16_BYTES = 2


_SHAPE_LIMITS = {"layers": rules.MAX_LAYERS, "hidden": rules.MAX_HIDDEN, "ffn": rules.MAX_FFN,
                 "heads": rules.MAX_HEADS, "kv_heads": rules.MAX_HEADS, "vocab": rules.MAX_VOCAB}


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (RMSNorm, rotary, SwiGLU, grouped-query attention)."""

    name: str
    layers: int  # transformer blocks
    hidden: int  # model width h
    ffn: int  # SwiGLU inner width f
    heads: int  # attention (query) heads a
    kv_heads: int  # key/value heads g (grouped-query attention); == heads for MHA
    vocab: int  # vocabulary size V
    head: str = "lm"  # "lm" (vocab logits) or "value" (one scalar per token)
    tied_embeddings: bool = False  # LM head shares the embedding matrix
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    rope_theta: float = 10000.0  # rotary base
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self) -> None:
        problems = []
        for field, hi in _SHAPE_LIMITS.items():
            try:
                rules.integer(field, getattr(self, field), lo=1, hi=hi)
            except ConfigError as exc:
                problems.append(str(exc))
        for field in ("rope_theta", "norm_eps"):
            try:
                rules.real(field, getattr(self, field), positive=True, hi=1e12 if field == "rope_theta" else 1.0)
            except ConfigError as exc:
                problems.append(str(exc))
        if not problems:
            if self.hidden % self.heads:
                problems.append(f"hidden={self.hidden} must be divisible by heads={self.heads}")
            if self.heads % self.kv_heads:
                problems.append(f"heads={self.heads} must be divisible by kv_heads={self.kv_heads}")
            if self.head_dim % 2:
                problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.head not in HEAD_KINDS:
            problems.append(f"head={self.head!r} must be one of {HEAD_KINDS}")
        if self.head == "value" and self.tied_embeddings:
            problems.append("tied_embeddings=True needs head='lm'")
        if problems:
            raise ConfigError(f"model {self.name!r}: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of the K (or V) projection output: g·d."""
        return self.kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        h, f, kv = self.hidden, self.ffn, self.kv_dim
        attn = 2 * h * h + 2 * h * kv + (h + 2 * kv if self.qkv_bias else 0)
        return attn + 3 * h * f + 2 * h  # + two RMSNorm weight vectors

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        if self.head == "value":
            return self.hidden
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Total parameter count."""
        return (
            self.layers * self.params_per_layer
            + self.hidden  # final norm
            + self.embedding_params
            + self.head_params
        )

    def bytes(self, bytes_per_param: int = BF16_BYTES) -> int:
        """Bytes of the weights at ``bytes_per_param`` (bf16 by default)."""
        return self.params * bytes_per_param

    def as_value_model(self) -> ModelSpec:
        """The same trunk with a scalar value head (critic / reward model)."""
        return dataclasses.replace(self, head="value", tied_embeddings=False)


def _llama(name: str, layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int,
           theta: float = 10000.0, eps: float = 1e-5) -> ModelSpec:
    return ModelSpec(name, layers, hidden, ffn, heads, kv, vocab, rope_theta=theta, norm_eps=eps)


def _qwen(name: str, layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int,
          tied: bool) -> ModelSpec:
    return ModelSpec(name, layers, hidden, ffn, heads, kv, vocab, tied_embeddings=tied,
                     qkv_bias=True, rope_theta=1_000_000.0, norm_eps=1e-6)


# Values from each model's published Hugging Face config.json.
PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _llama("llama2-7b", 32, 4096, 11008, 32, 32, 32000),
        _llama("llama2-13b", 40, 5120, 13824, 40, 40, 32000),
        _llama("codellama-34b", 48, 8192, 22016, 64, 8, 32000, theta=1_000_000.0),
        _llama("llama2-70b", 80, 8192, 28672, 64, 8, 32000),
        _llama("llama3-8b", 32, 4096, 14336, 32, 8, 128256, theta=500_000.0),
        _llama("llama3-70b", 80, 8192, 28672, 64, 8, 128256, theta=500_000.0),
        _qwen("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 151936, tied=True),
        _qwen("qwen2.5-1.5b", 28, 1536, 8960, 12, 2, 151936, tied=True),
        _qwen("qwen2.5-3b", 36, 2048, 11008, 16, 2, 151936, tied=True),
        _qwen("qwen2.5-7b", 28, 3584, 18944, 28, 4, 152064, tied=False),
        _qwen("qwen2.5-14b", 48, 5120, 13824, 40, 8, 152064, tied=False),
        _qwen("qwen2.5-32b", 64, 5120, 27648, 40, 8, 152064, tied=False),
        _qwen("qwen2.5-72b", 80, 8192, 29568, 64, 8, 152064, tied=False),
        # Tiny models the CPU executor runs in seconds.
        _llama("tiny-2l-128h", 2, 128, 256, 4, 2, 256),
        _llama("tiny-4l-256h", 4, 256, 512, 8, 4, 512),
    )
}

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
_HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def from_hf_config(path: str | Path) -> ModelSpec:
    """Read a Hugging Face ``config.json`` (LLaMA, Mistral or Qwen2 style) into a ModelSpec.

    ``path`` is the file or the directory that holds it.
    """
    path = Path(path)
    if is_dir(path) and path.suffix != ".json":
        path = path / "config.json"
    cfg = load_json(path, "model config", expect=dict)
    where = f"model config {str(path)!r}"
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: architectures={archs!r} must be a list of class names")
    model_type = cfg.get("model_type", "")
    if not isinstance(model_type, str):
        raise ConfigError(f"{where}: model_type={model_type!r} must be a string")
    style = next((_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES), None)
    style = style or _HF_MODEL_TYPES.get(model_type)
    if style is None:
        raise ConfigError(
            f"model config {str(path)!r}: unsupported architecture "
            f"{archs or cfg.get('model_type')!r}; supported: {sorted(_HF_ARCHITECTURES)}"
        )
    required = ("num_hidden_layers", "hidden_size", "intermediate_size",
                "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConfigError(f"model config {str(path)!r} lacks keys {missing}")
    heads = cfg["num_attention_heads"]
    rope_theta = rules.real(f"{where}: rope_theta", cfg.get("rope_theta", 10000.0), positive=True)
    norm_eps = rules.real(f"{where}: rms_norm_eps", cfg.get("rms_norm_eps", 1e-5), positive=True)
    for key in ("tie_word_embeddings", "attention_bias"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"{where}: {key}={cfg[key]!r} must be true or false")
    return ModelSpec(
        name=path.parent.name or path.stem,
        layers=cfg["num_hidden_layers"],
        hidden=cfg["hidden_size"],
        ffn=cfg["intermediate_size"],
        heads=heads,
        kv_heads=heads if cfg.get("num_key_value_heads") is None else cfg["num_key_value_heads"],
        vocab=cfg["vocab_size"],
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", style == "qwen2")),
        rope_theta=rope_theta,
        norm_eps=norm_eps,
    )


def model_path(name_or_path: str, base_dir: str | Path | None = None) -> Path | None:
    """The path a model entry names (relative to ``base_dir``), or None for a preset name."""
    if name_or_path in PRESETS or not ("/" in name_or_path or name_or_path.endswith(".json")):
        return None
    path = Path(name_or_path)
    return Path(base_dir) / path if base_dir is not None and not path.is_absolute() else path


def checkpoint_dir(name_or_path: str, base_dir: str | Path | None = None) -> Path | None:
    """The Hugging Face checkpoint directory a model entry names: the directory of its
    ``config.json`` when that directory also holds ``*.safetensors`` weights, else None."""
    path = model_path(name_or_path, base_dir)
    if path is None:
        return None
    folder = path if is_dir(path) else path.parent
    return folder.resolve() if any(folder.glob("*.safetensors")) else None


def get_model(name_or_path: str, base_dir: str | Path | None = None) -> ModelSpec:
    """A preset by name, or a Hugging Face config by path (relative to ``base_dir``)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = model_path(name_or_path, base_dir)
    if path is not None:
        return from_hf_config(path)
    raise ConfigError(
        f"unknown model preset {name_or_path!r}; known presets: {', '.join(sorted(PRESETS))} "
        "(or give a path to a Hugging Face config.json)"
    )
