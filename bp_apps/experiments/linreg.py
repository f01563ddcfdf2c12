"""The article's linear-regression example (its section 5), and the corrected version.

The article minimises L(θ) = (1/m)·Σ(y − Xθ)² but computes ``gradients = (1/m)·Xᵀ(y − Xθ)``,
which is −½·∂L/∂θ, and then steps ``θ -= α·gradients``: that moves *up* the loss, so the
loss grows without bound. The true gradient is ∂L/∂θ = (2/m)·Xᵀ(Xθ − y); stepping against
it converges to the least-squares solution for any α < 1/λ_max((2/m)XᵀX).
"""

from __future__ import annotations

import numpy as np


def mse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The article's loss: L = (1/n)·Σ(y − ŷ)²."""
    return float(np.mean(np.square(y_true - y_pred)))


def mse_gradient(X: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """∂L/∂θ for L(θ) = (1/m)·‖Xθ − y‖²: (2/m)·Xᵀ(Xθ − y)."""
    return (2.0 / X.shape[0]) * X.T @ (X @ theta - y)


def article_gradient_descent(X: np.ndarray, y: np.ndarray, learning_rate: float, epochs: int,
                             theta: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The article's loop as printed (sign error included), from a given start θ; returns the
    final θ and the loss before each update."""
    m = X.shape[0]
    theta = theta.copy()
    losses = []
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(epochs):
            predictions = X.dot(theta)
            losses.append(mse(y, predictions))
            gradients = (1 / m) * X.T.dot(y - predictions)  # = −½·∂L/∂θ: the wrong sign
            theta -= learning_rate * gradients
    return theta, losses


def gradient_descent(X: np.ndarray, y: np.ndarray, learning_rate: float, epochs: int,
                     theta: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Corrected gradient descent: θ ← θ − α·(2/m)·Xᵀ(Xθ − y); returns θ and the loss history."""
    theta = theta.copy()
    losses = []
    for _ in range(epochs):
        losses.append(mse(y, X @ theta))
        theta -= learning_rate * mse_gradient(X, y, theta)
    return theta, losses


def make_regression(m: int = 200, n: int = 3, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small linear problem with a bias column: y = Xθ* + noise, y of shape (m, 1) as in the article."""
    rng = np.random.default_rng(seed)
    X = np.hstack([np.ones((m, 1)), rng.normal(size=(m, n - 1))])
    theta_true = rng.normal(size=(n, 1))
    return X, X @ theta_true + noise * rng.normal(size=(m, 1))
