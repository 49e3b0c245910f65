import numpy as np

from analysis.lbfgs import MAX_ITER, minimize_batched


def rosenbrock(x, rows):
    a, b = x[:, 0], x[:, 1]
    f = (1 - a) ** 2 + 100 * (b - a * a) ** 2
    g = np.column_stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])
    return f, g


def test_every_start_reaches_the_rosenbrock_minimum():
    starts = np.array([[-1.2, 1.0], [2.0, -1.0], [0.0, 0.0], [-3.0, 5.0], [1.0, 1.0]])
    res = minimize_batched(rosenbrock, starts, max_iter=2000)
    assert res.converged.all()
    np.testing.assert_allclose(res.x, np.ones_like(starts), atol=1e-4)
    # The start already at the minimum stops at once.
    assert res.n_iter[4] == 0


def test_problems_with_their_own_data_are_solved_independently():
    targets = np.array([[1.0, -2.0], [3.0, 0.5], [-4.0, 7.0]])

    def quad(x, rows):
        d = x - targets[rows]
        return 0.5 * np.sum(d * d * [1.0, 50.0], axis=1), d * [1.0, 50.0]

    res = minimize_batched(quad, np.zeros((3, 2)))
    np.testing.assert_allclose(res.x, targets, atol=1e-6)


def test_iteration_limit_is_reported_as_not_converged():
    res = minimize_batched(rosenbrock, np.array([[-1.2, 1.0]]), max_iter=3)
    assert res.status[0] == MAX_ITER
    assert not res.converged[0]
