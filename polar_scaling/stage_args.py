"""Config pieces shared by the training stages (model choice, budget, batch), and how the
batch layout (padded or packed) and the attention kernel are resolved from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from polar_scaling.config import check
from polar_scaling.errors import StageError

# Attention kernels a stage may name (packed_attention.py says what each does with packed rows).
Attention = Literal["auto", "sdpa", "eager", "polar_varlen", "flex_attention", "flash_attention_2"]


@dataclass
class ModelArgs:
    size: str = "t100k"  # a ladder name (polar_scaling.sizes)
    # A local HF folder to start from (a base LM from `polar-train lm`, or a converted
    # checkpoint); None starts from random weights.
    base: str | None = None
    trust_remote_code: bool = False
    # auto: packed_attention.best_packed_attention() for packed batches, sdpa for padded ones.
    attention: Attention = "auto"


@dataclass
class BudgetArgs:
    """Training length: exactly one of tokens or FLOPs (cumulative training compute)."""

    tokens: float | None = field(default=None, metadata={"gt": 0})
    flops: float | None = field(default=None, metadata={"gt": 0})

    def __post_init__(self):
        check((self.tokens is None) != (self.flops is None), "tokens",
              "give exactly one of budget.tokens and budget.flops")


@dataclass
class BatchArgs:
    size: int = field(default=32, metadata={"ge": 1})  # examples per optimizer step, all ranks
    # Examples per micro-batch per rank; None: size/world (the pair stages plan it on a GPU
    # instead: choose_micro below).
    micro: int | None = field(default=None, metadata={"ge": 1})


@dataclass
class PairBatchArgs(BatchArgs):
    """The batch of the pair stages (pretrain, finetune): BatchArgs plus the layout."""

    # Pack each micro-batch's sequences into rows of row_tokens instead of padding them to
    # the longest (a micro-batch still holds the same pairs). auto: on for CUDA, off on CPU.
    # YAML reads a bare on/off as true/false, so booleans are accepted and normalised.
    packing: str | bool = "auto"
    # Packed row width; 0: the smallest power of two that holds the data's longest sequence.
    row_tokens: int = field(default=0, metadata={"ge": 0})

    def __post_init__(self):
        if isinstance(self.packing, bool):
            self.packing = "on" if self.packing else "off"
        check(self.packing in ("auto", "on", "off"), "packing",
              f"expected one of ['auto', 'on', 'off'], got {self.packing!r}")


@dataclass
class BatchLayout:
    """How a pair stage lays out and scores its batches, resolved once at start-up."""

    packed: bool
    attention: str  # the model's attention kernel
    row_tokens: int | None  # packed row width; None for padded batches
    # Padded batches with model.attention=auto leave the model's own kernel alone (a
    # remote-code base may not offer sdpa).
    keep_kernel: bool = False

    @classmethod
    def resolve(cls, batch: PairBatchArgs, attention: str, sets: dict,
                device_type: str | None = None) -> BatchLayout:
        """The layout for ``batch`` and ``model.attention`` on this machine (or
        ``device_type``); ``sets`` (name -> PairData, every set the stage scores) fix
        ``row_tokens`` when it is 0 and are checked against an explicit one."""
        import torch

        from polar_scaling.pairs import resolve_row_tokens

        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        packed, impl = resolve_layout(batch, attention, device_type)
        row_tokens = resolve_row_tokens(batch.row_tokens, sets) if packed else None
        return cls(packed, impl, row_tokens, keep_kernel=not packed and attention == "auto")

    def apply(self, model) -> None:
        """Switch ``model`` to this layout's attention kernel (if it is not already on it);
        with ``keep_kernel``, record the model's own kernel instead."""
        from polar_scaling.packed_attention import use_attention

        current = getattr(model.config, "_attn_implementation", None)
        if self.keep_kernel:
            self.attention = current or self.attention
        elif current != self.attention:
            use_attention(model, self.attention)

    def loss_fn(self):
        """The trainer's loss function: :func:`polar_scaling.pairs.pair_loss` on this kernel."""
        import functools

        from polar_scaling.pairs import pair_loss

        return functools.partial(pair_loss, attention=self.attention)

    @property
    def compact(self) -> bool:
        """Packed micro-batches lose their padding tails: the kernel reads sequence bounds
        from positions over a flattened batch, so a row's width is free (no pad computed)."""
        from polar_scaling.packed_attention import VARLEN, needs_one_row

        return self.packed and (self.attention == VARLEN or needs_one_row(self.attention))

    def eval_kwargs(self) -> dict:
        """Keyword arguments of :func:`polar_scaling.pairs.evaluate_pairs` for this layout."""
        return {"row_tokens": self.row_tokens, "attention": self.attention,
                "compact": self.compact}

    def summary(self) -> dict:
        return {"packing": self.packed, "attention": self.attention, "row_tokens": self.row_tokens,
                "compact_rows": self.compact}


def resolve_layout(batch: PairBatchArgs, attention: str, device_type: str) -> tuple[bool, str]:
    """``(packed, kernel)`` for these args on a ``device_type`` ("cuda" or "cpu") device.

    Raises StageError for a kernel that cannot run the resolved layout here.
    """
    from polar_scaling.packed_attention import VARLEN, best_packed_attention

    packed = batch.packing == "on" or (batch.packing == "auto" and device_type == "cuda")
    if attention == "auto":
        return packed, best_packed_attention(device_type) if packed else "sdpa"
    if attention == VARLEN and not packed:
        raise StageError(f"model.attention={VARLEN} reads packed rows only, but batches are "
                         f"padded here (batch.packing={batch.packing}, {device_type}); set "
                         f"batch.packing=on or choose another kernel")
    if attention == "flex_attention" and device_type != "cuda":
        raise StageError("model.attention=flex_attention has no backward pass on CPU in this "
                         "torch; choose sdpa or polar_varlen here")
    if attention == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise StageError("model.attention=flash_attention_2 needs the flash-attn package, "
                             "which is not installed here; choose polar_varlen or auto")
    return packed, attention


def choose_micro(batch: BatchArgs, engine, size, pairs, world: int, layout: BatchLayout,
                 gpu_bytes: float | None = None) -> tuple[int, dict]:
    """Pairs per micro-batch and a record of the choice for ``done.json``.

    ``batch.micro`` when set. Otherwise, on a GPU (``gpu_bytes``: its memory, read from the
    device when None), the most pairs (a divisor of a rank's share of ``batch.size``) whose
    worst micro-batch of ``pairs`` (PairData) fits the memory the batch planner leaves for
    activations after the model states of ``engine`` (zero_stage, activation
    checkpointing, fused kernels) are placed (polar_scaling/batch_plan.py); on CPU all of a
    rank's pairs, as before."""
    import warnings

    from polar_scaling import gpu
    from polar_scaling.batch_plan import activation_budget_tokens, fit_micro
    from polar_scaling.fused import resolve_fused

    per_rank = max(1, batch.size // world)
    if batch.micro:
        return batch.micro, {"micro": batch.micro, "micro_from": "batch.micro"}
    gpu_bytes = gpu_bytes if gpu_bytes is not None else gpu.total_memory_bytes()
    if not gpu_bytes:
        return per_rank, {"micro": per_rank, "micro_from": "batch.size / world (no GPU)"}
    fused = resolve_fused(engine.fused_kernels, "cuda") != "none"
    budget = activation_budget_tokens(size, gpu_bytes, world, engine.zero_stage,
                                      engine.activation_checkpointing, fused)
    longest = max(len(s) for side in (pairs.chosen, pairs.rejected) for s in side)
    micro = fit_micro(pairs.tokens(), longest, per_rank, budget, layout.compact)
    if micro == 0:
        micro = 1
        warnings.warn(f"one pair (longest sequence {longest} tokens) needs more activation "
                      f"memory than the planner estimates this GPU has left ({budget} tokens "
                      f"for size {size.name}); consider engine.activation_checkpointing, a "
                      f"higher engine.zero_stage or more GPUs", stacklevel=2)
    return micro, {"micro": micro, "micro_from": "batch planner",
                   "micro_token_budget": budget, "gpu_gib": round(gpu_bytes / 2 ** 30, 2)}
