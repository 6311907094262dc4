"""The verifier reward (``models.reward: rule``): a rule of the sampled tokens, no model.

A verifier scores each response on the host right after it is generated, where a math task
checks the final answer or a coding task runs the unit tests. The rule here is the smallest
such checker a test can verify by hand: every experiment has one *answer token*,
``hash(seed, ANSWER) mod vocab`` of the actor's vocabulary (:func:`answer_token`, the hash of
:mod:`executor.data`), and a response scores 1.0 when any of its tokens is the answer, else
0.0. It is a pure function of (seed, the response's tokens), so every plan scores every row
alike. A real task replaces :meth:`Verifier.__call__` with its checker.

Nothing here waits or sleeps: a run measures what the rule costs. The experiment's
``reward_s_per_sample`` is the estimator's figure for an expensive checker and changes nothing
the executor does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from estimator.spec.experiment import Experiment
from executor.data import hash_keys

STREAM_ANSWER = 5  # hash stream of the answer token (apart from executor.data's streams 1-4)


def answer_token(seed: int, vocab: int) -> int:
    """The answer token of an experiment with ``seed`` whose actor has ``vocab`` tokens."""
    return int(hash_keys(seed, STREAM_ANSWER)) % vocab


@dataclass(frozen=True)
class Verifier:
    """Scores responses: 1.0 if a response holds the answer token, else 0.0."""

    answer: int  # the token id a correct response contains
    prompt_len: int  # tokens of prompt before each response

    @classmethod
    def of(cls, experiment: Experiment) -> Verifier:
        return cls(answer_token(experiment.seed, experiment.models["actor"].vocab), experiment.params.prompt_len)

    def __call__(self, seq: Tensor, dtype: torch.dtype) -> Tensor:
        """``seq`` (b, P + G) token ids → rewards (b,) in ``dtype``."""
        return (seq[:, self.prompt_len:] == self.answer).any(dim=1).to(dtype)

    def rows(self, seq: Tensor, prompt: Tensor, gen: Tensor, dtype: torch.dtype) -> Tensor:
        """Right-padded rows of drawn lengths: ``seq`` (b, width), each row's response at
        ``[prompt[i], prompt[i] + gen[i])`` → rewards (b,); padding is never read."""
        pos = torch.arange(seq.shape[1], device=seq.device)[None, :]
        start = prompt.to(seq.device)[:, None]
        real = (pos >= start) & (pos < start + gen.to(seq.device)[:, None])
        return ((seq == self.answer) & real).any(dim=1).to(dtype)
