"""Which attention kernel keeps packed sequences apart, and how to feed it.

A packed row carries no attention mask; its ``position_ids`` restart at 0 at every sequence.
What transformers 5.x (read in 5.24's ``masking_utils.py`` and
``modeling_flash_attention_utils.py``) does with such rows, when ``attention_mask`` is None:

- ``sdpa`` and ``eager``: ``find_packed_sequence_indices`` marks a new sequence wherever a
  position is not the previous one plus 1, and the causal mask is ANDed with "same
  sequence". The mask is materialised as a dense ``[R, 1, L, L]`` tensor, so it is correct
  at any batch size but the kernel computes the whole row (no flash kernel, no skipping).
- ``flex_attention``: the same mask function becomes a ``BlockMask``; blocks outside every
  sequence are skipped, so the cost follows the real sequence lengths. Correct at any batch
  size; the kernel is compiled once per row shape.
- ``flash_attention_2`` (and 3/4): the mask function is ignored; sequence boundaries are
  read from ``position_ids`` only when the batch holds ONE row (``_is_packed_sequence``
  returns False for ``batch_size != 1``). Rows must be flattened to ``[1, R*L]`` first
  (:meth:`PackedBatch.flattened`), or sequences in one row attend to each other.
- ``polar_varlen`` (registered here): torch's own flash kernel for ragged batches
  (``torch.nn.attention.varlen``, CUDA, torch >= 2.10) with cumulative lengths read from
  ``position_ids`` once per forward; on CPU a per-sequence SDPA loop stands in, so the
  plumbing is tested where no GPU is.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
import torch.nn.functional as F

VARLEN = "polar_varlen"
ONE_ROW_KERNELS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def needs_one_row(impl: str) -> bool:
    """Whether packed rows must be flattened to one row for ``impl`` to separate sequences."""
    return impl in ONE_ROW_KERNELS


def best_packed_attention(device: torch.device | str | None = None) -> str:
    """The fastest kernel here that keeps packed sequences apart.

    CUDA: ``flash_attention_2`` when flash-attn is installed, else ``polar_varlen`` when
    torch has its varlen kernel (3.46x a padded loop on an H100, docs/gpu.md), else
    ``flex_attention`` (which compiles per row shape: slow to start, and its 1.8B block
    masks did not compile within 170 s there); CPU: ``sdpa`` (flex attention on CPU
    compiles through a C++ toolchain and has no backward pass).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
        return VARLEN
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        return "flex_attention"
    return "sdpa"


def use_attention(model: torch.nn.Module, impl: str) -> None:
    """Switch a RewardModel (or any HF model) to attention kernel ``impl``."""
    if impl == VARLEN:
        register_varlen()
    backbone = getattr(model, "model", model)
    if hasattr(backbone, "set_attn_implementation"):
        backbone.set_attn_implementation(impl)
    else:  # older transformers: the config attribute is what the layers read
        backbone.config._attn_implementation = impl


def packed_inputs(batch, impl: str) -> dict:
    """Keyword arguments for ``RewardModel.forward`` from a PackedBatch, for kernel ``impl``."""
    if needs_one_row(impl):
        batch = batch.flattened()
    return {"input_ids": batch.input_ids, "position_ids": batch.position_ids,
            "score_index": batch.score_index}


# --------------------------------------------------------------------- torch varlen kernel


def segment_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence offsets ``[S+1]`` (int32) of the flattened rows.

    A sequence starts at every row start and wherever a position is not the previous one
    plus 1 (the rule transformers uses to detect packing).
    """
    pos = position_ids
    diff = torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1)
    start = diff != 1
    start[:, 0] = True
    idx = start.reshape(-1).nonzero().flatten()
    end = torch.tensor([pos.numel()], device=pos.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


_CU_CACHE: dict = {}


def _cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    # One forward calls attention once per layer (twice with activation checkpointing) with
    # the same position_ids; computing offsets once avoids a host sync per layer.
    key = (position_ids.data_ptr(), tuple(position_ids.shape), position_ids._version,
           str(position_ids.device))
    if _CU_CACHE.get("key") != key:
        cu = segment_starts(position_ids)
        _CU_CACHE.update(key=key, value=(cu, int(cu.diff().max())))
    return _CU_CACHE["value"]


def _reference_varlen(q, k, v, cu, scale):
    """Per-sequence causal SDPA over ``[T, H, D]`` tensors (the CPU stand-in)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                           v[a:b].transpose(0, 1), is_causal=True, scale=scale)
        out[a:b] = o.transpose(0, 1)
    return out


def _torch_varlen(q, k, v, cu, max_len, scale):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    # torch 2.10 takes is_causal; later versions express causality as a window (-1, 0).
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-9:
        raise ValueError("this torch's varlen_attn has no scale argument")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _flash_dtype(q, k, v):
    """The flash kernel takes fp16/bf16 only. Under autocast, rotary embeddings (fp32 cos and
    sin) promote q and k to fp32, and a custom op is not cast by autocast: cast here."""
    if q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype == v.dtype:
        return q, k, v
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return q.to(dtype), k.to(dtype), v.to(dtype)
    raise ValueError(f"{VARLEN} on CUDA needs fp16 or bf16 activations (got {q.dtype}); "
                     "train in bf16 or run under torch.autocast")


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None,
                             dropout=0.0, position_ids=None, **kwargs):
    """transformers attention interface: ``query [B, H, T, D]`` -> ``([B, T, H, D], None)``."""
    if attention_mask is not None:
        raise ValueError(f"{VARLEN} reads packed rows (position_ids, no attention mask); "
                         "use sdpa for padded batches")
    b, h, t, d = query.shape
    if position_ids is None:
        position_ids = torch.arange(t, device=query.device).expand(b, t)
    position_ids = position_ids.expand(b, t)
    cu, max_len = _cu_seqlens(position_ids)
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    scale = scaling if scaling is not None else d ** -0.5
    if q.is_cuda:
        q, k, v = _flash_dtype(q, k, v)
        out = _torch_varlen(q, k, v, cu, max_len, scale)
    else:
        out = _reference_varlen(q, k, v, cu, scale)
    return out.reshape(b, t, h, d), None


def _no_mask(*args, attention_mask=None, **kwargs):
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{VARLEN} cannot apply a padding mask; pack the batch instead")
    return None


def register_varlen() -> None:
    """Make ``attn_implementation="polar_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _no_mask)
