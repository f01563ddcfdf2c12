"""The article's linear-regression example: its sign error diverges, the corrected descent converges."""

from itertools import pairwise

import numpy as np
import torch

from bp_apps.experiments.linreg import article_gradient_descent, gradient_descent, make_regression, mse, mse_gradient


def test_mse_gradient_matches_autograd():
    X, y = make_regression(m=50, n=4, seed=1)
    theta = np.random.default_rng(2).normal(size=(4, 1))
    t = torch.tensor(theta, requires_grad=True)
    loss = torch.mean((torch.tensor(y) - torch.tensor(X) @ t) ** 2)
    loss.backward()
    np.testing.assert_allclose(mse_gradient(X, y, theta), t.grad.numpy(), rtol=1e-12)
    assert abs(mse(y, X @ theta) - loss.item()) < 1e-12


def test_corrected_descent_reaches_least_squares():
    X, y = make_regression(m=200, n=3, seed=0)
    theta0 = np.random.default_rng(0).normal(size=(3, 1))
    theta, losses = gradient_descent(X, y, learning_rate=0.1, epochs=500, theta=theta0)
    lstsq = np.linalg.lstsq(X, y, rcond=None)[0]
    np.testing.assert_allclose(theta, lstsq, atol=1e-8)
    assert all(b <= a + 1e-15 for a, b in pairwise(losses)), "loss must not increase"


def test_article_sign_error_diverges():
    X, y = make_regression(m=200, n=3, seed=0)
    theta0 = np.random.default_rng(0).normal(size=(3, 1))
    theta, losses = article_gradient_descent(X, y, learning_rate=0.1, epochs=500, theta=theta0)
    finite = [v for v in losses if np.isfinite(v)]
    assert finite[-1] > 1e6 * losses[0], "the printed update climbs the loss"
    assert losses[1] > losses[0]
    lstsq = np.linalg.lstsq(X, y, rcond=None)[0]
    assert not np.allclose(theta, lstsq, atol=1e-3)
