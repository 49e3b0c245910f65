import numpy as np
import pandas as pd
import pytest
from synthetic_tables import TRUE, chinchilla

from analysis.chinchilla import fit_chinchilla, start_grid
from analysis.result import FitError, FitWarning

# Epoch AI's refit of Chinchilla Approach 3 (Besiroglu et al. 2024).
EPOCH = {"E": 1.817, "A": 482.0, "B": 2085.4, "alpha": 0.348, "beta": 0.366}


@pytest.fixture(scope="module")
def epoch_fit(anchors):
    df = pd.read_csv(anchors / "svg_extracted_data.csv")
    assert len(df) == 245
    df = df.sort_values("loss").iloc[:-5]  # Epoch drops the 5 highest-loss points
    n = df["Model Size"].to_numpy()
    d = df["Training FLOP"].to_numpy() / (6 * n)
    return fit_chinchilla(n, d, df["loss"].to_numpy(), bootstrap=150, seed=0)


def test_epoch_refit_matches_published_parameters(epoch_fit):
    p = epoch_fit.params
    assert epoch_fit.n_points == 240
    assert p["E"] == pytest.approx(EPOCH["E"], abs=0.01)
    assert p["alpha"] == pytest.approx(EPOCH["alpha"], abs=0.01)
    assert p["beta"] == pytest.approx(EPOCH["beta"], abs=0.01)
    assert p["A"] == pytest.approx(EPOCH["A"], rel=0.05)
    assert p["B"] == pytest.approx(EPOCH["B"], rel=0.05)


def test_epoch_bootstrap_intervals_contain_published_values(epoch_fit):
    assert epoch_fit.ci_method.startswith("bootstrap")
    for name, value in EPOCH.items():
        lo, hi = epoch_fit.ci[name]
        assert lo < value < hi, (name, lo, value, hi)
        assert lo < epoch_fit.params[name] < hi


def test_epoch_fit_diagnostics(epoch_fit):
    diag = epoch_fit.diagnostics
    assert epoch_fit.converged and not epoch_fit.warnings
    assert diag["n_starts"] == len(start_grid()) == 4500
    assert diag["starts_at_best"] > 10  # many starts agree on the optimum
    assert diag["moved_from_start"] > 1
    assert diag["bootstrap_converged_fraction"] > 0.95
    assert not diag["degenerate"]
    assert epoch_fit.r2 > 0.99
    assert np.abs(epoch_fit.residuals).max() < 0.1


def test_olmo_ladder_extrapolates_to_7b_and_13b(anchors):
    df = pd.read_csv(anchors / "olmo_ladder_final_points.csv")
    train, test = df[~df["heldout_in_paper"]], df[df["heldout_in_paper"]]
    assert len(train) == 25 and set(test["model"]) == {"7B-4T", "13B-5T"}
    r = fit_chinchilla(train["n_params"].to_numpy(), train["tokens"].to_numpy(),
                       train["c4_en-validation"].to_numpy())
    pred = r.predict(test["n_params"].to_numpy(), test["tokens"].to_numpy())
    rel = pred / test["c4_en-validation"].to_numpy() - 1
    assert np.all(np.abs(rel) < 0.01), rel


def test_synthetic_recovery_of_hoffmann_parameters():
    rng = np.random.default_rng(3)
    n = np.repeat(np.geomspace(5e7, 1.6e10, 9), 7)
    d = n * np.tile(np.geomspace(3, 400, 7), 9)
    loss = chinchilla(n, d) * np.exp(rng.normal(0, 0.003, len(n)))
    r = fit_chinchilla(n, d, loss, bootstrap=60)
    assert r.converged
    assert r.params["E"] == pytest.approx(TRUE["E"], abs=0.05)
    assert r.params["alpha"] == pytest.approx(TRUE["alpha"], abs=0.03)
    assert r.params["beta"] == pytest.approx(TRUE["beta"], abs=0.03)
    for name, truth in TRUE.items():
        assert r.ci[name][0] < truth < r.ci[name][1], name
    # Predictions, which is what the fit is for, are much tighter than the parameters.
    np.testing.assert_allclose(r.predict(n, d), chinchilla(n, d), rtol=0.005)


def test_iteration_limit_is_reported(recwarn):
    n = np.repeat(np.geomspace(1e8, 1e10, 4), 3)
    d = n * np.tile([5.0, 20.0, 80.0], 4)
    r = fit_chinchilla(n, d, chinchilla(n, d), starts=start_grid()[:5], max_iter=2)
    assert not r.converged
    assert any("did not converge" in w for w in r.warnings)
    assert any("did not converge" in str(w.message) for w in recwarn)


@pytest.mark.parametrize("stride", [9, 45])
def test_degenerate_fit_is_flagged(stride):
    # Loss that ignores N: the N term is not identified, and whichever of its many exact
    # fits the optimiser lands on (alpha -> 0 with E -> 0, or a vanishing A/N^alpha) must be
    # reported as degenerate.
    n = np.repeat(np.geomspace(1e8, 1e10, 4), 3)
    d = n * np.tile([5.0, 20.0, 80.0], 4)
    loss = 2.0 + 1e3 / d**0.3
    with pytest.warns(FitWarning, match="degenerate fit"):
        r = fit_chinchilla(n, d, loss, starts=start_grid()[::stride])
    assert r.diagnostics["degenerate"]
    assert r.params["beta"] == pytest.approx(0.3, abs=1e-3)
    np.testing.assert_allclose(r.predict(n, d), loss, rtol=1e-6)


@pytest.mark.parametrize(
    ("n", "match"),
    [
        ([1e8, 2e8, 4e8], "too few points"),
        ([1e8, 2e8, np.nan, 8e8, 1.6e9, 3.2e9], "NaN"),
        ([1e8, 2e8, 0.0, 8e8, 1.6e9, 3.2e9], "non-positive"),
    ],
)
def test_hopeless_input_raises(n, match):
    n = np.array(n)
    d = np.full(len(n), 1e10)
    with pytest.raises(FitError, match=match):
        fit_chinchilla(n, d, np.full(len(n), 3.0))
