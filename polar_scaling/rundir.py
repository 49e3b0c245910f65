"""The run directory: all of one run's state, so relaunching the same directory resumes it.

    RUN/config.yaml        resolved config (written once; a different config is an error)
    RUN/metrics.jsonl      one JSON object per line: step, tokens, flops, losses, evals
    RUN/ds_config.json     the DeepSpeed config generated from the args
    RUN/checkpoints/       NNNNNNNNNN/ (complete ones hold COMPLETE) written by the engine
    RUN/model/             the exported model (safetensors) when the run finishes
    RUN/done.json          summary, written last: its presence means the run is finished
    RUN/.lock              held (flock) by the process running the stage; names its pid
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import warnings
from pathlib import Path

import yaml

RUNTIME_KEYS = ("progress",)
SAFE_NAME = re.compile(r"[^A-Za-z0-9._=+-]+")


class RunDirError(RuntimeError):
    pass


def safe_name(name: str) -> str:
    """A run name made safe as one path component (no separators, no '..', not empty)."""
    cleaned = SAFE_NAME.sub("_", name).strip("._")
    if not cleaned:
        raise RunDirError(f"run name {name!r} has no usable characters")
    return cleaned[:200]


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    done_path = property(lambda self: self.path / "done.json")
    model_dir = property(lambda self: self.path / "model")

    def init(self, config: dict, stage: str, defaults: dict | None = None) -> None:
        """Create the directory and write ``config.yaml``, or check it matches the one there.

        A directory holding another config is refused (naming the differing keys) so a
        typo can never resume, overwrite or mix two runs' checkpoints. ``defaults`` (the
        config class's defaults) lets a run written before a key existed resume when that
        key is at its default: the new option changes nothing for it.
        """
        resolved = {"stage": stage, **config}
        if isinstance(resolved.get("schedule"), dict):  # display only: may change on relaunch
            resolved["schedule"] = {k: v for k, v in resolved["schedule"].items()
                                    if k not in RUNTIME_KEYS}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {self.path}: {e}") from None
        if self.config_path.exists():
            existing = yaml.safe_load(self.config_path.read_text()) or {}
            if defaults is not None:
                resolved = _drop_new_defaults(existing, resolved, {"stage": stage, **defaults})
            if _normalise(existing) != _normalise(resolved):
                diff = sorted(_diff_keys(existing, resolved))
                raise RunDirError(
                    f"{self.path} holds a run with another config (differs in: "
                    f"{', '.join(diff[:8])}); use a new --run-dir or delete that one")
            return
        atomic_write(self.config_path, yaml.safe_dump(resolved, sort_keys=False))

    def init_args(self, args, stage: str) -> None:
        """:meth:`init` for a stage's config dataclass ``args``, with its class's defaults."""
        from polar_scaling.config import default_dict, to_dict

        self.init(to_dict(args), stage, defaults=default_dict(type(args)))

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the run's lock while this process works on it: a second process launched on
        the same directory (a relaunch while the first still runs, a duplicated job) is
        refused, naming the holder, instead of writing the same checkpoints. Only rank 0
        locks (the ranks of one run share the directory); a file system without locks
        gets a warning."""
        if int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) != 0:
            yield
            return
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_lock(fd, self.path)
            if locked:
                me = f"pid {os.getpid()} on {socket.gethostname()}".encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, me, 0)
            try:
                yield
            finally:
                if locked:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def is_done(self) -> bool:
        return self.done_path.is_file()

    def read_done(self) -> dict:
        return json.loads(self.done_path.read_text())

    def mark_done(self, summary: dict) -> None:
        atomic_write(self.done_path, json.dumps(summary, indent=2, default=str))

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)


def _try_lock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        raise RunDirError(f"{path} is in use by {holder}: two processes must not run one run "
                          f"directory; relaunch it once that one has ended") from None
    except OSError as e:  # e.g. a network file system mounted without lock support
        warnings.warn(f"cannot lock {path} ({e}); make sure no other process runs it",
                      stacklevel=3)
        return False


def run_once(run_dir: str | Path, args, stage: str, body) -> dict:
    """The frame of every stage: check (or write) the run's config, hold its lock, and
    return ``done.json`` when the run has finished, else ``body(args, run)``."""
    run = RunDir(run_dir)
    run.init_args(args, stage)
    with run.exclusive():
        if run.is_done():
            return run.read_done()
        return body(args, run)


def read_jsonl(path: Path) -> list[dict]:
    """Parsed lines of a JSONL file; a torn last line (a kill mid-write) is ignored."""
    if not Path(path).is_file():
        return []
    rows = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step``: they came from a run killed after its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def _normalise(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _drop_new_defaults(existing: dict, resolved: dict, defaults: dict) -> dict:
    """``resolved`` without the keys that ``existing`` lacks and that hold their default."""
    out = {}
    for key, value in resolved.items():
        if key not in existing:
            if key in defaults and _normalise(value) == _normalise(defaults[key]):
                continue
            out[key] = value
        elif isinstance(value, dict) and isinstance(existing[key], dict) \
                and isinstance(defaults.get(key), dict):
            out[key] = _drop_new_defaults(existing[key], value, defaults[key])
        else:
            out[key] = value
    return out


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
    elif _normalise(a) != _normalise(b):
        yield prefix.rstrip(".")
