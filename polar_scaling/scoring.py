"""Scoring API: rewards for ``{prompt, reference, output}`` items, batched by length.

An item is a dict with ``prompt``, ``reference`` and ``output`` (each a string or a list of
``{"role", "content"}`` messages, the official POLAR format), an optional ``wrapper``
(``"sft"``, the default, or ``"pretrain"``) and an optional ``system`` text for conditional
scoring. Messages are joined by ``"\\n"`` on their contents, roles dropped, as the official
client does (no chat template).

Two encodings, chosen by the model folder's ``polar.json``:

* ``"ids"`` (models trained by this suite): the template of :mod:`polar_scaling.template`
  applied to separately tokenized pieces, exactly as in training, with the truncation limits
  recorded at export (``max_length``, ``max_response_length``; none by default).
* ``"text"`` (released POLAR models converted by :mod:`polar_scaling.convert_internlm2`): the
  official ``RewardModelClient`` encoding. Each piece is tokenized with special tokens, cut
  (responses keep their *last* ``max_response_length`` tokens, the client's default
  ``response_cut_side="left"``; the prompt keeps its last
  ``(max_length - 4 - len(reference) - len(output)) // 2``), decoded back to text, put in the
  template ``prompt + "\\n" + reference + "<|reward|>" + prompt + "\\n" + output``, tokenized as
  one string (BOS included) and closed with the reward token. Defaults are the client's:
  ``max_length=16384``, ``max_response_length=4096``.

A ``system`` text goes first, followed by ``"\\n"``, in both encodings (this suite's
conditional-scoring convention; the official client has no system field).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from polar_scaling.template import (
    RESERVED,
    WRAPPERS,
    TemplateIds,
    encode_polar,
    polar_text,
)
from polar_scaling.tokenizer import REWARD_TOKEN

OFFICIAL_MAX_LENGTH = 16384
OFFICIAL_MAX_RESPONSE_LENGTH = 4096
ENCODINGS = ("ids", "text")
FIELDS = ("prompt", "reference", "output")


@dataclass(frozen=True)
class ScoreItem:
    """One validated item, messages already joined into text."""

    prompt: str
    reference: str
    output: str
    wrapper: str = "sft"
    system: str | None = None


def join_messages(value, where: str) -> str:
    """``value`` as text: a string as is, a list of ``{role, content}`` messages as their
    contents joined by ``"\\n"`` (roles dropped). A ValueError starts with ``where``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        parts = []
        for j, message in enumerate(value):
            if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
                raise ValueError(f"{where}[{j}] must be a message "
                                 f"{{'role': ..., 'content': str}}, got {message!r}")
            parts.append(message["content"])
        return "\n".join(parts)
    raise ValueError(f"{where} must be a string or a list of messages, "
                     f"got {type(value).__name__}")


def _as_text(value, index: int, field: str) -> str:
    return join_messages(value, f"item {index}: {field}")


def parse_items(items) -> list[ScoreItem]:
    """Validate items; errors are ValueErrors naming the item's index and the field."""
    if isinstance(items, Mapping) or isinstance(items, (str, bytes)):
        raise TypeError("items must be a list of dicts (wrap a single item in a list)")
    parsed = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"item {i}: expected a dict with {', '.join(FIELDS)}, "
                             f"got {type(item).__name__}")
        missing = [f for f in FIELDS if f not in item]
        if missing:
            raise ValueError(f"item {i}: missing {', '.join(repr(f) for f in missing)}")
        unknown = sorted(set(item) - set(FIELDS) - {"wrapper", "system"})
        if unknown:
            raise ValueError(f"item {i}: unknown fields {unknown} (known: {', '.join(FIELDS)}, "
                             f"wrapper, system)")
        prompt, reference, output = (_as_text(item[f], i, f) for f in FIELDS)
        if not reference.strip():
            raise ValueError(f"item {i}: empty reference (POLAR scores an output against a "
                             f"reference answer)")
        wrapper = item.get("wrapper") or "sft"
        if wrapper not in WRAPPERS:
            raise ValueError(f"item {i}: wrapper must be one of {WRAPPERS}, got {wrapper!r}")
        system = item.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"item {i}: system must be a string, got {type(system).__name__}")
        parsed.append(ScoreItem(prompt, reference, output, wrapper, system))
    return parsed


# ------------------------------------------------------------------------------ encoding


def _tokenize(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def encode_ids(items: list[ScoreItem], tokenizer, max_length: int | None = None,
               max_response_length: int | None = None,
               reward_token_id: int | None = None) -> list[list[int]]:
    """Token ids of each item under this suite's template (the training encoding)."""
    ids = TemplateIds.from_tokenizer(tokenizer, max_length, max_response_length)
    if reward_token_id is not None and ids.reward != reward_token_id:
        raise ValueError(f"tokenizer's {REWARD_TOKEN} is id {ids.reward} but the model was "
                         f"trained with reward token id {reward_token_id}")
    p, r, o = (_tokenize(tokenizer, [getattr(it, f) for it in items], False) for f in FIELDS)
    with_system = [i for i, it in enumerate(items) if it.system is not None]
    sys_ids = dict(zip(with_system, _tokenize(tokenizer, [items[i].system for i in with_system],
                                              False), strict=True))
    return [encode_polar(p[i], r[i], o[i], ids, it.wrapper, sys_ids.get(i))
            for i, it in enumerate(items)]


def encode_text(items: list[ScoreItem], tokenizer, reward_token_id: int,
                max_length: int = OFFICIAL_MAX_LENGTH,
                max_response_length: int = OFFICIAL_MAX_RESPONSE_LENGTH,
                response_cut_side: str = "left") -> list[list[int]]:
    """Token ids of each item as the official POLAR client builds them (module docstring)."""
    if response_cut_side not in ("left", "right"):
        raise ValueError(f"response_cut_side must be 'left' or 'right', got {response_cut_side!r}")
    if max_length <= RESERVED:
        raise ValueError(f"max_length must be > {RESERVED}, got {max_length}")
    p, r, o = (_tokenize(tokenizer, [getattr(it, f) for it in items], True) for f in FIELDS)
    with_system = [i for i, it in enumerate(items) if it.system is not None]
    sys_len = dict(zip(with_system, map(len, _tokenize(
        tokenizer, [items[i].system + "\n" for i in with_system], False)), strict=True))

    def cut(seq):
        if len(seq) <= max_response_length:
            return seq
        return seq[-max_response_length:] if response_cut_side == "left" \
            else seq[:max_response_length]

    texts = []
    for i, it in enumerate(items):
        ref, out = cut(r[i]), cut(o[i])
        budget = max((max_length - RESERVED - sys_len.get(i, 0) - len(ref) - len(out)) // 2, 0)
        prompt = p[i][len(p[i]) - budget:] if len(p[i]) > budget else p[i]
        # The client always round-trips the pieces through decode, cut or not.
        prompt, ref, out = tokenizer.batch_decode([prompt, ref, out], skip_special_tokens=True)
        text = polar_text(prompt, ref, out, it.wrapper, it.system)
        texts.append(text[:-len(REWARD_TOKEN)])  # the end token is the model's reward token
    return [seq + [reward_token_id] for seq in _tokenize(tokenizer, texts, True)]


def encode_items(items, tokenizer, encoding: str = "ids", reward_token_id: int | None = None,
                 max_length: int | None = None, max_response_length: int | None = None,
                 response_cut_side: str = "left") -> list[list[int]]:
    """Validate ``items`` and return their token ids under ``encoding`` ("ids" or "text")."""
    parsed = parse_items(items)
    if encoding == "ids":
        return encode_ids(parsed, tokenizer, max_length, max_response_length, reward_token_id)
    if encoding == "text":
        if reward_token_id is None:
            raise ValueError("the text encoding needs the model's reward_token_id")
        return encode_text(parsed, tokenizer, reward_token_id,
                           max_length or OFFICIAL_MAX_LENGTH,
                           max_response_length or OFFICIAL_MAX_RESPONSE_LENGTH,
                           response_cut_side)
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


# ------------------------------------------------------------------------------- forward


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices grouped into batches of similar length, longest first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for a list of id lists."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


@torch.inference_mode()
def forward_scores(model, seqs: Sequence[Sequence[int]], batches: list[list[int]],
                   pad_id: int) -> list[float]:
    """Scores of ``seqs`` from ``model(input_ids, attention_mask)``, run batch by batch in the
    given groups and returned in the order of ``seqs``."""
    device = next(model.parameters()).device
    out = [0.0] * len(seqs)
    for batch in batches:
        ids, mask = pad_right([seqs[i] for i in batch], pad_id)
        scores = model(ids.to(device), mask.to(device)).float().cpu().tolist()
        for i, s in zip(batch, scores, strict=True):
            out[i] = s
    return out


def _model_meta(model) -> dict:
    return dict(getattr(model, "meta", None) or {})


def score(items, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
          max_response_length: int | None = None, encoding: str | None = None,
          response_cut_side: str = "left") -> list[float]:
    """Rewards of ``items`` (module docstring), one float per item in input order.

    ``model`` is a :class:`~polar_scaling.model.RewardModel` (or any module called as
    ``model(input_ids, attention_mask)`` returning one score per row). ``encoding`` and the
    limits default to the model's ``meta``: "text" with the official client's limits for a
    converted POLAR model, "ids" with the training limits otherwise. Items run in batches of
    ``batch_size`` sorted by length, so padding stays small. A ``score_offset`` in the meta
    (a dropped head bias) is added to every score.
    """
    meta = _model_meta(model)
    encoding = encoding or meta.get("encoding", "ids")
    if encoding == "ids":
        max_length = max_length if max_length is not None else meta.get("max_length")
        max_response_length = max_response_length if max_response_length is not None \
            else meta.get("max_response_length")
    seqs = encode_items(items, tokenizer, encoding, meta.get("reward_token_id"), max_length,
                        max_response_length, response_cut_side)
    if not seqs:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = forward_scores(model, seqs, length_sorted_batches(list(map(len, seqs)), batch_size),
                            pad_id)
    offset = float(meta.get("score_offset", 0.0))
    return [s + offset for s in scores]


class RewardScorer:
    """A reward model and its tokenizer, callable on a list of items (an RFT reward function).

    ``scorer(items)`` returns :func:`score` of the items with the settings given here;
    :meth:`rewards` takes parallel lists of prompts, references and outputs instead.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
                 max_response_length: int | None = None, encoding: str | None = None,
                 response_cut_side: str = "left"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = dict(batch_size=batch_size, max_length=max_length,
                             max_response_length=max_response_length, encoding=encoding,
                             response_cut_side=response_cut_side)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype=None,
                        tokenizer_path: str | Path | None = None, **settings) -> RewardScorer:
        """Load a RewardModel folder (and the tokenizer saved with it, or ``tokenizer_path``)."""
        from transformers import AutoTokenizer

        from polar_scaling.model import RewardModel

        path = Path(path)
        tok_dir = Path(tokenizer_path) if tokenizer_path is not None else path
        if not any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise FileNotFoundError(f"{tok_dir} has no tokenizer (tokenizer.json); pass "
                                    f"tokenizer_path= to the folder that holds it")
        model = RewardModel.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        return cls(model, tokenizer, **settings)

    def __call__(self, items) -> list[float]:
        return score(items, self.model, self.tokenizer, **self.settings)

    def rewards(self, prompts: Sequence, references: Sequence, outputs: Sequence,
                wrapper: str = "sft", system: str | None = None) -> list[float]:
        """Scores of ``outputs[i]`` against ``references[i]`` for ``prompts[i]``."""
        if not len(prompts) == len(references) == len(outputs):
            raise ValueError(f"prompts, references and outputs differ in length: "
                             f"{len(prompts)}, {len(references)}, {len(outputs)}")
        items = [{"prompt": p, "reference": r, "output": o, "wrapper": wrapper,
                  **({"system": system} if system is not None else {})}
                 for p, r, o in zip(prompts, references, outputs, strict=True)]
        return self(items)
