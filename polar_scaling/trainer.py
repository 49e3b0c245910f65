"""The training loop every stage shares: budget, metrics, evaluation schedule, checkpoints,
resume, preemption and NaN handling. A stage supplies the model, a :class:`StepSource`, a
loss function and an evaluation function; this file knows nothing about rewards or LMs.

Data position is the step number: ``StepSource.micro_batches(step, rank, world)`` is a pure
function of its arguments, so a resumed run sees exactly the batches an uninterrupted run
would, at any world size.
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from polar_scaling.dist_env import init_distributed
from polar_scaling.engine import Engine, EngineArgs, OptimArgs
from polar_scaling.errors import Preempted, StageError
from polar_scaling.gpu import Throughput
from polar_scaling.rundir import MetricsLog, RunDir


@dataclass
class ScheduleArgs:
    seed: int = 0
    eval_points: int = field(default=16, metadata={"ge": 1})  # log-spaced over the run
    eval_first_fraction: float = field(default=0.01, metadata={"gt": 0, "le": 1})
    checkpoint_every: int = field(default=200, metadata={"ge": 1})  # steps
    keep_checkpoints: int = field(default=2, metadata={"ge": 1})
    log_every: int = field(default=5, metadata={"ge": 1})
    progress: bool = True


class StepSource(Protocol):
    num_steps: int
    micro_batch: int
    grad_accum: int

    def micro_batches(self, step: int, rank: int, world: int) -> list: ...
    def step_tokens(self, step: int) -> int: ...
    def step_flops(self, step: int) -> float: ...


def eval_steps(num_steps: int, points: int, first_fraction: float) -> set[int]:
    """Steps (1-based, after the update) at which to evaluate: log-spaced, last included."""
    first = max(1.0, first_fraction * num_steps)
    steps = {int(round(s)) for s in np.geomspace(first, num_steps, points)} if points > 1 else set()
    return {min(max(1, s), num_steps) for s in steps} | {num_steps}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class StopSignals:
    """Turns SIGUSR2/SIGTERM into a flag checked at step boundaries.

    After the loop has saved a checkpoint, :meth:`forward` hands the signal to the handler
    that was installed before (submitit's requeue handler under a sweep), or raises
    :class:`Preempted` when there was none.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def forward(self):
        sig, self.received = self.received, None
        prev = self.previous.get(sig)
        self.__exit__()
        if callable(prev):
            prev(sig, None)
        raise Preempted(f"stopped by {signal.Signals(sig).name}; checkpoint saved")


def _all_reduce_mean(value: float, device) -> float:
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def train(run: RunDir, model: torch.nn.Module, engine_args: EngineArgs, optim: OptimArgs,
          schedule: ScheduleArgs, source: StepSource,
          loss_fn: Callable, evaluate: Callable[[torch.nn.Module], dict],
          export: Callable[[torch.nn.Module, dict, RunDir], None] | None = None,
          summary_extra: dict | None = None, loss_key: str = "train_loss") -> dict:
    """Train to the end of ``source`` (resuming from the run's latest checkpoint) and export.

    Training rows of metrics.jsonl hold the mean loss as ``loss_key``. Returns the summary
    also written to ``done.json``.
    """
    rank, world = init_distributed()
    if source.num_steps < 1:
        raise StageError("the budget is smaller than one optimizer step")
    engine = Engine(model, engine_args, optim, source.num_steps, source.micro_batch,
                    source.grad_accum, run.path)
    metrics = MetricsLog(run.metrics_path, enabled=rank == 0)
    state = engine.load_latest(run.checkpoints)
    start, tokens, flops = 0, 0, 0.0
    if state is not None:
        start, tokens, flops = state["step"], state["tokens"], state["flops"]
        restore_rng(state["rng"])
    metrics.truncate_after(start)
    evals = eval_steps(source.num_steps, schedule.eval_points, schedule.eval_first_fraction)
    bar = _progress(schedule.progress and rank == 0, source, start, tokens)
    wall0, eval_time, last_good = time.time(), 0.0, start
    perf = Throughput(world, tokens, flops)
    with StopSignals() as stop:
        for step in range(start, source.num_steps):
            batches = source.micro_batches(step, rank, world)
            loss, stats = engine.train_step(batches, loss_fn)
            loss = _all_reduce_mean(loss, engine.device)
            if not math.isfinite(loss):
                raise StageError(
                    f"non-finite training loss ({loss}) at step {step + 1}; the last good "
                    f"checkpoint is step {last_good} in {run.checkpoints} (lower optim.lr?)")
            tokens += source.step_tokens(step)
            flops += source.step_flops(step)
            done = step + 1
            if done % schedule.log_every == 0 or done in evals or done == source.num_steps:
                metrics.write({"step": done, "tokens": tokens, "flops": flops,
                               loss_key: loss, "lr": engine.lr(),
                               **{f"train_{k}": v for k, v in stats.items()}})
                # Timing figures go to perf.jsonl: metrics.jsonl must be identical on resume.
                perf.log(run.path / "perf.jsonl", done, tokens, flops, enabled=rank == 0)
            if done in evals:
                t0 = time.time()
                row = evaluate(engine.ds)
                eval_time += time.time() - t0
                perf.pause(time.time() - t0)
                metrics.write({"step": done, "tokens": tokens, "flops": flops, **row})
            if bar is not None:
                bar.update(source.step_tokens(step))
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            stopping = stop.received is not None
            if done % schedule.checkpoint_every == 0 or done == source.num_steps or stopping:
                engine.save(run.checkpoints, done, {
                    "step": done, "tokens": tokens, "flops": flops, "rng": rng_state()},
                    keep=schedule.keep_checkpoints)
                last_good = done
            if stopping:
                if bar is not None:
                    bar.close()
                stop.forward()
    if bar is not None:
        bar.close()
    wall = time.time() - wall0
    final_state = engine.full_state_dict()
    summary = {"steps": source.num_steps, "tokens": tokens, "flops": flops,
               "wall_seconds_last_session": round(wall, 2),
               "eval_share_of_wall": round(eval_time / wall, 4) if wall > 0 else 0.0,
               "world_size": world, **perf.summary(tokens, flops), **(summary_extra or {})}
    last = [r for r in run.read_metrics() if loss_key not in r] if rank == 0 else []
    if last:
        summary["final_eval"] = last[-1]
    if rank == 0:
        if export is not None:
            export(engine.module, final_state, run)
        run.mark_done(summary)
    return summary


def _progress(enabled: bool, source: StepSource, start: int, tokens: int):
    if not enabled:
        return None
    from tqdm import tqdm

    total = sum(source.step_tokens(s) for s in range(source.num_steps))
    return tqdm(total=total, initial=tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
                mininterval=1.0, desc="train", smoothing=0.1)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
