"""The POLAR claim in miniature: a POLAR-pre-trained then fine-tuned reward model against one
fine-tuned from scratch on the same preference data, 3 seeds each, with and without the
reference.

    python benchmarks/polar_claim.py OUT [--pretrain-tokens 2e6] [--seeds 0 1 2] [--jobs 2]

Every step is a ``polar-train`` command (or the preference CLI) in a subprocess with one CPU
thread, writing into OUT; a rerun skips finished steps (their run directories say done):

1. ``generate``: a small synthetic world (4 families x 4 policies, one held out per family).
2. ``python -m polar_scaling.preferences synth``: ranked preferences on the world's held-out
   prompts (never used in pre-training); a share of the prompts is for fine-tuning, the
   rest for evaluation.
3. ``pretrain``: POLAR pre-training from random weights on the world's training prompts, one
   run per seed (``--shared-pretrain``: the first seed's run serves every seed).
4. ``finetune`` per seed, from the pre-trained model and from scratch, same data and epochs.
5. ``evaluate`` of every fine-tuned model and of the pre-trained model before fine-tuning.

Prints a markdown table (also ``OUT/table.md``; numbers in ``OUT/summary.json``): accuracy
mean ± sample standard deviation over seeds (min–max in the JSON), with and without the
reference, overall and per category, plus the wall time of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

WORLD = {
    "world": {"content_vocab": 32, "families": 4, "members_per_family": 4,
              "heldout_members_per_family": 1, "logit_scale": 3.0,
              "arch": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                       "num_heads": 2, "max_positions": 64}},
    "prompts": {"train": 2500, "heldout_prompts": 300, "heldout_policies": 30,
                "min_len": 4, "max_len": 8},
    "sampling": {"max_new_tokens": 12, "batch_size": 1024},
    "shard_prompts": 700,
    "kl": {"prompts": 32, "samples_per_prompt": 4},
    "workers": 2,
    "progress": False,
}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def call(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with one intra-op thread, output to ``log``; its wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(True)[-20:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.time() - t0


def stage(name: str, run_dir: Path, *overrides: str) -> list[str]:
    return command("polar_scaling.cli", name, *overrides, "--run-dir", str(run_dir))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", default="t25k")
    p.add_argument("--pretrain-tokens", type=float, default=2e6)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--shared-pretrain", action="store_true",
                   help="one pre-training run (the first seed's) for every fine-tuning seed")
    p.add_argument("--finetune-fraction", type=float, default=0.5,
                   help="share of the held-out prompts whose preferences are for fine-tuning")
    p.add_argument("--groups-per-prompt", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning a pre-trained model")
    p.add_argument("--scratch-lr", type=float, default=1e-3, help="fine-tuning from scratch")
    p.add_argument("--scratch-epochs", type=int, help="epochs from scratch (default --epochs)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    args = p.parse_args(argv)
    out = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    t_start = time.time()

    (out / "world.yaml").write_text(yaml.safe_dump(WORLD, sort_keys=False))
    walls["generate"] = call(stage("generate", out / "world", str(out / "world.yaml")),
                             out / "logs" / "generate.log")

    prefs = out / "prefs"
    if not (prefs / "eval.jsonl").is_file():
        walls["synth"] = call(command(
            "polar_scaling.preferences", "synth", str(out / "world"), str(prefs / "train.jsonl"),
            "--eval-out", str(prefs / "eval.jsonl"), "--eval-fraction",
            str(1 - args.finetune_fraction), "--groups-per-prompt", str(args.groups_per_prompt)),
            out / "logs" / "synth.log")
    common = ["schedule.progress=false", "schedule.checkpoint_every=100000"]

    pre_seeds = [args.seeds[0]] if args.shared_pretrain else args.seeds

    def pretrain(seed: int) -> float:
        return call(stage("pretrain", out / f"pretrain_s{seed}", f"data.dir={out / 'world'}",
                          f"model.size={args.size}", f"budget.tokens={args.pretrain_tokens:g}",
                          f"optim.lr={args.pretrain_lr:g}", "batch.size=32", f"seed={seed}",
                          "schedule.eval_points=8", "data.eval_pairs=256", *common),
                    out / "logs" / f"pretrain_s{seed}.log")

    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as ex:
        list(ex.map(pretrain, pre_seeds))
    walls["pretrain"] = time.time() - t0

    def base_of(seed: int) -> Path:
        return out / f"pretrain_s{args.seeds[0] if args.shared_pretrain else seed}" / "model"

    # Both arms read the same inputs: the pre-training wrapper (no newline between pieces).
    data = [f"data.train={prefs / 'train.jsonl'}", f"data.eval={prefs / 'eval.jsonl'}",
            "data.wrapper=pretrain"]
    arms = {"pretrained": (args.ft_lr, args.epochs), "scratch": (args.scratch_lr,
                                                                 args.scratch_epochs or args.epochs)}
    # Names carry the learning rate and epochs, so other settings can run beside these in OUT.
    names = {arm: f"{arm}_lr{lr:g}_e{ep}" for arm, (lr, ep) in arms.items()}
    runs = {}
    for seed in args.seeds:
        runs[("pretrained", seed)] = [f"model.base={base_of(seed)}"]
        runs[("scratch", seed)] = [f"model.size={args.size}", f"model.tokenizer={out / 'world'}"]

    def finetune(key) -> float:
        arm, seed = key
        lr, epochs = arms[arm]
        name = f"{names[arm]}_s{seed}"
        t = call(stage("finetune", out / f"ft_{name}", *data, *runs[key], f"optim.lr={lr:g}",
                       f"seed={seed}", f"epochs={epochs}", f"batch.size={args.batch}",
                       "schedule.eval_points=4", *common), out / "logs" / f"ft_{name}.log")
        return t + evaluate(out / f"ft_{name}" / "model", f"eval_{name}")

    def evaluate(model: Path, name: str) -> float:
        return call(stage("evaluate", out / name, f"model={model}",
                          f"data={prefs / 'eval.jsonl'}"), out / "logs" / f"{name}.log")

    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as ex:
        zero = [ex.submit(evaluate, base_of(s), f"eval_zeroshot_s{s}") for s in pre_seeds]
        list(ex.map(finetune, list(runs)))
        for f in zero:
            f.result()
    walls["finetune + evaluate"] = time.time() - t0
    walls["total"] = time.time() - t_start

    results = {"pre-trained, not fine-tuned": [read_eval(out / f"eval_zeroshot_s{s}")
                                               for s in pre_seeds]}
    for arm, label in (("pretrained", "pre-trained + fine-tuned"),
                       ("scratch", "from scratch + fine-tuned")):
        results[label] = [read_eval(out / f"eval_{names[arm]}_s{s}") for s in args.seeds]
    summary = summarize(results)
    n_train = sum(1 for _ in open(prefs / "train.jsonl"))
    n_eval = sum(1 for _ in open(prefs / "eval.jsonl"))
    pre = {s: json.loads((out / f"pretrain_s{s}" / "done.json").read_text()) for s in pre_seeds}
    summary["setup"] = {"args": {k: str(v) for k, v in vars(args).items()},
                        "train_pairs": n_train, "eval_pairs": n_eval,
                        "pretrain_tokens": pre[pre_seeds[0]]["tokens"],
                        "pretrain_final_eval": {s: d.get("final_eval") for s, d in pre.items()},
                        "wall_seconds": {k: round(v, 1) for k, v in walls.items()}}
    table = format_summary(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(table)
    print(table)
    return 0


def read_eval(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval.json").read_text())


def summarize(results: dict[str, list[dict]]) -> dict:
    """Mean, sample sd, min and max over seeds of every accuracy, per arm."""
    out = {"arms": {}}
    for label, evals in results.items():
        cats = sorted(evals[0]["by_category"])
        arm = {"seeds": len(evals)}
        for ref in ("with_reference", "without_reference"):
            arm[ref] = stats([e[ref]["accuracy"] for e in evals])
            arm[ref]["n"] = evals[0][ref]["n"]
            arm[f"{ref}_by_category"] = {
                c: {**stats([e["by_category"][c][ref]["accuracy"] for e in evals]),
                    "n": evals[0]["by_category"][c][ref]["n"]} for c in cats}
        out["arms"][label] = arm
    a, b = out["arms"]["pre-trained + fine-tuned"], out["arms"]["from scratch + fine-tuned"]
    for ref in ("with_reference", "without_reference"):
        gap = a[ref]["mean"] - b[ref]["mean"]
        spread = max(a[ref]["sd"], b[ref]["sd"])
        out[f"gap_{ref}"] = {"gap": gap, "largest_sd": spread, "gap_over_sd": gap / spread
                             if spread > 0 else float("inf")}
    return out


def stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}


def format_summary(summary: dict) -> str:
    def cell(s: dict) -> str:
        return f"{100 * s['mean']:.1f} ± {100 * s['sd']:.1f}"

    arms = summary["arms"]
    cats = list(next(iter(arms.values()))["with_reference_by_category"])
    lines = ["| model | seeds | with reference | without reference | "
             + " | ".join(f"{c} (with / without)" for c in cats) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(cats)]
    for label, arm in arms.items():
        by = [f"{cell(arm['with_reference_by_category'][c])} / "
              f"{cell(arm['without_reference_by_category'][c])}" for c in cats]
        lines.append(f"| {label} | {arm['seeds']} | {cell(arm['with_reference'])} | "
                     f"{cell(arm['without_reference'])} | " + " | ".join(by) + " |")
    first = next(iter(arms.values()))
    lines.append("| pairs | | " + f"{first['with_reference']['n']} | "
                 f"{first['without_reference']['n']} | "
                 + " | ".join(str(first["with_reference_by_category"][c]["n"]) for c in cats)
                 + " |")
    lines.append("")
    for ref in ("with_reference", "without_reference"):
        g = summary[f"gap_{ref}"]
        lines.append(f"- {ref.replace('_', ' ')}: pre-trained minus scratch = "
                     f"{100 * g['gap']:+.1f} points; largest seed sd {100 * g['largest_sd']:.1f}")
    setup = summary.get("setup")
    if setup:
        lines.append(f"- fine-tuning pairs {setup['train_pairs']}, evaluation pairs "
                     f"{setup['eval_pairs']}, pre-training tokens {setup['pretrain_tokens']:,}")
        acc = [f"{100 * e['eval_accuracy']:.1f}" for e in setup["pretrain_final_eval"].values()
               if e is not None]
        lines.append("- pre-training triplet accuracy on held-out prompts, per seed: "
                     + ", ".join(acc))
        lines.append("- wall seconds: " + ", ".join(
            f"{k} {v}" for k, v in setup["wall_seconds"].items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
