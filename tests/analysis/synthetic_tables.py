"""Synthetic scaling-law tables with known parameters, shared by the analysis tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

# Hoffmann et al.'s Approach 3 law, the truth behind the synthetic tables.
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla(n, d, p=TRUE):
    return p["E"] + p["A"] / np.power(n, p["alpha"]) + p["B"] / np.power(d, p["beta"])


def learning_curves(
    sizes=(2e7, 5e7, 1.2e8, 3e8, 7e8),
    tokens_per_param=20.0,
    points=30,
    noise=0.004,
    seed=0,
    law=chinchilla,
) -> pd.DataFrame:
    """A results table shaped like the sweep manager's ROOT/results.csv.

    One run per size trained for tokens_per_param·N tokens; an evaluation row (with loss)
    and a train-only row (loss NaN) at each logged step, plus the evaluation at step 0 with
    zero tokens and compute. Loss follows law(N, D) with multiplicative noise.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(sizes):
        total = tokens_per_param * n
        tokens = np.geomspace(total / 100, total, points)
        rows.append(dict(run_id=f"run{i}", size=f"s{i}", params=n, non_embedding_params=0.9 * n,
                         step=0, tokens=0.0, flops=0.0, loss=np.log(2) + 5, accuracy=0.5,
                         final=False))
        for k, d in enumerate(tokens, start=1):
            loss = law(n, d) * np.exp(rng.normal(0, noise))
            base = dict(run_id=f"run{i}", size=f"s{i}", params=n, non_embedding_params=0.9 * n,
                        step=k, tokens=d, flops=6 * n * d, final=False)
            rows.append({**base, "loss": np.nan, "accuracy": np.nan})
            rows.append({**base, "loss": loss, "accuracy": 0.6, "final": k == points})
    return pd.DataFrame(rows)
