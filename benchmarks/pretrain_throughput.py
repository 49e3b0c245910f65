"""Tokens/s of POLAR pre-training on the project's engine against a plain PyTorch/HF loop.

Both loops train the same reward model (same init, same size) on the same batches of the
same trajectory dataset with AdamW: ours goes through ``PairStepSource`` and the DeepSpeed
``Engine`` (the path ``polar-train pretrain`` takes), the baseline is
``loss.backward(); clip; optimizer.step()``. Timed steps exclude start-up and warm-up.
Also prints the share of padding in the batches with and without length bucketing.

usage: python benchmarks/pretrain_throughput.py [--data DIR] [--size t100k] [--steps 30]
(without --data a small world is generated into a temporary directory first)
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="a dataset from `polar-train generate`")
    p.add_argument("--size", default="t100k")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="alternating timed rounds per loop")
    return p.parse_args()


def small_world(path: Path) -> Path:
    from polar_scaling.config import load_config
    from polar_scaling.data_generate import GenerateArgs, generate

    args = load_config(GenerateArgs, None, ["prompts.train=300", "prompts.heldout_prompts=20",
                                            "prompts.heldout_policies=20", "progress=false"])
    generate(args, path)
    return path


def main():
    args = parse()
    import torch

    from polar_scaling.data import TripletSource
    from polar_scaling.dist_env import init_distributed
    from polar_scaling.engine import Engine, EngineArgs, OptimArgs
    from polar_scaling.pairs import PairStepSource, pair_loss
    from polar_scaling.pretrain import ModelArgs, build_reward_model, encode_pairs
    from polar_scaling.sizes import train_flops
    from polar_scaling.template import TemplateIds
    from polar_scaling.tokenizer import load_tokenizer

    data = args.data or small_world(Path(tempfile.mkdtemp()) / "world")
    tokenizer = load_tokenizer(data / "tokenizer")
    ids = TemplateIds.from_tokenizer(tokenizer)
    pairs = encode_pairs(TripletSource(data, "train", seed=0), ids, "pretrain")
    torch.manual_seed(0)
    model, size = build_reward_model(ModelArgs(size=args.size), tokenizer)
    plain_model = copy.deepcopy(model)
    init_distributed()

    def make_source(bucket_steps):
        return PairStepSource(pairs, args.batch, args.micro, 1, tokenizer.pad_token_id,
                              lambda lens: train_flops(size, lens), budget_tokens=sum(pairs.tokens()[:args.batch]),
                              seed=0, bucket_steps=bucket_steps)

    source = make_source(16)
    n_steps = args.warmup + args.steps
    max_steps = len(pairs) // args.batch
    if n_steps * args.repeats > max_steps:
        raise SystemExit(f"the dataset holds {max_steps} steps; lower --steps or --repeats")
    optim = OptimArgs(lr=1e-3)
    engine = Engine(model, EngineArgs(zero_stage=0, precision="fp32"), optim, 10_000,
                    args.micro, args.batch // args.micro, None)
    opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                            weight_decay=0.0)

    def ours(step):
        engine.train_step(source.micro_batches(step, 0, 1), pair_loss)

    def plain(step):
        batches = source.micro_batches(step, 0, 1)
        for b in batches:
            loss, _ = pair_loss(plain_model, b)
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn, first):
        for s in range(first, first + args.warmup):
            fn(s)
        t0 = time.perf_counter()
        tokens = 0
        for s in range(first + args.warmup, first + n_steps):
            fn(s)
            tokens += source.step_tokens(s)
        return tokens / (time.perf_counter() - t0)

    rates = {"ours": [], "plain": []}
    for r in range(args.repeats):  # alternate so drift on a shared machine hits both alike
        rates["ours"].append(timed(ours, r * n_steps))
        rates["plain"].append(timed(plain, r * n_steps))
    ours_rate, plain_rate = max(rates["ours"]), max(rates["plain"])
    print(f"size {args.size}, batch {args.batch} pairs (micro {args.micro}), "
          f"{args.steps} timed steps x {args.repeats} rounds, torch threads "
          f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"ours  (DeepSpeed engine): {ours_rate:10.0f} tokens/s  (rounds: "
          f"{', '.join(f'{x:.0f}' for x in rates['ours'])})")
    print(f"plain (torch AdamW loop): {plain_rate:10.0f} tokens/s  (rounds: "
          f"{', '.join(f'{x:.0f}' for x in rates['plain'])})")
    print(f"ratio ours/plain: {ours_rate / plain_rate:.3f}")
    steps = min(50, max_steps)
    no_bucket = make_source(1).pad_share(steps)
    bucket = make_source(16).pad_share(steps)
    print(f"padding share over {steps} steps: {no_bucket:.1%} without bucketing, "
          f"{bucket:.1%} with (window of 16 steps)")


if __name__ == "__main__":
    main()
