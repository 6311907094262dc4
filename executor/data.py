"""Data every iteration starts from, and sampling that no parallel layout can change.

Sources (the ``prompts`` and ``pairs`` a workflow reads) are a pure function of
``(seed, iteration, row)``: every device builds exactly the rows it needs, so no source data
ever moves between devices.

- Synthetic: token ids in ``[0, vocab)`` from a counter-based hash (:func:`hash_keys`).
- JSONL (``prompts:`` in the experiment): one example per line, used in order and cycled.
  ``prompts`` lines are lists of token ids, left-padded with :data:`PAD_ID` or left-truncated
  (keeping the last tokens, which the generation continues from) to ``prompt_len``. For
  ``sft`` a list is a whole example fitted to ``prompt_len + gen_len`` the same way, or an
  object ``{"prompt": [...], "response": [...]}``. ``pairs`` (dpo, rw) lines are objects
  ``{"prompt": [...], "chosen": [...], "rejected": [...]}``; responses are right-padded or
  truncated to ``gen_len``. There is no attention mask: pads are ordinary tokens.

Sampling (:func:`sample`) is Gumbel-max over ``logits / temperature`` with noise from the same
hash of ``(seed, iteration, call, response position, global row, vocab index)``: a sequence
draws the same token whichever device, micro-batch, data-parallel rank or engine step generates
it. With a length distribution every response ends with :func:`eos_id` at its drawn length
(:meth:`Sampler.ending`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from executor.prompts import PAD_ID, fit_left, fit_right, read_examples, source_kind, source_vocab

__all__ = ["PAD_ID", "fit_left", "fit_right"]  # re-exported: part of this module's documented API
_M32 = 0xFFFFFFFF

# Stream tags that keep the hash streams of different uses apart.
STREAM_PROMPT, STREAM_CHOSEN, STREAM_REJECTED, STREAM_SAMPLE = 1, 2, 3, 4


# ---- counter-based hash (int64 torch ops, exact on every device) ----------------------------


def _mul32(a: Tensor, c: int) -> Tensor:
    """``a·c mod 2³²`` for ``a`` in ``[0, 2³²)``, split in 16-bit halves so int64 never overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (Appleby 2008): a bijective avalanche of ``h``."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _combine(h: Tensor, key: Tensor | int) -> Tensor:
    """Fold one key into the running hash (boost ``hash_combine``, then re-mixed)."""
    key = torch.as_tensor(key, dtype=torch.int64, device=h.device) & _M32
    mixed = (key + 0x9E3779B9 + ((h << 6) & _M32) + (h >> 2)) & _M32
    return _fmix32(h ^ mixed)


def _combine_int(h: int, key: int) -> int:
    """:func:`_combine` on Python integers (the same bits, without tensor overhead)."""
    mixed = ((key & _M32) + 0x9E3779B9 + ((h << 6) & _M32) + (h >> 2)) & _M32
    h ^= mixed
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def hash_keys(*keys: Tensor | int, device: torch.device | str = "cpu") -> Tensor:
    """32-bit hash (as int64 in ``[0, 2³²)``) of the keys, broadcast elementwise."""
    prefix = 0
    while keys and isinstance(keys[0], int):  # scalar keys first, in plain integers
        prefix, keys = _combine_int(prefix, keys[0]), keys[1:]
    h = torch.tensor(prefix, dtype=torch.int64, device=device)
    for k in keys:
        h = _combine(h, k)
    return h


def uniform(h: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Map hashes to uniforms strictly inside (0, 1) (24 bits, exact in float32)."""
    return ((h >> 8).to(dtype) + 0.5) / float(1 << 24)


def name_key(name: str) -> int:
    """A stable 32-bit key of a call name (``hash()`` is salted per process)."""
    return zlib.crc32(name.encode())


# ---- sampling -------------------------------------------------------------------------------


def eos_id(vocab: int) -> int:
    """The end-of-sequence token of a vocabulary of ``vocab`` ids: its last id. A response of
    drawn length L (a length distribution) samples it as its L-th token; fixed lengths use none."""
    return vocab - 1


@dataclass(frozen=True)
class Sampler:
    """Chooses the next token of each row; plan-invariant by construction."""

    seed: int
    iteration: int
    call: str
    temperature: float = 1.0
    greedy: bool = False

    def __call__(self, rows: Tensor, step: int | Tensor, logits: Tensor) -> Tensor:
        """``rows`` (b,) global row ids, ``logits`` (b, V) → token ids (b,); ``step`` is the
        response position of the token, one for all rows or one per row (b,)."""
        if self.greedy:
            return logits.argmax(-1)
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        if isinstance(step, Tensor):
            step = step.to(logits.device)[:, None]  # the same bits as an integer key (see _combine)
        h = hash_keys(self.seed, self.iteration, name_key(self.call), STREAM_SAMPLE, step,
                      rows.to(logits.device)[:, None], vocab[None, :], device=logits.device)
        # in the logits' own precision (at least float32): the uniforms carry 24 bits, exact in
        # float32, so only float64 runs pay for float64 arithmetic
        dtype = torch.promote_types(logits.dtype, torch.float32)
        gumbel = -torch.log(-torch.log(uniform(h, dtype)))  # (b, V)
        return (logits.to(dtype) / self.temperature + gumbel).argmax(-1)

    def ending(self, rows: Tensor, positions: Tensor, lengths: Tensor, logits: Tensor) -> Tensor:
        """Tokens of rows that stop at their drawn response lengths (b,): :func:`eos_id` at
        position ``length − 1`` and never before (it is left out of the choice there), so every
        response ends exactly at its length; ``positions`` (b,) are the rows' response positions."""
        eos = eos_id(logits.shape[-1])
        choice = self(rows, positions, logits.index_fill(-1, torch.tensor([eos], device=logits.device), -torch.inf))
        return torch.where(positions.to(choice.device) == lengths.to(choice.device) - 1, eos, choice)


def sample(logits: Tensor, rows: Tensor, step: int, seed: int, iteration: int, call: str,
           temperature: float = 1.0, greedy: bool = False) -> Tensor:
    """Gumbel-max sample (or argmax) of the next token for global ``rows`` at ``step``."""
    return Sampler(seed, iteration, call, temperature, greedy)(rows, step, logits)


# ---- sources --------------------------------------------------------------------------------


def _synthetic(seed: int, iteration: int, stream: int, rows: Tensor, length: int, vocab: int) -> Tensor:
    pos = torch.arange(length)
    return hash_keys(seed, iteration, stream, rows[:, None], pos[None, :]) % vocab  # (b, length)


def load_jsonl(path: str | Path, kind: str, prompt_len: int, gen_len: int, vocab: int) -> Tensor:
    """Every example of a JSONL file as one row each: (n, width) token ids.

    ``kind`` is ``prompts``, ``sft`` or ``pairs`` (a pair's row is chosen then rejected).
    Errors name the file and line number.
    """
    return torch.tensor(read_examples(path, kind, prompt_len, gen_len, vocab), dtype=torch.int64)


@dataclass(frozen=True)
class Source:
    """The rows of an experiment's source data, as a pure function of (iteration, rows).

    ``kind``: ``prompts`` (prompt_len tokens, one row per sequence; ``group_size`` consecutive
    rows share a prompt), ``sft`` (prompt + response) or ``pairs`` (rows 2i chosen, 2i+1
    rejected; prompt + response each).
    """

    kind: str
    seed: int
    prompt_len: int
    gen_len: int
    vocab: int
    examples_per_iteration: int  # prompts or pairs per iteration
    group_size: int = 1
    table: Tensor | None = None  # (n, width) loaded examples, or None for synthetic

    @property
    def rows_per_iteration(self) -> int:
        """Rows one iteration's data holds: its prompts (× the group), or two per pair."""
        return self.examples_per_iteration * (2 if self.kind == "pairs" else self.group_size)

    def rows(self, iteration: int, lo: int, hi: int) -> Tensor:
        """Global rows ``[lo, hi)`` of this iteration's data: (hi − lo, width) token ids."""
        rows = torch.arange(lo, hi)
        per = 2 if self.kind == "pairs" else self.group_size
        example = iteration * self.examples_per_iteration + rows // per
        if self.table is not None:
            picked = self.table[example % self.table.shape[0]]
            if self.kind != "pairs":
                return picked
            width = self.prompt_len + self.gen_len
            side = (rows % 2)[:, None]
            return torch.where(side == 0, picked[:, :width], picked[:, width:])
        return self._synthetic(iteration, rows, example)

    def _synthetic(self, iteration: int, rows: Tensor, example: Tensor) -> Tensor:
        prompt = _synthetic(self.seed, iteration, STREAM_PROMPT, example, self.prompt_len, self.vocab)
        if self.kind == "prompts":
            return prompt
        if self.kind == "sft":
            resp = _synthetic(self.seed, iteration, STREAM_CHOSEN, example, self.gen_len, self.vocab)
            return torch.cat((prompt, resp), dim=1)
        chosen = _synthetic(self.seed, iteration, STREAM_CHOSEN, example, self.gen_len, self.vocab)
        rejected = _synthetic(self.seed, iteration, STREAM_REJECTED, example, self.gen_len, self.vocab)
        resp = torch.where((rows % 2)[:, None] == 0, chosen, rejected)
        return torch.cat((prompt, resp), dim=1)


def source_for(experiment: Any) -> Source:
    """The :class:`Source` of an experiment (loads and checks its JSONL file, if any).

    The vocabulary is the smallest of the experiment's models, so every model can read the data.
    """
    p = experiment.params
    kind, vocab = source_kind(experiment.algorithm), source_vocab(experiment)
    table = None
    if experiment.prompts_path is not None:
        table = load_jsonl(experiment.prompts_path, kind, p.prompt_len, p.gen_len, vocab)
    return Source(kind, experiment.seed, p.prompt_len, p.gen_len, vocab, p.batch_size, p.group_size, table)
