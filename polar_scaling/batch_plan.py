"""Size-aware micro-batch, gradient accumulation, ZeRO stage and activation checkpointing.

From a ladder size, the memory of one GPU, the world size and the tokens an optimizer step
should hold, :func:`plan_batch` picks the packed row length, the rows per micro-batch, the
gradient accumulation, the lowest ZeRO stage whose model states fit, and activation
checkpointing only when a row does not fit without it. With ``compact=True`` (a varlen
kernel, whose micro-batch is one row of any width: ``PackedBatch.compact()``) it picks
instead the widest micro-batch, in steps of 1,024 tokens, that fits. Memory is estimated
from constants calibrated on one H100 (1.8B shape, docs/gpu.md; the estimates land within
1 GiB of the measured peaks, and ``headroom`` keeps 10% of the card free):

- model states, bytes per parameter under DeepSpeed bf16 with a client AdamW: bf16 weights
  2 (sharded by ZeRO-3), gradients 2 (sharded by ZeRO-2 and up), fp32 master weights and
  Adam moments 12 (sharded by ZeRO-1 and up). With checkpointing the 1.8B run peaked at
  31.7 GiB, so the states take at most ~16.5 bytes per parameter there;
- activations, bytes per token per layer in bf16 with a flash-type attention kernel (no
  L x L scores kept): ``26·d + 4·d_kv + 6·f`` as transformers builds the layer (measured
  68.2 GiB peak at rows of 16,384 without checkpointing), ``19·d + 4·d_kv + 4·f`` with fused
  RMSNorm/SwiGLU/RoPE kernels (polar_scaling/fused.py; measured 55.6–55.8 GiB at 16,384
  tokens, 70.6 GiB at 24,576). With checkpointing each layer keeps only its input
  (``2·d``) and one layer at a time is recomputed;
- a fixed 3 GiB for the CUDA context, communication buffers and allocator slack, and a
  ``headroom`` share of the card's memory that the plan may fill.

The benchmark (``benchmarks/gpu_mfu.py``) prints the measured peak beside this estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from polar_scaling.sizes import ModelSize, total_params

GIB = 1024 ** 3
FIXED_BYTES = 3 * GIB
COMPACT_STEP = 1024  # compact micro-batches are sized in multiples of this many tokens
# prompt 1,024 + reference 4,096 + <reward> + prompt 1,024 + candidate 4,096 + reward token
POLAR_MAX_SEQ_LEN = 1024 + 4096 + 1 + 1024 + 4096 + 1


@dataclass(frozen=True)
class BatchPlan:
    row_tokens: int
    rows: int  # packed rows per micro-batch
    grad_accum: int
    zero_stage: int
    activation_checkpointing: bool
    est_peak_gib: float  # estimated peak memory per GPU

    @property
    def micro_tokens(self) -> int:
        return self.rows * self.row_tokens

    def step_tokens(self, world: int) -> int:
        return self.micro_tokens * self.grad_accum * world


def state_bytes(size: ModelSize, zero_stage: int, world: int) -> float:
    """Model-state bytes per GPU (weights, gradients, master weights, Adam moments)."""
    n = total_params(size)
    weights = 2 / (world if zero_stage >= 3 else 1)
    grads = 2 / (world if zero_stage >= 2 else 1)
    optim = 12 / (world if zero_stage >= 1 else 1)
    return n * (weights + grads + optim)


def layer_activation_bytes(size: ModelSize, fused: bool = False) -> int:
    """Bytes one layer keeps per token for its backward pass (bf16, no checkpointing)."""
    kv_dim = size.kv_heads * size.head_dim
    if fused:
        return 19 * size.hidden + 4 * kv_dim + 4 * size.ffn
    return 26 * size.hidden + 4 * kv_dim + 6 * size.ffn


def activation_bytes(size: ModelSize, tokens: int, checkpointing: bool,
                     fused: bool = False) -> float:
    """Activation bytes of a micro-batch of ``tokens`` packed tokens."""
    per_layer = layer_activation_bytes(size, fused)
    if checkpointing:
        return tokens * (size.layers * 2 * size.hidden + per_layer)
    return tokens * size.layers * per_layer


def row_tokens_for(max_seq_len: int) -> int:
    """The smallest power of two (at least 1,024) that holds the longest sequence."""
    return max(1024, 1 << math.ceil(math.log2(max_seq_len)))


def plan_batch(size: ModelSize, gpu_bytes: float, world: int, step_tokens: int,
               max_seq_len: int = POLAR_MAX_SEQ_LEN, headroom: float = 0.9,
               min_zero_stage: int = 0, fused: bool = False,
               compact: bool = False) -> BatchPlan:
    """The plan for ``size`` on ``world`` GPUs of ``gpu_bytes`` each.

    ``step_tokens``: packed tokens (slots) one optimizer step should hold across all GPUs;
    the plan's step holds at least that many; ``fused``: fused kernels are on (smaller
    activations, polar_scaling/fused.py); ``compact``: the micro-batch is one row of any
    width (varlen kernels), so the plan's ``row_tokens`` is the widest multiple of 1,024
    tokens that fits, at least the longest sequence and at most what the step needs per GPU.
    Raises ValueError when even ZeRO-3 with checkpointing and one row per micro-batch does
    not fit.
    """
    if world < 1 or step_tokens < 1:
        raise ValueError("world and step_tokens must be positive")
    row = row_tokens_for(max_seq_len)
    budget = headroom * gpu_bytes - FIXED_BYTES
    # Without sharding (one GPU) every stage holds the same states: stay at the cheapest.
    stages = [s for s in (0, 1, 2, 3) if s >= min_zero_stage and (world > 1 or s == min_zero_stage)]
    rows_wanted = max(1, math.ceil(step_tokens / (world * row)))
    for stage in stages:
        free = budget - state_bytes(size, stage, world)
        for ckpt in (False, True):
            if compact:
                plan = _compact_plan(size, free, stage, ckpt, world, step_tokens, max_seq_len,
                                     fused)
                if plan is None:
                    continue
                return plan
            rows = int(free // activation_bytes(size, row, ckpt, fused)) if free > 0 else 0
            if rows < 1:
                continue
            rows = min(rows, rows_wanted)
            accum = math.ceil(rows_wanted / rows)
            peak = FIXED_BYTES + state_bytes(size, stage, world) + activation_bytes(
                size, rows * row, ckpt, fused)
            return BatchPlan(row, rows, accum, stage, ckpt, round(peak / GIB, 1))
    raise ValueError(
        f"size {size.name} ({total_params(size) / 1e9:.2f}B parameters) does not fit "
        f"{world} GPU(s) of {gpu_bytes / GIB:.0f} GiB even with ZeRO-3 and activation "
        f"checkpointing at rows of {row} tokens: use more GPUs or optimizer offload")


def _compact_plan(size: ModelSize, free: float, stage: int, ckpt: bool, world: int,
                  step_tokens: int, max_seq_len: int, fused: bool) -> BatchPlan | None:
    """The widest compact micro-batch that fits ``free`` bytes, or None."""
    fits = _fitting_tokens(size, free, ckpt, fused) // COMPACT_STEP * COMPACT_STEP
    least = math.ceil(max_seq_len / COMPACT_STEP) * COMPACT_STEP
    wanted = math.ceil(step_tokens / world / COMPACT_STEP) * COMPACT_STEP
    if fits < least:
        return None
    width = max(least, min(fits, wanted))
    accum = math.ceil(step_tokens / (world * width))
    peak = FIXED_BYTES + state_bytes(size, stage, world) + activation_bytes(size, width, ckpt,
                                                                            fused)
    return BatchPlan(width, 1, accum, stage, ckpt, round(peak / GIB, 1))


def activation_budget_tokens(size: ModelSize, gpu_bytes: float, world: int, zero_stage: int,
                             checkpointing: bool, fused: bool = False,
                             headroom: float = 0.9) -> int:
    """Tokens a micro-batch may hold on one GPU once the model states of ``zero_stage`` are
    placed (0 when even they do not fit)."""
    free = headroom * gpu_bytes - FIXED_BYTES - state_bytes(size, zero_stage, world)
    return _fitting_tokens(size, free, checkpointing, fused)


def _fitting_tokens(size: ModelSize, free: float, checkpointing: bool, fused: bool) -> int:
    """Tokens whose activations fit ``free`` bytes."""
    return max(0, int(free // activation_bytes(size, 1, checkpointing, fused)))


def fit_micro(pair_tokens: Sequence[int], longest: int, per_rank: int, budget_tokens: int,
              compact: bool) -> int:
    """The most pairs per micro-batch, a divisor of ``per_rank`` (a rank's pairs per step),
    whose worst micro-batch fits ``budget_tokens``: the sum of the longest pairs for compact
    rows (no padding); ``2·m·longest`` slots otherwise (a padded micro-batch, and a packed
    one never holds more). Returns 0 when not even one pair fits."""
    worst = np.cumsum(np.sort(np.asarray(pair_tokens, dtype=np.int64))[::-1])
    for m in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        need = worst[min(m, len(worst)) - 1] if compact else 2 * m * longest
        if need <= budget_tokens:
            return m
    return 0


def main(argv=None) -> BatchPlan:
    """``python -m polar_scaling.batch_plan --size 1.8B --gpus 8 --step-tokens 2e6``: print the
    plan (what to set as ``batch.*`` and ``engine.*``) for a ladder size on a kind of card."""
    import argparse

    from polar_scaling.sizes import get_size

    p = argparse.ArgumentParser(prog="python -m polar_scaling.batch_plan",
                                description=main.__doc__.split(":")[0])
    p.add_argument("--size", required=True, help="a ladder size, e.g. 1.8B")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel world size")
    p.add_argument("--gpu-gib", type=float, default=79.18,
                   help="memory of one GPU in GiB (an H100 80GB reports 79.18)")
    p.add_argument("--step-tokens", type=float, default=2 ** 20,
                   help="packed tokens per optimizer step, all GPUs")
    p.add_argument("--max-seq-len", type=int, default=POLAR_MAX_SEQ_LEN)
    p.add_argument("--min-zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--fused", action="store_true", help="fused kernels (engine.fused_kernels)")
    p.add_argument("--compact", action="store_true",
                   help="varlen kernel: one row of any width per micro-batch")
    a = p.parse_args(argv)
    try:
        plan = plan_batch(get_size(a.size), a.gpu_gib * GIB, a.gpus, int(a.step_tokens),
                          a.max_seq_len, min_zero_stage=a.min_zero_stage, fused=a.fused,
                          compact=a.compact)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"error: {e.args[0] if e.args else e}") from None
    print(f"{a.size} on {a.gpus} GPU(s) of {a.gpu_gib:g} GiB: ZeRO-{plan.zero_stage}, "
          f"activation checkpointing {'on' if plan.activation_checkpointing else 'off'}, "
          f"{plan.rows} row(s) of {plan.row_tokens:,} tokens per micro-batch, "
          f"{plan.grad_accum} micro-batches per step ({plan.step_tokens(a.gpus):,} tokens), "
          f"estimated peak {plan.est_peak_gib} GiB per GPU")
    return plan


if __name__ == "__main__":
    main()
