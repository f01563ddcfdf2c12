"""Gradient checks: the hand-written engine against torch.autograd and against finite differences.

Every check runs the engine's explicit ``forward``/``backward`` and an independent reference
on copies of the same inputs, then reports :func:`relative_error` per tensor:

* the autograd reference is the ``torch.nn`` twin of a layer (weights and buffers copied
  exactly, in the layer's dtype) or the ``torch.nn.functional`` twin of a loss;
* the finite-difference reference perturbs one input or weight element at a time by ±eps
  and takes central differences of a scalar: Σ(output · upstream gradient) for layers, the
  loss itself for losses. Do these in float64 on small tensors (one pair of forwards per element).

Details:

* ``grad_output`` (the upstream gradient of a layer check) defaults to a standard-normal tensor
  drawn from a private generator seeded with ``seed``.
* References are built before the engine's forward and receive copies of its parameters and
  buffers after conversion to the layer's dtype, so float64 weights keep all their bits and
  BatchNorm running statistics start equal; the check then compares the updated buffers too.
* Dropout is compared with the mask the engine layer drew (its reference, :class:`SavedMask`,
  multiplies by the layer's saved scale). Every forward a check runs starts from the caller's
  RNG state, which is restored afterwards: checks repeat dropout masks and leave the global RNG alone.
* An ``MLP`` flattens leading input dimensions, so its reference sees (N, D) inputs too.
* :func:`finite_difference_errors` restores buffers to their state after its one analytic forward;
  :func:`mlp_gradient_errors` restores the MLP's parameters, buffers, gradient buffers and saved state
  (and runs with ``reuse_buffers`` off, so a caller's pending forward keeps its activations).
* The relative error divides by the largest reference entry, so it is meaningless for gradients that
  are zero up to rounding (e.g. a bias right before a train-mode BatchNorm, whose batch mean cancels it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bp_apps.engine.layers import Dropout, Layer
from bp_apps.engine.losses import BCEWithLogitsLoss, MSELoss, SoftmaxCrossEntropy
from bp_apps.engine.models import MLP, _torch_twin

TINY = torch.finfo(torch.float64).tiny
EngineLoss = MSELoss | SoftmaxCrossEntropy | BCEWithLogitsLoss
LOSSES: dict[str, type] = {"cross_entropy": SoftmaxCrossEntropy, "mse": MSELoss, "bce_with_logits": BCEWithLogitsLoss}


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max|actual − expected| / max(max|expected|, tiny), computed in float64 (0 for empty tensors)."""
    a = actual.detach().to(torch.float64)
    b = expected.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"relative_error: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp(min=TINY))


@contextmanager
def _rng_kept(*tensors: Tensor) -> Iterator[None]:
    """Run a block from the current RNG state and restore that state afterwards (CPU and the tensors' GPUs)."""
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


def finite_difference_grad(fn: Callable[[Tensor], Tensor | float], x: Tensor, eps: float = 1e-6) -> Tensor:
    """Central differences (f(x + eps·eᵢ) − f(x − eps·eᵢ)) / 2eps of a scalar function, in float64."""
    point = x.detach().to(torch.float64).clone(memory_format=torch.contiguous_format)
    grad = torch.zeros_like(point)
    flat_point, flat_grad = point.view(-1), grad.view(-1)
    for i in range(flat_point.numel()):
        original = float(flat_point[i])
        flat_point[i] = original + eps
        plus = float(fn(point.clone()))
        flat_point[i] = original - eps
        minus = float(fn(point.clone()))
        flat_point[i] = original
        flat_grad[i] = (plus - minus) / (2 * eps)
    return grad


class SavedMask(nn.Module):
    """Reference for an engine ``Dropout``: multiply by the scale (mask / (1 − p)) its latest forward drew."""

    def __init__(self, layer: Dropout) -> None:
        super().__init__()
        self._source = (layer,)  # a tuple, so the engine layer is not registered as a submodule

    def forward(self, x: Tensor) -> Tensor:
        saved = self._source[0].saved
        if len(saved) != 1:
            raise RuntimeError("SavedMask: run the engine Dropout's forward before its reference")
        (scale,) = saved
        return x if scale is None else x * scale


def reference_module(layer: Layer) -> nn.Module:
    """The ``torch.nn`` twin of a layer (MLP: ``nn.Sequential``, index i = ``layers[i]``), state copied exactly."""
    if isinstance(layer, MLP):
        twin: nn.Module = nn.Sequential(*(reference_module(sub) for sub in layer.layers))
        return twin.train(layer.training)
    if isinstance(layer, Dropout):
        return SavedMask(layer).train(layer.training)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own initialisation must not move the caller's RNG
        twin = _torch_twin(layer)
    state = layer.state_dict()
    floats = [t for t in state.values() if t.is_floating_point()]
    if floats:
        twin = twin.to(device=floats[0].device, dtype=floats[0].dtype)
        twin.load_state_dict(state)
    return twin.train(layer.training)


def reference_forward(reference: nn.Module, layer: Layer, x: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Apply the reference as the engine applies ``layer``: an MLP flattens leading dimensions; a recurrent layer's
    twin reads a packed sequence of ``lengths`` and gives its padded output (zeros past each length)."""
    if isinstance(layer, MLP) and x.dim() != 2:
        return reference(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    if isinstance(reference, nn.RNNBase):
        if lengths is None:
            return reference(x)[0]
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(reference(packed)[0], batch_first=True, total_length=x.shape[1])[0]
    return reference(x)


def _reference_name(layer: Layer, name: str) -> str:
    """Engine parameter/buffer name → the reference module's name ('layers.3.weight' → '3.weight')."""
    return name.removeprefix("layers.") if isinstance(layer, MLP) else name


def _random_like(t: Tensor, seed: int) -> Tensor:
    """A standard-normal tensor shaped like ``t`` from a private generator (the global RNG is not used)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device=t.device, dtype=t.dtype)


def _cloned(t: Tensor | None) -> Tensor | None:
    """A copy (layers may return reused buffers that their next call overwrites)."""
    return None if t is None else t.clone()


def check_layer(layer: Layer, x: Tensor, grad_output: Tensor | None = None, seed: int = 0,
                lengths: Tensor | None = None) -> dict[str, float]:
    """Errors vs autograd: 'output', 'input' (if returned), each parameter gradient, each state-dict buffer.
    ``lengths``: the valid lengths of a recurrent layer's sequences (its twin then reads them packed)."""
    reference = reference_module(layer)  # built first: buffers as they were before the forward
    extra = () if lengths is None else (lengths,)
    with _rng_kept(x):  # clones: in-place ReLU overwrites its input and its incoming gradient
        output = layer.forward(x.detach().clone(), *extra).clone()  # (reused output buffers are overwritten later)
    if grad_output is None:
        grad_output = _random_like(output, seed)
    grad_input = _cloned(layer.backward(grad_output.clone()))

    with torch.enable_grad():
        x_ref = x.detach().clone().requires_grad_(True)
        output_ref = reference_forward(reference, layer, x_ref, lengths)
        output_ref.backward(grad_output)
    errors = {"output": relative_error(output, output_ref)}
    if grad_input is not None:
        errors["input"] = relative_error(grad_input, x_ref.grad)
    ref_params = dict(reference.named_parameters())
    for name, _, grad in layer.param_grads():
        errors[name] = relative_error(grad, ref_params[_reference_name(layer, name)].grad)
    ref_state = reference.state_dict()
    param_names = {name for name, _, _ in layer.param_grads()}
    for name, value in layer.state_dict().items():
        if name not in param_names:
            errors[name] = relative_error(value, ref_state[_reference_name(layer, name)])
    return errors


def finite_difference_errors(layer: Layer, x: Tensor, grad_output: Tensor | None = None, eps: float = 1e-6,
                             seed: int = 0) -> dict[str, float]:
    """Errors of the engine's 'input' and parameter gradients vs central differences of Σ(layer(x)·grad_output)."""
    with _rng_kept(x):
        output = layer.forward(x.detach().clone())
    if grad_output is None:
        grad_output = _random_like(output, seed)
    grad_input = _cloned(layer.backward(grad_output.clone()))
    analytic = {name: grad.clone() for name, _, grad in layer.param_grads()}
    after_forward = {name: t.clone() for name, t in layer.state_dict().items()}

    def scalar(inp: Tensor) -> Tensor:
        with _rng_kept(inp):  # every forward sees the same RNG state, hence the same dropout mask
            return (layer.forward(inp.to(x.dtype)) * grad_output).sum()

    errors: dict[str, float] = {}
    try:
        if grad_input is not None:
            errors["input"] = relative_error(grad_input, finite_difference_grad(scalar, x, eps))
        for name, param, _ in layer.param_grads():
            original = param.detach().clone()

            def scalar_of_param(value: Tensor, param: Tensor = param) -> Tensor:
                with torch.no_grad():
                    param.copy_(value)
                return scalar(x.detach().clone())

            try:
                numeric = finite_difference_grad(scalar_of_param, original, eps)
            finally:
                with torch.no_grad():
                    param.copy_(original)
            errors[name] = relative_error(analytic[name], numeric)
    finally:
        layer.load_state_dict(after_forward)
    return errors


def reference_loss(loss: EngineLoss) -> Callable[[Tensor, Tensor], Tensor]:
    """The ``torch.nn.functional`` loss an engine loss must match (same options, same reduction)."""
    if isinstance(loss, MSELoss):
        return F.mse_loss
    if isinstance(loss, BCEWithLogitsLoss):
        return F.binary_cross_entropy_with_logits
    if isinstance(loss, SoftmaxCrossEntropy):
        def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long(),
                                   ignore_index=loss.ignore_index, label_smoothing=loss.label_smoothing)
        return cross_entropy
    raise TypeError(f"no torch reference for {type(loss).__name__}")


def check_loss(loss: EngineLoss, prediction: Tensor, target: Tensor) -> float:
    """Relative error of the engine's dL/dprediction against autograd through :func:`reference_loss`."""
    loss.forward(prediction.detach().clone(), target)
    grad = loss.backward()
    with torch.enable_grad():
        pred_ref = prediction.detach().clone().requires_grad_(True)
        reference_loss(loss)(pred_ref, target).backward()
    return relative_error(grad, pred_ref.grad)


def loss_finite_difference_error(loss: EngineLoss, prediction: Tensor, target: Tensor, eps: float = 1e-6) -> float:
    """Relative error of the engine's dL/dprediction against central differences of its own forward."""
    loss.forward(prediction.detach().clone(), target)
    grad = loss.backward()
    numeric = finite_difference_grad(lambda p: loss.forward(p.to(prediction.dtype), target), prediction, eps)
    return relative_error(grad, numeric)


def make_loss(loss: str | EngineLoss) -> EngineLoss:
    """An engine loss from a name in ``LOSSES`` (or the loss itself)."""
    if not isinstance(loss, str):
        return loss
    try:
        return LOSSES[loss]()
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}") from None


def mlp_gradient_errors(mlp: MLP, x: Tensor, y: Tensor, loss: str | EngineLoss = "cross_entropy") -> dict[str, float]:
    """Per-parameter error ('layers.0.weight', ...) of the MLP's loss gradients vs autograd; changes no state."""
    loss_fn = copy.deepcopy(make_loss(loss))  # a copy: a caller's loss keeps its saved state
    reference = reference_module(mlp)
    state = {name: t.clone() for name, t in mlp.state_dict().items()}
    grads_before = [g.clone() for g in mlp.gradients()]
    saved_before = mlp.saved_state()
    reuse_buffers = mlp.reuse_buffers
    mlp.reuse_buffers = False  # fresh tensors: the caller's pending forward state stays intact
    try:
        with _rng_kept(x):
            prediction = mlp.forward(x)
        loss_fn.forward(prediction, y)
        mlp.backward(loss_fn.backward())
        engine = {name: grad.clone() for name, _, grad in mlp.param_grads()}
        with torch.enable_grad():
            output_ref = reference_forward(reference, mlp, x.detach())
            reference_loss(loss_fn)(output_ref, y).backward()
    finally:
        mlp.reuse_buffers = reuse_buffers
        mlp.load_state_dict(state)
        for grad, before in zip(mlp.gradients(), grads_before, strict=True):
            grad.copy_(before)
        mlp.restore_state(saved_before)
    ref_params = dict(reference.named_parameters())
    return {name: relative_error(grad, ref_params[_reference_name(mlp, name)].grad) for name, grad in engine.items()}
