"""``polar-train evaluate``: preference accuracy of a reward model, with and without the reference.

``model`` is a reward-model folder (``RUN/model`` of a ``pretrain`` or ``finetune`` run, or a
converted POLAR checkpoint), ``data`` a preference JSONL (:mod:`polar_scaling.preferences`).
A pair is right when ``r(p, ref, chosen) > r(p, ref, rejected)``; a tie counts half. Each pair
is scored twice: with its reference, and with the reference slot left empty. Accuracy and
mean Bradley-Terry loss are reported overall and per ``category`` (rows without one are
``-``), with the binomial standard error of each accuracy.

Inputs are encoded as the scoring API encodes them (:mod:`polar_scaling.scoring`: this suite's
template, or the official client's text encoding for a converted checkpoint, as its
``polar.json`` says), with the wrapper and limits the model was trained with unless given.
The forward pass is plain torch in length-sorted batches: no DeepSpeed, no training.

Writes ``RUN/eval.json`` and ``RUN/eval.md`` (the table, also printed) and ``RUN/done.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from polar_scaling.config import check, load_config
from polar_scaling.errors import StageError
from polar_scaling.rundir import RunDir, atomic_write, run_once


@dataclass
class EvaluateArgs:
    model: str | None = None  # a reward-model folder (required)
    data: str | None = None  # a preference JSONL (required)
    tokenizer: str | None = None  # default: the model folder's
    wrapper: Literal["sft", "pretrain"] | None = None  # default: the model's, else sft
    max_length: int | None = field(default=None, metadata={"gt": 4})  # default: the model's
    max_response_length: int | None = field(default=None, metadata={"ge": 1})
    batch_size: int = field(default=64, metadata={"ge": 1})  # sequences per forward pass
    device: str = "cpu"

    def __post_init__(self):
        check(self.model is not None, "model", "required: a reward-model folder")
        check(self.data is not None, "data", "required: a preference JSONL file")


def run(config_path: Path | None, overrides: list[str], run_dir: Path) -> dict:
    args = load_config(EvaluateArgs, config_path, overrides)
    return run_once(run_dir, args, "evaluate", evaluate_run)


def evaluate_run(args: EvaluateArgs, run: RunDir) -> dict:
    """Evaluate, write eval.json, eval.md and done.json, print the table; returns the summary."""
    from polar_scaling.preferences import read_preferences

    rows = read_preferences(args.data)
    model, tokenizer = load_reward_model(Path(args.model), args.tokenizer, args.device)
    result = evaluate_preferences(model, tokenizer, rows, args.wrapper, args.max_length,
                                  args.max_response_length, args.batch_size)
    result = {"model": args.model, "data": args.data, **result}
    atomic_write(run.path / "eval.json", json.dumps(result, indent=2))
    table = format_table(result)
    atomic_write(run.path / "eval.md", table)
    print(table, end="")
    summary = {"pairs": result["pairs"], "wrapper": result["wrapper"],
               "accuracy_with_reference": result["with_reference"]["accuracy"],
               "accuracy_without_reference": result["without_reference"]["accuracy"],
               "eval_json": str(run.path / "eval.json")}
    run.mark_done(summary)
    return summary


def load_reward_model(path: Path, tokenizer_path: str | None = None, device: str = "cpu"):
    """(RewardModel in eval mode, tokenizer) from a folder; errors name the folder."""
    from transformers import AutoTokenizer

    from polar_scaling.model import RewardModel

    if not (path / "config.json").is_file():
        raise StageError(f"model {path} is not a model folder (no config.json)")
    try:
        model = RewardModel.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"model {path}: cannot load it as a reward model "
                         f"({type(e).__name__}: {e})") from None
    tok_dir = Path(tokenizer_path) if tokenizer_path is not None else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise StageError(f"no usable tokenizer in {tok_dir} ({e}); pass tokenizer=") from None
    if model.config.vocab_size < len(tokenizer):
        raise StageError(f"model {path} has vocab {model.config.vocab_size} but the tokenizer "
                         f"in {tok_dir} has {len(tokenizer)} tokens")
    return model.to(device).eval(), tokenizer


def encode_rows(rows, tokenizer, meta: dict, wrapper: str, with_reference: bool,
                max_length: int | None, max_response_length: int | None) -> list[list[int]]:
    """Ids of every chosen then every rejected sequence, in the model's encoding."""
    from polar_scaling.preferences import preference_items
    from polar_scaling.scoring import (
        OFFICIAL_MAX_LENGTH,
        OFFICIAL_MAX_RESPONSE_LENGTH,
        encode_ids,
        encode_text,
    )

    items = preference_items(rows, wrapper, with_reference)
    encoding = meta.get("encoding", "ids")
    if encoding == "ids":
        return encode_ids(items, tokenizer, max_length, max_response_length,
                          meta.get("reward_token_id"))
    if encoding == "text":
        return encode_text(items, tokenizer, meta["reward_token_id"],
                           max_length or OFFICIAL_MAX_LENGTH,
                           max_response_length or OFFICIAL_MAX_RESPONSE_LENGTH)
    raise StageError(f"unknown encoding {encoding!r} in the model's polar.json")


def pair_margins(model, tokenizer, rows, wrapper: str, with_reference: bool,
                 max_length: int | None = None, max_response_length: int | None = None,
                 batch_size: int = 64) -> np.ndarray:
    """``r(chosen) - r(rejected)`` of every row (float64)."""
    from polar_scaling.scoring import forward_scores, length_sorted_batches

    meta = dict(getattr(model, "meta", None) or {})
    seqs = encode_rows(rows, tokenizer, meta, wrapper, with_reference, max_length,
                       max_response_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = np.array(forward_scores(model, seqs, length_sorted_batches(
        [len(s) for s in seqs], batch_size), pad), dtype=np.float64)
    return scores[:len(rows)] - scores[len(rows):]


def summarize_margins(margins: np.ndarray) -> dict:
    """Accuracy (ties half), its binomial standard error, mean BT loss and mean margin."""
    n = len(margins)
    if n == 0:
        return {"n": 0, "accuracy": float("nan"), "stderr": float("nan"),
                "loss": float("nan"), "margin": float("nan")}
    correct = (margins > 0) + 0.5 * (margins == 0)
    acc = float(correct.mean())
    loss = float(np.logaddexp(0.0, -margins).mean())  # -log σ(m), computed stably
    return {"n": n, "accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / n), "loss": loss,
            "margin": float(margins.mean())}


def evaluate_preferences(model, tokenizer, rows: Sequence, wrapper: str | None = None,
                         max_length: int | None = None, max_response_length: int | None = None,
                         batch_size: int = 64) -> dict:
    """Accuracy and loss with and without the reference, overall and per category.

    ``wrapper`` and the limits default to the model's ``meta`` (then ``sft``, no limits).
    """
    from polar_scaling.preferences import categories

    meta = dict(getattr(model, "meta", None) or {})
    wrapper = wrapper or meta.get("wrapper") or "sft"
    if meta.get("encoding", "ids") == "ids":
        max_length = max_length if max_length is not None else meta.get("max_length")
        max_response_length = max_response_length if max_response_length is not None \
            else meta.get("max_response_length")
    names, labels = categories(rows)
    out = {"pairs": len(rows), "wrapper": wrapper, "by_category": {c: {} for c in names}}
    for key, with_ref in (("with_reference", True), ("without_reference", False)):
        m = pair_margins(model, tokenizer, rows, wrapper, with_ref, max_length,
                         max_response_length, batch_size)
        out[key] = summarize_margins(m)
        for k, c in enumerate(names):
            out["by_category"][c][key] = summarize_margins(m[labels == k])
    return out


def format_table(result: dict) -> str:
    """A markdown table: rows per category then all, accuracy ± stderr with and without."""
    def cell(s: dict) -> str:
        return f"{100 * s['accuracy']:.1f} ± {100 * s['stderr']:.1f}"

    lines = [f"preference accuracy (%) of {result.get('model', 'the model')} on "
             f"{result.get('data', 'the data')} (wrapper {result['wrapper']})", "",
             "| category | pairs | with reference | without reference |",
             "|---|---:|---:|---:|"]
    for name, res in result["by_category"].items():
        lines.append(f"| {name} | {res['with_reference']['n']} | {cell(res['with_reference'])} "
                     f"| {cell(res['without_reference'])} |")
    lines.append(f"| **all** | {result['pairs']} | {cell(result['with_reference'])} | "
                 f"{cell(result['without_reference'])} |")
    return "\n".join(lines) + "\n"
