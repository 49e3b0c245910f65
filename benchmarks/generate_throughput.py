"""Trajectory generation speed of the default synthetic pool: batched vs one call per prompt.

Both sides use the same policies, prompts, sampling settings (HF ``generate``, temperature 1,
top-p 0.9, top-k 50, ``samples_per_policy`` samples per prompt) and one CPU thread:
- batched: what the generate stage does, all prompts of a shard in one left-padded call
  per policy;
- naive: one ``generate`` call per prompt (its samples together), the loop one writes first.
CPU seconds are reported beside wall seconds because the machine may be shared. ``--stage``
also runs the whole ``generate`` stage (corpus prompts, Parquet shards, manifest, with
``--workers`` processes) on a default-world dataset of ``--stage-prompts`` train prompts.

    .venv/bin/python benchmarks/generate_throughput.py [--prompts 200] [--naive-prompts 20]
        [--policies 4] [--stage] [--stage-prompts 400] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from polar_scaling.config import load_config  # noqa: E402
from polar_scaling.data_generate import GenerateArgs, generate  # noqa: E402
from polar_scaling.world import World, sample_prompts  # noqa: E402


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def measure(policies, prompts, n, seed, per_prompt: bool) -> dict:
    def run():
        out = []
        for i, p in enumerate(policies):
            if per_prompt:
                for j, x in enumerate(prompts):
                    out += p.generate([x], num_samples=n, seed=seed + 1000 * i + j)
            else:
                out += p.generate(prompts, num_samples=n, seed=seed + i)
        return out

    out, wall, cpu = timed(run)
    tokens = sum(len(r) for r in out)
    return {"trajectories": len(out), "tokens": tokens, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "traj_per_s": round(len(out) / wall, 1),
            "tokens_per_s": round(tokens / wall, 1),
            "traj_per_cpu_s": round(len(out) / cpu, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200, help="prompts for the batched side")
    ap.add_argument("--naive-prompts", type=int, default=20, help="prompts for the naive loop")
    ap.add_argument("--policies", type=int, default=4, help="policies timed on each side")
    ap.add_argument("--stage", action="store_true", help="also time the whole generate stage")
    ap.add_argument("--stage-prompts", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    cfg = load_config(GenerateArgs, None, [])
    world = World(cfg.world, cfg.sampling)
    policies = world.policies()[:args.policies]
    p = cfg.prompts
    prompts, _ = sample_prompts(world.corpus_policy(), args.prompts, p.min_len, p.max_len,
                                p.max_len, seed=args.seed)
    n = cfg.samples_per_policy
    policies[0].generate(prompts[:4], num_samples=n, seed=0)  # warm-up (lazy init, caches)

    batched = measure(policies, prompts, n, args.seed, per_prompt=False)
    naive = measure(policies, prompts[:args.naive_prompts], n, args.seed, per_prompt=True)
    result = {"pool": f"default world ({len(world.specs)} policies; {len(policies)} timed)",
              "samples_per_prompt": n, "max_new_tokens": cfg.sampling.max_new_tokens,
              "threads": 1, "batched": batched, "naive_per_prompt": naive,
              "speedup_traj_per_s": round(batched["traj_per_s"] / naive["traj_per_s"], 1),
              "speedup_traj_per_cpu_s": round(batched["traj_per_cpu_s"] /
                                              naive["traj_per_cpu_s"], 1)}
    if args.stage:
        with tempfile.TemporaryDirectory() as tmp:
            stage_cfg = load_config(GenerateArgs, None, [
                f"prompts.train={args.stage_prompts}", "prompts.heldout_prompts=0",
                "prompts.heldout_policies=0", "world.heldout_members_per_family=0",
                "kl.enabled=false", f"workers={args.workers}", "progress=false"])
            summary = generate(stage_cfg, Path(tmp) / "data")
        result["stage"] = {"workers": args.workers, "trajectories": summary["trajectories"],
                           "response_tokens": summary["response_tokens"],
                           "seconds": summary["seconds"],
                           "traj_per_s": summary["trajectories_per_second"]}
    print(json.dumps(result, indent=2))
    print(f"\nbatched   {batched['traj_per_s']:>9.1f} traj/s  {batched['tokens_per_s']:>10.1f} "
          f"tokens/s  ({batched['traj_per_cpu_s']:.1f} traj per CPU-second)")
    print(f"per-prompt{naive['traj_per_s']:>9.1f} traj/s  {naive['tokens_per_s']:>10.1f} "
          f"tokens/s  ({naive['traj_per_cpu_s']:.1f} traj per CPU-second)")
    print(f"ratio     {result['speedup_traj_per_s']:>9.1f}x wall, "
          f"{result['speedup_traj_per_cpu_s']:.1f}x CPU")
    if args.stage:
        s = result["stage"]
        print(f"stage     {s['traj_per_s']:>9.1f} traj/s end to end with {s['workers']} workers "
              f"({s['trajectories']} trajectories in {s['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
