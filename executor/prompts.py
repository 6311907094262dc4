"""Prompt files (JSONL) read and checked without torch, so a bad file is refused before any
process starts; :mod:`executor.data` turns the examples into tensors.

``prompts`` lines are lists of token ids, fitted to ``prompt_len``; ``sft`` lines a list or
``{"prompt": [...], "response": [...]}``; ``pairs`` (dpo, rw) lines ``{"prompt": [...],
"chosen": [...], "rejected": [...]}`` (see :mod:`executor.data`). The file is read through
:mod:`estimator.base.loading` (size cap, UTF-8, strict JSON per line); errors name file and line::

    from executor.prompts import check_prompts
    check_prompts(experiment)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from estimator.base.errors import ConfigError
from estimator.base.loading import MAX_DATA_BYTES, parse_json, read_text

PAD_ID = 0


def fit_left(ids: list[int], length: int) -> list[int]:
    """Left-pad with :data:`PAD_ID`, or keep the last ``length`` ids."""
    return [PAD_ID] * (length - len(ids)) + ids[-length:] if length else []


def fit_right(ids: list[int], length: int) -> list[int]:
    """Right-pad with :data:`PAD_ID`, or keep the first ``length`` ids."""
    return ids[:length] + [PAD_ID] * (length - len(ids))


def _ids(value: Any, vocab: int, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ConfigError(f"{where}: must be a JSON list of integer token ids")
    bad = [i for i in value if not 0 <= i < vocab]
    if bad:
        raise ConfigError(f"{where}: token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
    return value


def _example(raw: Any, kind: str, prompt_len: int, gen_len: int, vocab: int, where: str) -> list[int]:
    """One JSONL line as the token ids of one example (pairs: prompt+chosen, prompt+rejected)."""
    if kind == "pairs":
        keys = ("prompt", "chosen", "rejected")
        if not isinstance(raw, dict) or sorted(raw) != sorted(keys):
            raise ConfigError(f"{where}: a pair must be an object with keys {list(keys)}")
        prompt = fit_left(_ids(raw["prompt"], vocab, f"{where}: prompt"), prompt_len)
        return [*prompt, *fit_right(_ids(raw["chosen"], vocab, f"{where}: chosen"), gen_len),
                *prompt, *fit_right(_ids(raw["rejected"], vocab, f"{where}: rejected"), gen_len)]
    if kind == "sft" and isinstance(raw, dict):
        if sorted(raw) != ["prompt", "response"]:
            raise ConfigError(f"{where}: an sft example must be a list or an object with keys prompt, response")
        return (fit_left(_ids(raw["prompt"], vocab, f"{where}: prompt"), prompt_len)
                + fit_right(_ids(raw["response"], vocab, f"{where}: response"), gen_len))
    length = prompt_len + gen_len if kind == "sft" else prompt_len
    return fit_left(_ids(raw, vocab, where), length)


def read_examples(path: str | Path, kind: str, prompt_len: int, gen_len: int, vocab: int) -> list[list[int]]:
    """Every example of a JSONL file as one list of token ids each (all of one width).

    ``kind`` is ``prompts``, ``sft`` or ``pairs`` (a pair's row is chosen then rejected).
    Errors name the file and line number.
    """
    rows = []
    lines = read_text(path, "prompts file", max_bytes=MAX_DATA_BYTES).splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"prompts file {str(path)!r} line {n}"
        rows.append(_example(parse_json(line, where, expect=None), kind, prompt_len, gen_len, vocab, where))
    if not rows:
        raise ConfigError(f"prompts file {str(path)!r} holds no examples")
    return rows


def source_kind(algorithm: str) -> str:
    """What an algorithm's source rows are: ``prompts``, ``sft`` examples or ``pairs``."""
    return {"dpo": "pairs", "rw": "pairs", "sft": "sft"}.get(algorithm, "prompts")


def source_vocab(experiment: Any) -> int:
    """The smallest vocabulary of the experiment's models, so every model can read the data."""
    return min(m.vocab for m in experiment.models.values())


def check_prompts(experiment: Any) -> None:
    """Read and check an experiment's prompts file, if any (raises :class:`ConfigError`)."""
    if experiment.prompts_path is not None:
        p = experiment.params
        read_examples(experiment.prompts_path, source_kind(experiment.algorithm), p.prompt_len, p.gen_len,
                      source_vocab(experiment))
