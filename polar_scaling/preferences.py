"""Ranked preference data for reward-model fine-tuning and evaluation, and a synthetic set.

A preference file is JSONL, one object per line (blank lines skipped)::

    {"prompt": ..., "reference": ..., "chosen": ..., "rejected": ...,
     "category": "stem", "system": "judge by correctness"}

``prompt``, ``reference``, ``chosen`` and ``rejected`` are each a string or a list of
``{"role", "content"}`` messages (the official POLAR format), joined as the scoring API joins
them (:func:`polar_scaling.scoring.join_messages`: contents joined by ``"\\n"``, roles dropped).
``category`` (a string) and ``system`` (a string: the conditional reward model's system
prompt naming the preference domain) are optional; any other key is an error. Errors name the
file and line: a missing field, an empty reference, a chosen equal to the rejected.

Encoding: the chosen sequence is ``template(prompt, reference, chosen)`` and the rejected one
``template(prompt, reference, rejected)`` (:mod:`polar_scaling.template`, the same ids the
scoring API gives). *Without the reference* means the reference slot is left empty and the
rest of the template is kept: ``prompt + "\\n" + "" + "<|reward|>" + prompt + "\\n" +
candidate + "<|reward|>"`` (``sft`` wrapper), so the model reads the layout it was trained on
with no reference content to compare against.

The synthetic set (:func:`synth_preferences`, ``python -m polar_scaling.preferences synth``)
comes from a trajectory dataset of the policy world. For a prompt, a target policy T writes
the reference; three candidate policies each write one answer, and their "human" ranking
A ≻ B ≻ C is the order of their true KL(T ‖ candidate) (the dataset's ``kl.parquet``). Each
ranked triple gives three rows (A over B, A over C, B over C). A row's category is the
relation to T of its chosen and rejected policies: ``self`` (T itself, a second sample),
``family`` (T's family) or ``other``, e.g. ``family>other``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polar_scaling.errors import StageError

FIELDS = ("prompt", "reference", "chosen", "rejected")
OPTIONAL = ("category", "system")
RELATIONS = ("self", "family", "other")


class PreferenceError(StageError):
    """A preference file or row is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Preference:
    """One validated row, messages joined into text."""

    prompt: str
    reference: str
    chosen: str
    rejected: str
    category: str | None = None
    system: str | None = None


# ------------------------------------------------------------------------------ reading


def parse_preference(obj, where: str) -> Preference:
    """Validate one row; errors are PreferenceErrors starting with ``where`` (file:line)."""
    from polar_scaling.scoring import join_messages

    if not isinstance(obj, Mapping):
        raise PreferenceError(f"{where}: expected an object with {', '.join(FIELDS)}, "
                              f"got {type(obj).__name__}")
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        raise PreferenceError(f"{where}: missing {', '.join(repr(f) for f in missing)}")
    unknown = sorted(set(obj) - set(FIELDS) - set(OPTIONAL))
    if unknown:
        raise PreferenceError(f"{where}: unknown fields {unknown} (known: "
                              f"{', '.join(FIELDS + OPTIONAL)})")
    try:
        prompt, reference, chosen, rejected = (join_messages(obj[f], f"{where}: {f}")
                                               for f in FIELDS)
    except ValueError as e:
        raise PreferenceError(str(e)) from None
    if not reference.strip():
        raise PreferenceError(f"{where}: empty reference (the reward is read against a "
                              f"reference answer)")
    if chosen == rejected:
        raise PreferenceError(f"{where}: chosen equals rejected (a pair must differ)")
    extra = {}
    for key in OPTIONAL:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise PreferenceError(f"{where}: {key} must be a string, got {type(value).__name__}")
        extra[key] = value
    return Preference(prompt, reference, chosen, rejected, **extra)


def read_preferences(path: str | Path) -> list[Preference]:
    """Every row of a preference JSONL file, validated (module docstring)."""
    from polar_scaling.jsonl import iter_jsonl

    rows = [parse_preference(obj, where) for where, obj in
            iter_jsonl(path, PreferenceError, PreferenceError, "preference file")]
    if not rows:
        raise PreferenceError(f"{path}: no preference rows")
    return rows


def write_preferences(rows: Sequence[Mapping | Preference], path: str | Path) -> Path:
    """Write rows as JSONL (optional fields only where set); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            obj = row.__dict__ if isinstance(row, Preference) else dict(row)
            f.write(json.dumps({k: v for k, v in obj.items() if v is not None},
                               ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------- encoding


def preference_items(rows: Sequence[Preference], wrapper: str = "sft",
                     with_reference: bool = True) -> list:
    """Scoring items (:class:`~polar_scaling.scoring.ScoreItem`) of every row's chosen answer,
    then of every row's rejected answer (so item ``i`` and ``len(rows) + i`` form pair i)."""
    from polar_scaling.scoring import ScoreItem
    from polar_scaling.template import WRAPPERS

    if wrapper not in WRAPPERS:
        raise ValueError(f"wrapper must be one of {WRAPPERS}, got {wrapper!r}")
    items = []
    for side in ("chosen", "rejected"):
        items += [ScoreItem(r.prompt, r.reference if with_reference else "", getattr(r, side),
                            wrapper, r.system) for r in rows]
    return items


def encode_preferences(rows: Sequence[Preference], tokenizer, wrapper: str = "sft",
                       with_reference: bool = True, max_length: int | None = None,
                       max_response_length: int | None = None):
    """Rows as :class:`~polar_scaling.pairs.PairData`: ``chosen[i]`` is the template of
    (prompt, reference, chosen) and ``rejected[i]`` that of (prompt, reference, rejected),
    with the row's system prompt first when it has one. ``with_reference=False`` leaves the
    reference slot empty (module docstring)."""
    from polar_scaling.pairs import PairData
    from polar_scaling.scoring import encode_ids

    items = preference_items(rows, wrapper, with_reference)
    seqs = encode_ids(items, tokenizer, max_length, max_response_length)
    arrays = [np.asarray(s, dtype=np.int64) for s in seqs]
    return PairData(arrays[:len(rows)], arrays[len(rows):])


def categories(rows: Sequence[Preference]) -> tuple[list[str], np.ndarray]:
    """Sorted category names and each row's index into them (rows without one: ``"-"``)."""
    names = [r.category if r.category is not None else "-" for r in rows]
    labels = sorted(set(names))
    lookup = {c: i for i, c in enumerate(labels)}
    return labels, np.array([lookup[c] for c in names], dtype=np.int64)


# ------------------------------------------------------------------------ synthetic set


def _dataset_kl(path: Path) -> tuple[dict, dict]:
    """KL(a ‖ b) per sequence and its standard error, from the dataset or computed now."""
    from polar_scaling.data import load_kl, read_manifest

    kl = load_kl(path)
    if kl:
        return kl, load_kl(path, "stderr_per_sequence")
    manifest = read_manifest(path)
    if manifest.get("pool") != "synthetic":
        raise PreferenceError(f"{path} has no kl.parquet and is not a synthetic world: the "
                              f"true ranking needs the policies' KL")
    from polar_scaling.config import from_dict
    from polar_scaling.data_generate import GenerateArgs
    from polar_scaling.pool import Runtime

    args = from_dict(GenerateArgs, {**manifest["config"], "workers": 1, "progress": False})
    rows = Runtime(args).kl_rows()
    kl = {(r["policy_a"], r["policy_b"]): float(r["kl_per_sequence"]) for r in rows}
    se = {(r["policy_a"], r["policy_b"]): float(r["stderr_per_sequence"]) for r in rows}
    return kl, se


def relation(target: dict, candidate: dict) -> str:
    """``self``, ``family`` or ``other``: how a candidate policy relates to the target."""
    if candidate["policy_id"] == target["policy_id"]:
        return "self"
    return "family" if candidate["family"] == target["family"] else "other"


def synth_preferences(dataset: str | Path, split: str = "heldout_prompts", seed: int = 0,
                      groups_per_prompt: int = 1, min_z: float = 3.0,
                      include_target: bool = True, system: str | None = None,
                      tries: int = 64) -> list[dict]:
    """Ranked preference rows from a trajectory dataset (module docstring), in prompt order.

    For each prompt of ``split`` and each of ``groups_per_prompt`` groups (at most the
    dataset's samples per policy), a target T is drawn from the policies that wrote for the
    prompt; its sample g is the reference. Three candidates are drawn (T itself allowed when
    ``include_target``, answering with its next sample) with each relation (self, family,
    other) equally likely, and kept only if consecutive KLs differ by more than ``min_z``
    standard errors, so the ranking is not estimation noise, and if the three answers differ
    as text; after ``tries`` failed draws the group is skipped, as is a group whose reference
    is empty (T stopped at once). Each row carries ``prompt_id``, ``target``, ``chosen_policy``,
    ``rejected_policy``, ``kl_chosen`` and ``kl_rejected`` besides the preference fields;
    :func:`public_row` strips them. Text is the dataset tokenizer's decoding of the ids, and
    encoding it back must give the same ids (checked here for every piece).
    """
    from polar_scaling.data import TrajectoryDataset

    path = Path(dataset)
    ds = TrajectoryDataset(path)
    n_samples = int(ds.manifest["samples_per_policy"])
    if not 1 <= groups_per_prompt <= n_samples:
        raise ValueError(f"groups_per_prompt must be in [1, {n_samples}], got {groups_per_prompt}")
    tokenizer = ds.tokenizer()
    kl, se = _dataset_kl(path)
    t = ds.load(split)
    policies = ds.policies
    grid: dict[tuple[int, int], dict[int, int]] = {}
    for row in np.nonzero(t.policy_index >= 0)[0].tolist():
        key = (int(t.prompt_id[row]), int(t.policy_index[row]))
        grid.setdefault(key, {})[int(t.sample[row])] = row
    by_prompt: dict[int, list[int]] = {}
    for (pid, pol), samples in sorted(grid.items()):
        if len(samples) == n_samples:
            by_prompt.setdefault(pid, []).append(pol)

    decoded: dict[tuple[str, int], str] = {}

    def text(kind: str, row: int) -> str:
        if (kind, row) not in decoded:
            ids = (t.prompts if kind == "prompt" else t.responses)[row].tolist()
            s = tokenizer.decode(ids)
            if tokenizer.encode(s, add_special_tokens=False) != ids:
                raise PreferenceError(f"{path}: the tokenizer does not round-trip the ids of "
                                      f"{kind} row {row} through text; this set needs a "
                                      f"character-level (world) tokenizer")
            decoded[(kind, row)] = s
        return decoded[(kind, row)]

    out = []
    for pid, writers in by_prompt.items():
        for g in range(groups_per_prompt):
            rng = np.random.default_rng([seed, pid, g])
            target = policies[writers[rng.integers(len(writers))]]
            ref_row = grid[(pid, target["index"])][g]
            prompt, reference = text("prompt", ref_row), text("response", ref_row)
            pool = [i for i in writers if include_target or i != target["index"]]
            if not reference or len(pool) < 3:
                continue  # an empty reference (T stopped at once) gives nothing to compare
            rel = [relation(target, policies[i]) for i in pool]
            counts = {r: rel.count(r) for r in set(rel)}
            weight = np.array([1.0 / counts[r] for r in rel])
            weight /= weight.sum()
            for _ in range(tries):
                pick = rng.choice(len(pool), size=3, replace=False, p=weight)
                cands = sorted((pool[j] for j in pick),
                               key=lambda i: kl[(target["policy_id"], policies[i]["policy_id"])])
                ks = [kl[(target["policy_id"], policies[i]["policy_id"])] for i in cands]
                es = [se.get((target["policy_id"], policies[i]["policy_id"]), 0.0) for i in cands]
                if not all(ks[k + 1] - ks[k] > min_z * float(np.hypot(es[k], es[k + 1]))
                           for k in range(2)):
                    continue
                answers = [text("response", grid[(pid, i)][(g + 1) % n_samples
                                                           if i == target["index"] else g])
                           for i in cands]
                if len(set(answers)) == 3:  # two equal answers cannot be ranked
                    break
            else:
                continue
            for hi, lo in ((0, 1), (0, 2), (1, 2)):
                ch, rj = policies[cands[hi]], policies[cands[lo]]
                out.append({
                    "prompt": prompt, "reference": reference, "chosen": answers[hi],
                    "rejected": answers[lo],
                    "category": f"{relation(target, ch)}>{relation(target, rj)}",
                    **({"system": system} if system is not None else {}),
                    "prompt_id": pid, "target": target["policy_id"],
                    "chosen_policy": ch["policy_id"], "rejected_policy": rj["policy_id"],
                    "kl_chosen": ks[hi], "kl_rejected": ks[lo]})
    return out


def public_row(row: Mapping) -> dict:
    """The preference fields of a synthetic row (what a preference file holds)."""
    return {k: row[k] for k in FIELDS + OPTIONAL if row.get(k) is not None}


def split_by_prompt(rows: Sequence[Mapping], eval_fraction: float,
                    seed: int = 0) -> tuple[list, list]:
    """(train, eval) rows, whole prompts on one side: about ``eval_fraction`` of the prompts
    go to eval, so no prompt is seen in both."""
    if not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    prompts = sorted({r["prompt_id"] for r in rows})
    chosen = np.random.default_rng([seed, 0xE7]).permutation(len(prompts))
    held = {prompts[i] for i in chosen[:round(eval_fraction * len(prompts))]}
    return ([r for r in rows if r["prompt_id"] not in held],
            [r for r in rows if r["prompt_id"] in held])


# ----------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polar_scaling.preferences",
        description="Preference sets: a synthetic one from a trajectory dataset, or a check.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="ranked preferences from a dataset's true policy KL")
    s.add_argument("dataset", type=Path, help="a trajectory dataset (polar-train generate)")
    s.add_argument("out", type=Path, help="JSONL to write (the train part with --eval-out)")
    s.add_argument("--eval-out", type=Path, help="also write an eval JSONL of other prompts")
    s.add_argument("--eval-fraction", type=float, default=0.5,
                   help="share of prompts that go to --eval-out (default 0.5)")
    s.add_argument("--split", default="heldout_prompts",
                   help="dataset split whose prompts are used (default heldout_prompts)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--groups-per-prompt", type=int, default=1)
    s.add_argument("--min-z", type=float, default=3.0,
                   help="consecutive KLs must differ by this many standard errors")
    s.add_argument("--no-target", action="store_true",
                   help="never use the target policy itself as a candidate")
    s.add_argument("--system", help="a system prompt put on every row (conditional scoring)")
    c = sub.add_parser("check", help="validate a preference JSONL and print its categories")
    c.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            rows = read_preferences(args.path)
            names, labels = categories(rows)
            counts = np.bincount(labels, minlength=len(names))
            print(json.dumps({"rows": len(rows), "categories": dict(zip(
                names, counts.tolist(), strict=True))}, indent=2))
            return 0
        rows = synth_preferences(args.dataset, args.split, args.seed, args.groups_per_prompt,
                                 args.min_z, not args.no_target, args.system)
        if args.eval_out is not None:
            train, held = split_by_prompt(rows, args.eval_fraction, args.seed)
            write_preferences([public_row(r) for r in held], args.eval_out)
        else:
            train, held = rows, []
        write_preferences([public_row(r) for r in train], args.out)
        cats: dict[str, int] = {}
        for r in rows:
            cats[r["category"]] = cats.get(r["category"], 0) + 1
        print(json.dumps({"rows": len(rows), "train_rows": len(train), "eval_rows": len(held),
                          "categories": dict(sorted(cats.items()))}, indent=2))
    except (StageError, ValueError, FileNotFoundError) as e:
        print(f"preferences: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
