"""Text views of a sweep: the dry-run plan, the status table, and the live ``--wait`` view."""

from __future__ import annotations

import sys
import time

from polar_scaling.sweep.spec import Sweep
from polar_scaling.sweep.store import STATES, RunStatus


def si(x: float | None, digits: int = 3) -> str:
    """1234567 -> 1.23M; None -> '-'."""
    if x is None or x != x:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g}{unit}"
    return f"{x:.{digits}g}"


def sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{m:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)


def plan_table(sweep: Sweep, actions: dict[str, str]) -> str:
    """Every run with N, tokens, FLOPs, GPUs, time limit, estimated time and what launch does."""
    rows = []
    for run in sweep.runs:
        res = run.resources
        rows.append([run.run_id, run.stage, si(run.n_params), si(run.tokens), sci(run.flops),
                     str(res.gpus), str(res.nodes), duration(res.time_min * 60),
                     duration(run.estimate_s), actions.get(run.run_id, "")])
    header = ["RUN", "STAGE", "N", "TOKENS", "FLOPS", "GPUS", "NODES", "LIMIT", "EST.TIME",
              "ACTION"]
    total_flops = sum(r.flops or 0 for r in sweep.runs)
    gpu_hours = sum((r.estimate_s or 0) * r.resources.gpus / 3600 for r in sweep.runs)
    cpu_time = sum(r.estimate_s or 0 for r in sweep.runs if not r.resources.gpus)
    over = [r.run_id for r in sweep.runs
            if r.estimate_s and r.estimate_s > r.resources.time_min * 60]
    costs = ([f"{gpu_hours:.1f} GPU-hours"] if gpu_hours else []) + (
        [f"{duration(cpu_time)} of CPU jobs"] if cpu_time else [])
    lines = [table(header, rows), "",
             f"{len(sweep.runs)} runs; {total_flops:.3g} FLOPs in all"
             + (f"; estimated {' and '.join(costs)}" if costs else "")]
    if over:
        lines.append(f"note: {len(over)} run(s) are estimated to outlast their time limit and "
                     f"will be requeued from checkpoints (e.g. {over[0]})")
    return "\n".join(lines)


def status_table(statuses: list[RunStatus], rates: dict[str, float] | None = None) -> str:
    """One line per run; failed, blocked and waiting runs get their reason (and log) on the
    next line."""
    rows, notes = [], {}
    for st in statuses:
        p = st.progress
        eta = None
        if rates and st.state == "running" and rates.get(st.run.run_id) and st.run.tokens:
            eta = (st.run.tokens - (st.tokens or 0)) / rates[st.run.run_id]
        rows.append([st.run.run_id, st.state, _bar(p), si(st.tokens), _f(st.loss),
                     st.job_id or "-", duration(eta) if eta is not None else "-"])
        if st.state in ("failed", "blocked", "waiting", "unknown") and (st.reason or st.log):
            notes[len(rows) - 1] = (f"    reason: {st.reason or '-'}"
                                    + (f"\n    log: {st.log}" if st.log else ""))
    text = table(["RUN", "STATE", "PROGRESS", "TOKENS", "EVAL_LOSS", "JOB", "ETA"], rows)
    lines = text.splitlines()
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        out.append(line)
        if i in notes:
            out.append(notes[i])
    return "\n".join(out) + "\n" + summary(statuses)


def summary(statuses: list[RunStatus]) -> str:
    counts = {s: 0 for s in STATES}
    for st in statuses:
        counts[st.state] += 1
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs"


def is_finished(statuses: list[RunStatus]) -> bool:
    """Nothing left to wait for: a waiting run needs another launch once its inputs exist."""
    return all(st.state in ("done", "failed", "cancelled", "blocked", "waiting")
               for st in statuses)


class LiveView:
    """Redraws the status table in place on a terminal; elsewhere prints state changes."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.lines = 0
        self.last: dict[str, tuple[float, float]] = {}  # run id -> (time, tokens)
        self.rates: dict[str, float] = {}
        self.states: dict[str, str] = {}
        self.t0 = time.time()

    def update(self, statuses: list[RunStatus]) -> None:
        now = time.time()
        for st in statuses:
            rid = st.run.run_id
            if st.tokens is not None:
                t, tok = self.last.get(rid, (now, st.tokens))
                if st.tokens > tok and now > t:
                    rate = (st.tokens - tok) / (now - t)
                    self.rates[rid] = 0.7 * self.rates.get(rid, rate) + 0.3 * rate
                if st.tokens != tok or rid not in self.last:
                    self.last[rid] = (now, st.tokens)
        if self.tty:
            text = status_table(statuses, self.rates) + f"  [{duration(now - self.t0)}]"
            if self.lines:
                self.out.write(f"\x1b[{self.lines}F\x1b[J")
            self.out.write(text + "\n")
            self.lines = text.count("\n") + 1
        else:
            for st in statuses:
                rid = st.run.run_id
                if self.states.get(rid) != st.state:
                    extra = f" ({st.reason}; log {st.log})" if st.state == "failed" else ""
                    self.out.write(f"[{duration(now - self.t0)}] {rid}: {st.state}{extra}\n")
                    self.states[rid] = st.state
        self.out.flush()


def _bar(p: float | None, width: int = 10) -> str:
    if p is None:
        return "-"
    filled = int(round(p * width))
    return "#" * filled + "." * (width - filled) + f" {p * 100:3.0f}%"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"

