"""The accelerator we run on: its name, its dense bf16 peak, MFU and memory figures.

MFU is model FLOPs per second (from :func:`polar_scaling.sizes.train_flops` on the real,
non-pad sequence lengths) over the card's dense bf16 tensor-core peak. The peak comes from
a table of datasheet figures (dense, without 2:4 sparsity), matched on the device name;
``POLAR_PEAK_FLOPS`` (FLOP/s, e.g. ``989e12``) or an explicit argument overrides it. On a
CPU, or a card not in the table, the peak is None and MFU is not reported.
"""

from __future__ import annotations

import os

import torch

PEAK_ENV = "POLAR_PEAK_FLOPS"

# Dense bf16 tensor-core FLOP/s per card, from NVIDIA datasheets. Matched in order on the
# upper-cased device name, so the more specific names come first.
PEAK_BF16: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM, reported as "NVIDIA H100 80GB HBM3"
    ("H800 PCIE", 756e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A6000", 155e12),
    ("A10G", 70e12),
    ("A10", 125e12),
]


def device_name(device: torch.device | str | None = None) -> str:
    """``torch.cuda.get_device_name`` for a CUDA device, ``"cpu"`` otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def peak_flops(name: str | None = None, override: float | None = None,
               environ: dict | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of card ``name`` (default: this process's device), or None.

    Order: ``override``, then ``$POLAR_PEAK_FLOPS``, then the table. None for a CPU or an
    unknown card, so that no MFU is reported rather than a wrong one.
    """
    if override is not None:
        return float(override)
    env = os.environ if environ is None else environ
    if env.get(PEAK_ENV):
        return float(env[PEAK_ENV])
    name = device_name() if name is None else name
    upper = name.upper()
    if upper in ("CPU", "MPS", "META"):
        return None
    for key, peak in PEAK_BF16:
        if key in upper:
            return peak
    return None


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1+): achieved over peak; None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return flops_per_s / peak


def memory_stats(device: torch.device | str | None = None) -> dict:
    """GPU memory in GiB (allocated, reserved, peak allocated, total); CPU: peak RSS only."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gib = 1024 ** 3
    if device.type == "cuda" and torch.cuda.is_available():
        return {
            "mem_allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "mem_reserved_gib": torch.cuda.memory_reserved(device) / gib,
            "mem_peak_gib": torch.cuda.max_memory_allocated(device) / gib,
            "mem_total_gib": torch.cuda.get_device_properties(device).total_memory / gib,
        }
    import resource

    # ru_maxrss is KiB on Linux.
    return {"rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}


def total_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Memory of the CUDA device, or None on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


class Throughput:
    """Per-GPU tokens/s, model FLOP/s and MFU of a training session, excluding pauses.

    ``tokens`` and ``flops`` are the running totals the trainer keeps (all GPUs together);
    :meth:`log` appends one JSON row per call to a ``perf.jsonl`` covering the interval
    since the previous call, and :meth:`summary` covers the whole session. Time spent in
    :meth:`pause` (evaluation) is not training time.
    """

    def __init__(self, world: int, tokens: float, flops: float, peak: float | None = None,
                 clock=None):
        import time

        self.clock = clock or time.perf_counter
        self.world = world
        self.peak = peak_flops() if peak is None else peak
        self.start = self.mark = (self.clock(), tokens, flops, 0.0)
        self.paused = 0.0

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def _rates(self, since, tokens, flops) -> dict:
        t0, tok0, fl0, paused0 = since
        seconds = max(1e-9, self.clock() - t0 - (self.paused - paused0))
        flops_per_s = (flops - fl0) / seconds / self.world
        return {"tokens_per_s_per_gpu": (tokens - tok0) / seconds / self.world,
                "model_tflops_per_s_per_gpu": flops_per_s / 1e12,
                "mfu": mfu(flops_per_s, self.peak)}

    def log(self, path, step: int, tokens: float, flops: float, enabled: bool = True) -> dict:
        row = {"step": step, **self._rates(self.mark, tokens, flops), **memory_stats()}
        self.mark = (self.clock(), tokens, flops, self.paused)
        if enabled:
            import json

            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def summary(self, tokens: float, flops: float) -> dict:
        return self._rates(self.start, tokens, flops)
