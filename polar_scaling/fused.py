"""Fused kernels for the decoder's memory-bound operations.

Between the large matmuls, a Llama decoder layer runs RMSNorm (an fp32 upcast, a square,
a mean, a reciprocal square root, two products), SwiGLU (SiLU times a product) and rotary
embeddings (slices, negations, products) as separate kernels, each reading and writing the
whole activation. On a GPU these can cost as much as the attention. Three ways to fuse them:

- ``compile``: ``torch.compile`` of every RMSNorm and MLP module (static graphs, nothing
  data-dependent; compiled once and reused by every layer of the same shape).
- ``compile_layers``: ``torch.compile`` of each whole decoder layer (also fuses rotary
  embeddings and residual adds); the attention kernel's sequence offsets, read from the
  packed positions, break the graph once per layer.
- ``liger``: the Triton kernels of the ``liger-kernel`` package (RMSNorm, SwiGLU, RoPE) for
  Llama-layout models. It patches transformers' Llama module for the whole process, so it
  also applies to Llama models built afterwards.

``none`` leaves the model as transformers built it; ``auto`` (the engine's default) is
liger on CUDA where the package is installed (``pip install polar-scaling[gpu]``), else
none. All four compute the same function (the
tests compare outputs and gradients); which is fastest is a measurement
(``benchmarks/gpu_mfu.py --fused``, docs/gpu.md).
"""

from __future__ import annotations

import importlib.util

import torch

FUSED_KERNELS = ("auto", "none", "compile", "compile_layers", "liger")


def resolve_fused(how: str, device: torch.device | str | None = None) -> str:
    """``auto``: liger on CUDA where liger-kernel is installed (measured fastest with
    compile_layers, and it never recompiles when row shapes change), else none."""
    if how != "auto":
        return how
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None \
            and importlib.util.find_spec("triton") is not None:
        return "liger"
    return "none"


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    backbone = getattr(model, "model", model)
    if not hasattr(backbone, "layers"):
        raise ValueError(f"fused kernels need a decoder with .layers; got {type(backbone).__name__}")
    return backbone


def fuse_kernels(model: torch.nn.Module, how: str,
                 device: torch.device | str | None = None) -> torch.nn.Module:
    """Apply fused kernels ``how`` (one of :data:`FUSED_KERNELS`) to ``model`` in place.

    ``device``: where the model will train (the engine moves it there later); default: CUDA
    when available, else the model's device.
    """
    if how not in FUSED_KERNELS:
        raise ValueError(f"unknown fused kernels {how!r}; expected one of {FUSED_KERNELS}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else next(model.parameters()).device
    device = torch.device(device)
    how = resolve_fused(how, device)
    if how == "none":
        return model
    backbone = _backbone(model)
    if how == "liger":
        _apply_liger(backbone, device)
    elif how == "compile":
        for layer in backbone.layers:
            for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
                getattr(layer, name).compile(dynamic=None)
        if hasattr(backbone, "norm"):
            backbone.norm.compile(dynamic=None)
    else:  # compile_layers
        for layer in backbone.layers:
            layer.compile(dynamic=None)
        if hasattr(backbone, "norm"):
            backbone.norm.compile(dynamic=None)
    return model


def _apply_liger(backbone: torch.nn.Module, device: torch.device) -> None:
    model_type = getattr(backbone.config, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"liger kernels are wired for Llama-layout models here, not {model_type!r}")
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        raise RuntimeError("fused kernels 'liger' need the liger-kernel and triton packages "
                           "(pip install liger-kernel; a CUDA machine)")
    if device.type != "cuda":
        raise RuntimeError("fused kernels 'liger' run on CUDA only")
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=backbone)
