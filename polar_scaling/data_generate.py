"""``polar-train generate [CONFIG] [key=value ...] --run-dir DIR``: write a trajectory dataset.

Every policy of the pool writes ``samples_per_policy`` responses to every prompt of its splits
(layout and splits: :mod:`polar_scaling.data`). The work is cut into shards of
``shard_prompts`` prompts; a shard's content depends only on the config and its index
(sampling is seeded per (shard, policy), one CPU thread per process), so shards are
byte-identical however the run is split across restarts and workers.

Resume: a shard is written to ``*.tmp``, renamed, then recorded with its sha256 in
``manifest.json`` (itself replaced atomically). A restart re-checks every recorded shard (a
mismatch is an error naming the shard; nothing is deleted), drops leftover ``*.tmp`` files and
rewrites shards that were renamed but not yet recorded. Finally the pool's true KL matrix is
estimated on held-out prompts (``kl.parquet``).

Parts (``--part I/N``, then ``--finalize N``): the same dataset written by N processes or
Slurm jobs. Part I writes shards I, I+N, I+2N, ... (round robin, so the costlier held-out
splits spread over the parts) into the same directory and records them, with their sha256, in
``parts/part-IIIII-of-NNNNN.json``; a part that is run again keeps the shards it (or any
earlier run) recorded and that still verify. ``--finalize N`` checks every shard against the
part records (a missing or corrupt one is an error naming its part; nothing is written or
deleted), then writes the tokenizer, the KL table and ``manifest.json``, the same manifest a
single process writes (the shards' ``seconds`` aside).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from polar_scaling.config import check, default_dict, load_config, to_dict
from polar_scaling.data import (
    FORMAT,
    MANIFEST,
    SPLITS,
    DatasetError,
    read_manifest,
    sha256_file,
    verify_shard,
    write_json_atomic,
)
from polar_scaling.errors import StageError
from polar_scaling.policies import SamplingConfig
from polar_scaling.rundir import RunDir, RunDirError
from polar_scaling.world import CORPUS_ID, WorldConfig, derive_seed, pool_specs

RUNTIME_KEYS = ("workers", "progress")  # may change between restarts: no effect on content
PARTS = "parts"  # part records of a dataset written in parts (--part I/N)


@dataclass
class PromptArgs:
    source: Literal["corpus", "jsonl"] = "corpus"
    path: str | None = None  # the JSONL file ({"prompt": ...} per line) when source=jsonl
    train: int = field(default=1000, metadata={"ge": 1})
    heldout_prompts: int = field(default=100, metadata={"ge": 0})
    heldout_policies: int = field(default=100, metadata={"ge": 0})
    min_len: int = field(default=8, metadata={"ge": 1})  # corpus prompts: prefix lengths
    max_len: int = field(default=24, metadata={"ge": 1})

    def __post_init__(self):
        check(self.min_len <= self.max_len, "max_len", f"must be >= min_len ({self.min_len})")
        check(self.source != "jsonl" or bool(self.path), "path", "required when source=jsonl")

    @property
    def total(self) -> int:
        return self.train + self.heldout_prompts + self.heldout_policies


@dataclass
class LocalPolicyArgs:
    path: str
    id: str | None = None  # default: the folder name
    family: str = ""
    heldout: bool = False


@dataclass
class LocalPoolArgs:
    """Real causal-LM folders (``pool: local``); prompts must then come from a JSONL file."""

    policies: list[LocalPolicyArgs] = field(default_factory=list)
    tokenizer: str | None = None  # the dataset's (the RM's) tokenizer; default: first policy's
    trust_remote_code: bool = False
    device: str = "cpu"
    dtype: str | None = None


@dataclass
class KLArgs:
    enabled: bool = True
    prompts: int = field(default=32, metadata={"ge": 1})
    samples_per_prompt: int = field(default=2, metadata={"ge": 1})


@dataclass
class GenerateArgs:
    pool: Literal["synthetic", "local"] = "synthetic"
    world: WorldConfig = field(default_factory=WorldConfig)
    local: LocalPoolArgs = field(default_factory=LocalPoolArgs)
    prompts: PromptArgs = field(default_factory=PromptArgs)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    samples_per_policy: int = field(default=3, metadata={"ge": 3})  # 3 per triplet round
    shard_prompts: int = field(default=200, metadata={"ge": 1})
    kl: KLArgs = field(default_factory=KLArgs)
    seed: int = 0  # prompts and sampling (world.seed fixes the weights)
    workers: int = field(default=2, metadata={"ge": 1})  # processes, one CPU thread each
    progress: bool = True

    def __post_init__(self):
        check(self.pool != "local" or self.prompts.source == "jsonl", "prompts.source",
              "must be jsonl for a local pool")


def identity(args: GenerateArgs) -> dict:
    """The config keys that decide the dataset's content."""
    return {k: v for k, v in to_dict(args).items() if k not in RUNTIME_KEYS}


def plan_shards(args: GenerateArgs) -> list[dict]:
    """The shards of a config: split, prompt-id range and file, in generation order."""
    shards, lo = [], 0
    for split in SPLITS:
        hi = lo + getattr(args.prompts, split)
        for start in range(lo, hi, args.shard_prompts):
            i = len(shards)
            shards.append({"index": i, "file": f"shards/shard-{i:05d}.parquet", "split": split,
                           "prompts": [start, min(start + args.shard_prompts, hi)],
                           "status": "pending"})
        lo = hi
    return shards


def prompt_splits(args: GenerateArgs) -> dict[str, list[int]]:
    out, lo = {}, 0
    for split in SPLITS:
        out[split] = [lo, lo + getattr(args.prompts, split)]
        lo += getattr(args.prompts, split)
    return out


def prompts_needed(tokens_budget: float, args: GenerateArgs, wrapper: str = "sft",
                   response_fill: float = 0.94) -> int:
    """Train prompts whose triplets hold about ``tokens_budget`` RM tokens (an estimate).

    Each train prompt yields one triplet per train policy and round of three samples; a
    triplet's tokens follow :func:`polar_scaling.data.responses_needed` with the mean prompt
    length and ``response_fill`` x ``max_new_tokens`` per response (0.94 in the default world).
    Triplets are never repeated, so check the exact ``TripletSource.tokens`` before training.
    """
    from polar_scaling.data import responses_needed

    if args.pool != "synthetic":
        raise ValueError("prompts_needed estimates lengths of the synthetic world only")
    train = sum(s.split == "train" for s in pool_specs(args.world))
    per_prompt = train * (args.samples_per_policy // 3)
    if per_prompt == 0:
        raise ValueError("the pool has no training policy")
    mean_prompt = (args.prompts.min_len + args.prompts.max_len) / 2
    mean_response = response_fill * args.sampling.max_new_tokens
    triplets = responses_needed(tokens_budget, mean_prompt, mean_response, wrapper) // 3
    return int(np.ceil(triplets / per_prompt))


def run(config_path: Path | None, overrides: list[str], run_dir: Path,
        part: tuple[int, int] | None = None, finalize: int | None = None) -> dict:
    """The stage: the whole dataset, or part ``part = (I, N)`` of it, or (``finalize = N``)
    the manifest of a dataset whose N parts are written."""
    args = load_config(GenerateArgs, config_path, overrides)
    if part is not None and finalize is not None:
        raise StageError("give either --part or --finalize, not both")
    if part is not None:
        return generate_part(args, Path(run_dir), *part)
    if finalize is not None:
        return finalize_parts(args, Path(run_dir), finalize)
    return generate(args, Path(run_dir))


def generate(args: GenerateArgs, run_dir: Path) -> dict:
    """Write (or finish) the dataset of ``args`` in ``run_dir``; returns the summary."""
    runtime, rd = _open(args, run_dir)
    with rd.exclusive():  # a second whole-dataset or finalize process is refused
        return _write_dataset(args, run_dir, runtime, rd)


def _write_dataset(args: GenerateArgs, run_dir: Path, runtime, rd: RunDir) -> dict:
    if (run_dir / MANIFEST).is_file():
        manifest = read_manifest(run_dir)
        plan = plan_shards(args)
        for i, shard in enumerate(manifest["shards"]):
            if shard["status"] == "done" and (run_dir / shard["file"]).is_file():
                verify_shard(run_dir, shard)
            elif shard["status"] == "done":  # recorded, then deleted: it is written again
                manifest["shards"][i] = plan[i]
    else:
        manifest = new_manifest(args, runtime)
    for index, entry in _part_records(run_dir).items():  # shards parts of this dataset wrote
        if manifest["shards"][index]["status"] != "done" and _verified(run_dir, entry):
            manifest["shards"][index] = entry
    (run_dir / "shards").mkdir(exist_ok=True)
    for tmp in (run_dir / "shards").glob("*.tmp"):
        tmp.unlink()  # a shard being written when the last run stopped; it is rewritten
    if not (run_dir / "tokenizer" / "tokenizer_config.json").is_file():
        runtime.save_tokenizer(run_dir / "tokenizer")
    write_json_atomic(run_dir / MANIFEST, manifest)

    started = time.perf_counter()
    todo = [s for s in manifest["shards"] if s["status"] != "done"]

    def save(entry):
        manifest["shards"][entry["index"]] = entry
        write_json_atomic(run_dir / MANIFEST, manifest)

    made = _generate_shards(args, runtime, run_dir, todo, save)
    if args.kl.enabled and not manifest.get("kl"):
        manifest["kl"] = _write_kl(args, runtime, run_dir)
    manifest["complete"] = True
    write_json_atomic(run_dir / MANIFEST, manifest)
    summary = summarize(manifest, made, time.perf_counter() - started)
    rd.mark_done(summary)
    return summary


# --------------------------------------------------------------------------- parts


def part_shards(shards: list[dict], part: int, parts: int) -> list[dict]:
    """The shards part ``part`` of ``parts`` writes: every ``parts``-th from ``part``."""
    return [s for s in shards if s["index"] % parts == part]


def part_record(run_dir: Path, part: int, parts: int) -> Path:
    return Path(run_dir) / PARTS / f"part-{part:05d}-of-{parts:05d}.json"


def check_parts(args: GenerateArgs, part: int | None, parts: int) -> list[dict]:
    """The config's shards, after checking that ``part``/``parts`` can split them."""
    shards = plan_shards(args)
    if parts < 1:
        raise StageError(f"a dataset is written in at least 1 part, got {parts}")
    if part is not None and not 0 <= part < parts:
        raise StageError(f"part {part}/{parts} is out of range: parts are numbered 0 to "
                         f"{parts - 1}")
    if parts > len(shards):
        raise StageError(f"{parts} parts for {len(shards)} shard(s): every part needs a shard; "
                         f"use at most {len(shards)} parts (or a smaller shard_prompts)")
    return shards


def generate_part(args: GenerateArgs, run_dir: Path, part: int, parts: int) -> dict:
    """Write the shards of part ``part`` of ``parts`` (see the module docstring) and their
    record; shards already recorded (by this part, another split or a single process) that
    verify are kept. Returns the part's summary."""
    shards = check_parts(args, part, parts)
    runtime, _ = _open(args, run_dir)
    mine = part_shards(shards, part, parts)
    known = _part_records(run_dir)
    if (run_dir / MANIFEST).is_file():
        known.update({s["index"]: s for s in read_manifest(run_dir)["shards"]
                      if s["status"] == "done"})
    entries = {}
    for shard in mine:
        entry = known.get(shard["index"])
        if entry is not None and (run_dir / entry["file"]).is_file():
            try:
                entries[shard["index"]] = verify_entry(run_dir, entry)
            except DatasetError as e:
                raise StageError(f"part {part}/{parts}: {e}") from None
    (run_dir / "shards").mkdir(exist_ok=True)
    (run_dir / PARTS).mkdir(exist_ok=True)
    todo = [s for s in mine if s["index"] not in entries]
    for shard in todo:  # only this part's: other parts may be writing theirs right now
        (run_dir / (shard["file"] + ".tmp")).unlink(missing_ok=True)
    record = {"format": FORMAT, "part": [part, parts], "config": identity(args),
              "shards": sorted(entries.values(), key=lambda e: e["index"]), "complete": False}
    path = part_record(run_dir, part, parts)
    write_json_atomic(path, record)

    def save(entry):
        record["shards"] = sorted([*record["shards"], entry], key=lambda e: e["index"])
        write_json_atomic(path, record)

    started = time.perf_counter()
    made = _generate_shards(args, runtime, run_dir, todo, save)
    record["complete"] = True
    write_json_atomic(path, record)
    out = summarize({"shards": record["shards"], "policies": runtime.policy_table()}, made,
                    time.perf_counter() - started)
    return {"part": f"{part}/{parts}", "record": str(path), **out}


def finalize_parts(args: GenerateArgs, run_dir: Path, parts: int) -> dict:
    """Check every shard of a dataset written in ``parts`` parts and write its manifest (and
    tokenizer, KL table, done.json). A shard that no part recorded, or whose file is missing or
    differs from its record, is a StageError naming the part; nothing is then written."""
    shards = check_parts(args, None, parts)
    from polar_scaling.pool import Runtime

    runtime = Runtime(args)
    if not (run_dir / "config.yaml").is_file():
        raise StageError(f"{run_dir} holds no part of this dataset; write the parts first "
                         f"(polar-train generate ... --part I/{parts})")
    _, rd = _open(args, run_dir, runtime)
    with rd.exclusive():
        return _finalize(args, run_dir, parts, shards, runtime, rd)


def _finalize(args: GenerateArgs, run_dir: Path, parts: int, shards: list[dict], runtime,
              rd: RunDir) -> dict:
    known = _part_records(run_dir)
    old = read_manifest(run_dir) if (run_dir / MANIFEST).is_file() else {}
    for s in old.get("shards", []):
        if s["status"] == "done":
            known.setdefault(s["index"], s)
    manifest = new_manifest(args, runtime)
    problems: dict[int, list[str]] = {}  # part -> what is wrong with its shards
    for shard in shards:
        index, part = shard["index"], shard["index"] % parts
        entry = known.get(index)
        problem = "was never written" if entry is None else _problem(run_dir, entry)
        if problem:
            problems.setdefault(part, []).append(f"{shard['file']} {problem}")
        else:
            manifest["shards"][index] = entry
    if problems:
        # One line, the parts first: a sweep's status shows (300 characters of) the last line
        # of a failed job's error.
        lines = [f"part {part}/{parts}: {text}" for part, texts in sorted(problems.items())
                 for text in texts]
        raise StageError(
            f"cannot finalize: {'; '.join(lines)}. Rewrite them with `polar-train generate "
            f"CONFIG --run-dir DATA --part I/{parts}` for I in "
            f"{', '.join(map(str, sorted(problems)))} (delete a corrupt shard first), then "
            f"finalize again; nothing was deleted (DATA: {run_dir})")
    if not (run_dir / "tokenizer" / "tokenizer_config.json").is_file():
        runtime.save_tokenizer(run_dir / "tokenizer")
    started = time.perf_counter()
    kl = old.get("kl")
    if args.kl.enabled and not (kl and _verified(run_dir, kl)):
        kl = _write_kl(args, runtime, run_dir)
    manifest["kl"] = kl if args.kl.enabled else None
    manifest["complete"] = True
    write_json_atomic(run_dir / MANIFEST, manifest)
    made = {"shards": 0, "trajectories": 0, "seconds": 0.0}
    summary = summarize(manifest, made, time.perf_counter() - started)
    summary["parts"] = parts
    rd.mark_done(summary)
    return summary


def verify_entry(run_dir: Path, entry: dict) -> dict:
    """``entry`` (a shard or the KL table) if its file's sha256 matches, else DatasetError."""
    problem = _problem(run_dir, entry)
    if problem:
        raise DatasetError(f"{Path(run_dir) / entry['file']} {problem}")
    return entry


def _problem(run_dir: Path, entry: dict) -> str | None:
    path = Path(run_dir) / entry["file"]
    if not path.is_file():
        return "is missing"
    if sha256_file(path) != entry["sha256"]:
        return "is corrupt (its sha256 differs from the one recorded when it was written)"
    return None


def _verified(run_dir: Path, entry: dict) -> bool:
    return _problem(run_dir, entry) is None


def _part_records(run_dir: Path) -> dict[int, dict]:
    """Shard entries recorded by the parts found in ``run_dir/parts`` (not yet verified)."""
    import json

    out = {}
    for path in sorted((Path(run_dir) / PARTS).glob("part-*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: unreadable part record ({e})") from None
        for entry in record.get("shards", []):
            out.setdefault(entry["index"], entry)
    return out


def _open(args: GenerateArgs, run_dir: Path, runtime=None):
    """The pool runtime (which validates the pool and prompts) and the initialised run
    directory; nothing is written when the config is bad."""
    from polar_scaling.pool import Runtime

    runtime = runtime or Runtime(args)
    try:
        rd = RunDir(run_dir)
        # a dataset written before a world key existed reopens while the key is at its default
        rd.init(identity(args), "generate", defaults=default_dict(GenerateArgs))
    except RunDirError as e:
        raise StageError(str(e)) from None
    return runtime, rd


def new_manifest(args: GenerateArgs, runtime) -> dict:
    return {"format": FORMAT, "pool": args.pool, "config": identity(args),
            "token_ids": runtime.token_ids(), "policies": runtime.policy_table(),
            "samples_per_policy": args.samples_per_policy, "prompt_splits": prompt_splits(args),
            "shards": plan_shards(args), "kl": None, "complete": False}


def summarize(manifest: dict, made: dict, seconds: float) -> dict:
    shards = manifest["shards"]
    out = {"shards": len(shards), "shards_written_now": made["shards"],
           "trajectories": sum(s["trajectories"] for s in shards),
           "response_tokens": sum(s["response_tokens"] for s in shards),
           "seconds": round(seconds, 2),
           "trajectories_per_second": round(made["trajectories"] / made["seconds"], 1)
           if made["seconds"] > 0 else None,
           "policies": len(manifest["policies"])}
    for split in SPLITS:
        out[f"{split}_trajectories"] = sum(s["trajectories"] for s in shards
                                           if s["split"] == split)
    if manifest.get("kl"):
        out["kl"] = manifest["kl"]["summary"]
    return out


# --------------------------------------------------------------------------- shards


def make_shard(runtime, shard: dict) -> tuple[object, dict]:
    """The shard's table (pyarrow) and its counts; the same for the same config and index."""
    import pyarrow as pa

    n = runtime.args.samples_per_policy
    sp = runtime.prompts_for(shard)
    cols: dict[str, list] = defaultdict(list)
    ragged: dict[str, list] = {"prompt_ids": [], "response_ids": []}

    def add(pid, policy_id, index, family, seed, sample, prompt, response, ended):
        for k, v in (("prompt_id", pid), ("policy_id", policy_id), ("policy_index", index),
                     ("family", family), ("seed", seed), ("sample", sample), ("ended", ended)):
            cols[k].append(v)
        ragged["prompt_ids"].append(prompt)
        ragged["response_ids"].append(response)

    if sp.docs is not None:
        seed = runtime.corpus_seed(shard)
        for pid, prompt, doc in zip(sp.ids, sp.tokens, sp.docs, strict=True):
            add(pid, CORPUS_ID, -1, CORPUS_ID, seed, 0, prompt, doc[len(prompt):], False)
    tokens = 0
    for index in runtime.writers(shard["split"]):
        spec = runtime.specs[index]
        seed = derive_seed(runtime.seed, "sample", shard["index"], spec["policy_id"])
        responses, ended = runtime.generate(index, sp, n, seed)
        for k, (resp, end) in enumerate(zip(responses, ended, strict=True)):
            add(sp.ids[k // n], spec["policy_id"], index, spec["family"], seed, k % n,
                sp.tokens[k // n], resp, end)
            tokens += len(resp)
    table = pa.table({
        "prompt_id": pa.array(cols["prompt_id"], pa.int64()),
        "policy_id": pa.array(cols["policy_id"], pa.string()),
        "policy_index": pa.array(cols["policy_index"], pa.int32()),
        "family": pa.array(cols["family"], pa.string()),
        "seed": pa.array(cols["seed"], pa.int64()),
        "sample": pa.array(cols["sample"], pa.int32()),
        "prompt_ids": _list_array(ragged["prompt_ids"]),
        "response_ids": _list_array(ragged["response_ids"]),
        "ended": pa.array(cols["ended"], pa.bool_()),
    })
    trajectories = sum(1 for i in cols["policy_index"] if i >= 0)
    return table, {"rows": table.num_rows, "trajectories": trajectories,
                   "response_tokens": tokens}


def write_shard(runtime, run_dir: Path, shard: dict) -> dict:
    """Make one shard, write it to ``*.tmp`` and rename it; returns its manifest entry."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    table, counts = make_shard(runtime, shard)
    final = run_dir / shard["file"]
    tmp = final.with_name(final.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    tmp.replace(final)
    return {**shard, **counts, "sha256": digest, "status": "done",
            "seconds": round(time.perf_counter() - t0, 3)}


def _list_array(seqs: list[list[int]]):
    import pyarrow as pa

    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _generate_shards(args, runtime, run_dir: Path, todo: list[dict], save) -> dict:
    """Write the ``todo`` shards (in ``args.workers`` processes); ``save(entry)`` records
    each as it is done (in this process)."""
    from tqdm import tqdm

    total = sum(runtime.trajectories_in(s) for s in todo)
    made = {"shards": 0, "trajectories": 0, "seconds": 0.0}
    if not todo:
        return made
    bar = tqdm(total=total, unit="traj", unit_scale=True, disable=not args.progress,
               desc="generate", dynamic_ncols=True)
    t0 = time.perf_counter()

    def record(entry):
        save(entry)
        made["shards"] += 1
        made["trajectories"] += entry["trajectories"]
        bar.update(entry["trajectories"])
        bar.set_postfix(shards=f"{made['shards']}/{len(todo)}")

    try:
        if args.workers == 1 or len(todo) == 1:
            with runtime.single_thread():
                for shard in todo:
                    record(write_shard(runtime, run_dir, shard))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            from polar_scaling import pool

            with ProcessPoolExecutor(max_workers=min(args.workers, len(todo)),
                                     mp_context=mp.get_context("spawn"),
                                     initializer=pool.init_worker,
                                     initargs=(to_dict(args),)) as ex:
                futures = [ex.submit(pool.worker_shard, str(run_dir), s) for s in todo]
                for fut in as_completed(futures):
                    record(fut.result())
    finally:
        bar.close()
    made["seconds"] = time.perf_counter() - t0
    return made


def _write_kl(args, runtime, run_dir: Path) -> dict | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from polar_scaling.kl import summarize_kl

    rows = runtime.kl_rows()
    if rows is None:
        return None
    file = run_dir / "kl.parquet"
    tmp = file.with_name(file.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp, compression="zstd")
    tmp.replace(file)
    return {"file": file.name, "sha256": sha256_file(file), "summary": summarize_kl(rows),
            "prompts": args.kl.prompts, "samples_per_prompt": args.kl.samples_per_prompt,
            "distribution": "full (temperature 1, no top-k/top-p)"}


__all__ = ["GenerateArgs", "DatasetError", "generate", "generate_part", "finalize_parts", "run",
           "plan_shards", "part_shards", "make_shard", "prompts_needed"]
