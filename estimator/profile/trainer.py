"""The training software a profile prices, where it departs from the executor's op census.

The op census (:mod:`estimator.cost.census`) is what this project's executor dispatches. A
profile of measurements taken under another trainer — Megatron-LM or Megatron-DeepSpeed, as
vTrain measured its A100 runs — says in its optional ``trainer`` section how that trainer's
work differs, each choice a mechanism with its source (the cost of each is
:mod:`estimator.cost.trainer`)::

    "trainer": {"name": "Megatron-DeepSpeed", "attention": "unfused", "cross_entropy": "vocab_parallel",
                "grad_buffer": "contiguous", "optimizer": {"bytes_per_param": 36.0, "launches": 4,
                "cite": "..."}, "cite": "..."}

- ``attention``: ``fused`` (absent: one attention kernel per block pass, as the census records
  it) or ``unfused`` — Megatron's core attention: ``baddbmm`` writes the ``[b·heads, s, s]``
  scores in the run dtype, a fused scale-mask-softmax reads and writes them, dropout reads
  them and writes them and its mask, ``bmm`` reads the probabilities; no causal block is
  skipped.
- ``cross_entropy``: ``gathered`` (absent: the executor all-gathers the logits over the
  tensor-parallel group and takes the loss over the whole vocabulary on every rank) or
  ``vocab_parallel`` — Megatron's vocab-parallel cross entropy: each rank's loss over its
  shard of the vocabulary, three all-reduces of one fp32 number per token (the max, the
  target's logit, the sum of exponentials) instead of the logits.
- ``grad_buffer``: ``flatten`` (absent: the executor copies gradients into one flat buffer for
  the data-parallel collective and back) or ``contiguous`` — gradients accumulate in one
  contiguous buffer the collective works on in place (Megatron's DistributedDataParallel).
- ``optimizer``: absent, the census's Adam (per-tensor ops); or a fused multi-tensor step of
  ``bytes_per_param`` bytes moved per parameter (master weights, moments, gradient, the
  parameter copy) in ``launches`` kernels, memory-bound.

Only train and inference passes ("forward" phase) take the attention and loss choices;
generation is the serving engine's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from estimator.base.errors import ConfigError

ATTENTION = ("fused", "unfused")
CROSS_ENTROPY = ("gathered", "vocab_parallel")
GRAD_BUFFER = ("flatten", "contiguous")
KEYS = ("name", "attention", "cross_entropy", "grad_buffer", "optimizer", "cite")
OPTIMIZER_KEYS = ("bytes_per_param", "launches", "cite")
MAX_BYTES_PER_PARAM = 1024.0  # far above any optimizer's traffic: a typo, not a trainer


@dataclass(frozen=True)
class Trainer:
    """How the training software departs from the executor's op census (defaults: not at all)."""

    name: str = ""  # the trainer in words; "" for the executor itself
    attention: str = "fused"  # ATTENTION
    cross_entropy: str = "gathered"  # CROSS_ENTROPY
    grad_buffer: str = "flatten"  # GRAD_BUFFER
    optimizer_bytes_per_param: float = 0.0  # a fused optimizer's bytes per parameter; 0: the census's Adam
    optimizer_launches: int = 0  # kernels of that fused step

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)!r} (one of {list(choices)})"
               for k, choices in (("attention", ATTENTION), ("cross_entropy", CROSS_ENTROPY),
                                  ("grad_buffer", GRAD_BUFFER)) if getattr(self, k) not in choices]
        b = self.optimizer_bytes_per_param
        if not (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                and 0 <= b <= MAX_BYTES_PER_PARAM):
            bad.append(f"optimizer.bytes_per_param={b!r} (a number of bytes from 0 to {MAX_BYTES_PER_PARAM:g})")
        n = self.optimizer_launches
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or (b > 0 and n < 1):
            bad.append(f"optimizer.launches={n!r} (a whole number, at least 1 with bytes_per_param)")
        if bad:
            raise ConfigError(f"trainer {', '.join(bad)}")

    @property
    def fused_optimizer(self) -> bool:
        return self.optimizer_bytes_per_param > 0

    @property
    def departs(self) -> bool:
        """Whether anything differs from the executor's census."""
        return self != Trainer(name=self.name)

    def words(self) -> str:
        """One line: the trainer and each departure."""
        if not self.departs:
            return "the executor's own op census"
        defaults = Trainer()
        parts = [f"{k} {getattr(self, k)}" for k in ("attention", "cross_entropy", "grad_buffer")
                 if getattr(self, k) != getattr(defaults, k)]
        if self.fused_optimizer:
            parts.append(f"fused optimizer {self.optimizer_bytes_per_param:.3g} B/parameter")
        return f"{self.name or 'trainer'}: " + ", ".join(parts)


def parse_trainer(data: dict, where: str = "profile") -> Trainer:
    """The ``trainer`` section of a profile document (absent: the executor's census)."""
    node = data.get("trainer")
    if node is None:
        return Trainer()
    w = f"{where}: trainer"
    if not isinstance(node, dict):
        raise ConfigError(f"{w} must be an object with keys among {list(KEYS)}")
    unknown = sorted(set(node) - set(KEYS))
    if unknown:
        raise ConfigError(f"{w}: unknown key(s) {unknown}; allowed: {sorted(KEYS)}")
    if not str(node.get("cite", "")).strip():
        raise ConfigError(f"{w} needs a 'cite' (the source of each choice)")
    opt = node.get("optimizer", {})
    if not isinstance(opt, dict):
        raise ConfigError(f"{w}.optimizer must be an object with bytes_per_param, launches and cite")
    unknown = sorted(set(opt) - set(OPTIMIZER_KEYS))
    missing = sorted(set(OPTIMIZER_KEYS) - set(opt)) if opt else []
    if unknown or missing:
        raise ConfigError(f"{w}.optimizer: " + "; ".join(([f"unknown key(s) {unknown}"] if unknown else [])
                                                        + ([f"missing key(s) {missing}"] if missing else [])))
    try:
        return Trainer(str(node.get("name", "")), node.get("attention", "fused"),
                       node.get("cross_entropy", "gathered"), node.get("grad_buffer", "flatten"),
                       opt.get("bytes_per_param", 0.0), opt.get("launches", 0))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def trainer_dict(trainer: Trainer, cite: str, optimizer_cite: str = "") -> dict[str, Any]:
    """The ``trainer`` section that :func:`parse_trainer` reads back as ``trainer``."""
    out: dict[str, Any] = {"name": trainer.name, "attention": trainer.attention,
                           "cross_entropy": trainer.cross_entropy, "grad_buffer": trainer.grad_buffer}
    if trainer.fused_optimizer:
        out["optimizer"] = {"bytes_per_param": trainer.optimizer_bytes_per_param,
                            "launches": trainer.optimizer_launches, "cite": optimizer_cite or cite}
    return out | {"cite": cite}
