"""Digits accuracy benchmark: the hand-written MLP against scikit-learn's MLPClassifier.

Both train on the same standardised split, one epoch at a time, with the test accuracy read
after every epoch (evaluation time is not counted). Two speed ratios per seed:

- full training: scikit-learn's training time until its own stopping rule (as ``fit`` does)
  over the engine recipe's whole training time, counted only when the engine MLP ends at
  least as accurate;
- time to the same accuracy: the training time each needs to first reach the lower of the
  two best accuracies (an oracle stopping point for both).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from bp_apps.core.samplers import batch_order
from bp_apps.engine import MLP, SoftmaxCrossEntropy, build_optimizer, cosine_lr, train_step
from bp_apps.vision.data import DigitsSplit, load_digits_split


@dataclass(frozen=True)
class DigitsRecipe:
    """The hand-written MLP's training recipe for digits (tuned on seeds 0–4 of this split)."""

    hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    dropout: float = 0.0
    optimizer: str = "adamw"
    lr: float = 4e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    batch_size: int = 128
    epochs: int = 40


def _epoch_curve(train_epoch: object, evaluate: object, epochs: int) -> tuple[list[float], list[float]]:
    """Run ``epochs`` epochs; return cumulative training seconds and test accuracy after each."""
    elapsed, seconds, accuracies = 0.0, [], []
    for epoch in range(epochs):
        start = time.perf_counter()
        train_epoch(epoch)
        elapsed += time.perf_counter() - start
        seconds.append(elapsed)
        accuracies.append(evaluate())
    return seconds, accuracies


def train_manual(data: DigitsSplit, recipe: DigitsRecipe, seed: int) -> tuple[list[float], list[float]]:
    """Train the engine MLP per ``recipe``; (seconds, accuracy) after every epoch."""
    torch.manual_seed(seed)
    model = MLP(data.num_features, recipe.hidden, data.num_classes, activation=recipe.activation,
                dropout=recipe.dropout)
    optimizer = build_optimizer(recipe.optimizer, model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loss_fn = SoftmaxCrossEntropy(label_smoothing=recipe.label_smoothing)
    steps_per_epoch = math.ceil(len(data.y_train) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch

    def train_epoch(epoch: int) -> None:
        model.train()
        for i, index in enumerate(batch_order(len(data.y_train), recipe.batch_size, seed, epoch)):
            optimizer.param_groups[0]["lr"] = cosine_lr(recipe.lr, epoch * steps_per_epoch + i, total)
            train_step(model, loss_fn, optimizer, data.x_train[index], data.y_train[index])

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        return (model.forward(data.x_test).argmax(1) == data.y_test).float().mean().item()

    return _epoch_curve(train_epoch, evaluate, recipe.epochs)


def train_sklearn(data: DigitsSplit, hidden: tuple[int, ...], seed: int,
                  epochs: int = 200) -> tuple[list[float], list[float]]:
    """scikit-learn's MLPClassifier (its defaults: Adam, lr 1e-3, batch 200, L2 1e-4), one
    ``partial_fit`` epoch at a time; stops after 10 epochs without a better training loss."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=hidden, random_state=seed)
    x_train, y_train, x_test, y_test = (t.numpy() for t in (data.x_train, data.y_train, data.x_test, data.y_test))
    best_loss, stale = math.inf, 0
    elapsed, seconds, accuracies = 0.0, [], []
    for _ in range(epochs):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.partial_fit(x_train, y_train, classes=list(range(data.num_classes)))
        elapsed += time.perf_counter() - start
        seconds.append(elapsed)
        accuracies.append(float(clf.score(x_test, y_test)))
        if clf.loss_ < best_loss - 1e-4:
            best_loss, stale = clf.loss_, 0
        else:
            stale += 1
            if stale >= 10:
                break
    return seconds, accuracies


def time_to_accuracy(seconds: list[float], accuracies: list[float], target: float) -> float | None:
    """Training seconds until the accuracy first reaches ``target`` (None if it never does)."""
    return next((s for s, a in zip(seconds, accuracies) if a >= target - 1e-9), None)


def run_digits_bench(seeds: Iterable[int] = range(3), recipe: DigitsRecipe | None = None) -> dict:
    """Per seed: final accuracy and training time of both, and the time each needs to reach the
    same accuracy; with means and the median speed ratio."""
    recipe = recipe or DigitsRecipe()
    data = load_digits_split(standardize=True)
    runs = []
    for seed in seeds:
        engine_s, engine_acc = train_manual(data, recipe, seed)
        sk_s, sk_acc = train_sklearn(data, recipe.hidden, seed)
        target = min(max(engine_acc), max(sk_acc))
        t_manual, t_sklearn = time_to_accuracy(engine_s, engine_acc, target), time_to_accuracy(sk_s, sk_acc, target)
        runs.append({"seed": seed, "engine_test_accuracy": engine_acc[-1], "engine_train_seconds": engine_s[-1],
                     "sklearn_test_accuracy": sk_acc[-1], "sklearn_train_seconds": sk_s[-1],
                     "sklearn_epochs": len(sk_acc), "common_accuracy": target,
                     "engine_seconds_to_common": t_manual, "sklearn_seconds_to_common": t_sklearn,
                     "speedup_to_common_accuracy": t_sklearn / t_manual,
                     "speedup_full_training": sk_s[-1] / engine_s[-1] if engine_acc[-1] >= sk_acc[-1] else None})
    return {
        "recipe": asdict(recipe),
        "engine_test_accuracy_mean": statistics.mean(r["engine_test_accuracy"] for r in runs),
        "sklearn_test_accuracy_mean": statistics.mean(r["sklearn_test_accuracy"] for r in runs),
        "speedup_to_common_accuracy_median": statistics.median(r["speedup_to_common_accuracy"] for r in runs),
        "speedup_full_training_median": statistics.median(
            r["speedup_full_training"] if r["speedup_full_training"] is not None else 0.0 for r in runs),
        "runs": runs,
    }


def format_digits_table(report: dict) -> str:
    """A Markdown table of a ``run_digits_bench`` report."""
    lines = ["| seed | engine acc | engine s | sklearn acc | sklearn s | full-training ratio | common acc | "
             "engine s to it | sklearn s to it | ratio to it |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        full = "—" if r["speedup_full_training"] is None else f"{r['speedup_full_training']:.2f}x"
        lines.append(f"| {r['seed']} | {r['engine_test_accuracy']:.4f} | {r['engine_train_seconds']:.2f} | "
                     f"{r['sklearn_test_accuracy']:.4f} | {r['sklearn_train_seconds']:.2f} | {full} | "
                     f"{r['common_accuracy']:.4f} | {r['engine_seconds_to_common']:.2f} | "
                     f"{r['sklearn_seconds_to_common']:.2f} | {r['speedup_to_common_accuracy']:.2f}x |")
    lines += ["", f"engine MLP mean test accuracy {report['engine_test_accuracy_mean']:.4f}, scikit-learn "
              f"{report['sklearn_test_accuracy_mean']:.4f}. Median speed ratios (scikit-learn time / engine time): "
              f"full training {report['speedup_full_training_median']:.2f}x, "
              f"to the common accuracy {report['speedup_to_common_accuracy_median']:.2f}x."]
    return "\n".join(lines)
