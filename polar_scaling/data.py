"""Trajectory datasets on disk, and POLAR triplets drawn from them.

A dataset is one directory written by ``polar-train generate`` (:mod:`polar_scaling.data_generate`)::

    manifest.json          config, tokenizer ids, policies (id, family, split, seed), prompt
                           splits, shards (file, split, prompt range, rows, sha256, status)
    tokenizer/             the tokenizer every id in the shards belongs to
    shards/shard-00000.parquet ...   one row per trajectory: prompt_id, policy_id,
                           policy_index, family, seed, sample, prompt_ids, response_ids,
                           ended (response stopped at EOS; EOS itself not stored);
                           rows of policy "corpus" hold the corpus document behind the prompt
    kl.parquet             true KL(a || b) for every ordered pool pair, on held-out prompts

Splits. Prompt ids are partitioned into ``train``, ``heldout_prompts`` and
``heldout_policies``. Train policies write for every prompt; held-out policies only for
``heldout_policies`` prompts. So the split ``train`` (train policies × train prompts) shares
no prompt and no policy with what the evaluation measures, ``heldout_prompts`` is train
policies on unseen prompts, and ``heldout_policies`` keeps only triplets in which A or B is a
held-out policy.

Triplets. Each (prompt, policy) has ``samples_per_policy`` trajectories; each round of three
gives every policy of the split one triplet as A (its samples 3r and 3r+1 as reference and
positive) and one use as B (its sample 3r+2 as negative), through a random derangement of the
split's policies in which a ``same_family_share`` of negatives come from A's family. So no
trajectory appears twice in a split, and the stream has a fixed length: ``len(source)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polar_scaling.errors import StageError
from polar_scaling.rundir import atomic_write

FORMAT = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout_prompts", "heldout_policies")


class DatasetError(StageError):
    """A trajectory dataset is missing, incomplete, corrupt or cannot serve a request."""


# --------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON so that readers never see half a file (see rundir.atomic_write)."""
    atomic_write(path, json.dumps(obj, indent=1))


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise DatasetError(f"{path} is not a trajectory dataset (no {MANIFEST}); "
                           f"write one with `polar-train generate`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{file}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def verify_shard(root: Path, shard: dict) -> Path:
    """Path of a completed shard whose checksum matches the manifest, else a DatasetError."""
    path = root / shard["file"]
    if not path.is_file():
        raise DatasetError(f"shard {path} is listed as complete but missing")
    if sha256_file(path) != shard["sha256"]:
        raise DatasetError(f"shard {path} is corrupt (sha256 differs from {MANIFEST}); "
                           f"delete it and rerun generate to rewrite it")
    return path


# --------------------------------------------------------------------------- trajectories


@dataclass
class Ragged:
    """Variable-length int sequences as one flat array plus offsets (row i = values[o[i]:o[i+1]])."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Trajectories:
    """All rows of one split, as flat arrays (row order: as stored)."""

    prompt_id: np.ndarray  # int64 [R]
    policy_index: np.ndarray  # int32 [R], -1 for the corpus policy
    sample: np.ndarray  # int32 [R]
    ended: np.ndarray  # bool [R]
    prompts: Ragged  # [R]
    responses: Ragged  # [R]

    def __len__(self) -> int:
        return len(self.prompt_id)


class TrajectoryDataset:
    """A generated dataset: its manifest, verified shards and tokenizer."""

    def __init__(self, path: str | Path, require_complete: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if require_complete and not self.manifest.get("complete"):
            done = sum(s["status"] == "done" for s in self.manifest["shards"])
            raise DatasetError(f"dataset {self.path} is incomplete ({done} of "
                               f"{len(self.manifest['shards'])} shards); rerun polar-train "
                               f"generate on it to finish")
        self.policies = self.manifest["policies"]
        self.policy_ids = np.array([p["policy_id"] for p in self.policies], dtype=object)

    def tokenizer(self):
        from polar_scaling.tokenizer import load_tokenizer

        return load_tokenizer(self.path / "tokenizer")

    def shards(self, split: str) -> list[dict]:
        _check_split(split)
        return [s for s in self.manifest["shards"] if s["split"] == split]

    def load(self, split: str) -> Trajectories:
        """Every row of ``split`` after checking each shard's checksum."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        shards = [s for s in self.shards(split) if s["status"] == "done"]
        if not shards:
            raise DatasetError(f"dataset {self.path} has no completed shard for split {split!r}")
        cols = ["prompt_id", "policy_index", "sample", "ended", "prompt_ids", "response_ids"]
        tables = [pq.read_table(verify_shard(self.path, s), columns=cols) for s in shards]
        t = pa.concat_tables(tables).combine_chunks()
        return Trajectories(
            t["prompt_id"].to_numpy().astype(np.int64), t["policy_index"].to_numpy(),
            t["sample"].to_numpy(), t["ended"].to_numpy(zero_copy_only=False),
            _ragged(t["prompt_ids"]), _ragged(t["response_ids"]))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + length)`` for each pair, without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return shift + np.arange(ends[-1] if len(ends) else 0)


def _ragged(column) -> Ragged:
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Ragged(arr.flatten().to_numpy(), offsets)


def load_kl(path: str | Path, measure: str = "kl_per_sequence") -> dict[tuple[str, str], float]:
    """True KL(a || b) of the pool, keyed by (policy_a, policy_b); empty if not computed."""
    import pyarrow.parquet as pq

    manifest = read_manifest(path)
    info = manifest.get("kl")
    if not info:
        return {}
    file = Path(path) / info["file"]
    if not file.is_file() or sha256_file(file) != info["sha256"]:
        raise DatasetError(f"{file} is missing or corrupt (sha256 differs from {MANIFEST})")
    t = pq.read_table(file, columns=["policy_a", "policy_b", measure]).to_pydict()
    return {(a, b): float(v) for a, b, v in zip(t["policy_a"], t["policy_b"], t[measure],
                                                 strict=True)}


def lm_sequences(path: str | Path, policies: bool = True) -> Ragged:
    """Text for base-LM pre-training: ``[BOS] prompt response [EOS if ended]`` of every
    ``train``-split row (the corpus documents, and the train policies' trajectories too if
    ``policies``). Held-out prompts and held-out policies never appear."""
    ds = TrajectoryDataset(path)
    t = ds.load("train")
    keep = np.nonzero((t.policy_index == -1) | (policies & (t.policy_index >= 0)))[0]
    bos, eos = ds.manifest["token_ids"]["bos"], ds.manifest["token_ids"]["eos"]
    p_len, r_len = t.prompts.lengths()[keep], t.responses.lengths()[keep]
    add_eos = t.ended[keep].astype(np.int64)
    lengths = 1 + p_len + r_len + add_eos
    offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(offsets[-1], dtype=np.int32)
    values[offsets[:-1]] = bos
    values[_ranges(offsets[:-1] + 1, p_len)] = t.prompts.values[
        _ranges(t.prompts.offsets[keep], p_len)]
    values[_ranges(offsets[:-1] + 1 + p_len, r_len)] = t.responses.values[
        _ranges(t.responses.offsets[keep], r_len)]
    values[(offsets[1:] - 1)[add_eos == 1]] = eos
    return Ragged(values, offsets)


# --------------------------------------------------------------------------- triplets


def draw_negatives(family: np.ndarray, share: float | None,
                   rng: np.random.Generator) -> np.ndarray:
    """A derangement ``sigma``: policy a's negative comes from policy sigma[a] ≠ a, and every
    policy is used as a negative exactly once (all -1 if there are fewer than two policies).

    A ``share`` of the negatives (in expectation) come from A's own family (``None``: the
    share a uniform choice of B would give, (family size - 1) / (n - 1)). In each family,
    k ~ Binomial(size, share) members take a same-family negative, through a random cycle
    among themselves; k = 1 (no cycle possible) becomes 0 or 2 with equal odds, which keeps the
    expectation. The rest form one cycle across families, laid out family by family (largest
    first) and shifted by the largest family's count h: nobody lands in their own family. If
    h is over half of that set, the shift is (set size - h) instead, giving the fewest
    same-family pairs possible (2h - set size); so small or lopsided pools realise a share
    that differs from the one asked for.
    """
    n = len(family)
    sigma = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return sigma
    fams, fam_of = np.unique(family, return_inverse=True)
    sizes = np.bincount(fam_of)
    same = np.zeros(n, dtype=bool)
    for f, m in enumerate(sizes.tolist()):
        if m < 2:
            continue
        q = (m - 1) / (n - 1) if share is None else float(share)
        k = int(rng.binomial(m, q))
        if k == 1:
            k = 2 * int(rng.integers(2))
        same[rng.choice(np.nonzero(fam_of == f)[0], size=k, replace=False)] = True
    if (~same).sum() == 1:  # one policy cannot cycle alone
        lone = int(np.nonzero(~same)[0][0])
        mates = same & (fam_of == fam_of[lone])
        if mates.sum() >= 2:
            same[lone] = True  # it joins its family's cycle
        else:  # a singleton family: another family's cycle joins the cross-family one
            f = int(rng.choice(np.unique(fam_of[same])))
            same[fam_of == f] = False
    for f in range(len(fams)):
        group = rng.permutation(np.nonzero(same & (fam_of == f))[0])
        if len(group) >= 2:
            sigma[group] = np.roll(group, -1)
    cross = ~same
    c = int(cross.sum())
    if c >= 2:
        counts = np.bincount(fam_of[cross], minlength=len(fams))
        order = rng.permutation(len(fams))
        order = order[np.argsort(-counts[order], kind="stable")]  # largest family first
        layout = np.concatenate([rng.permutation(np.nonzero(cross & (fam_of == f))[0])
                                 for f in order])
        h = int(counts.max())
        shift = h if 2 * h <= c else max(c - h, 1)  # 1: all of one family, one cycle
        sigma[layout] = np.roll(layout, -shift)
    return sigma


@dataclass
class Triplet:
    index: int
    prompt_id: int
    policy_a: str
    policy_b: str
    same_family: bool
    prompt: np.ndarray
    reference: np.ndarray
    positive: np.ndarray
    negative: np.ndarray


class _Rows:
    """``view[i]`` = the ragged row of triplet i (in stream order)."""

    def __init__(self, ragged: Ragged, rows: np.ndarray):
        self.ragged, self.rows = ragged, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ragged[int(self.rows[i])]


class TripletSource:
    """The ordered, never-repeating stream of POLAR triplets of one split.

    ``len(source)`` triplets; triplet i (``source[i]``) is fixed by the dataset, the split,
    ``seed`` and ``same_family_share``, so a trainer resumes by its position. Columns in
    stream order: ``prompt``, ``reference``, ``positive``, ``negative`` (``x[i]`` is an int32
    array), ``policy_a``, ``policy_b`` (ids), ``same_family``, ``prompt_id``.
    """

    def __init__(self, path: str | Path, split: str = "train", seed: int = 0,
                 same_family_share: float | None = None):
        _check_split(split)
        if same_family_share is not None and not 0 <= same_family_share <= 1:
            raise ValueError(f"same_family_share must be in [0, 1], got {same_family_share}")
        self.dataset = TrajectoryDataset(path)
        self.split, self.seed, self.same_family_share = split, seed, same_family_share
        t = self.dataset.load(split)
        rows = build_triplet_rows(t, self.dataset.policies, split,
                                  self.dataset.manifest["samples_per_policy"], seed,
                                  same_family_share)
        order = np.random.default_rng([seed, 0x7E]).permutation(len(rows["a"]))
        rows = {k: v[order] for k, v in rows.items()}
        families = np.array([p["family"] for p in self.dataset.policies], dtype=object)
        ids = self.dataset.policy_ids
        self.prompt = _Rows(t.prompts, rows["ref"])
        self.reference = _Rows(t.responses, rows["ref"])
        self.positive = _Rows(t.responses, rows["pos"])
        self.negative = _Rows(t.responses, rows["neg"])
        self.policy_a, self.policy_b = ids[rows["a"]], ids[rows["b"]]
        self.same_family = families[rows["a"]] == families[rows["b"]]
        self.prompt_id = t.prompt_id[rows["ref"]]
        self._rows = rows
        self._lengths = (t.prompts.lengths(), t.responses.lengths())

    def __len__(self) -> int:
        return len(self.policy_a)

    def __getitem__(self, i: int) -> Triplet:
        if not -len(self) <= i < len(self):
            raise IndexError(f"triplet {i} out of range: split {self.split!r} holds {len(self)}")
        i = i % len(self)
        return Triplet(i, int(self.prompt_id[i]), str(self.policy_a[i]), str(self.policy_b[i]),
                       bool(self.same_family[i]), self.prompt[i], self.reference[i],
                       self.positive[i], self.negative[i])

    def tokens(self, ids, wrapper: str = "sft", system_len: int | None = None) -> np.ndarray:
        """RM tokens of each triplet (chosen + rejected sequence) under template ``ids``."""
        from polar_scaling.template import RESERVED

        p_len, r_len = self._lengths
        p = p_len[self._rows["ref"]]
        ref, pos, neg = (r_len[self._rows[k]] for k in ("ref", "pos", "neg"))
        if ids.max_response_length is not None:
            ref, pos, neg = (np.minimum(x, ids.max_response_length) for x in (ref, pos, neg))
        head = 0 if system_len is None else system_len + len(ids.newline)
        fixed = head + len(ids.separator) + 1 + (2 * len(ids.newline) if wrapper == "sft" else 0)

        def one(cand):
            prompt = p
            if ids.max_length is not None:
                budget = np.maximum((ids.max_length - RESERVED - head - ref - cand) // 2, 0)
                prompt = np.minimum(p, budget)
            return fixed + 2 * prompt + ref + cand

        return one(pos) + one(neg)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[range]:
        """Index ranges of consecutive batches from ``start``; the last may be short; never wraps."""
        for lo in range(start, len(self), batch_size):
            yield range(lo, min(lo + batch_size, len(self)))


def build_triplet_rows(t: Trajectories, policies: Sequence[dict], split: str,
                       samples_per_policy: int, seed: int,
                       same_family_share: float | None) -> dict[str, np.ndarray]:
    """Row indices (ref, pos, neg) and policy indices (a, b) of every triplet of ``split``,
    grouped by prompt (see the module docstring). Deterministic in ``seed``."""
    heldout = np.array([p["split"] == "heldout" for p in policies])
    members = np.nonzero(~heldout)[0] if split != "heldout_policies" else np.arange(len(policies))
    if len(members) < 2:
        raise DatasetError(f"split {split!r} has {len(members)} polic"
                           f"{'y' if len(members) == 1 else 'ies'}; a triplet needs two")
    family = np.array([policies[i]["family"] for i in members], dtype=object)
    keep = t.policy_index >= 0
    pid, pol, smp = t.prompt_id[keep], t.policy_index[keep], t.sample[keep]
    row = np.nonzero(keep)[0]
    prompts, p_pos = np.unique(pid, return_inverse=True)
    local = np.full(len(policies), -1)
    local[members] = np.arange(len(members))
    grid = np.full((len(prompts), len(members), samples_per_policy), -1, dtype=np.int64)
    ok = local[pol] >= 0
    grid[p_pos[ok], local[pol[ok]], smp[ok]] = row[ok]
    out: dict[str, list] = {k: [] for k in ("ref", "pos", "neg", "a", "b")}
    for j, prompt in enumerate(prompts.tolist()):
        rng = np.random.default_rng([seed, prompt])
        for r in range(samples_per_policy // 3):
            sigma = draw_negatives(family, same_family_share, rng)
            a = np.nonzero(sigma >= 0)[0]
            b = sigma[a]
            if split == "heldout_policies":
                involved = heldout[members[a]] | heldout[members[b]]
                a, b = a[involved], b[involved]
            ref, pos, neg = grid[j, a, 3 * r], grid[j, a, 3 * r + 1], grid[j, b, 3 * r + 2]
            full = (ref >= 0) & (pos >= 0) & (neg >= 0)
            for k, v in (("ref", ref), ("pos", pos), ("neg", neg), ("a", members[a]),
                         ("b", members[b])):
                out[k].append(v[full])
    return {k: np.concatenate(v).astype(np.int64) if v else np.zeros(0, dtype=np.int64)
            for k, v in out.items()}


def responses_needed(tokens_budget: float, prompt_tokens: float, response_tokens: float,
                     wrapper: str = "sft") -> int:
    """Trajectories a budget of ``tokens_budget`` RM tokens consumes without repeating data.

    A triplet is two RM sequences ``prompt [\\n] ref <|reward|> prompt [\\n] cand <|reward|>``
    and uses three trajectories; lengths are means (after truncation).
    """
    per_seq = 2 * prompt_tokens + 2 * response_tokens + 2 + (2 if wrapper == "sft" else 0)
    triplets = int(np.ceil(tokens_budget / (2 * per_seq)))
    return 3 * triplets


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
