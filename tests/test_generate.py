"""The generate stage: determinism, resume after a kill, bad input, local pools, the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_world import TINY_GENERATE, tiny_args

from polar_scaling.cli import train_main
from polar_scaling.config import merge
from polar_scaling.data import TripletSource, read_manifest
from polar_scaling.data_generate import (
    finalize_parts,
    generate,
    generate_part,
    part_shards,
    plan_shards,
)
from polar_scaling.errors import StageError
from polar_scaling.tokenizer import content_char

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def files(path: Path) -> dict[str, bytes]:
    """Every shard and the KL table (if any), by name."""
    out = {p.name: p.read_bytes() for p in sorted((path / "shards").glob("*.parquet"))}
    if (path / "kl.parquet").is_file():
        out["kl.parquet"] = (path / "kl.parquet").read_bytes()
    return out


def snapshot(path: Path) -> dict[str, bytes]:
    """The dataset's files (not .lock, which names whichever process last held the run)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_generation_is_deterministic(tiny_dataset, tmp_path):
    summary = generate(tiny_args(), tmp_path / "again")
    assert files(tmp_path / "again") == files(tiny_dataset)
    assert summary["trajectories"] == 2 * 8 * 18 + 6 * 18 + 6 * 27
    assert summary["train_trajectories"] == 16 * 18
    other = generate(tiny_args("seed=1"), tmp_path / "seed1")
    assert files(tmp_path / "seed1")["shard-00000.parquet"] != \
        files(tiny_dataset)["shard-00000.parquet"]
    assert other["kl"]["within"]["kl_per_token"] < other["kl"]["across"]["kl_per_token"]


def test_kill_then_resume_gives_byte_identical_shards(tmp_path):
    overrides = ["prompts.train=32", "shard_prompts=4", "sampling.max_new_tokens=8",
                 "kl.enabled=false"]
    cfg_file = tmp_path / "gen.yaml"
    cfg_file.write_text(yaml.safe_dump(merge(TINY_GENERATE, {
        "prompts": {"train": 32}, "shard_prompts": 4, "sampling": {"max_new_tokens": 8},
        "kl": {"enabled": False}})))
    reference = tmp_path / "reference"
    generate(tiny_args(*overrides), reference)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "polar_scaling.cli", "generate", str(cfg_file),
                             "--run-dir", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                shards = json.loads((killed / "manifest.json").read_text())["shards"]
            except (FileNotFoundError, json.JSONDecodeError):
                shards = []
            if any(s["status"] == "done" for s in shards):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    manifest = read_manifest(killed)
    done = sum(s["status"] == "done" for s in manifest["shards"])
    assert 1 <= done < len(manifest["shards"]) and not manifest["complete"]
    assert not (killed / "done.json").exists()

    # resume with two worker processes: shards must not depend on how the work was split
    summary = generate(tiny_args(*overrides, "workers=2"), killed)
    assert summary["shards_written_now"] == len(manifest["shards"]) - done
    assert files(killed) == files(reference)
    assert read_manifest(killed)["shards"][0]["sha256"] == read_manifest(reference)["shards"][0][
        "sha256"]
    assert not list((killed / "shards").glob("*.tmp"))


def test_restart_rewrites_unrecorded_and_temporary_shards(tiny_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    manifest = read_manifest(copy)
    # shard 1 was renamed but the manifest never recorded it (killed in between), shard 2
    # was being written
    manifest["shards"][1]["status"] = "pending"
    manifest["complete"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "shards" / "shard-00001.parquet").write_bytes(b"half a shard")
    (copy / "shards" / "shard-00002.parquet").rename(copy / "shards" / "shard-00002.parquet.tmp")
    manifest["shards"][2]["status"] = "pending"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "done.json").unlink()
    summary = generate(tiny_args(), copy)
    assert summary["shards_written_now"] == 2
    assert files(copy) == files(tiny_dataset)
    assert not list((copy / "shards").glob("*.tmp"))


def test_corrupt_recorded_shard_is_an_error_and_nothing_is_lost(tiny_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    shard = copy / "shards" / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    before = snapshot(copy)
    with pytest.raises(StageError, match=r"shard .*shard-00000\.parquet is corrupt"):
        generate(tiny_args(), copy)
    assert snapshot(copy) == before


def test_another_config_on_the_same_dataset_is_refused(tiny_dataset):
    before = snapshot(tiny_dataset)
    with pytest.raises(StageError, match=r"differs in: .*world\.seed"):
        generate(tiny_args("world.seed=7"), tiny_dataset)
    # runtime-only keys may change between restarts
    generate(tiny_args("workers=3", "progress=true"), tiny_dataset)
    assert snapshot(tiny_dataset).keys() == before.keys()
    assert files(tiny_dataset) == {k.split("/")[-1]: v for k, v in before.items()
                                   if k.endswith(".parquet")}


@pytest.mark.parametrize("overrides, message", [
    (["world.families=0", "prompts.heldout_policies=0"], "the pool is empty"),
    (["world.families=1", "world.members_per_family=1", "world.heldout_members_per_family=0",
      "prompts.heldout_policies=0"], "1 training policy .*no negatives are possible"),
    (["world.families=2", "world.members_per_family=2", "world.heldout_families=1"],
     "1 training policy"),
    (["world.heldout_members_per_family=0"], "no policy is held out"),
    (["prompts.source=jsonl", "prompts.path=/nonexistent/prompts.jsonl"],
     "prompts file not found: /nonexistent/prompts.jsonl"),
])
def test_bad_input_is_a_clear_error_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(StageError, match=message):
        generate(tiny_args(*overrides), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_input_on_an_existing_dataset_loses_nothing(tiny_dataset):
    before = snapshot(tiny_dataset)
    with pytest.raises(StageError, match="prompts file not found"):
        generate(tiny_args("prompts.source=jsonl", "prompts.path=missing.jsonl"), tiny_dataset)
    assert snapshot(tiny_dataset) == before


def test_jsonl_prompts_in_the_synthetic_world(tmp_path):
    path = tmp_path / "prompts.jsonl"
    texts = ["".join(content_char(j) for j in range(i % 5 + 1)) for i in range(12)]
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    args = tiny_args("prompts.source=jsonl", f"prompts.path={path}", "prompts.train=8",
                     "prompts.heldout_prompts=2", "prompts.heldout_policies=2")
    generate(args, tmp_path / "out")
    source = TripletSource(tmp_path / "out", "heldout_prompts")
    from polar_scaling.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert {tok.decode(source[i].prompt) for i in range(len(source))} == set(texts[8:10])
    path.write_text(json.dumps({"prompt": "ok <tag>"}) + "\n")
    with pytest.raises(StageError, match="holds 1 prompts; the splits need 12"):
        generate(args, tmp_path / "short")
    with pytest.raises(StageError, match="prompt 1 has characters outside"):
        generate(tiny_args("prompts.source=jsonl", f"prompts.path={path}", "prompts.train=1",
                           "prompts.heldout_prompts=0", "prompts.heldout_policies=0"),
                 tmp_path / "alien")


def test_local_folder_pool(tmp_path):
    from test_policies import save_tiny_local_model

    for i in range(3):
        save_tiny_local_model(tmp_path / f"m{i}", seed=i)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in
                               ["abc", "bad", "cafe", "dig", "head", "jab"]))
    local = {"policies": [{"path": str(tmp_path / "m0"), "family": "x"},
                          {"path": str(tmp_path / "m1"), "family": "x"},
                          {"path": str(tmp_path / "m2"), "family": "y", "heldout": True}]}
    args = tiny_args("pool=local", "prompts.source=jsonl", f"prompts.path={prompts}",
                     "prompts.train=4", "prompts.heldout_prompts=1", "prompts.heldout_policies=1",
                     f"local={json.dumps(local)}")
    summary = generate(args, tmp_path / "out")
    assert summary["policies"] == 3 and summary["train_trajectories"] == 4 * 2 * 3
    m = read_manifest(tmp_path / "out")
    assert [p["policy_id"] for p in m["policies"]] == ["m0", "m1", "m2"]
    assert len(TripletSource(tmp_path / "out", "train")) == 4 * 2
    assert len(TripletSource(tmp_path / "out", "heldout_policies")) >= 1
    assert summary["kl"]["within"]["pairs"] == 2  # the three share one vocabulary
    from polar_scaling.tokenizer import load_tokenizer, reward_token_id

    tok = load_tokenizer(tmp_path / "out" / "tokenizer")  # the reward token was added
    assert reward_token_id(tok) == len(tok) - 1


def test_cli_runs_the_stage_and_reports_config_errors(tmp_path, capsys):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump(merge(TINY_GENERATE, {"kl": {"enabled": False}})))
    assert train_main(["generate", str(cfg), "--run-dir", str(tmp_path / "run")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == len(plan_shards(tiny_args())) and "kl" not in summary
    assert train_main(["generate", str(cfg), "sampling.top_q=1",
                       "--run-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "sampling.top_q" in err and "unknown key" in err
    assert train_main(["generate", str(cfg), "world.within_sigma=-1",
                       "--run-dir", str(tmp_path / "x")]) == 2
    assert "world.within_sigma: expected a value >= 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- parts


def manifest_without_timing(path: Path) -> dict:
    """The manifest with the shards' ``seconds`` (wall time of the writer) left out."""
    m = read_manifest(path)
    m["shards"] = [{k: v for k, v in s.items() if k != "seconds"} for s in m["shards"]]
    return m


def tree(path: Path, skip=("manifest.json", "done.json")) -> dict[str, bytes]:
    """Every file but the part records and the files with timings, by relative path."""
    return {k: v for k, v in snapshot(path).items()
            if not k.startswith("parts/") and k not in skip}


def test_parts_then_finalize_write_what_a_single_process_writes(tiny_dataset, tmp_path,
                                                                capsys):
    # 4 shards (train 2, heldout_prompts 1, heldout_policies 1) in 3 parts: {0, 3}, {1}, {2},
    # written out of order, one of them through the CLI, then finalized.
    assert [s["index"] for s in part_shards(plan_shards(tiny_args()), 0, 3)] == [0, 3]
    out = tmp_path / "parts"
    summary = generate_part(tiny_args(), out, 2, 3)
    assert summary["part"] == "2/3" and summary["shards_written_now"] == 1
    assert not (out / "manifest.json").exists() and not (out / "done.json").exists()
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump(TINY_GENERATE))
    assert train_main(["generate", str(cfg), "--run-dir", str(out), "--part", "0/3"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_written_now"] == 2
    generate_part(tiny_args("workers=2"), out, 1, 3)  # a runtime key may differ per part
    summary = finalize_parts(tiny_args(), out, 3)
    assert summary["parts"] == 3 and summary["trajectories"] == 2 * 8 * 18 + 6 * 18 + 6 * 27
    assert tree(out) == tree(tiny_dataset)  # shards, KL table, tokenizer, config: same bytes
    assert manifest_without_timing(out) == manifest_without_timing(tiny_dataset)
    assert sorted(p.name for p in (out / "parts").iterdir()) == [
        f"part-0000{i}-of-00003.json" for i in range(3)]
    # Finalizing again (a requeued finalize job) rewrites the same manifest.
    finalize_parts(tiny_args(), out, 3)
    assert manifest_without_timing(out) == manifest_without_timing(tiny_dataset)


def test_a_part_run_again_keeps_its_verified_shards_and_rewrites_lost_ones(tmp_path):
    out = tmp_path / "d"
    args = tiny_args("kl.enabled=false")
    generate_part(args, out, 0, 2)
    first = read_manifest_like(out / "parts" / "part-00000-of-00002.json")
    assert first["complete"] and [s["index"] for s in first["shards"]] == [0, 2]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = generate_part(args, out, 0, 2)
    assert again["shards_written_now"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == stamps
    # A part killed mid-way: one shard lost, one being written (*.tmp); the other part's
    # in-flight file is not this part's to delete.
    lost = out / "shards" / "shard-00002.parquet"
    data = lost.read_bytes()
    lost.rename(lost.with_name(lost.name + ".tmp"))
    foreign = out / "shards" / "shard-00001.parquet.tmp"
    foreign.write_bytes(b"being written by part 1")
    again = generate_part(args, out, 0, 2)
    assert again["shards_written_now"] == 1 and lost.read_bytes() == data
    assert not lost.with_name(lost.name + ".tmp").exists() and foreign.exists()
    foreign.unlink()
    # Parts of another split reuse what is recorded; a single process adopts the records too.
    assert generate_part(args, out, 1, 4)["shards_written_now"] == 1
    summary = generate(args, out)
    assert summary["shards_written_now"] == 1  # shard 3 only
    assert [s["status"] for s in read_manifest(out)["shards"]] == ["done"] * 4


def read_manifest_like(path: Path) -> dict:
    return json.loads(path.read_text())


def test_bad_parts_and_a_finalize_with_a_missing_or_corrupt_part(tmp_path, capsys):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump(merge(TINY_GENERATE, {"kl": {"enabled": False}})))
    out = tmp_path / "d"

    def cli(*flags):
        try:
            code = train_main(["generate", str(cfg), "--run-dir", str(out), *flags])
        except SystemExit as e:  # argparse refuses a malformed flag
            code = e.code
        return code, capsys.readouterr().err

    for flags, message in ((["--part", "3/3"], "part 3/3 is out of range"),
                           (["--part=-1/2"], "part -1/2 is out of range"),
                           (["--part", "two"], "expected I/N"),
                           (["--part", "0/5"], "5 parts for 4 shard"),
                           (["--finalize", "0"], "at least 1 part"),
                           (["--part", "0/2", "--finalize", "2"], "either --part or --finalize"),
                           (["--finalize", "2"], "holds no part of this dataset")):
        code, err = cli(*flags)
        assert code == 2 and message in err, (flags, err)
        assert not out.exists(), flags
    assert cli("--part", "0/2")[0] == 0
    before = snapshot(out)
    code, err = cli("--finalize", "2")
    assert code == 2, err
    assert "part 1/2: shards/shard-00001.parquet was never written" in err
    assert "part 0/2" not in err
    assert snapshot(out) == before  # nothing written, nothing deleted
    assert cli("--part", "1/2")[0] == 0
    shard = out / "shards" / "shard-00003.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    (out / "shards" / "shard-00000.parquet").unlink()
    before = snapshot(out)
    code, err = cli("--finalize", "2")
    assert code == 2
    assert "part 0/2: shards/shard-00000.parquet is missing; " in err
    assert "part 1/2: shards/shard-00003.parquet is corrupt" in err
    assert "for I in 0, 1" in err
    assert snapshot(out) == before
    # The part whose shard is corrupt refuses to go on, naming it; nothing is deleted.
    code, err = cli("--part", "1/2")
    assert code == 2 and re.search(r"part 1/2: \S+shard-00003\.parquet is corrupt", err), err
    assert snapshot(out) == before
    shard.unlink()  # as the message says: delete it, write the parts again, finalize
    assert cli("--part", "1/2")[0] == 0 and cli("--part", "0/2")[0] == 0
    assert cli("--finalize", "2")[0] == 0
    assert read_manifest(out)["complete"] and (out / "done.json").is_file()
