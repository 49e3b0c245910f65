import numpy as np
import pytest

from analysis.powerlaw import fit_power_law, fit_saturating
from analysis.result import FitError


def noisy(x, clean, sigma, seed):
    return clean * np.exp(np.random.default_rng(seed).normal(0, sigma, len(x)))


def test_power_law_recovers_the_polar_compute_law():
    # The POLAR paper's L = 2.4·C^-0.0342 with 0.3% noise.
    c = np.geomspace(1e15, 1e19, 40)
    loss = noisy(c, 2.4 * c**-0.0342, 0.003, seed=0)
    r = fit_power_law(c, loss, bootstrap=300, x_name="compute")
    assert r.params["b"] == pytest.approx(-0.0342, abs=0.001)
    assert r.params["a"] == pytest.approx(2.4, rel=0.03)
    for name, truth in (("a", 2.4), ("b", -0.0342)):
        lo, hi = r.ci[name]
        assert lo < truth < hi
        assert hi - lo < 4 * 1.96 * r.stderr[name] + 1e-12
    assert r.pearson_r < -0.99 and r.r2 > 0.98
    assert r.pearson_r**2 == pytest.approx(r.r2, rel=1e-9)  # one regressor: R² = r²
    assert r.n_points == 40 and r.converged and not r.warnings
    np.testing.assert_allclose(r.predict(c), 2.4 * c**-0.0342, rtol=0.01)


def test_power_law_analytic_interval_without_bootstrap():
    x = np.geomspace(1e6, 1e9, 12)
    loss = noisy(x, 0.9 * x**-0.0425, 0.002, seed=1)
    r = fit_power_law(x, loss)
    assert r.ci_method.startswith("Student t")
    assert r.ci["b"][0] < -0.0425 < r.ci["b"][1]
    assert r.ci["a"][0] > 0  # taken in log space, so always positive


def test_power_law_warns_when_loss_grows():
    x = np.geomspace(1, 100, 5)
    with pytest.warns(UserWarning, match="not negative"):
        r = fit_power_law(x, 2 * x**0.1)
    assert r.warnings


def test_saturating_law_recovers_known_parameters():
    c = np.geomspace(1e15, 1e21, 50)
    loss = noisy(c, 1.5 + 300 * c**-0.15, 0.003, seed=2)
    r = fit_saturating(c, loss, bootstrap=200, x_name="compute")
    assert r.converged and not r.warnings
    assert r.params["E"] == pytest.approx(1.5, abs=0.03)
    assert r.params["alpha"] == pytest.approx(0.15, abs=0.01)
    assert r.params["A"] == pytest.approx(300, rel=0.2)
    for name, truth in (("E", 1.5), ("A", 300.0), ("alpha", 0.15)):
        assert r.ci[name][0] < truth < r.ci[name][1]
    assert r.r2 > 0.999
    assert r.diagnostics["moved_from_start"] > 0


def test_saturating_law_with_huber_matches_least_squares_on_clean_data():
    c = np.geomspace(1e3, 1e8, 30)
    clean = 0.5 + 4 * c**-0.3
    r = fit_saturating(c, clean, delta=1e-3)
    assert r.params["E"] == pytest.approx(0.5, rel=1e-3)
    assert r.params["alpha"] == pytest.approx(0.3, rel=1e-3)


@pytest.mark.parametrize("fit", [fit_power_law, fit_saturating])
@pytest.mark.parametrize(
    ("x", "loss", "match"),
    [
        ([1.0, 2.0], [3.0, 2.0], "too few points"),
        ([1.0, 2.0, np.nan, 4.0, 5.0], [3.0, 2.0, 1.5, 1.2, 1.1], "NaN"),
        ([1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 0.0, 1.2, 1.1], "non-positive"),
        ([-1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 1.5, 1.2, 1.1], "non-positive"),
        ([2.0, 2.0, 2.0, 2.0, 2.0], [3.0, 2.0, 1.5, 1.2, 1.1], "constant"),
    ],
)
def test_hopeless_input_raises_a_clear_error(fit, x, loss, match):
    with pytest.raises(FitError, match=match):
        fit(np.array(x), np.array(loss))
