"""Losses with hand-written gradients.

``forward(prediction, target)`` returns the scalar loss and keeps what ``backward`` needs;
``backward()`` returns dL/dprediction (for an upstream gradient of 1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_same_shape(name: str, prediction: Tensor, target: Tensor) -> None:
    if prediction.shape != target.shape:
        raise ValueError(f"{name}: prediction shape {tuple(prediction.shape)} and target shape "
                         f"{tuple(target.shape)} differ")
    if not target.is_floating_point():
        raise TypeError(f"{name}: target must be a floating-point tensor, got {target.dtype}")


class MSELoss:
    """The article's L = (1/n)·Σ(y − ŷ)² over all n elements; dL/dŷ = (2/n)(ŷ − y)."""

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        _check_same_shape("MSELoss", prediction, target)
        diff = prediction - target
        self.saved = (diff,)
        return diff.pow(2).mean()

    def backward(self) -> Tensor:
        (diff,) = self.saved
        return diff * (2.0 / diff.numel())


class SoftmaxCrossEntropy:
    """Fused, numerically stable log-softmax + negative log-likelihood, as ``F.cross_entropy``.

    With label smoothing ε over C classes the target distribution is (1 − ε)·onehot + ε/C, and
    dL/dz = (softmax(z) − target distribution) / n_valid for rows whose label is not
    ``ignore_index`` (zero for ignored rows). Logits are (..., C), targets (...) of class indices.
    """

    saved: tuple = ()

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index

    def _check_shapes(self, logits: Tensor, target: Tensor) -> None:
        if logits.dim() < 2 or target.shape != logits.shape[:-1]:
            raise ValueError(f"SoftmaxCrossEntropy: logits (..., C) and targets (...) expected, got logits "
                             f"{tuple(logits.shape)} and targets {tuple(target.shape)}")
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"SoftmaxCrossEntropy: targets must be integer class indices, got {target.dtype}")
        if target.numel() == 0:
            raise ValueError("SoftmaxCrossEntropy: empty batch")

    def _has_ignored(self, target: Tensor, num_classes: int) -> bool:
        """Raise a ValueError naming the first label outside [0, C) that is not ``ignore_index``;
        return whether any row carries ``ignore_index``."""
        ignored = target == self.ignore_index
        bad = target[~ignored & ((target < 0) | (target >= num_classes))]
        if bad.numel():
            raise ValueError(f"SoftmaxCrossEntropy: label {int(bad[0])} is outside [0, {num_classes}) "
                             f"(ignore_index={self.ignore_index})")
        return bool(ignored.any())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check_shapes(logits, target)
        num_classes = logits.shape[-1]
        self.input_shape = logits.shape
        if logits.dim() != 2:
            logits = logits.reshape(-1, num_classes)
        target = target.reshape(-1, 1) if target.dtype == torch.int64 else target.reshape(-1, 1).long()
        log_probs = torch.log_softmax(logits, dim=1)
        eps = self.label_smoothing
        # Fast path, CPU: gather checks its indices itself, so labels are only inspected when it
        # refuses one (an ignored row or a bad label) or when ignore_index is a valid class.
        # On CUDA a bad index would be a device-side assert, so the labels are checked first.
        has_ignored = None
        if not logits.is_cpu or 0 <= self.ignore_index < num_classes:
            has_ignored = self._has_ignored(target, num_classes)
        if not eps and not has_ignored:
            try:
                picked = log_probs.gather(1, target)
            except (RuntimeError, IndexError):
                has_ignored = self._has_ignored(target, num_classes)
            else:
                count = target.shape[0]
                self.saved = (log_probs, target, None, count)
                return picked.sum().mul_(-1.0 / count)
        if has_ignored is None:
            has_ignored = self._has_ignored(target, num_classes)
        valid = target != self.ignore_index if has_ignored else torch.ones_like(target, dtype=torch.bool)
        target = torch.where(valid, target, 0)
        count = valid.sum()
        nll = log_probs.gather(1, target).neg()
        if eps:
            nll = (1 - eps) * nll - (eps / num_classes) * log_probs.sum(1, keepdim=True)
        self.saved = (log_probs, target, valid, count)
        return (nll * valid).sum() / count

    def backward(self) -> Tensor:
        if not self.saved:
            raise RuntimeError("SoftmaxCrossEntropy.backward needs a forward first (and runs once per forward)")
        log_probs, target, valid, count = self.saved
        self.saved = ()
        grad = log_probs.exp_()  # softmax, in the memory of the log-probabilities it no longer needs
        eps = self.label_smoothing
        if eps:
            grad.sub_(eps / grad.shape[1])
        grad.scatter_add_(1, target, self._minus_target_weight(grad))
        if valid is not None:
            grad.mul_(valid)
        grad.div_(count)
        return grad if len(self.input_shape) == 2 else grad.reshape(self.input_shape)

    def _minus_target_weight(self, grad: Tensor) -> Tensor:
        """A column of −(1 − ε), one per row, cached by shape, dtype and device (scatter_add needs a tensor)."""
        cached = self.__dict__.get("_minus_weight")
        if cached is None or cached.shape[0] != grad.shape[0] or cached.dtype != grad.dtype \
                or cached.device != grad.device:
            cached = self._minus_weight = torch.full((grad.shape[0], 1), -(1.0 - self.label_smoothing),
                                                     dtype=grad.dtype, device=grad.device)
        return cached


class BCEWithLogitsLoss:
    """Binary cross-entropy on logits x with targets y ∈ [0, 1], mean over elements:
    ℓ = max(x, 0) − x·y + log(1 + e^−|x|) (stable form); dℓ/dx = (σ(x) − y)/n."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_same_shape("BCEWithLogitsLoss", logits, target)
        self.saved = (logits, target)
        return (logits.clamp(min=0) - logits * target + torch.log1p(torch.exp(-logits.abs()))).mean()

    def backward(self) -> Tensor:
        logits, target = self.saved
        return (torch.sigmoid(logits) - target).div_(logits.numel())
