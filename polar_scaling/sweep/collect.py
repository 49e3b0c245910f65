"""The results table: learning curves and final figures of every run of a sweep.

One row per evaluation of every grid run (base LMs and data runs are not rows; a base LM's
compute is the ``base_flops`` column of the runs built on it). Columns the analysis reads by
default: ``run_id, size, params, non_embedding_params, tokens, flops, step, loss, accuracy,
final``; ``loss``/``accuracy`` are the held-out-prompt eval figures, and ``final`` marks the
last evaluation of a finished run. Written to ROOT/results.parquet and ROOT/results.csv.

``rft`` runs give one row per true-KL evaluation instead (``tokens`` = rollout tokens):
``true_kl``, ``true_kl_per_token``, ``true_kl_reverse``, ``true_kl_to_init``,
``true_kl_fall`` (1 − true KL / its value at step 0), ``reward_mean`` (the training step's),
and the reward: ``reward_mode``, ``reward_model`` and, read from the RM's run directory,
``rm_size``, ``rm_params``, ``rm_non_embedding_params``, ``rm_tokens`` (its pre-training
tokens), ``rm_budget_tokens`` (its nominal budget) and ``rm_base_tokens`` (its base LM's);
the token counts are 0 for an untrained RM (``polar-analyze rft`` summarises them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from polar_scaling.rundir import atomic_write, read_jsonl
from polar_scaling.sizes import get_size, non_embedding_params, total_params
from polar_scaling.sweep.spec import HEAD_OF_STAGE, Sweep
from polar_scaling.sweep.store import RunStatus, Store

COLUMNS = ["run_id", "name", "stage", "size", "params", "non_embedding_params", "tokens",
           "flops", "step", "loss", "accuracy", "heldout_policies_loss",
           "heldout_policies_accuracy", "train_loss", "final", "seed", "lr", "batch", "budget",
           "budget_tokens", "budget_flops", "base_run_id", "base_flops", "status",
           # rft runs
           "true_kl", "true_kl_per_token", "true_kl_reverse", "true_kl_to_init", "true_kl_fall",
           "reward_mean", "reward_mode", "reward_model", "rm_size", "rm_params",
           "rm_non_embedding_params", "rm_tokens", "rm_budget_tokens", "rm_base_tokens"]
RFT_FLOATS = ("true_kl", "true_kl_per_token", "true_kl_reverse", "true_kl_to_init",
              "true_kl_fall", "reward_mean", "rm_params", "rm_non_embedding_params", "rm_tokens",
              "rm_budget_tokens", "rm_base_tokens")


def collect_rows(sweep: Sweep, store: Store, statuses: list[RunStatus] | None = None) -> list[dict]:
    """Rows of the results table (see the module docstring), runs in sweep order."""
    statuses = statuses if statuses is not None else store.status(sweep, probe=False)
    state = {s.run.run_id: s.state for s in statuses}
    by_id = sweep.by_id
    rows: list[dict] = []
    for run in sweep.runs:
        if run.role != "run":
            continue
        path = store.run_dir(run.run_id)
        metrics = read_jsonl(path / "metrics.jsonl")
        if run.stage == "rft":
            rows += _rft_rows(run, path, metrics, state.get(run.run_id))
            continue
        evals = [r for r in metrics if "eval_loss" in r]
        if not evals:
            continue
        train_loss = {r["step"]: r["train_loss"] for r in metrics if "train_loss" in r}
        done = _read_json(path / "done.json")
        config = _run_config(path) or run.config
        base = next((by_id[d] for d in run.deps if by_id[d].role == "base"), None)
        base_flops = _total_flops(store.run_dir(base.run_id)) if base else math.nan
        params, non_emb = _params(run, done, path)
        fixed = {
            "run_id": run.run_id, "name": run.name, "stage": run.stage, "size": run.size,
            "params": params, "non_embedding_params": non_emb, "seed": config.get("seed"),
            "lr": _get(config, "optim.lr"), "batch": _get(config, "batch.size"),
            "budget": run.budget, "budget_tokens": run.tokens, "budget_flops": run.flops,
            "base_run_id": base.run_id if base else None, "base_flops": base_flops,
            "status": state.get(run.run_id),
        }
        finished = done is not None
        for i, r in enumerate(evals):
            rows.append({**fixed, "tokens": r.get("tokens"), "flops": r.get("flops"),
                         "step": r.get("step"), "loss": r.get("eval_loss"),
                         "accuracy": r.get("eval_accuracy"),
                         "heldout_policies_loss": r.get("eval_heldout_policies_loss"),
                         "heldout_policies_accuracy": r.get("eval_heldout_policies_accuracy"),
                         "train_loss": train_loss.get(r.get("step")),
                         "final": finished and i == len(evals) - 1})
    return rows


def write_results(sweep: Sweep, store: Store, statuses: list[RunStatus] | None = None):
    """Write ROOT/results.parquet and ROOT/results.csv; returns the DataFrame."""
    import pandas as pd

    df = pd.DataFrame(collect_rows(sweep, store, statuses), columns=COLUMNS)
    df["final"] = df["final"].astype(bool)
    for col in ("params", "non_embedding_params", "step", "seed", "batch"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    for col in ("tokens", "flops", "loss", "accuracy", "heldout_policies_loss",
                "heldout_policies_accuracy", "train_loss", "lr", "budget_tokens",
                "budget_flops", "base_flops", *RFT_FLOATS):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    store.root.mkdir(parents=True, exist_ok=True)
    tmp = store.root / ".results.parquet.tmp"
    df.to_parquet(tmp, index=False)
    tmp.replace(store.root / "results.parquet")
    atomic_write(store.root / "results.csv", df.to_csv(index=False))
    return df


def _rft_rows(run, path: Path, metrics: list[dict], status: str | None) -> list[dict]:
    """One row per true-KL evaluation of an rft run (none without a target policy)."""
    config = _run_config(path) or run.config
    done = _read_json(path / "done.json")
    evals = [r for r in metrics if "true_kl" in r]
    reward = {r["step"]: r["reward_mean"] for r in metrics if "reward_mean" in r}
    model = _get(config, "reward.model")
    rm = _rm_run_info(model, trained=_get(config, "reward.mode") == "rm") if model else {}
    start = evals[0]["true_kl"] if evals and evals[0].get("step") == 0 else math.nan
    prompts, samples = (_get(config, f"rollout.{k}") for k in ("prompts_per_step",
                                                               "samples_per_prompt"))
    rollouts = prompts * samples if prompts and samples else None  # per step
    fixed = {"run_id": run.run_id, "name": run.name, "stage": run.stage, "size": run.size,
             "params": math.nan, "non_embedding_params": math.nan, "seed": config.get("seed"),
             "lr": _get(config, "optim.lr"), "batch": rollouts,
             "budget": run.budget, "budget_tokens": run.tokens, "budget_flops": run.flops,
             "base_run_id": None, "base_flops": math.nan, "status": status,
             "reward_mode": _get(config, "reward.mode"), "reward_model": model, **rm}
    return [{**fixed, "tokens": r.get("rollout_tokens"), "flops": math.nan, "step": r.get("step"),
             "true_kl": r["true_kl"], "true_kl_per_token": r.get("true_kl_per_token"),
             "true_kl_reverse": r.get("true_kl_reverse"),
             "true_kl_to_init": r.get("true_kl_to_init"),
             "true_kl_fall": 1.0 - r["true_kl"] / start if start else math.nan,
             "reward_mean": reward.get(r.get("step")),
             "final": done is not None and i == len(evals) - 1}
            for i, r in enumerate(evals)]


def _rm_run_info(model: str, trained: bool) -> dict:
    """Size, parameters and training tokens of the reward model in folder ``model``, from the
    done.json and config of the run that wrote it (``RUN/model``) and of its base LM's run;
    NaN for a model from elsewhere, tokens 0 for its untrained twin (``trained`` false)."""
    run = Path(model).parent
    done = _read_json(run / "done.json") or {}
    budget = _get(_run_config(run) or {}, "budget.tokens")
    base = done.get("base")
    base_done = (_read_json(Path(base).parent / "done.json") or {}) if base else {"tokens": 0}
    tokens = {"rm_tokens": done.get("tokens", math.nan),
              "rm_budget_tokens": budget if budget is not None else math.nan,
              "rm_base_tokens": base_done.get("tokens", math.nan)}
    if not trained:
        tokens = {k: 0.0 for k in tokens}
    return {"rm_size": done.get("size"), "rm_params": done.get("params", math.nan),
            "rm_non_embedding_params": done.get("non_embedding_params", math.nan), **tokens}


def _params(run, done: dict | None, path: Path) -> tuple[float, float]:
    """(total, non-embedding) parameters: from done.json, else the ladder (total needs the
    vocabulary: the size's own, or the run's exported model)."""
    if done and done.get("params") and done.get("non_embedding_params"):
        return done["params"], done["non_embedding_params"]
    if run.size is None:
        return math.nan, math.nan
    head = HEAD_OF_STAGE.get(run.stage, "reward")
    size = get_size(run.size)
    vocab = size.vocab or (_read_json(path / "model" / "config.json") or {}).get("vocab_size")
    if vocab is None:
        return math.nan, float(non_embedding_params(size, head) if head != "lm" else math.nan)
    size = size.with_vocab(vocab)
    return float(total_params(size, head)), float(non_embedding_params(size, head))


def _total_flops(run_dir: Path) -> float:
    done = _read_json(run_dir / "done.json")
    if done and done.get("flops") is not None:
        return float(done["flops"])
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "flops" in r]
    return float(rows[-1]["flops"]) if rows else math.nan


def _run_config(path: Path) -> dict | None:
    for name in ("config.yaml", "launch.yaml"):
        if (path / name).is_file():
            return yaml.safe_load((path / name).read_text()) or {}
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
