"""Throughput and MFU of reward-model training: packed DeepSpeed path against a padded loop.

Both loops train the same model shape on the same pairs, drawn like POLAR's data: a prompt
of 1-1,024 tokens, a reference and two candidates of up to 4,096 tokens each (log-normal
lengths, clipped), random token ids. A POLAR sequence is
``prompt + reference + <reward> + prompt + candidate + <reward>``.

- packed: RewardModel inside polar_scaling.engine.Engine (DeepSpeed, bf16, ZeRO stage and
  activation checkpointing as given); pairs grouped in data order into micro-batches of
  ``--rows`` rows of ``--row-tokens`` and packed first-fit-decreasing.
- padded: the same RewardModel in a plain loop (fp32 weights, bf16 autocast, fused torch
  AdamW, transformers' default sdpa), ``--pad-pairs`` pairs per micro-batch padded to the
  longest sequence.

Reported per loop: real (non-pad) tokens/s, model TFLOP/s (sizes.train_flops on the real
lengths, recomputation not counted), MFU against the card's dense bf16 peak, pad share and
peak memory; then the packed/padded ratio of real tokens/s. Warm-up steps are excluded and
every timed step is bracketed by torch.cuda.synchronize. On a CPU the script trains a tiny
shape in fp32 and says so; its figures say nothing about a GPU.

    python benchmarks/gpu_mfu.py --size 1.8B --steps 6 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_scaling import gpu  # noqa: E402
from polar_scaling.batch_plan import plan_batch  # noqa: E402
from polar_scaling.engine import enable_activation_checkpointing  # noqa: E402
from polar_scaling.fused import FUSED_KERNELS, resolve_fused  # noqa: E402
from polar_scaling.losses import bradley_terry_loss, pair_scores  # noqa: E402
from polar_scaling.packed_attention import (  # noqa: E402
    best_packed_attention,
    packed_inputs,
    use_attention,
)
from polar_scaling.packing import (  # noqa: E402
    first_fit_decreasing,
    group_pairs,
    pack_sequences,
    pad_sequences,
)
from polar_scaling.sizes import get_size, hf_config, train_flops  # noqa: E402

CPU_SIZE, CPU_VOCAB, CPU_ROW, CPU_PROMPT, CPU_RESPONSE = "t200k", 512, 512, 48, 96
PAD_ID = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1.8B")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary for a size without one (the CPU ladder)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per loop")
    p.add_argument("--row-tokens", type=int, default=16384)
    p.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch")
    p.add_argument("--pad-pairs", type=int, default=2,
                   help="pairs per padded micro-batch (2 pairs hold about as many real "
                        "tokens as one packed row of 16,384)")
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing of the packed loop")
    p.add_argument("--padded-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing of the padded loop (a padded 1.8B batch of "
                        "POLAR lengths does not fit 80 GB without it)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (both loops)")
    p.add_argument("--fused", default="none", choices=list(FUSED_KERNELS),
                   help="fused RMSNorm/SwiGLU/RoPE kernels of the packed loop")
    p.add_argument("--tight", action="store_true",
                   help="packed micro-batches as one row of exactly their tokens (no padding; "
                        "varlen kernels only, the row length varies)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one packed step and print the top kernels")
    p.add_argument("--attn", default=None,
                   help="packed kernel: sdpa, flex_attention, polar_varlen, flash_attention_2 "
                        "(default: the best available)")
    p.add_argument("--mode", choices=["both", "packed", "padded"], default="both")
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-response", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak", type=float, default=None, help="override the peak FLOP/s")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the packed-vs-padded reward check before training")
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- data


def draw_pair_lengths(rng: np.random.Generator, n: int, max_prompt: int, max_response: int):
    """``(prompt, reference, chosen, rejected)`` lengths of ``n`` pairs (log-normal, clipped)."""
    def lognormal(median, high):
        return np.clip(np.round(rng.lognormal(math.log(median), 1.0, n)), 1, high).astype(int)

    prompt = lognormal(max(1, max_prompt // 8), max_prompt)
    ref, chosen, rejected = (lognormal(max(1, max_response // 8), max_response) for _ in range(3))
    return list(zip(prompt.tolist(), ref.tolist(), chosen.tolist(), rejected.tolist(),
                    strict=True))


def make_pairs(rng, lengths, vocab: int) -> list[tuple[list[int], list[int]]]:
    """Token ids of each pair: (chosen sequence, rejected sequence), sharing prompt+reference."""
    reward = vocab - 1
    pairs = []
    for p, r, c, j in lengths:
        prompt = rng.integers(1, reward, p).tolist()
        head = prompt + rng.integers(1, reward, r).tolist() + [reward] + prompt
        pairs.append((head + rng.integers(1, reward, c).tolist() + [reward],
                      head + rng.integers(1, reward, j).tolist() + [reward]))
    return pairs


# ---------------------------------------------------------------------------------- timing


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarise(name, times, real_tokens, slots, flops, peak, warmup):
    t = sum(times[warmup:])
    real = sum(real_tokens[warmup:])
    f = sum(flops[warmup:])
    row = {
        "timed_steps": len(times) - warmup,
        "seconds": t,
        "step_seconds_median": float(np.median(times[warmup:])),
        "real_tokens": real,
        "pad_share": 1 - real / max(1, sum(slots[warmup:])),
        "real_tokens_per_s": real / t,
        "model_tflops_per_s": f / t / 1e12,
        "mfu": gpu.mfu(f / t, peak),
        **gpu.memory_stats(),
    }
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a (no known peak)"
    print(f"{name:>7}: {row['real_tokens_per_s']:10.0f} real tok/s  "
          f"{row['model_tflops_per_s']:7.1f} model TFLOP/s  MFU {mfu}  "
          f"pad {row['pad_share']:.1%}  step {row['step_seconds_median']:.3f}s  "
          f"peak mem {row.get('mem_peak_gib', row.get('rss_peak_gib', 0)):.1f} GiB", flush=True)
    return row


def build_model(size, vocab, dtype=torch.float32):
    from polar_scaling.model import RewardModel

    config = hf_config(size, vocab=vocab, pad_token_id=PAD_ID)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        return RewardModel.from_config(config, dtype=dtype)


# ---------------------------------------------------------------------------------- loops


def run_padded(args, size, vocab, pairs, n_steps, peak):
    """Plain loop: fp32 weights, bf16 autocast on CUDA, fused AdamW, padded micro-batches."""
    model = build_model(size, vocab)
    use_attention(model, "sdpa")
    if args.padded_ckpt:
        enable_activation_checkpointing(model.model)
    cuda = torch.cuda.is_available()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                            **({"fused": True} if cuda else {}))
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    times, real, slots, flops = [], [], [], []
    model.train()
    per_step = args.pad_pairs * args.grad_accum
    for step in range(n_steps):
        step_pairs = pairs[step * per_step:(step + 1) * per_step]
        micro = [step_pairs[i:i + args.pad_pairs] for i in range(0, per_step, args.pad_pairs)]
        batches = []
        for chunk in micro:
            seqs = [c for c, _ in chunk] + [r for _, r in chunk]
            ids, mask = pad_sequences(seqs, PAD_ID)
            batches.append((seqs, ids.to(device, non_blocking=True),
                            mask.to(device, non_blocking=True)))
        sync()
        t0 = time.perf_counter()
        for _, ids, mask in batches:
            with autocast:
                chosen, rejected = pair_scores(model(ids, attention_mask=mask))
                loss = bradley_terry_loss(chosen, rejected) / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        lens = [len(s) for seqs, _, _ in batches for s in seqs]
        real.append(sum(lens))
        slots.append(sum(ids.numel() for _, ids, _ in batches))
        flops.append(train_flops(size, lens))
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"padded loop: non-finite loss at step {step}")
    row = summarise("padded", times, real, slots, flops, peak, args.warmup)
    row.update(pairs_per_micro_batch=args.pad_pairs, grad_accum=args.grad_accum,
               activation_checkpointing=args.padded_ckpt)
    del model, opt
    free_memory()
    return row


def run_packed(args, size, vocab, pairs, n_steps, peak, impl, precision):
    """DeepSpeed Engine over packed micro-batches; returns the figures and the reward check."""
    from polar_scaling.dist_env import init_distributed
    from polar_scaling.engine import Engine, EngineArgs, OptimArgs

    init_distributed()
    groups = group_pairs([(len(c), len(r)) for c, r in pairs], args.row_tokens, args.rows)
    # Every micro-batch keeps the shape [rows, row_tokens], so a compiled kernel is never
    # recompiled inside the timed steps; the rare pair that needs more rows is left out.
    fitting = [g for g in groups if len(first_fit_decreasing(
        [n for i in g for n in (len(pairs[i][0]), len(pairs[i][1]))], args.row_tokens))
        <= args.rows]
    n_micro = n_steps * args.grad_accum + (1 if args.profile else 0) * args.grad_accum
    if len(fitting) < n_micro:
        raise RuntimeError(f"only {len(fitting)} packed micro-batches for {n_micro}")
    groups = fitting[:n_micro]
    def pack(g):
        seqs = [pairs[i][0] for i in g] + [pairs[i][1] for i in g]
        packed = pack_sequences(seqs, args.row_tokens, PAD_ID, min_rows=args.rows)
        # --tight: the training stages' compact rows (one row, no padding tails)
        return packed.compact() if args.tight else packed

    batches = [pack(g) for g in groups]
    model = build_model(size, vocab)
    use_attention(model, impl)
    plain = None
    if args.check and args.fused != "none":  # the unfused model's rewards, for the check
        cuda = torch.cuda.is_available()  # flash kernels take bf16: fp32 weights, bf16 autocast
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            plain = model(**packed_inputs(batches[0].to(next(model.parameters()).device), impl))
    engine = Engine(model, EngineArgs(zero_stage=args.zero, precision=precision,
                                      activation_checkpointing=args.ckpt,
                                      fused_kernels=args.fused),
                    OptimArgs(lr=1e-5, warmup_ratio=0.0), total_steps=n_steps + 1,
                    micro_batch=1, grad_accum=args.grad_accum, run_path=None)
    check = reward_check(engine.module, batches[0], pairs, groups[0], impl) if args.check else None
    if plain is not None:
        with torch.no_grad():
            fused = engine.module(**packed_inputs(batches[0].to(engine.device), impl))
        diff = (fused.float() - plain.float()).abs().max().item()
        check["fused_vs_plain_fp32"] = diff
        print(f"fused check ({args.fused}, {precision}) against the unfused model: "
              f"max |diff| = {diff:.3g} (reward std {check['reward_std']:.3g})", flush=True)
        del plain

    def loss_fn(module, batch):
        chosen, rejected = pair_scores(module(**packed_inputs(batch, impl)))
        return bradley_terry_loss(chosen, rejected), {}

    times, real, slots, flops = [], [], [], []
    ga = args.grad_accum
    for step in range(n_steps):
        step_batches = [b.to(engine.device) for b in batches[step * ga:(step + 1) * ga]]
        sync()
        t0 = time.perf_counter()
        loss, _ = engine.train_step(step_batches, loss_fn)
        sync()
        times.append(time.perf_counter() - t0)
        real.append(sum(b.real_tokens for b in step_batches))
        slots.append(sum(b.slots for b in step_batches))
        flops.append(sum(train_flops(size, b.seq_lens.tolist()) for b in step_batches))
        if not math.isfinite(loss):
            raise RuntimeError(f"packed loop: non-finite loss at step {step}")
    row = summarise("packed", times, real, slots, flops, peak, args.warmup)
    row.update(attention=impl, zero_stage=args.zero, rows_per_micro_batch=args.rows,
               row_tokens=args.row_tokens, grad_accum=ga, fused_kernels=args.fused,
               tight_rows=args.tight,
               activation_checkpointing=args.ckpt,
               pairs_per_micro_batch=float(np.mean([len(g) for g in groups])),
               reward_check=check)
    if args.profile:
        last = [b.to(engine.device) for b in batches[n_steps * ga:(n_steps + 1) * ga]]
        row["profile_top"] = profile_step(engine, last, loss_fn)
    del engine, model
    free_memory()
    return row


def profile_step(engine, step_batches, loss_fn, top: int = 25) -> list[dict]:
    """Profile one optimizer step; print and return the kernels that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                           else [])
    sync()
    with profile(activities=activities) as prof:
        engine.train_step(step_batches, loss_fn)
        sync()
    events = prof.key_averages()
    device = torch.cuda.is_available()

    def self_time(e):
        for name in (("self_device_time_total", "self_cuda_time_total") if device
                     else ("self_cpu_time_total",)):
            if hasattr(e, name):
                return getattr(e, name)
        return 0.0

    total = sum(self_time(e) for e in events) or 1.0
    rows = sorted(events, key=self_time, reverse=True)[:top]
    print(f"profile of one step ({'device' if device else 'cpu'} self time, "
          f"total {total / 1e3:.1f} ms):", flush=True)
    out = []
    for e in rows:
        t = self_time(e)
        print(f"  {t / 1e3:9.2f} ms {t / total:6.1%} x{e.count:<5d} {e.key[:90]}", flush=True)
        out.append({"name": e.key, "self_ms": t / 1e3, "share": t / total, "calls": e.count})
    return out


@torch.no_grad()
def reward_check(module, batch, pairs, group, impl) -> dict:
    """Max |packed - padded| reward over one micro-batch, against the reward spread."""
    # Stays in train mode: transformers compiles flex attention separately for eval and
    # train, and a second compile would cost more than this check. Dropout is zero.
    device = next(module.parameters()).device
    packed = module(**packed_inputs(batch.to(device), impl))
    seqs = [pairs[i][0] for i in group] + [pairs[i][1] for i in group]
    padded = []
    # Reference: each sequence alone through sdpa (no padding, no packing); sdpa also avoids
    # compiling the packed kernel for every sequence length.
    use_attention(module, "sdpa")
    for s in seqs:
        ids = torch.as_tensor([s], device=device)
        padded.append(module(ids, attention_mask=torch.ones_like(ids)))
    use_attention(module, impl)
    padded = torch.cat(padded)
    diff = (packed - padded).abs().max().item()
    spread = padded.std().item() if len(seqs) > 1 else padded.abs().max().item()
    print(f"reward check ({impl}): max |packed - unpadded| = {diff:.3g} "
          f"(reward std {spread:.3g}, {len(seqs)} sequences)", flush=True)
    return {"max_abs_diff": diff, "reward_std": spread, "sequences": len(seqs)}


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        size = get_size(args.size)
        if args.vocab:
            size = size.with_vocab(args.vocab)
        if size.vocab is None:
            raise SystemExit(f"size {size.name} has no vocabulary: pass --vocab")
        vocab, precision = size.vocab, "bf16"
    else:
        print(f"CPU: no GPU here, so a tiny shape ({CPU_SIZE}, vocab {CPU_VOCAB}, rows of "
              f"{CPU_ROW}) in fp32; these figures say nothing about GPU throughput and MFU "
              "is not reported", flush=True)
        size = get_size(CPU_SIZE).with_vocab(CPU_VOCAB)
        vocab, precision = CPU_VOCAB, "fp32"
        args.row_tokens = CPU_ROW
        args.max_prompt, args.max_response = CPU_PROMPT, CPU_RESPONSE
    impl = args.attn or best_packed_attention()
    name = gpu.device_name()
    peak = gpu.peak_flops(name, override=args.peak)
    longest = 2 * args.max_prompt + 2 * args.max_response + 2
    if longest > args.row_tokens:
        raise SystemExit(f"--row-tokens {args.row_tokens} cannot hold a sequence of up to "
                         f"{longest} tokens")
    n_steps = args.warmup + args.steps
    rng = np.random.default_rng(args.seed)
    n_micro = (n_steps + 1) * args.grad_accum
    # Enough pairs for every packed micro-batch (with a margin for rows left part-empty) and
    # every padded one.
    probe = draw_pair_lengths(np.random.default_rng(args.seed + 1), 1000, args.max_prompt,
                              args.max_response)
    mean_pair = float(np.mean([2 * (p + r + 1) + c + j + 2 for p, r, c, j in probe]))
    n_pairs = max(n_micro * args.pad_pairs,
                  math.ceil(1.5 * n_micro * args.rows * args.row_tokens / mean_pair) + 64)
    lengths = draw_pair_lengths(rng, n_pairs, args.max_prompt, args.max_response)
    pairs = make_pairs(rng, lengths, vocab)
    print(f"device {name}, peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s, size "
          f"{size.name}, packed kernel {impl}, ZeRO {args.zero}, activation checkpointing "
          f"{args.ckpt}, fused kernels {args.fused}, {args.grad_accum} micro-batches per step, "
          f"torch {torch.__version__}", flush=True)
    result = {"device": name, "peak_flops": peak, "size": size.name, "cpu_tiny_shape": not cuda,
              "args": vars(args), "torch": torch.__version__}
    mem = gpu.total_memory_bytes()
    if mem:
        plan = plan_batch(size, mem, 1, args.grad_accum * args.rows * args.row_tokens,
                          fused=resolve_fused(args.fused) != "none", compact=args.tight)
        result["plan_for_this_card"] = plan.__dict__
    if args.mode in ("both", "padded"):
        result["padded"] = run_padded(args, size, vocab, pairs, n_steps, peak)
    if args.mode in ("both", "packed"):
        result["packed"] = run_packed(args, size, vocab, pairs, n_steps, peak, impl, precision)
    if "packed" in result and "padded" in result:
        ratio = result["packed"]["real_tokens_per_s"] / result["padded"]["real_tokens_per_s"]
        result["ratio_real_tokens_per_s"] = ratio
        print(f"packed / padded real tokens/s: {ratio:.2f}x", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    if torch.distributed.is_initialized():  # a clean NCCL exit (the packed loop set it up)
        torch.distributed.destroy_process_group()
