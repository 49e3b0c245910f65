import warnings

import numpy as np
import pandas as pd
import pytest
from synthetic_tables import TRUE, chinchilla, learning_curves

from analysis.envelope import lower_envelope
from analysis.isoflop import (
    curve_minimum,
    fit_envelope_allocation,
    fit_isoflop,
    group_budgets,
    isoflop_optima,
)
from analysis.load import standardize
from analysis.powerlaw import fit_power_law
from analysis.result import FitError, FitWarning

# The N_opt exponents Porian et al. report for their first (Kaplan-like) and last (tuned) setup.
STORED = {0: 0.834, 4: 0.497}
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # N_opt exponent of the Chinchilla law


@pytest.fixture(scope="module")
def porian(anchors):
    pairs = pd.read_csv(anchors / "porian2024_optimal_pairs.csv").dropna(subset=["n"])
    points = pd.read_csv(anchors / "porian2024_isoflop_points.csv").dropna()
    points = points.rename(columns={"n_params": "params", "flops": "compute"})
    assert sorted(pairs["config_id"].unique()) == [0, 1, 2, 3, 4]
    return pairs, points


def test_porian_exponents_from_optimal_pairs(porian):
    pairs, _ = porian
    exps = {}
    for cid, g in pairs.groupby("config_id"):
        exps[cid] = fit_power_law(g["flops"].to_numpy(), g["n"].to_numpy(), y_name="N_opt").params["b"]
    for cid, stored in STORED.items():
        assert exps[cid] == pytest.approx(stored, abs=0.02)
    # The fixes Porian et al. apply one by one move the exponent from Kaplan's to Chinchilla's.
    assert exps[0] > exps[1] > exps[2] > exps[3] > exps[4]


@pytest.mark.parametrize("cid", [0, 1, 2, 3, 4])
def test_porian_exponents_from_raw_isoflop_points(porian, cid):
    pairs, points = porian
    g = pairs[pairs["config_id"] == cid]
    from_pairs = fit_power_law(g["flops"].to_numpy(), g["n"].to_numpy(), y_name="N_opt").params["b"]
    with warnings.catch_warnings():
        # Budgets with an edge minimum are skipped with a warning, as Porian et al. skip them.
        warnings.simplefilter("ignore", FitWarning)
        r = fit_isoflop(points[points["config_id"] == cid], method="akima")
    optima = pd.DataFrame(r.extras["optima"]).query("used")
    # Same budgets as the stored optima, and the same N_opt at each (within 5%).
    assert np.allclose(np.sort(optima["compute"]), np.sort(g["flops"]), rtol=1e-9)
    stored = g.set_index("flops")["n"].reindex(optima["compute"], method="nearest")
    np.testing.assert_allclose(optima["n_opt"].to_numpy(), stored.to_numpy(), rtol=0.05)
    assert r.params["a"] == pytest.approx(from_pairs, abs=0.02)
    if cid in STORED:
        assert r.params["a"] == pytest.approx(STORED[cid], abs=0.02)
    # tokens = C/(6N) in this table, so the D_opt exponent mirrors the N_opt one.
    assert r.params["a"] + r.params["b"] == pytest.approx(1.0, abs=0.02)
    assert r.r2 > 0.98


def test_porian_bootstrap_interval_contains_the_stored_exponent(porian):
    _, points = porian
    r = fit_isoflop(points[points["config_id"] == 4], method="akima", bootstrap=60, seed=1)
    assert r.ci["a"][0] < STORED[4] < r.ci["a"][1]
    assert r.ci["a"][1] - r.ci["a"][0] < 0.1


def isoflop_table(noise=0.002, seed=0, budgets=(1e18, 4e18, 1.6e19, 6.4e19, 2.56e20)):
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        n_opt = 0.6 * c**TRUE_A  # near the true optimum, so the sampled range brackets it
        for n in n_opt * np.geomspace(1 / 4, 4, 9):
            d = c / (6 * n)
            loss = chinchilla(n, d) * np.exp(rng.normal(0, noise))
            rows.append(dict(params=n, tokens=d, compute=c * (1 + rng.uniform(-0.02, 0.02)),
                             loss=loss))
    return pd.DataFrame(rows)


# Akima passes through every point, so its minimum follows the noise more than a parabola's.
@pytest.mark.parametrize(("method", "noise"), [("parabola", 0.002), ("akima", 0.0005)])
def test_isoflop_recovers_chinchilla_allocation(method, noise):
    r = fit_isoflop(isoflop_table(noise=noise), method=method, bootstrap=50)
    assert r.diagnostics["budgets_used"] == 5
    assert r.params["a"] == pytest.approx(TRUE_A, abs=0.03)
    assert r.params["b"] == pytest.approx(1 - TRUE_A, abs=0.03)
    assert r.ci["a"][0] < TRUE_A < r.ci["a"][1]
    assert len(r.extras["optima"]) == 5


def test_budgets_group_nearby_compute_values():
    c = np.array([1e18, 1.03e18, 0.98e18, 4e18, 4.1e18])
    b = group_budgets(c)
    assert len(np.unique(b)) == 2
    assert b[0] == b[1] == b[2] and b[3] == b[4]


def test_curve_minimum_rejects_edge_and_concave_curves():
    x = np.log(np.geomspace(1e6, 1e8, 5))
    assert curve_minimum(x, (x - x[2]) ** 2 + 3, "parabola")[0] == pytest.approx(x[2])
    assert curve_minimum(x, -(x - x[2]) ** 2 + 3, "parabola") is None
    assert curve_minimum(x, 3 - 0.1 * x, "akima") is None


def test_isoflop_with_too_few_budgets_raises():
    df = isoflop_table(budgets=(1e18, 1e19))
    with pytest.raises(FitError, match="too few points for an IsoFLOP fit"):
        fit_isoflop(df)
    optima = isoflop_optima(df)
    assert optima["used"].all() and len(optima) == 2


@pytest.mark.parametrize(("column", "value", "match"),
                         [("loss", np.nan, "NaN"), ("params", 0.0, "non-positive")])
def test_isoflop_rejects_bad_values(column, value, match):
    df = isoflop_table()
    df.loc[3, column] = value
    with pytest.raises(FitError, match=match):
        fit_isoflop(df)


def test_envelope_allocation_recovers_chinchilla_exponent():
    table = learning_curves(sizes=np.geomspace(1e7, 1e9, 10), tokens_per_param=300, points=40,
                            noise=0.001)
    env = lower_envelope(standardize(table, need=("params", "tokens", "compute")))
    r = fit_envelope_allocation(env, bootstrap=100)
    assert r.diagnostics["edge_sizes_dropped"]
    assert r.params["a"] == pytest.approx(TRUE_A, abs=0.03)
    assert r.params["a"] + r.params["b"] == pytest.approx(1.0, abs=1e-9)  # D = C/(6N)
    assert r.ci["a"][0] < r.params["a"] < r.ci["a"][1]


def test_envelope_allocation_needs_several_sizes():
    env = pd.DataFrame({"params": [1e8] * 4, "tokens": [1e9, 2e9, 4e9, 8e9],
                        "compute": [6e17, 1.2e18, 2.4e18, 4.8e18], "loss": [3, 2.9, 2.8, 2.7]})
    with pytest.raises(FitError, match="one model size"):
        fit_envelope_allocation(env)
