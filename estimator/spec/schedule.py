"""The order of micro-batches in a pipeline: one function each for the simulator and the executor.

Both sides call these, so a predicted timeline and a measured one follow the same schedule
(DESIGN §4.11):

- :func:`schedule_1f1b` — training: PipeDream-flush (1F1B, Narayanan et al., "Memory-Efficient
  Pipeline-Parallel DNN Training", arXiv 2006.09503): stage ``k`` of ``p`` runs ``p − k − 1``
  warm-up forwards, then alternates one forward and one backward, then drains the remaining
  backwards. Later stages warm up less, so at most ``p − k`` micro-batches' activations are
  alive on stage ``k`` at once.
- :func:`generation_rounds` — generation: step by step, every micro-batch in turn. Round 0
  prefills each micro-batch's prompt, round ``s > 0`` decodes token ``s`` of each
  micro-batch, so while one micro-batch's token travels back from the last stage the others
  keep the pipeline busy.

The functions are pure: they depend only on the pipeline's shape (stages, stage, micro-batches,
tokens), never on devices or timing.
"""

from __future__ import annotations

FORWARD, BACKWARD = "F", "B"
PREFILL, DECODE = "prefill", "decode"


def schedule_1f1b(stages: int, stage: int, micro_batches: int) -> list[tuple[str, int]]:
    """``(FORWARD | BACKWARD, micro_batch)`` in the order stage ``stage`` of ``stages`` runs them."""
    if not 0 <= stage < stages or micro_batches < 1:
        raise ValueError(f"schedule_1f1b: stage={stage} must lie in [0, stages={stages}) and "
                         f"micro_batches={micro_batches} must be at least 1")
    warmup = min(stages - stage - 1, micro_batches)
    order = [(FORWARD, i) for i in range(warmup)]
    for i in range(micro_batches - warmup):
        order += [(FORWARD, warmup + i), (BACKWARD, i)]
    return order + [(BACKWARD, i) for i in range(micro_batches - warmup, micro_batches)]


def generation_rounds(micro_batches: int, tokens: int) -> list[list[tuple[str, int]]]:
    """One round per generated token: ``[(PREFILL | DECODE, micro_batch), …]`` in order. Round 0
    prefills every micro-batch (and samples its first token); round ``s`` decodes token ``s``."""
    if micro_batches < 1 or tokens < 1:
        raise ValueError(f"generation_rounds: micro_batches={micro_batches} and tokens={tokens} "
                         "must be at least 1")
    return [[(PREFILL if step == 0 else DECODE, mb) for mb in range(micro_batches)] for step in range(tokens)]
