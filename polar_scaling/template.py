"""The POLAR reward-model input: template, truncation and tokenization of one triplet half.

Text form (DESIGN.md §1, the POLAR scoring client's ``_encode``)::

    sft:      prompt + "\\n" + reference + "<|reward|>" + prompt + "\\n" + candidate + END
    pretrain: prompt +        reference + "<|reward|>" + prompt +        candidate + END

END is the reward token the score is read at; in this project it is ``<|reward|>`` as well.
Truncation follows the same client: each response is cut on the right to
``max_response_length``; then the prompt keeps its *last*
``(max_length - 4 - len(reference) - len(candidate)) // 2`` tokens (4 for the two newlines,
the separator and the end token). An optional ``system`` text (conditional scoring, as in
InternLM2's COOL RLHF) goes first, followed by ``"\\n"``, in both wrappers; its tokens come off
the prompt budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from polar_scaling.tokenizer import NEWLINE, REWARD_TOKEN, newline_ids, reward_token_id

Wrapper = Literal["sft", "pretrain"]
WRAPPERS = ("sft", "pretrain")
RESERVED = 4  # two newlines, the separator and the end token (as the official client counts)


def polar_text(prompt: str, reference: str, candidate: str, wrapper: Wrapper = "sft",
               system: str | None = None) -> str:
    """The template as text, without truncation."""
    _check_wrapper(wrapper)
    sep = NEWLINE if wrapper == "sft" else ""
    head = "" if system is None else system + NEWLINE
    return (head + prompt + sep + reference + REWARD_TOKEN
            + prompt + sep + candidate + REWARD_TOKEN)


@dataclass(frozen=True)
class TemplateIds:
    """The template's fixed pieces as ids of one tokenizer, plus the truncation limits."""

    newline: tuple[int, ...]
    separator: tuple[int, ...]
    reward: int
    max_length: int | None = None
    max_response_length: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer, max_length: int | None = None,
                       max_response_length: int | None = None) -> TemplateIds:
        rid = reward_token_id(tokenizer)
        return cls(tuple(newline_ids(tokenizer)), (rid,), rid, max_length, max_response_length)

    def __post_init__(self):
        if self.max_response_length is not None and self.max_response_length < 0:
            raise ValueError(f"max_response_length must be >= 0, got {self.max_response_length}")
        if self.max_length is not None and self.max_length <= RESERVED:
            raise ValueError(f"max_length must be > {RESERVED}, got {self.max_length}")


def truncate(prompt: Sequence[int], reference: Sequence[int], candidate: Sequence[int],
             ids: TemplateIds, system: Sequence[int] | None = None) -> tuple[list, list, list]:
    """Apply the official truncation; returns (prompt, reference, candidate) cut to fit."""
    reference, candidate, prompt = list(reference), list(candidate), list(prompt)
    if ids.max_response_length is not None:
        reference = reference[:ids.max_response_length]
        candidate = candidate[:ids.max_response_length]
    if ids.max_length is not None:
        head = len(system) + len(ids.newline) if system is not None else 0
        budget = (ids.max_length - RESERVED - head - len(reference) - len(candidate)) // 2
        keep = max(budget, 0)
        if len(prompt) > keep:  # slicing from len-keep, as p[-0:] would keep the whole prompt
            prompt = prompt[len(prompt) - keep:]
    return prompt, reference, candidate


def encode_polar(prompt: Sequence[int], reference: Sequence[int], candidate: Sequence[int],
                 ids: TemplateIds, wrapper: Wrapper = "sft",
                 system: Sequence[int] | None = None) -> list[int]:
    """Token ids of one RM input (truncated as in the module docstring)."""
    _check_wrapper(wrapper)
    prompt, reference, candidate = truncate(prompt, reference, candidate, ids, system)
    nl = list(ids.newline) if wrapper == "sft" else []
    head = list(system) + list(ids.newline) if system is not None else []
    return (head + prompt + nl + reference + list(ids.separator)
            + prompt + nl + candidate + [ids.reward])


def encode_polar_np(prompt: np.ndarray, reference: np.ndarray, candidate: np.ndarray,
                    ids: TemplateIds, wrapper: Wrapper = "sft",
                    system: np.ndarray | None = None) -> np.ndarray:
    """:func:`encode_polar` on int arrays, returning an int64 array (the trainer's fast path)."""
    reference = reference[:ids.max_response_length] if ids.max_response_length is not None \
        else reference
    candidate = candidate[:ids.max_response_length] if ids.max_response_length is not None \
        else candidate
    has_system = system is not None
    if ids.max_length is not None:
        head = len(system) + len(ids.newline) if has_system else 0
        budget = max((ids.max_length - RESERVED - head - len(reference) - len(candidate)) // 2, 0)
        if len(prompt) > budget:
            prompt = prompt[len(prompt) - budget:]
    nl = np.asarray(ids.newline if wrapper == "sft" else (), dtype=np.int64)
    sep = np.asarray(ids.separator, dtype=np.int64)
    end = np.asarray((ids.reward,), dtype=np.int64)
    parts = [prompt, nl, reference, sep, prompt, nl, candidate, end]
    if has_system:
        parts = [system, np.asarray(ids.newline, dtype=np.int64)] + parts
    return np.concatenate(parts).astype(np.int64, copy=False)


def encode_polar_text(tokenizer, prompt: str, reference: str, candidate: str,
                      wrapper: Wrapper = "sft", system: str | None = None,
                      max_length: int | None = None,
                      max_response_length: int | None = None) -> list[int]:
    """Tokenize each piece with ``tokenizer`` (no special tokens) and apply the template."""
    ids = TemplateIds.from_tokenizer(tokenizer, max_length, max_response_length)

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    return encode_polar(enc(prompt), enc(reference), enc(candidate), ids, wrapper,
                        enc(system) if system is not None else None)


def _check_wrapper(wrapper: str) -> None:
    if wrapper not in WRAPPERS:
        raise ValueError(f"wrapper must be one of {WRAPPERS}, got {wrapper!r}")
