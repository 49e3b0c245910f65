"""Process-group set-up from whatever started us: torchrun, ``srun``, or a plain ``python``.

DeepSpeed needs ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
Under Slurm (one task per GPU via ``srun``) they are derived from ``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID`` and the first host of ``SLURM_JOB_NODELIST``; a plain
single process gets rank 0 of 1 on a free loopback port.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as ``gpu[003-005,007],cpu1`` -> ``gpu003``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # The first entry is a name, optionally followed by a bracketed range list; a comma
    # inside the brackets does not end the entry.
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if m is None:
        return nodelist
    if m.group(2):
        return m.group(1) + m.group(2).split(",")[0].split("-")[0]
    return m.group(1)


def slurm_job_port(job_id: str) -> int:
    """A port every task of one job derives alike (no communication needed to agree)."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def setup_env(environ: dict | None = None) -> dict:
    """Fill the rank variables in ``environ`` (default ``os.environ``) and return them."""
    env = os.environ if environ is None else environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(slurm_job_port(env.get("SLURM_JOB_ID", "0"))))
    if "RANK" not in env:
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = "0", "1", "0"
        env["MASTER_ADDR"] = "127.0.0.1"
        env["MASTER_PORT"] = str(free_port())
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    return {k: env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed once (NCCL on GPU, gloo on CPU); return (rank, world)."""
    import torch
    import torch.distributed as dist

    setup_env()
    if not dist.is_initialized():
        import deepspeed

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()
