"""Value rules, stated once: finite numbers, integers where counts are meant, and upper bounds.

Every count and number a user writes (experiment, model config, plan, profile, CLI flag) is
checked here, so no number can make a later step hang, allocate terabytes or compute with
NaN. The bounds are far above any real run, and each message names the bound:

====================  ===========  =========================================================
limit                 value        why this is above any real run
====================  ===========  =========================================================
MAX_DEVICES           65,536       the largest published training clusters are ~100k GPUs
                                   split into jobs; 2¹⁶ devices per experiment
MAX_DEVICES_PER_NODE  128          8 GPUs per HGX node; 72 per GB200 NVL72 NVLink domain
MAX_SEQ_TOKENS        1,048,576    prompt + generation per sequence: the longest context
                                   windows offered (Qwen2.5-1M) are 2²⁰ tokens
MAX_BATCH             1,048,576    sequences per iteration (ReaL and OpenRLHF use ≤ 8,192)
MAX_GROUP             1,024        GRPO samples per prompt (DeepSeekMath uses 64)
MAX_SIM_ITERATIONS    1,000        simulated iterations: the steady state shows after 2-3
MAX_RUN_ITERATIONS    1,000,000    executed iterations in one command
MAX_TIMEOUT_S         86,400       a collective timeout of a day
MAX_HOST_S_PER_SAMPLE 3,600        host seconds per sample (a verifier): an hour to check
                                   one response is beyond any sandbox or proof checker
====================  ===========  =========================================================

Usage::

    from estimator.base.rules import integer, real
    nodes = integer("experiment x.yaml: cluster.nodes", nodes, hi=MAX_DEVICES)
    lr = real("hyperparams.lr", lr, positive=True, hi=1.0)
"""

from __future__ import annotations

import math
from typing import Any

from estimator.base.errors import ConfigError

MAX_DEVICES = 1 << 16
MAX_DEVICES_PER_NODE = 128
MAX_SEQ_TOKENS = 1 << 20
MAX_BATCH = 1 << 20
MAX_GROUP = 1024
MAX_SIM_ITERATIONS = 1000
MAX_RUN_ITERATIONS = 1_000_000
MAX_TIMEOUT_S = 86_400.0
MAX_HOST_S_PER_SAMPLE = 3600.0
MAX_LATENCY_S = 1.0  # a launch or link latency of a second is a typo or a unit error
MAX_SEED = (1 << 63) - 1  # seeds travel as int64 in the executor
# model shapes (ModelSpec): an order of magnitude above the largest public configs
# (LLaMA-3.1 405B: 126 layers, hidden 16,384, ffn 53,248, 128 heads; Qwen2.5: vocab 152,064)
MAX_LAYERS = 1024
MAX_HIDDEN = 1 << 18
MAX_FFN = 1 << 20
MAX_HEADS = 4096
MAX_VOCAB = 1 << 23


def integer(where: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in ``[lo, hi]``; else :class:`ConfigError`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}={_show(value)} must be an integer")
    if value < lo:
        rule = "a non-negative integer" if lo == 0 else f"at least {lo}"
        raise ConfigError(f"{where}={_show(value)} must be {rule}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}={_show(value)} exceeds the limit {hi:,}")
    return value


def real(where: str, value: Any, lo: float | None = 0.0, hi: float | None = None, positive: bool = False) -> float:
    """``value`` as a float if it is a finite number in ``[lo, hi]`` (``> 0`` when ``positive``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{where}={_show(value)} must be a number")
    try:
        v = float(value)
    except OverflowError:
        raise ConfigError(f"{where}={_show(value)} must be a finite number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}={_show(value)} must be a finite number")
    if positive and v <= 0:
        raise ConfigError(f"{where}={_show(value)} must be positive")
    if lo is not None and v < lo:
        raise ConfigError(f"{where}={_show(value)} must be at least {lo:g}")
    if hi is not None and v > hi:
        raise ConfigError(f"{where}={_show(value)} exceeds the limit {hi:g}")
    return v


def _show(value: Any) -> str:
    """A value for a message, cut short (a 5,000-digit integer or a huge list stays one line)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"<a {value.bit_length()}-bit integer>"
    return text if len(text) <= 80 else text[:77] + "..."
