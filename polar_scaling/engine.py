"""The one training engine: DeepSpeed (ZeRO 0-3) on GPUs with NCCL and on CPU with gloo.

The DeepSpeed JSON is generated from :class:`EngineArgs` and :class:`OptimArgs` and saved in
the run directory. The optimizer is a client ``torch.optim.AdamW`` (fused on CUDA), so no
DeepSpeed op is compiled at start-up; the schedule is linear warmup then cosine to
``min_lr_ratio`` of the peak.

Checkpoints are written to ``checkpoints/NNNNNNNNNN.tmp`` and renamed once every rank has
finished, then marked ``COMPLETE``; resume takes the newest complete one that loads and
skips a damaged one with a warning.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from polar_scaling.config import check  # noqa: E402
from polar_scaling.fused import FUSED_KERNELS, fuse_kernels  # noqa: E402

COMPLETE = "COMPLETE"


@dataclass
class OptimArgs:
    lr: float = field(default=1e-3, metadata={"gt": 0})
    min_lr_ratio: float = field(default=0.1, metadata={"ge": 0, "le": 1})
    warmup_ratio: float = field(default=0.03, metadata={"ge": 0, "lt": 1})
    weight_decay: float = field(default=0.0, metadata={"ge": 0})
    beta1: float = field(default=0.9, metadata={"ge": 0, "lt": 1})
    beta2: float = field(default=0.95, metadata={"ge": 0, "lt": 1})
    eps: float = field(default=1e-8, metadata={"gt": 0})
    grad_clip: float = field(default=1.0, metadata={"ge": 0})


@dataclass
class EngineArgs:
    zero_stage: int = field(default=0, metadata={"choices": [0, 1, 2, 3]})
    # auto: bf16 where the hardware has it (CUDA with bf16 support), else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    # CPU only: torch intra-op threads. Tiny ladder models train fastest on one thread, and a
    # sweep runs one job per core (measured 20-40x slower with 2 threads on shared cores);
    # 0 keeps torch's default.
    cpu_threads: int = field(default=1, metadata={"ge": 0})
    # Fused RMSNorm/SwiGLU/RoPE kernels (polar_scaling/fused.py): auto (liger on CUDA where
    # installed, else none), none, compile, compile_layers or liger. docs/gpu.md has the
    # measured speed of each on an H100.
    fused_kernels: str = field(default="auto", metadata={"choices": list(FUSED_KERNELS)})

    def __post_init__(self):
        check(not (self.offload_optimizer and self.zero_stage == 0), "offload_optimizer",
              "optimizer offload needs zero_stage >= 1")


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def lr_factor(step: int, total_steps: int, warmup_ratio: float, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): warmup, then cosine."""
    warmup = max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(1.0, progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def enable_activation_checkpointing(module) -> None:
    """Non-reentrant activation checkpointing of a transformers model's layers, through
    ``activation_checkpointing_enable`` where transformers has it (its older name is
    deprecated there) and ``gradient_checkpointing_enable`` before that."""
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def ds_config(engine: EngineArgs, optim: OptimArgs, micro_batch: int, grad_accum: int,
              world_size: int) -> dict:
    """The DeepSpeed JSON for these args (also written to the run directory)."""
    precision = resolve_precision(engine.precision)
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": engine.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # Client optimizer: DeepSpeed needs this to accept torch's AdamW under ZeRO.
        "zero_allow_untested_optimizer": True,
    }
    if engine.zero_stage == 3:
        cfg["zero_optimization"].update({
            "stage3_gather_16bit_weights_on_model_save": True,
            "overlap_comm": torch.cuda.is_available(),
        })
    if engine.offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


class Engine:
    """A model wrapped by DeepSpeed, with the project's checkpoint layout."""

    def __init__(self, model: torch.nn.Module, engine: EngineArgs, optim: OptimArgs,
                 total_steps: int, micro_batch: int, grad_accum: int, run_path: Path | None):
        import deepspeed
        import torch.distributed as dist

        if not torch.cuda.is_available() and engine.cpu_threads > 0:
            torch.set_num_threads(engine.cpu_threads)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.grad_accum = grad_accum
        config = ds_config(engine, optim, micro_batch, grad_accum, self.world_size)
        if run_path is not None and self.rank == 0:
            (Path(run_path) / "ds_config.json").write_text(json.dumps(config, indent=2))
        fuse_kernels(model, engine.fused_kernels)
        if engine.activation_checkpointing and hasattr(model, "model"):
            enable_activation_checkpointing(model.model)
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = {"fused": True} if torch.cuda.is_available() and not engine.offload_optimizer else {}
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                      eps=optim.eps, **fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps, optim.warmup_ratio, optim.min_lr_ratio))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
        self.device = self.ds.device

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: list, loss_fn) -> tuple[float, dict]:
        """One optimizer step over this rank's micro-batches; returns the mean loss and stats.

        ``loss_fn(module, batch) -> (loss, stats)``; the loss is a mean over the micro-batch.
        """
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"expected {self.grad_accum} micro-batches, got {len(micro_batches)}")
        self.ds.train()
        total, stats = 0.0, {}
        for batch in micro_batches:
            loss, batch_stats = loss_fn(self.ds, batch)
            self.ds.backward(loss)
            self.ds.step()
            total += loss.detach().float().item()
            for k, v in batch_stats.items():
                stats[k] = stats.get(k, 0.0) + v / len(micro_batches)
        return total / len(micro_batches), stats

    # --------------------------------------------------------------------- checkpoints

    def save(self, ckpt_root: Path, step: int, client_state: dict, keep: int = 2) -> Path:
        """Write checkpoint ``step`` atomically (tmp dir, rename, COMPLETE marker)."""
        import torch.distributed as dist

        ckpt_root = Path(ckpt_root)
        tag = f"{step:010d}"
        tmp_tag = f"{tag}.tmp"
        if self.rank == 0:
            shutil.rmtree(ckpt_root / tmp_tag, ignore_errors=True)
        dist.barrier()
        self.ds.save_checkpoint(str(ckpt_root), tag=tmp_tag, client_state=client_state,
                                save_latest=False)
        dist.barrier()
        final = ckpt_root / tag
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(ckpt_root / tmp_tag, final)
            (final / COMPLETE).write_text(json.dumps({"step": step}))
            for old in complete_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load_latest(self, ckpt_root: Path) -> dict | None:
        """Restore the newest loadable complete checkpoint; its client state, or None."""
        for path in reversed(complete_checkpoints(ckpt_root)):
            try:
                _, client_state = self.ds.load_checkpoint(
                    str(path.parent), tag=path.name, load_optimizer_states=True,
                    load_lr_scheduler_states=True)
            except Exception as e:  # a damaged checkpoint: fall back to an older one
                warnings.warn(f"skipping damaged checkpoint {path}: {type(e).__name__}: {e}",
                              stacklevel=2)
                continue
            if client_state is None:
                warnings.warn(f"skipping damaged checkpoint {path}: nothing loaded", stacklevel=2)
                continue
            return client_state
        return None

    def full_state_dict(self) -> dict:
        """Full-precision weights on rank 0 (gathered from shards under ZeRO-3)."""
        if self.ds.zero_optimization_partition_weights():
            import deepspeed

            params = list(self.ds.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().float().cpu().clone()
                        for k, v in self.ds.module.state_dict().items()}
        return {k: v.detach().float().cpu() for k, v in self.ds.module.state_dict().items()}


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / COMPLETE).is_file()]
    return sorted(dirs, key=lambda p: int(p.name))
