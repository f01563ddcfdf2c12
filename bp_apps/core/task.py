"""One ``TaskModule`` under every task: optimizer, learning-rate schedule and clipping, the non-finite policy,
task identity in the checkpoint, exact-resume random state, and safe loading.

A task's module keeps only its steps, metrics and decoding. Its network's backend is a property of the network:
a module of the hand-written engine (``backend = "engine"``) is trained with ``automatic_optimization = False``
by its own backward and an engine optimizer (a ``torch.optim.Optimizer``, so Lightning counts, schedules and
checkpoints its steps); anything else trains through autograd with the matching ``torch.optim`` optimizer.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from bp_apps.core.compose import PlainHyperparameters, settings
from bp_apps.core.distributed import EngineDDPStrategy, data_parallel_mean
from bp_apps.core.io import load_checkpoint_dict
from bp_apps.core.resume import RNG_KEY, restore_training_state, save_rng_state
from bp_apps.engine import Layer, NonFiniteError, build_optimizer, clip_grad_norm, cosine_lr

__all__ = ["NO_DECAY_KEYS", "TASK_KEY", "OptimizerConfig", "TaskModule", "backend_of", "check_task", "lr_factor"]

TASK_KEY = "bp_apps_task"
"""Checkpoint key naming the task that wrote it (``TaskModule.task_name``)."""
NO_DECAY_KEYS = ("bias", "embed", "shared", "norm", "relative_attention_bias")
"""Parameter names without weight decay in the text and speech tasks (with every parameter of fewer than 2 dims)."""
TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass
class OptimizerConfig:
    """The optimizer settings every task shares, checked together.

    ``no_decay_keys``: parameters whose name contains one of these (and every parameter of fewer than two
    dimensions) get no weight decay; empty: decay on all. ``nonfinite``: a NaN/Inf loss or gradient ``raise``s
    an error naming the step, or ``skip``s the update."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: Literal["constant", "cosine"] = "constant"
    warmup_fraction: float = 0.0
    max_grad_norm: float | None = None
    nonfinite: Literal["raise", "skip"] = "raise"
    no_decay_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in TORCH_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(TORCH_OPTIMIZERS)}, got {self.name!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.scheduler not in ("constant", "cosine"):
            raise ValueError(f"scheduler must be 'constant' or 'cosine', got {self.scheduler!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}")
        self.no_decay_keys = tuple(self.no_decay_keys)

    def optimizer_kwargs(self) -> dict[str, float]:
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.name == "sgd":
            kwargs["momentum"] = self.momentum
        return kwargs


def lr_factor(step: int, total_steps: int, warmup_fraction: float, scheduler: str) -> float:
    """The learning rate as a multiple of the base rate: linear warm-up over ``warmup_fraction`` of the steps,
    then constant or cosine decay to 0 (the one schedule of the suite)."""
    warmup = int(warmup_fraction * total_steps)
    if scheduler == "cosine":
        return cosine_lr(1.0, step, total_steps, warmup)
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def backend_of(net: nn.Module) -> Literal["engine", "autograd"]:
    """``engine`` for a network of the hand-written engine (its class says ``backend = "engine"``), else
    ``autograd``."""
    return "engine" if getattr(net, "backend", "autograd") == "engine" else "autograd"


def check_task(checkpoint: dict[str, Any], expected: Iterable[str], source: str, title: str = "a task's") -> str:
    """The checkpoint's task name, or a ValueError naming ``source``, what was expected (``title``, e.g. "a
    speech") and the task the checkpoint belongs to."""
    expected = tuple(expected)
    task = checkpoint.get(TASK_KEY)
    if task not in expected:
        other = task or checkpoint.get("hyper_parameters", {}).get("_class_path") or "another task"
        raise ValueError(f"{source}: not {title} checkpoint ({' or '.join(expected)}); it belongs to {other}")
    return task


class TaskModule(PlainHyperparameters, L.LightningModule):
    """The Lightning module every task subclasses.

    Subclasses set ``task_name``, build ``self.net`` (engine or autograd) and pass their ``optim`` argument (an
    :class:`OptimizerConfig`, a mapping of its fields over :attr:`default_optim`, or None for the defaults).
    For an engine network they implement :meth:`engine_backward` (forward, loss and hand-written backward of
    one batch, returning the loss); for autograd ones ``training_step`` as usual. ``save_hyperparameters`` keeps
    settings groups and network classes as plain data (:func:`~bp_apps.core.compose.plain`)."""

    task_name: ClassVar[str] = ""
    task_title: ClassVar[str] = "a task's"  # for messages: "not a speech checkpoint"
    default_optim: ClassVar[OptimizerConfig] = OptimizerConfig()
    """The task's optimizer settings when a config gives none (a config's ``optim`` mapping overrides fields)."""

    def __init__(self, optim: OptimizerConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.optim = settings(OptimizerConfig, optim, "optim", self.default_optim)
        self._pending_rng_state: Tensor | None = None
        self.skipped_steps = 0

    @property
    def engine(self) -> bool:
        """Whether the task's network trains by the hand-written engine (no autograd)."""
        net = getattr(self, "net", None)
        return net is not None and backend_of(net) == "engine"

    @property
    def automatic_optimization(self) -> bool:
        """Lightning optimizes autograd networks; an engine network steps its own optimizer (manual optimization)."""
        return not self.engine

    # -- optimizer, schedule, clipping ------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """All trainable parameters, split into decayed and not decayed ones by ``no_decay_keys``."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad or self.engine]
        keys = self.optim.no_decay_keys
        if not keys:
            return [{"params": [p for _, p in params]}]
        plain = [p for n, p in params if p.ndim < 2 or any(k in n.lower() for k in keys)]
        plain_ids = {id(p) for p in plain}
        groups = [{"params": [p for _, p in params if id(p) not in plain_ids]}, {"params": plain, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer (the engine's own for an engine network, else ``torch.optim``'s) and the per-step schedule
        of :func:`lr_factor` over the trainer's estimated number of steps."""
        kwargs = self.optim.optimizer_kwargs()
        if self.engine:
            optimizer = build_optimizer(self.optim.name, self.parameter_groups(), **kwargs)
        else:
            optimizer = TORCH_OPTIMIZERS[self.optim.name](self.parameter_groups(), **kwargs)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(lr_factor, total_steps=total, warmup_fraction=self.optim.warmup_fraction,
                               scheduler=self.optim.scheduler))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by the norm ``max_grad_norm``, unless the Trainer is given its own clipping."""
        if gradient_clip_val is None and self.optim.max_grad_norm is not None:
            gradient_clip_val, gradient_clip_algorithm = self.optim.max_grad_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- the non-finite policy, for both backends -----------------------------------------------

    def check_loss(self, loss: Tensor) -> None:
        """Under ``nonfinite='raise'``, refuse a NaN/Inf loss before its backward."""
        if self.optim.nonfinite == "raise" and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(f"non-finite loss ({float(loss.detach())}) at step {self.global_step}; lower the "
                                 "learning rate, clip gradients, or check the inputs")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A non-finite gradient raises, or (``skip``) drops every gradient so the optimizer leaves the weights
        and its state untouched; skipped steps are counted and logged."""
        if self._trainer is not None and str(self.trainer.precision) == "16-mixed":
            return  # the gradient scaler skips overflowing steps itself
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            return
        if self.optim.nonfinite == "raise":
            raise NonFiniteError(f"non-finite gradient at step {self.global_step}; lower the learning rate, clip "
                                 "gradients, or check the inputs")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped_steps += 1
        self.log("skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    # -- one training step, by either backend ---------------------------------------------------

    def training_batch(self, batch: Any) -> Any:
        """The batch as a training step sees it (a task's augmentation draws here); unchanged by default."""
        return batch

    def autograd_loss(self, batch: Any) -> Tensor:  # pragma: no cover - abstract
        """Autograd networks: the training loss of a (training) batch, for Lightning to back-propagate."""
        raise NotImplementedError(f"{type(self).__name__} has no autograd training loss")

    def engine_backward(self, batch: Any) -> Tensor:  # pragma: no cover - abstract
        """Engine networks: forward, loss and hand-written backward of ``batch`` (autograd off); the loss."""
        raise NotImplementedError(f"{type(self).__name__} has no engine training step")

    def backend_training_step(self, batch: Any) -> Tensor:
        """The training loss of ``batch`` after :meth:`training_batch`: an engine network's step is taken here
        (:meth:`engine_training_step`); an autograd network's loss is checked and returned to Lightning."""
        batch = self.training_batch(batch)
        if self.engine:
            return self.engine_training_step(batch)
        loss = self.autograd_loss(batch)
        self.check_loss(loss)
        return loss

    def engine_layers(self) -> dict[str, Layer]:
        """The engine layers an engine update trains, by attribute name: the network, and any layer a task keeps
        beside it (the labeler's CRF)."""
        return {"net": self.net}

    def engine_param_grads(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(name, parameter, gradient buffer)`` of every engine layer, named as in the network's ``state_dict``
        for the network and ``<attribute>.<name>`` for the others."""
        return [(name if attr == "net" else f"{attr}.{name}", p, g)
                for attr, layer in self.engine_layers().items() for name, p, g in layer.param_grads()]

    def autograd_copy(self) -> TaskModule:
        """A copy of this engine task whose network is the ``torch.nn`` twin with the same weights (``to_autograd``);
        a task with more engine layers swaps those too."""
        if not self.engine:
            raise ValueError(f"{type(self.net).__name__} trains by autograd already: an autograd copy needs a network "
                             "built of engine layers (use the task's *_engine config)")
        twin = copy.deepcopy(self)
        twin.net = self.net.to_autograd()
        return twin

    def engine_gradients(self, batch: Any) -> Tensor:
        """Engine networks: the loss of ``batch``, with the gradients the optimizer is to step on in the engine's
        buffers. The task's :meth:`engine_backward` here; a private module clips and noises them per example."""
        return self.engine_backward(batch)

    def engine_update(self, batch: Any, optimizer: torch.optim.Optimizer) -> Tensor:
        """One engine update of ``batch``: the task's gradients (:meth:`engine_gradients`), averaged over processes
        (DDP), clipped, then ``optimizer.step()``; the loss."""
        with torch.no_grad():
            loss = self.engine_gradients(batch)
            self.check_loss(loss)
            layers = self.engine_layers().values()
            grads = [g for layer in layers for g in layer.gradients()]
            average = data_parallel_mean()
            if average is not None:
                average(grads)
            for layer in layers:
                layer.attach_gradients()
            if self.optim.max_grad_norm is not None:
                clip_grad_norm(grads, self.optim.max_grad_norm)
            optimizer.step()
        return loss

    def engine_training_step(self, batch: Any) -> Tensor:
        """:meth:`engine_update` with Lightning's optimizer (which counts the step), then the schedule's step."""
        loss = self.engine_update(batch, self.optimizers())
        self.lr_schedulers().step()
        return loss

    def setup(self, stage: str) -> None:
        """Refuse Lightning's plain DDP for an engine network, naming ``ddp_engine``: DDP cannot wrap a model
        without autograd parameters, and its own error does not say what to use instead."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        if self.engine and isinstance(strategy, DDPStrategy) and not isinstance(strategy, EngineDDPStrategy):
            raise ValueError("the engine backend trains under DDP with the strategy 'ddp_engine' "
                             "(--trainer.strategy=ddp_engine), not 'ddp'")

    def on_fit_start(self) -> None:
        """Mixed precision would hand the engine's fixed-dtype buffers half-precision products: refuse it."""
        if self.engine and "mixed" in str(self.trainer.precision):
            raise ValueError(f"the engine backend does not support precision={self.trainer.precision!r}; use "
                             "'32-true', '64-true', '16-true' or 'bf16-true' (or an autograd network)")

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The task's name (checked on load) and the CPU random state (exact resume)."""
        checkpoint[TASK_KEY] = self.task_name
        save_rng_state(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another task's checkpoint before any weight loads; keep the random state for a resumed fit."""
        check_task(checkpoint, self.accepted_tasks(), "checkpoint", self.task_title)
        self._pending_rng_state = checkpoint.get(RNG_KEY)

    def on_train_start(self) -> None:
        pending, self._pending_rng_state = self._pending_rng_state, None  # set only when a fit resumes
        restore_training_state(self.trainer, pending)

    @classmethod
    def accepted_tasks(cls) -> tuple[str, ...]:
        return (cls.task_name,)

    @classmethod
    def load_overrides(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments that replace the checkpoint's when loading (e.g. never download weights)."""
        return {}

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> TaskModule:
        """The module saved in a checkpoint, for inference (eval mode, CPU): the file is read with
        ``weights_only=True`` (a pickled payload is refused, never run), its task checked, then built by
        Lightning's ``load_from_checkpoint`` from the checkpoint's own hyperparameters. No class or function
        named by the checkpoint is imported."""
        path = Path(path)
        checkpoint = load_checkpoint_dict(path)
        check_task(checkpoint, cls.accepted_tasks(), str(path), cls.task_title)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        taken = inspect.signature(cls.__init__).parameters
        unknown = sorted(k for k in hparams if not k.startswith("_") and k not in taken)
        if unknown:  # Lightning would drop them silently and build another model than the one saved
            raise ValueError(f"{path}: its hyperparameters (field 'hyper_parameters') name arguments {cls.__name__} "
                             f"no longer takes ({', '.join(unknown)}): it was written by an earlier bp_apps; "
                             "retrain, or load its state_dict into a model built with the current arguments")
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path}: field 'state_dict' is not a mapping of tensors")
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{path}: weight {name!r} holds NaN or infinite values; the model would predict "
                                 "nothing meaningful (was it saved after training diverged?)")
        overrides = {**cls.load_overrides(hparams), **overrides, "_instantiator": None}
        check_model_size(cls, {**hparams, **overrides}, checkpoint, path)
        try:
            module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)
        except (KeyError, RuntimeError) as error:
            raise ValueError(f"{path}: the weights (field 'state_dict') do not fit the model: {error}") from error
        return module.eval()


def check_model_size(cls: type[TaskModule], hparams: dict[str, Any], checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse hyperparameters (or a saved network configuration) that describe a far larger model than the weights
    the checkpoint holds, before any memory is allocated: the model is first built on the ``meta`` device, which
    allocates nothing, as loading builds it (constructor, then ``on_load_checkpoint``, where the text tasks build
    their network from the vocabulary or configuration the checkpoint carries). A model that cannot be built there
    is not checked (loading then compares shapes)."""
    saved = sum(t.numel() for t in checkpoint["state_dict"].values())
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            module = cls(**kwargs)
            module.on_load_checkpoint(checkpoint)
            described = sum(t.numel() for t in module.state_dict().values())
    except Exception:
        return
    if described > 2 * saved + 1_000_000:
        raise ValueError(f"{path}: its hyperparameters (with the network configuration it carries) describe a model "
                         f"of {described:,} weights but the checkpoint holds {saved:,}: refusing to build it (a "
                         "damaged or crafted checkpoint)")

