"""Evidence that POLAR pre-training learns on the embedded world (issues 3 and 4).

    python benchmarks/pretrain_evidence.py [--sweep sweeps/tiny.yaml] [--out DIR] [--jobs 2]

Reuses a finished sweep (`make demo`: its dataset, its base LMs and its reward models at one
token budget, by default the largest, seed 0) and adds, at that same budget and config:
  - a random-init reward model per size (no `model.base`), and
  - a control per size given by --control-sizes (default the smallest): `control=shuffled`,
    from the same base LM, where each training pair's sides are swapped by a fair coin.
Prints four tables (Markdown) and writes DIR/evidence.json:
  1. held-out accuracy on held-out prompts and on held-out policies, the control beside them,
     and accuracy by bins of the true KL between the pair's two policies (eval_by_kl.json);
  2. final held-out loss per size at equal tokens, from the base LM and from random init;
  3. when each reward model leaves chance (first evaluation whose held-out accuracy is above
     chance by 3 standard errors, 0.5 + 1.5/sqrt(pairs)), as a share of its budget;
  4. the base LMs' held-out next-token loss per size.
This is a benchmark, not a test: it prints what it measures and judges nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

LN2 = math.log(2)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def evals(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [r for r in rows if "eval_loss" in r]


def left_chance(rows: list[dict], pairs: int, budget: float) -> dict:
    """First evaluation whose held-out accuracy is 3 standard errors above chance."""
    bar = 0.5 + 3 * 0.5 / math.sqrt(pairs)
    for r in rows:
        if r["eval_accuracy"] >= bar:
            return {"tokens": r["tokens"], "share": r["tokens"] / budget,
                    "accuracy": r["eval_accuracy"], "loss": r["eval_loss"], "bar": bar}
    return {"tokens": None, "share": None, "accuracy": None, "loss": None, "bar": bar}


def stage_config(config: dict, **changes) -> dict:
    cfg = json.loads(json.dumps(config))
    cfg.pop("stage", None)
    for dotted, value in changes.items():
        node = cfg
        *head, last = dotted.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return cfg


def train(run_dir: Path, config: dict, log: Path) -> float:
    """`polar-train pretrain` with ``config`` in ``run_dir`` (resumes; skips a finished run)."""
    if (run_dir / "done.json").is_file():
        return 0.0
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    with log.open("w") as f:
        rc = subprocess.call([sys.executable, "-m", "polar_scaling.cli", "pretrain", str(cfg_file),
                              "--run-dir", str(run_dir)], stdout=f, stderr=subprocess.STDOUT,
                             env=env)
    if rc:
        raise SystemExit(f"{run_dir} failed (exit {rc}); log: {log}")
    return time.time() - t0


def fmt(x, spec=".4f"):
    return "–" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", default="sweeps/tiny.yaml")
    p.add_argument("--out", type=Path, default=None, help="default: SWEEP_ROOT/evidence")
    p.add_argument("--sizes", nargs="*", default=None, help="default: every size of the sweep")
    p.add_argument("--control-sizes", nargs="*", default=None, help="default: the smallest")
    p.add_argument("--budget", type=float, default=None,
                   help="token budget of the compared runs (default: the sweep's largest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="training processes at once")
    args = p.parse_args()

    from polar_scaling.sweep.spec import load_sweep

    sweep = load_sweep(args.sweep)
    out = args.out or sweep.root / "evidence"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    runs = [r for r in sweep.runs if r.role == "run" and r.seed == args.seed]
    budget = args.budget or max(r.tokens for r in runs)
    rm = {r.size: r for r in runs if r.tokens == budget}
    sizes = args.sizes or sorted(rm, key=lambda s: rm[s].n_params)
    controls = args.control_sizes or sizes[:1]
    bases = {r.size: r for r in sweep.runs if r.role == "base"}
    run_dir = {s: sweep.root / "runs" / rm[s].run_id for s in sizes}
    missing = [str(d) for d in run_dir.values() if not (d / "done.json").is_file()]
    if missing:
        raise SystemExit("run the sweep first (make demo, or polar-sweep launch "
                         f"{args.sweep} --wait); unfinished: {', '.join(missing)}")

    jobs = []
    for s in sizes:
        cfg = yaml.safe_load((run_dir[s] / "config.yaml").read_text())
        jobs.append((out / f"scratch-{s}", stage_config(cfg, **{"model.base": None})))
        if s in controls:
            jobs.append((out / f"control-{s}", stage_config(cfg, control="shuffled")))
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as ex:
        walls = list(ex.map(lambda j: train(j[0], j[1], out / "logs" / f"{j[0].name}.log"), jobs))
    wall = time.time() - t0

    result = {"sweep": str(args.sweep), "budget_tokens": budget, "sizes": sizes,
              "wall_seconds_added_runs": round(wall, 1),
              "run_walls": {j[0].name: round(w, 1) for j, w in zip(jobs, walls, strict=True)}}

    # 1. accuracy on held-out prompts / policies, control beside, by KL bins
    print(f"## 1. Held-out accuracy at {budget:.3g} tokens (chance 50%; "
          f"control = shuffled sides)\n")
    print("| run | N (non-emb.) | held-out prompts: loss / acc | held-out policies: loss / acc |")
    print("| --- | --- | --- | --- |")
    table1 = []
    rows = [(f"{s} from base LM", run_dir[s], rm[s].n_params) for s in sizes]
    rows += [(f"{s} control (shuffled)", out / f"control-{s}", rm[s].n_params) for s in controls]
    rows += [(f"{s} random init", out / f"scratch-{s}", rm[s].n_params) for s in sizes]
    for label, d, n in rows:
        fe = read_json(d / "done.json")["final_eval"]
        table1.append({"run": label, "dir": str(d), "n_params": n, **fe})
        print(f"| {label} | {n:,} | {fe['eval_loss']:.4f} / {100 * fe['eval_accuracy']:.1f}% | "
              f"{fe['eval_heldout_policies_loss']:.4f} / "
              f"{100 * fe['eval_heldout_policies_accuracy']:.1f}% |")
    result["accuracy"] = table1

    print("\nAccuracy by bins of true KL (nats per sequence) between the pair's two policies, "
          "final evaluation:\n")
    by_kl = {}
    for label, d, _ in rows:
        k = read_json(d / "eval_by_kl.json")
        if not k:
            continue
        by_kl[label] = k
        for split, bins in k.items():
            cells = " | ".join(f"{100 * b['accuracy']:.1f}% (n={b['n']})" for b in bins)
            if label == rows[0][0] and split == "eval":
                heads = " | ".join(f"KL {b['kl_lo']:.3g}–{b['kl_hi']:.3g}" for b in bins)
                print(f"| run | split | {heads} |")
                print("| --- | --- |" + " --- |" * len(bins))
            print(f"| {label} | {split} | {cells} |")
    result["accuracy_by_kl"] = by_kl

    # 2. equal-budget final loss: base vs random init
    print(f"\n## 2. Final held-out loss at {budget:.3g} tokens per size\n")
    print("| size | N (non-emb.) | from base LM | random init |")
    print("| --- | --- | --- | --- |")
    table2 = []
    for s in sizes:
        b = read_json(run_dir[s] / "done.json")["final_eval"]["eval_loss"]
        r = read_json(out / f"scratch-{s}" / "done.json")["final_eval"]["eval_loss"]
        table2.append({"size": s, "n_params": rm[s].n_params, "base": b, "scratch": r})
        print(f"| {s} | {rm[s].n_params:,} | {b:.4f} | {r:.4f} |")
    dec = all(a["base"] > b["base"] for a, b in zip(table2, table2[1:], strict=False))
    print(f"\nfrom base LM, strictly decreasing with size: {dec}")
    result["equal_budget"] = {"rows": table2, "base_strictly_decreasing": dec}

    # 3. leaving chance
    print("\n## 3. Leaving chance: first evaluation with held-out accuracy ≥ "
          "0.5 + 3·0.5/sqrt(pairs)\n")
    print("| run | pairs | bar | tokens | share of budget | accuracy / loss there |")
    print("| --- | --- | --- | --- | --- | --- |")
    table3 = []
    for label, d, _ in rows:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        pairs = int(cfg["data"]["eval_pairs"])
        lc = left_chance(evals(d), pairs, float(cfg["budget"]["tokens"]))
        table3.append({"run": label, "pairs": pairs, **lc})
        there = ("never" if lc["tokens"] is None else
                 f"{100 * lc['accuracy']:.1f}% / {lc['loss']:.4f}")
        print(f"| {label} | {pairs} | {100 * lc['bar']:.1f}% | {fmt(lc['tokens'], ',.0f')} | "
              f"{fmt(lc['share'] and 100 * lc['share'], '.1f')}% | {there} |")
    result["left_chance"] = table3

    # 4. base LMs
    print("\n## 4. Base LMs: held-out next-token loss (training policies on held-out prompts)\n")
    print("| size | N (non-emb., LM head incl.) | LM tokens | held-out loss (nats/token) |")
    print("| --- | --- | --- | --- |")
    table4 = []
    for s in sizes:
        d = read_json(sweep.root / "runs" / bases[s].run_id / "done.json")
        table4.append({"size": s, "n_params": d["non_embedding_params"], "tokens": d["tokens"],
                       "eval_lm_loss": d["final_eval"]["eval_lm_loss"]})
        print(f"| {s} | {d['non_embedding_params']:,} | {d['tokens']:,} | "
              f"{d['final_eval']['eval_lm_loss']:.4f} |")
    result["base_lms"] = table4
    print(f"\nadded runs: {len(jobs)}, {wall:.0f} s wall ({args.jobs} at a time); out: {out}")
    (out / "evidence.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
