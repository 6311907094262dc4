"""ModelSpec: the shape of a decoder-only transformer, its presets, and Hugging Face configs.

Parameter count (LLaMA family, untied embeddings; counted from the layer shapes of the LLaMA
architecture, Touvron et al. 2023, arXiv 2302.13971, with grouped-query attention's ``g`` key/value
heads of width ``d = h/a``): ``L·(2h² + 2·h·g·d + 3·h·f + 2h) + h + 2·V·h`` — per block the
q and o projections, k and v, the three SwiGLU matrices and two RMSNorm weights — plus q/k/v
biases for Qwen2-style models, minus one ``V·h`` for tied embeddings, and a scalar value head
(``h`` weights) in place of the LM head for critics and reward models. Where a head is wider
than ``h/a`` (Qwen3: ``d = 128`` at ``h = 5120``, ``a = 64``; ``attention_head_dim``), the q and
o projections are ``h × a·d`` instead of ``h²``; Qwen3's RMSNorm on each head's q and k
(``qk_norm``) adds two weights of ``d`` per block, replicated over tensor-parallel ranks.

GPT-style families (GPT-2, Radford et al. 2019; OPT, Zhang et al. 2022, arXiv 2205.01068;
GPT-NeoX / Pythia, Black et al. 2022, arXiv 2204.06745) change the terms, each by one field:

- ``norm="layernorm"``: every norm has a weight and a bias, ``2h`` per norm instead of ``h``;
- ``mlp="gelu"`` or ``"relu"``: two matrices fc1 (h→f) and fc2 (f→h), ``2·h·f`` instead of
  ``3·h·f`` (GPT-2 and OPT use ``f = 4h``);
- ``bias=True``: every linear layer carries a bias: ``h + 2·g·d`` (q, k, v) ``+ h`` (o) ``+ f + h``
  (fc1, fc2; SwiGLU: ``2f + h``);
- ``positions="learned"``: a ``max_positions × h`` table added to the token embedding (OPT's
  table has two extra rows, counted as published);
- ``parallel_residual`` and ``rotary_fraction`` (GPT-NeoX) change the computation, not the count.

GPT-2 small, for instance: ``12·(12h² + 13h) + 2h + V·h + 1024·h`` = 124,439,808 at h = 768,
V = 50,257 (tied head).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from estimator.base import rules
from estimator.base.errors import ConfigError, did_you_mean
from estimator.base.loading import is_dir, load_json

HEAD_KINDS = ("lm", "value")
OPT_POSITION_OFFSET = 2  # OPT's learned position table has 2 rows before position 0
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu", "relu")
POSITIONS = ("rotary", "learned")
BF16_BYTES = 2


_SHAPE_LIMITS = {"layers": rules.MAX_LAYERS, "hidden": rules.MAX_HIDDEN, "ffn": rules.MAX_FFN,
                 "heads": rules.MAX_HEADS, "kv_heads": rules.MAX_HEADS, "vocab": rules.MAX_VOCAB}


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only pre-norm transformer with grouped-query attention.

    The defaults are the LLaMA architecture (RMSNorm, rotary positions, SwiGLU MLP, no
    biases); ``norm``, ``mlp``, ``positions``/``max_positions``, ``bias``,
    ``parallel_residual`` and ``rotary_fraction`` describe GPT-2, OPT and GPT-NeoX blocks.
    """

    name: str
    layers: int  # transformer blocks
    hidden: int  # model width h
    ffn: int  # MLP inner width f
    heads: int  # attention (query) heads a
    kv_heads: int  # key/value heads g (grouped-query attention); == heads for MHA
    vocab: int  # vocabulary size V
    head: str = "lm"  # "lm" (vocab logits) or "value" (one scalar per token)
    tied_embeddings: bool = False  # LM head shares the embedding matrix
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    rope_theta: float = 10000.0  # rotary base
    norm_eps: float = 1e-5  # norm epsilon (RMSNorm or LayerNorm)
    norm: str = "rmsnorm"  # "rmsnorm" (weight) or "layernorm" (weight and bias)
    mlp: str = "swiglu"  # "swiglu" (gate, up, down of width ffn) or "gelu" / "relu" (fc1 h→ffn, fc2 ffn→h)
    positions: str = "rotary"  # "rotary" or "learned" (a max_positions × hidden table added to the embedding)
    max_positions: int = 0  # rows of the learned position table (needed ≥ 1 with positions="learned")
    bias: bool = False  # every linear layer (q/k/v/o, MLP) carries a bias (GPT-2, OPT, GPT-NeoX)
    parallel_residual: bool = False  # attention and MLP read the same block input (GPT-NeoX)
    rotary_fraction: float = 1.0  # rotary on the first fraction of each head's dimensions (GPT-NeoX)
    # width of one attention head where it is not hidden / heads (Qwen3's head_dim); 0: hidden / heads
    attention_head_dim: int = 0
    qk_norm: bool = False  # an RMSNorm on each head's q and k before rotary (Qwen3)

    def __post_init__(self) -> None:
        problems = self._variant_problems()
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
            if self.hidden % self.heads and not self.attention_head_dim:
                problems.append(f"hidden={self.hidden} must be divisible by heads={self.heads} "
                                "(or give attention_head_dim)")
            if self.heads % self.kv_heads:
                problems.append(f"heads={self.heads} must be divisible by kv_heads={self.kv_heads}")
            if self.positions == "rotary" and (self.rotary_dim % 2 or self.rotary_dim < 2):
                problems.append(f"rotary_dim={self.rotary_dim} (head_dim={self.head_dim} × "
                                f"rotary_fraction={self.rotary_fraction:g}) must be even and at least 2 "
                                "for rotary embeddings")
        if self.head not in HEAD_KINDS:
            problems.append(f"head={self.head!r} must be one of {HEAD_KINDS}")
        if self.head == "value" and self.tied_embeddings:
            problems.append("tied_embeddings=True needs head='lm'")
        if problems:
            raise ConfigError(f"model {self.name!r}: " + "; ".join(problems))

    def _variant_problems(self) -> list[str]:
        """What is wrong with the architecture fields (norm, mlp, positions, …)."""
        problems = []
        for field, allowed in (("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS)):
            if getattr(self, field) not in allowed:
                problems.append(f"{field}={getattr(self, field)!r} must be one of {allowed}")
        for field in ("bias", "parallel_residual", "qk_norm"):
            if not isinstance(getattr(self, field), bool):
                problems.append(f"{field}={getattr(self, field)!r} must be true or false")
        try:
            rules.integer("max_positions", self.max_positions, lo=0, hi=rules.MAX_SEQ_TOKENS)
            if self.positions == "learned" and self.max_positions < 1:
                problems.append(f"max_positions={self.max_positions} must be at least 1 with positions='learned'")
        except ConfigError as exc:
            problems.append(str(exc))
        try:
            rules.integer("attention_head_dim", self.attention_head_dim, lo=0, hi=rules.MAX_HIDDEN)
        except ConfigError as exc:
            problems.append(str(exc))
        try:
            rules.real("rotary_fraction", self.rotary_fraction, positive=True, hi=1.0)
            if self.positions == "learned" and self.rotary_fraction != 1.0:
                problems.append(f"rotary_fraction={self.rotary_fraction:g} needs positions='rotary'")
        except ConfigError as exc:
            problems.append(str(exc))
        return problems

    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``attention_head_dim`` where given, else hidden / heads."""
        return self.attention_head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        """Width of the q projection's output (and the o projection's input): a·d."""
        return self.heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that rotary embeddings rotate: GPT-NeoX's ``rotary_ndims``,
        ``int(head_dim · rotary_pct)``, rounded down as Hugging Face rounds it."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def family(self) -> str:
        """The architecture family the fields describe (for messages)."""
        if self.parallel_residual or self.rotary_fraction != 1.0:
            return "gpt-neox"
        if self.mlp == "relu":
            return "opt"
        if self.norm == "layernorm" or self.mlp == "gelu" or self.positions == "learned" or self.bias:
            return "gpt2"
        if self.qk_norm:
            return "qwen3"
        return "qwen2" if self.qkv_bias else "llama"

    @property
    def norm_params(self) -> int:
        """Parameters of one norm: RMSNorm weight, or LayerNorm weight and bias."""
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    @property
    def kv_dim(self) -> int:
        """Width of the K (or V) projection output: g·d."""
        return self.kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of width ``ffn`` in the MLP: SwiGLU 3, GELU / ReLU 2."""
        return 3 if self.mlp == "swiglu" else 2

    @property
    def qk_norm_params(self) -> int:
        """Weights of the q and k norms of one block (Qwen3: one ``d`` each), 0 without them."""
        return 2 * self.head_dim if self.qk_norm else 0

    @property
    def params_per_layer(self) -> int:
        h, f, kv, q = self.hidden, self.ffn, self.kv_dim, self.q_dim
        attn = 2 * h * q + 2 * h * kv + (q + 2 * kv if self.qkv_bias or self.bias else 0) + self.qk_norm_params
        mlp = self.mlp_matrices * h * f
        if self.bias:  # o_proj; fc1 (SwiGLU: gate and up) and fc2
            attn += h
            mlp += (self.mlp_matrices - 1) * f + h
        return attn + mlp + 2 * self.norm_params  # + the two norms

    @property
    def replicated_params_per_layer(self) -> int:
        """Parameters of one block that tensor parallelism replicates: the two norms (and the q/k
        norms, which act on one head) and the biases of the row-parallel o_proj and fc2 (added
        once, after the all-reduce)."""
        return 2 * self.norm_params + (2 * self.hidden if self.bias else 0) + self.qk_norm_params

    @property
    def position_params(self) -> int:
        """The learned position table (none for rotary positions)."""
        return self.max_positions * self.hidden if self.positions == "learned" else 0

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.position_params

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
            + self.norm_params  # final norm
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


def _qwen3(name: str, layers: int, hidden: int, ffn: int, heads: int, tied: bool) -> ModelSpec:
    """Qwen3 dense (Qwen/Qwen3-*/config.json, transformers 4.51): 8 key/value heads of
    ``head_dim`` 128 whatever the width, RMSNorm on q and k, no q/k/v bias, vocabulary 151,936,
    rope_theta 1,000,000, rms_norm_eps 1e-6; the three smallest tie their embeddings."""
    return ModelSpec(name, layers, hidden, ffn, heads, 8, 151936, tied_embeddings=tied, rope_theta=1_000_000.0,
                     norm_eps=1e-6, attention_head_dim=128, qk_norm=True)


def _r1_distill(name: str, base: ModelSpec, theta: float, tied: bool = False) -> ModelSpec:
    """DeepSeek-R1-Distill-Qwen (deepseek-ai/DeepSeek-R1-Distill-Qwen-*/config.json): the
    Qwen2.5 base it was distilled into (1.5B and 7B from Qwen2.5-Math, whose rope_theta is
    10,000 and whose 1.5B does not tie its embeddings; 14B and 32B from Qwen2.5)."""
    return dataclasses.replace(base, name=name, rope_theta=theta, tied_embeddings=tied)


def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    """OPT (Zhang et al. 2022, arXiv 2205.01068, Table 1): ffn = 4h, vocabulary 50,272, 2,048
    positions plus the 2 offset rows of its learned table, tied LM head, ReLU MLP."""
    return ModelSpec(name, layers, hidden, 4 * hidden, heads, heads, 50272, tied_embeddings=True,
                     norm="layernorm", mlp="relu", positions="learned", max_positions=2048 + OPT_POSITION_OFFSET,
                     bias=True)


def _gpt2(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    """GPT-2 (Radford et al. 2019; Hugging Face ``gpt2`` configs): ffn = 4h, vocabulary 50,257,
    1,024 learned positions, tied LM head, GELU (tanh approximation) MLP."""
    return ModelSpec(name, layers, hidden, 4 * hidden, heads, heads, 50257, tied_embeddings=True,
                     norm="layernorm", mlp="gelu", positions="learned", max_positions=1024, bias=True)


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
        # Llama 3.1 and 3.3 keep Llama 3's shapes (meta-llama/Llama-3.1-8B, -3.1-70B,
        # -3.3-70B-Instruct config.json; rope_scaling "llama3" stretches positions only)
        _llama("llama3.1-8b", 32, 4096, 14336, 32, 8, 128256, theta=500_000.0),
        _llama("llama3.1-70b", 80, 8192, 28672, 64, 8, 128256, theta=500_000.0),
        _llama("llama3.3-70b", 80, 8192, 28672, 64, 8, 128256, theta=500_000.0),
        _qwen3("qwen3-0.6b", 28, 1024, 3072, 16, tied=True),
        _qwen3("qwen3-1.7b", 28, 2048, 6144, 16, tied=True),
        _qwen3("qwen3-4b", 36, 2560, 9728, 32, tied=True),
        _qwen3("qwen3-8b", 36, 4096, 12288, 32, tied=False),
        _qwen3("qwen3-14b", 40, 5120, 17408, 40, tied=False),
        _qwen3("qwen3-32b", 64, 5120, 25600, 64, tied=False),
        _r1_distill("r1-distill-qwen-1.5b", _qwen("q", 28, 1536, 8960, 12, 2, 151936, tied=False), 10_000.0),
        _r1_distill("r1-distill-qwen-7b", _qwen("q", 28, 3584, 18944, 28, 4, 152064, tied=False), 10_000.0),
        _r1_distill("r1-distill-qwen-14b", _qwen("q", 48, 5120, 13824, 40, 8, 152064, tied=False), 1_000_000.0),
        _r1_distill("r1-distill-qwen-32b", _qwen("q", 64, 5120, 27648, 40, 8, 152064, tied=False), 1_000_000.0),
        # DeepSpeed-Chat's RLHF models (shapes of the OPT paper's Table 1)
        _opt("opt-125m", 12, 768, 12),
        _opt("opt-1.3b", 24, 2048, 32),
        _opt("opt-2.7b", 32, 2560, 32),
        _opt("opt-6.7b", 32, 4096, 32),
        _opt("opt-13b", 40, 5120, 40),
        _opt("opt-30b", 48, 7168, 56),
        _opt("opt-66b", 64, 9216, 72),
        _gpt2("gpt2", 12, 768, 12),
        _gpt2("gpt2-medium", 24, 1024, 16),
        _gpt2("gpt2-large", 36, 1280, 20),
        _gpt2("gpt2-xl", 48, 1600, 25),
        # Tiny models the CPU executor runs in seconds.
        _llama("tiny-2l-128h", 2, 128, 256, 4, 2, 256),
        _llama("tiny-4l-256h", 4, 256, 512, 8, 4, 512),
        ModelSpec("tiny-gpt-2l-128h", 2, 128, 512, 4, 4, 256, tied_embeddings=True, norm="layernorm",
                  mlp="gelu", positions="learned", max_positions=64, bias=True),
        ModelSpec("tiny-neox-2l-128h", 2, 128, 512, 4, 4, 256, norm="layernorm", mlp="gelu", bias=True,
                  parallel_residual=True, rotary_fraction=0.25),
    )
}

# Hugging Face repository names (lower case, without the organisation) → preset: the
# instruction-tuned and base checkpoints of a size share an architecture
HF_NAMES: dict[str, str] = {
    **{f"llama-2-{s}-hf": f"llama2-{s}" for s in ("7b", "13b", "70b")},
    **{f"llama-2-{s}-chat-hf": f"llama2-{s}" for s in ("7b", "13b", "70b")},
    "meta-llama-3-8b": "llama3-8b", "meta-llama-3-8b-instruct": "llama3-8b",
    "meta-llama-3-70b": "llama3-70b", "meta-llama-3-70b-instruct": "llama3-70b",
    "llama-3.1-8b": "llama3.1-8b", "llama-3.1-8b-instruct": "llama3.1-8b",
    "meta-llama-3.1-8b": "llama3.1-8b", "meta-llama-3.1-8b-instruct": "llama3.1-8b",
    "llama-3.1-70b": "llama3.1-70b", "llama-3.1-70b-instruct": "llama3.1-70b",
    "meta-llama-3.1-70b": "llama3.1-70b", "meta-llama-3.1-70b-instruct": "llama3.1-70b",
    "llama-3.3-70b-instruct": "llama3.3-70b",
    **{f"qwen2.5-{s}": f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")},
    **{f"qwen2.5-{s}-instruct": f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")},
    **{f"qwen3-{s}": f"qwen3-{s}" for s in ("0.6b", "1.7b", "4b", "8b", "14b", "32b")},
    **{f"qwen3-{s}-base": f"qwen3-{s}" for s in ("0.6b", "1.7b", "4b", "8b", "14b")},
    **{f"deepseek-r1-distill-qwen-{s}": f"r1-distill-qwen-{s}" for s in ("1.5b", "7b", "14b", "32b")},
}


def hf_preset(name: str) -> str | None:
    """The preset of a Hugging Face model name (``meta-llama/Llama-3.1-8B-Instruct`` →
    ``llama3.1-8b``; the organisation, case and a trailing remark in parentheses are ignored),
    or None when there is none."""
    base = name.split("(")[0].strip().rstrip("/").split("/")[-1].lower()
    if base in PRESETS:
        return base
    return HF_NAMES.get(base)


_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
    "OPTForCausalLM": "opt",
    "GPTNeoXForCausalLM": "gpt_neox",
}
_HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2",
                   "opt": "opt",
                   "gpt_neox": "gpt_neox"}


def from_hf_config(path: str | Path) -> ModelSpec:
    """Read a Hugging Face ``config.json`` (LLaMA, Mistral, Qwen2, Qwen3, GPT-2, OPT or GPT-NeoX style)
    into a ModelSpec. ``path`` is the file or the directory that holds it.
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
            f"{where}: unsupported architecture {archs or model_type!r} (model_type={model_type!r}); "
            f"supported: {sorted(_HF_ARCHITECTURES)} (model_type {sorted(_HF_MODEL_TYPES)})"
        )
    reader = {"llama": _llama_fields, "qwen2": _llama_fields, "qwen3": _llama_fields, "gpt2": _gpt2_fields,
              "opt": _opt_fields,
              "gpt_neox": _neox_fields}[style]
    return ModelSpec(name=path.parent.name or path.stem, **reader(cfg, where, style))


def _require(cfg: dict, where: str, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ConfigError(f"{where} lacks keys {missing}")


def _flag(cfg: dict, where: str, key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key}={value!r} must be true or false")
    return value


def _eps(cfg: dict, where: str, key: str, default: float) -> float:
    return rules.real(f"{where}: {key}", cfg.get(key, default), positive=True)


def _llama_fields(cfg: dict, where: str, style: str) -> dict:
    """LLaMA / Mistral / Qwen2 / Qwen3: Qwen2 biases its q/k/v by default; Qwen3 names its head
    width (``head_dim``, which need not be hidden / heads) and normalises q and k per head."""
    _require(cfg, where, ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                          "vocab_size"))
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    extra = {}
    if head_dim is not None and head_dim * heads != cfg["hidden_size"]:
        extra["attention_head_dim"] = rules.integer(f"{where}: head_dim", head_dim, lo=1, hi=rules.MAX_HIDDEN)
    if style == "qwen3":
        extra["qk_norm"] = True
    return dict(**extra,
        layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], ffn=cfg["intermediate_size"], heads=heads,
        kv_heads=heads if cfg.get("num_key_value_heads") is None else cfg["num_key_value_heads"],
        vocab=cfg["vocab_size"],
        tied_embeddings=_flag(cfg, where, "tie_word_embeddings", False),
        qkv_bias=_flag(cfg, where, "attention_bias", style == "qwen2"),
        rope_theta=rules.real(f"{where}: rope_theta", cfg.get("rope_theta", 10000.0), positive=True),
        norm_eps=_eps(cfg, where, "rms_norm_eps", 1e-5),
    )


def _activation(cfg: dict, where: str, key: str, allowed: dict[str, str], default: str) -> str:
    act = cfg.get(key, default)
    if act not in allowed:
        raise ConfigError(f"{where}: {key}={act!r} is not supported; supported: {sorted(allowed)}")
    return allowed[act]


def _gpt2_fields(cfg: dict, where: str, style: str) -> dict:
    """GPT-2: n_inner None means 4·n_embd; gelu_new is GELU's tanh approximation."""
    _require(cfg, where, ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"))
    h = cfg["n_embd"]
    inner = cfg.get("n_inner")
    return dict(
        layers=cfg["n_layer"], hidden=h, ffn=4 * h if inner is None else inner, heads=cfg["n_head"],
        kv_heads=cfg["n_head"], vocab=cfg["vocab_size"],
        tied_embeddings=_flag(cfg, where, "tie_word_embeddings", True),
        norm_eps=_eps(cfg, where, "layer_norm_epsilon", 1e-5),
        norm="layernorm", bias=True, positions="learned", max_positions=cfg["n_positions"],
        mlp=_activation(cfg, where, "activation_function", {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                                                            "gelu": "gelu", "relu": "relu"}, "gelu_new"),
    )


def _opt_fields(cfg: dict, where: str, style: str) -> dict:
    """OPT: the learned table has ``max_position_embeddings + 2`` rows; opt-350m's projection of
    a narrower word embedding and post-norm blocks are not modelled, so they are refused."""
    _require(cfg, where, ("hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
                          "max_position_embeddings", "vocab_size"))
    h = cfg["hidden_size"]
    proj = cfg.get("word_embed_proj_dim", h)
    if proj != h:
        raise ConfigError(f"{where}: word_embed_proj_dim={proj!r} differs from hidden_size={h!r} "
                          "(opt-350m's projected embedding); only word_embed_proj_dim == hidden_size is supported")
    if not _flag(cfg, where, "do_layer_norm_before", True):
        raise ConfigError(f"{where}: do_layer_norm_before=false (post-norm blocks) is not supported; "
                          "only pre-norm OPT models are")
    if not _flag(cfg, where, "enable_bias", True):
        raise ConfigError(f"{where}: enable_bias=false is not supported; OPT's linear layers carry biases")
    max_pos = rules.integer(f"{where}: max_position_embeddings", cfg["max_position_embeddings"],
                            hi=rules.MAX_SEQ_TOKENS)
    return dict(
        layers=cfg["num_hidden_layers"], hidden=h, ffn=cfg["ffn_dim"], heads=cfg["num_attention_heads"],
        kv_heads=cfg["num_attention_heads"], vocab=cfg["vocab_size"],
        tied_embeddings=_flag(cfg, where, "tie_word_embeddings", True),
        norm="layernorm", bias=True, positions="learned", max_positions=max_pos + OPT_POSITION_OFFSET,
        mlp=_activation(cfg, where, "activation_function", {"relu": "relu", "gelu": "gelu"}, "relu"),
    )


def _neox_fields(cfg: dict, where: str, style: str) -> dict:
    """GPT-NeoX / Pythia: rotary on ``rotary_pct`` of each head, parallel residual by default."""
    _require(cfg, where, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "vocab_size", "rotary_pct"))
    theta = cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0))
    return dict(
        layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], ffn=cfg["intermediate_size"],
        heads=cfg["num_attention_heads"], kv_heads=cfg["num_attention_heads"], vocab=cfg["vocab_size"],
        tied_embeddings=_flag(cfg, where, "tie_word_embeddings", False),
        norm_eps=_eps(cfg, where, "layer_norm_eps", 1e-5),
        rope_theta=rules.real(f"{where}: rotary_emb_base", theta, positive=True),
        norm="layernorm", bias=_flag(cfg, where, "attention_bias", True),
        parallel_residual=_flag(cfg, where, "use_parallel_residual", True),
        rotary_fraction=rules.real(f"{where}: rotary_pct", cfg["rotary_pct"], positive=True, hi=1.0),
        mlp=_activation(cfg, where, "hidden_act", {"gelu": "gelu", "gelu_new": "gelu", "gelu_fast": "gelu",
                                                   "gelu_pytorch_tanh": "gelu", "relu": "relu"}, "gelu"),
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
        f"unknown model preset {name_or_path!r}{did_you_mean(name_or_path, PRESETS)}; known presets: "
        f"{', '.join(sorted(PRESETS))} (or give a path to a Hugging Face config.json)"
    )
