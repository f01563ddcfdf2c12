"""Differentially private training (DP-SGD, Abadi et al. 2016) as the tasks run it: the settings, the accounting and
the Poisson sampling the accounting assumes.

The engine (:mod:`bp_apps.engine.privacy`) clips every example's gradient and adds the Gaussian noise. This module
decides how much noise: σ is given, or solved for a target (ε, δ) by Opacus's accountants (the accounting is a
library's, never written here). It draws the batches, counts the ε spent step by step, and ties both into a
Lightning fit (:class:`PrivateTraining`, which a task's module owns).

Why Poisson sampling: the accountants' bounds ("amplification by subsampling") are proven for batches in which each
example takes part independently with probability q. Shuffled batches of a fixed size, what a plain loader gives,
are not what the bound covers. Here every step draws each example with probability q = expected batch size / N, an
epoch is N // expected batch size steps, and under several processes each process draws from its own disjoint share
of the examples (together: one Poisson draw over all of them).

The noise and the batches are random draws the guarantee depends on being secret. Without a ``seed`` they come from
a generator seeded by the operating system's entropy, which nothing stores; a ``seed`` makes a run reproducible
(tests, comparisons with Opacus) and also lets anyone who knows it recompute the noise: do not publish models trained
with a known seed as private. Like Opacus without ``secure_mode``, the noise is not hardened against floating-point
attacks on the Gaussian sampler.
"""

from __future__ import annotations

import functools
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from bp_apps.core.distributed import shard_by_process
from bp_apps.core.resume import ResumableDataLoader
from bp_apps.core.samplers import MIX

__all__ = ["ACCOUNTANTS", "MAX_NOISE_MULTIPLIER", "PRIVACY_KEY", "EmptyBatchCollate", "PoissonBatchSampler",
           "PrivacyConfig", "PrivacyLedger", "PrivacyPlan", "PrivateTraining", "epsilon_spent", "plan_privacy",
           "poisson_loader", "privacy_settings", "require_opacus", "solve_noise_multiplier"]

ACCOUNTANTS = ("rdp", "prv")
"""Opacus's accountants: Rényi DP (Mironov 2017; fast, slightly loose) and privacy random variables (Gopi et al.
2021; tighter, a few seconds to solve for σ)."""
MAX_NOISE_MULTIPLIER = 50.0
"""The largest σ a run may be given or solved for. The noise on the averaged gradient has a standard deviation of
σ·C/B per weight; beyond about 50 it drowns the clipped gradients of any batch this suite trains with, and a target
that needs more cannot be reached by a useful model."""
PRIVACY_KEY = "bp_apps_privacy"
"""Checkpoint key of a private run's accounting (:meth:`PrivateTraining.state_dict`)."""


def _positive(value: Any, field: str, what: str = "a positive number") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"privacy.{field} must be {what}, got {value!r}")
    return float(value)


@dataclass
class PrivacyConfig:
    """The ``privacy`` group of a task's config: DP-SGD with per-example clipping to ``max_grad_norm`` (C) and
    Gaussian noise of ``noise_multiplier``·C, accounted for (ε, ``delta``) by ``accountant``.

    Give exactly one of ``target_epsilon`` (σ is then solved for it over the planned epochs) and
    ``noise_multiplier`` (ε then follows from it). ``seed`` makes the noise and the batches reproducible (see the
    module's note: not for models published as private); None draws them from the system's entropy."""

    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    accountant: Literal["rdp", "prv"] = "rdp"
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("privacy: give exactly one of target_epsilon (the noise is solved for it) and "
                             f"noise_multiplier (ε follows from it), got target_epsilon={self.target_epsilon!r} and "
                             f"noise_multiplier={self.noise_multiplier!r}")
        if self.target_epsilon is not None:
            self.target_epsilon = _positive(self.target_epsilon, "target_epsilon")
        if self.noise_multiplier is not None:
            self.noise_multiplier = _positive(self.noise_multiplier, "noise_multiplier",
                                              "a positive number (without noise there is no privacy)")
            if self.noise_multiplier > MAX_NOISE_MULTIPLIER:
                raise ValueError(f"privacy.noise_multiplier must be at most {MAX_NOISE_MULTIPLIER:g} (more noise "
                                 f"drowns the gradients), got {self.noise_multiplier:g}")
        delta = self.delta
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
            raise ValueError(f"privacy.delta must be in (0, 1), and below 1/N for N training examples, got {delta!r}")
        self.delta = float(delta)
        self.max_grad_norm = _positive(self.max_grad_norm, "max_grad_norm")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"privacy.seed must be a non-negative integer or None, got {self.seed!r}")


def privacy_settings(value: PrivacyConfig | Mapping[str, Any] | None) -> PrivacyConfig | None:
    """``value`` as a :class:`PrivacyConfig`: an instance as it is, a mapping of its fields (a config, a checkpoint's
    hyperparameters), None for a non-private run. Unknown keys raise a ValueError naming them."""
    if value is None or isinstance(value, PrivacyConfig):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(PrivacyConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"privacy: unknown setting(s) {', '.join(map(str, unknown))}; known: "
                             f"{', '.join(sorted(known))}")
        return PrivacyConfig(**value)
    raise ValueError(f"privacy: expected a mapping of PrivacyConfig settings or None, got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------- accounting

def require_opacus() -> None:
    """Opacus does the accounting (and the comparison of the benchmark): a ValueError naming the extra when it is
    missing, so a command says so in one line."""
    import importlib.util

    if importlib.util.find_spec("opacus") is None:
        raise ValueError('privacy needs Opacus for its accounting: pip install "bp_apps[privacy]"')


def _accountant(kind: str) -> Any:
    require_opacus()
    from opacus.accountants import create_accountant

    return create_accountant(kind)


@functools.lru_cache(maxsize=512)
def _epsilon(kind: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """ε at ``delta`` of the steps ``history`` lists as (σ, q, count) runs, by Opacus's ``kind`` of accountant (0 for
    none). Kept for the run: every checkpoint and report asks again for the same steps, and one RDP evaluation takes
    a good fraction of a second."""
    if not history:
        return 0.0
    accountant = _accountant(kind)
    accountant.history = list(history)
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" for tiny ε: the bound still holds
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """ε at ``delta`` after ``steps`` DP-SGD steps with noise ``noise_multiplier`` and Poisson sampling rate
    ``sample_rate``, by Opacus's ``accountant`` (0 for no step)."""
    history = ((float(noise_multiplier), float(sample_rate), int(steps)),) if steps > 0 else ()
    return _epsilon(accountant, history, float(delta))


def solve_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                           accountant: str = "rdp") -> float:
    """The smallest σ (within Opacus's tolerance of 0.01 in ε) whose ``steps`` steps at ``sample_rate`` spend at
    most ``target_epsilon`` at ``delta``. A target that needs more than :data:`MAX_NOISE_MULTIPLIER` is refused with a
    ValueError that says what to change."""
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    if steps < 1:
        raise ValueError(f"privacy: a run of {steps} steps spends no privacy; nothing to solve for")
    setting = (f"privacy.target_epsilon={target_epsilon:g} at delta={delta:g} over {steps} steps at sample rate "
               f"{sample_rate:.4g}")
    ceiling = epsilon_spent(MAX_NOISE_MULTIPLIER, sample_rate, steps, delta, accountant)
    if ceiling > target_epsilon:
        raise ValueError(f"{setting} cannot be reached: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} (noise that "
                         f"drowns the gradients) spends ε={ceiling:.3g}; raise target_epsilon, train fewer epochs, or "
                         "lower the batch size (the sample rate)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                               sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as error:
        raise ValueError(f"{setting}: Opacus cannot solve for the noise multiplier ({error})") from error
    if not math.isfinite(sigma) or sigma > MAX_NOISE_MULTIPLIER:
        raise ValueError(f"{setting} needs noise_multiplier={sigma:.3g}, above {MAX_NOISE_MULTIPLIER:g}; raise "
                         "target_epsilon, train fewer epochs, or lower the batch size")
    return sigma


class PrivacyLedger:
    """The ε a run has spent: one of Opacus's accountants, stepped once per private optimizer step (it keeps the
    steps as ``(σ, q, count)`` runs, so its state is a few numbers whatever the length of the run)."""

    def __init__(self, accountant: str = "rdp", delta: float = 1e-5) -> None:
        self.kind, self.delta = accountant, delta
        self.accountant = _accountant(accountant)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self.accountant.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))

    @property
    def steps(self) -> int:
        return sum(int(count) for _, _, count in self.accountant.history)

    def epsilon(self, extra: tuple[float, float, int] | None = None) -> float:
        """ε spent at ``delta`` so far; with ``extra`` = (σ, q, steps), as if those steps followed."""
        history = [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]
        if extra is not None and extra[2] > 0:
            history.append((float(extra[0]), float(extra[1]), int(extra[2])))
        return _epsilon(self.kind, tuple(history), float(self.delta))

    def state_dict(self) -> dict[str, Any]:
        history = [[float(s), float(q), int(n)] for s, q, n in self.accountant.history]
        return {"accountant": self.kind, "history": history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        history = state.get("history")
        if state.get("accountant") != self.kind or not isinstance(history, list):
            raise ValueError(f"the checkpoint's privacy accounting (accountant {state.get('accountant')!r}) does not "
                             f"continue this run's (accountant {self.kind!r})")
        try:
            self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
        except (TypeError, ValueError) as error:
            raise ValueError(f"the checkpoint's privacy accounting is damaged: history {history!r}") from error


@dataclass(frozen=True)
class PrivacyPlan:
    """What a private fit runs with, fixed when it starts: σ, the sampling rate q (expected batch over all
    processes / N), the expected batch of one process, steps per epoch (N // expected batch), the steps planned
    and the ε they will spend."""

    noise_multiplier: float
    sample_rate: float
    expected_batch_size: int
    steps_per_epoch: int
    planned_steps: int
    planned_epsilon: float
    num_examples: int
    world_size: int = 1


def plan_privacy(config: PrivacyConfig, num_examples: int, batch_size: int, epochs: int, max_steps: int = -1,
                 world_size: int = 1) -> PrivacyPlan:
    """The plan of a private fit over ``num_examples`` training examples with an expected ``batch_size`` per process
    (``world_size`` processes), for ``epochs`` epochs and at most ``max_steps`` steps (-1: no limit); σ is solved
    for the target, or taken from the config. ValueErrors name the setting that cannot work."""
    if num_examples < 1:
        raise ValueError("privacy: the training data is empty")
    if not 0 < config.delta < 1 / num_examples:
        raise ValueError(f"privacy.delta={config.delta:g} must be below 1/N = 1/{num_examples} (publishing one "
                         f"training example outright already meets δ = 1/N): choose delta below {1 / num_examples:.2g}")
    total_batch = batch_size * world_size
    if not 1 <= total_batch <= num_examples:
        raise ValueError(f"privacy: an expected batch of {total_batch} ({batch_size} per process × {world_size}) "
                         f"needs 1 to {num_examples} training examples")
    steps_per_epoch = num_examples // total_batch
    sample_rate = total_batch / num_examples
    planned = steps_per_epoch * epochs if epochs is not None and epochs >= 0 else -1
    if max_steps is not None and max_steps >= 0:
        planned = max_steps if planned < 0 else min(planned, max_steps)
    if planned < 1:
        raise ValueError("privacy: the fit plans no training step (set trainer.max_epochs or max_steps): the noise "
                         "is solved for the steps the run will take")
    if config.noise_multiplier is not None:
        sigma = config.noise_multiplier
    else:
        sigma = solve_noise_multiplier(config.target_epsilon, config.delta, sample_rate,  # type: ignore[arg-type]
                                       planned, config.accountant)
    epsilon = epsilon_spent(sigma, sample_rate, planned, config.delta, config.accountant)
    return PrivacyPlan(sigma, sample_rate, batch_size, steps_per_epoch, planned, epsilon, num_examples, world_size)


# ----------------------------------------------------------------------------------------------- Poisson sampling

class PoissonBatchSampler(Sampler[list[int]]):
    """``steps`` batches per epoch, each example of this process's share joining each batch independently with
    probability ``sample_rate`` (batch sizes vary around their expectation; a batch may even be empty).

    Under ``num_replicas`` processes, process ``rank`` owns the examples ``rank, rank + num_replicas, ...``: the
    shares are disjoint, and their draws together are one Poisson draw over all examples. The draws depend on
    ``(seed, epoch, rank)`` only (Lightning calls ``set_epoch``), so a resumed run replays them."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"PoissonBatchSampler: num_samples must be at least 1, got {num_samples}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"PoissonBatchSampler: sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"PoissonBatchSampler: steps must be at least 1, got {steps}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"PoissonBatchSampler: rank {rank} is not one of {num_replicas} processes")
        self.sample_rate, self.steps, self.seed = sample_rate, steps, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.indices = torch.arange(rank, num_samples, num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        seed = ((self.seed * MIX + self.epoch) * MIX + self.rank) % 2**63
        generator = torch.Generator().manual_seed(seed)
        for _ in range(self.steps):
            chosen = torch.rand(len(self.indices), generator=generator) < self.sample_rate
            yield self.indices[chosen].tolist()

    def __len__(self) -> int:
        return self.steps


def _empty(value: Any) -> Any:
    """A collated batch with no example: every tensor cut to length 0 along its first dimension."""
    if torch.is_tensor(value):
        return value[:0]
    if isinstance(value, tuple):
        return type(value)(*(_empty(v) for v in value)) if hasattr(value, "_fields") else tuple(map(_empty, value))
    if isinstance(value, list):
        return [_empty(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _empty(v) for k, v in value.items()}
    return value


class EmptyBatchCollate:
    """A loader's collate function that also takes an empty Poisson batch: it gives the shapes and types of a real
    batch with no example (a collated first example, cut to length 0), so the step runs and adds its noise."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None, dataset: Dataset) -> None:
        self.collate_fn = collate_fn or default_collate
        self.dataset = dataset

    def __call__(self, samples: list[Any]) -> Any:
        if samples:
            return self.collate_fn(samples)
        return _empty(self.collate_fn([self.dataset[0]]))


def poisson_loader(loader: DataLoader, plan: PrivacyPlan, seed: int, rank: int = 0) -> ResumableDataLoader:
    """``loader``'s dataset, collate function and workers with Poisson-sampled batches (:class:`PoissonBatchSampler`
    of ``plan``), as a loader that resumes exactly in the middle of an epoch."""
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError("privacy: Poisson sampling draws examples by index; the training data is an iterable "
                         "dataset without one")
    if len(dataset) != plan.num_examples:  # type: ignore[arg-type]
        raise ValueError(f"privacy: the training data holds {len(dataset)} examples, the plan was made for "  # type: ignore[arg-type]
                         f"{plan.num_examples}")
    sampler = PoissonBatchSampler(plan.num_examples, plan.sample_rate, plan.steps_per_epoch, seed, plan.world_size,
                                  rank)
    workers = loader.num_workers
    return ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=EmptyBatchCollate(loader.collate_fn, dataset),
                               num_workers=workers, pin_memory=loader.pin_memory,
                               persistent_workers=workers > 0 and loader.persistent_workers, seed=seed)


def loader_batch_size(loader: DataLoader) -> int:
    """The batch size a training loader was built with (its own, or its batch sampler's)."""
    size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError("privacy: cannot tell the training loader's batch size, the expected size of a Poisson "
                         "batch (give the loader a batch_size)")
    return size


# ----------------------------------------------------------------------------------------------- a private fit

class PrivateTraining:
    """A task module's private training: the plan, the ledger of ε spent, the noise generator, and the Poisson
    loader put in place of the data module's training loader for the length of a fit.

    The module calls :meth:`attach` in ``setup("fit")`` (after the data module's setup, before the optimizer and
    schedule count the steps, so the count is the Poisson loader's), :meth:`detach` in ``teardown``, and
    :meth:`step` once per optimizer step. Why the module and not the data module: privacy is a setting of the
    model (its ε is part of what the checkpoint is), it needs the trainer's epochs and processes to solve σ and any
    data module's training set serves; a data-module option would have to be set in step with the model's by hand.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.ledger = PrivacyLedger(config.accountant, config.delta)
        self.plan: PrivacyPlan | None = None
        self.seed = config.seed if config.seed is not None else secrets.randbits(62)
        self.noise = torch.Generator(device="cpu").manual_seed(self.seed)
        self.checkpoint_record: dict[str, Any] | None = None
        """The accounting of the last checkpoint loaded (reported by a test or validation of that checkpoint)."""
        self._detach: Callable[[], None] | None = None

    # -- the plan and the loader ----------------------------------------------------------------

    def attach(self, trainer: Any) -> PrivacyPlan:
        """Solve the plan for ``trainer``'s data, epochs and processes, print it, and make the data module hand out
        the Poisson loader (until :meth:`detach`)."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise ValueError("privacy: a private fit reads its data through a LightningDataModule (its training loader "
                             "is replaced by a Poisson-sampled one); pass datamodule= to fit")
        self.detach()
        original = datamodule.train_dataloader
        loader = original()
        world, rank = trainer.world_size, trainer.global_rank
        self.plan = plan_privacy(self.config, len(loader.dataset), loader_batch_size(loader), trainer.max_epochs,
                                 trainer.max_steps, world)
        plan, seed = self.plan, self.seed + 1  # the batches draw from another stream than the noise

        def private_loader() -> ResumableDataLoader:
            shard_by_process(trainer)  # the sampler shards by process itself: Lightning must not inject its own
            return poisson_loader(original(), plan, seed, rank)

        had_own = "train_dataloader" in vars(datamodule)
        datamodule.train_dataloader = private_loader

        def detach() -> None:
            if had_own:
                datamodule.train_dataloader = original
            else:
                vars(datamodule).pop("train_dataloader", None)

        self._detach = detach
        if trainer.is_global_zero:
            target = (f"solved for ε={self.config.target_epsilon:g}" if self.config.target_epsilon is not None
                      else "given")
            print(f"privacy: DP-SGD with noise_multiplier {plan.noise_multiplier:.4g} ({target}), max_grad_norm "
                  f"{self.config.max_grad_norm:g}, Poisson sampling at rate {plan.sample_rate:.4g} "
                  f"({plan.steps_per_epoch} steps per epoch); {plan.planned_steps} steps spend "
                  f"ε={plan.planned_epsilon:.3f} at δ={self.config.delta:g} ({self.config.accountant})")
        return plan

    def detach(self) -> None:
        """Give the data module its own training loader back."""
        if self._detach is not None:
            self._detach()
            self._detach = None

    # -- steps ----------------------------------------------------------------------------------

    def step(self, net: Any, engine_backward: Callable[[Any], Tensor], batch: Any, batch_size: int,
             rank: int = 0) -> Tensor:
        """One private gradient of ``batch`` (``batch_size`` examples) in ``net``'s gradient buffers: the task's
        ``engine_backward`` under the engine's per-example recorder, then clipping, noise and averaging
        (:func:`bp_apps.engine.privacy.privatize`); the ledger counts the step. The loss.

        Under several processes only process 0 adds noise (σ·C once for the whole batch; the processes' gradients
        are then averaged, each divided by its own expected batch), as Opacus's distributed optimizer does. An
        empty Poisson batch runs no forward (its mean loss is undefined): the step is noise alone, loss 0."""
        from bp_apps.engine.privacy import PerExampleRecorder, privatize

        plan = self._require_plan()
        sigma = plan.noise_multiplier if rank == 0 else 0.0
        loss = torch.zeros(())
        # param_grads=False: the layers compute only their input gradients; privatize writes the parameters' own
        with PerExampleRecorder(net, param_grads=False) as recorder:
            if batch_size > 0:
                loss = engine_backward(batch)
        privatize(net, recorder, self.config.max_grad_norm, sigma, plan.expected_batch_size, generator=self.noise)
        self.ledger.step(plan.noise_multiplier, plan.sample_rate)
        return loss

    def _require_plan(self) -> PrivacyPlan:
        if self.plan is None:
            raise RuntimeError("privacy: no plan yet; attach() runs in the module's setup('fit')")
        return self.plan

    # -- resume and reports ---------------------------------------------------------------------

    def resume(self, record: Mapping[str, Any]) -> None:
        """Continue the accounting of a checkpoint's ``record`` in a resumed fit; with a target, refuse a resumed plan
        that would end beyond it (e.g. more epochs than the noise was solved for)."""
        plan = self._require_plan()
        self.ledger.load_state_dict(record.get("ledger") or {})
        state = record.get("noise_state")
        if self.config.seed is not None and torch.is_tensor(state):
            self.noise.set_state(state)
        remaining = plan.planned_steps - self.ledger.steps
        projected = self.ledger.epsilon((plan.noise_multiplier, plan.sample_rate, remaining))
        target = self.config.target_epsilon
        if target is not None and projected > target + 0.01:
            raise ValueError(f"privacy: resuming with {remaining} more steps would spend ε={projected:.3f}, beyond "
                             f"privacy.target_epsilon={target:g} (the checkpoint has spent "
                             f"ε={self.ledger.epsilon():.3f}); keep the epochs the run started with")

    def state_dict(self) -> dict[str, Any]:
        """The record a checkpoint keeps: the ledger and the figures of :meth:`summary`; with a fixed seed, the noise
        generator's state too (exact resume; without a seed nothing that could recompute the noise is stored)."""
        state: dict[str, Any] = {"ledger": self.ledger.state_dict(), **self.summary()}
        if self.config.seed is not None:
            state["noise_state"] = self.noise.get_state()
        return state

    def summary(self) -> dict[str, Any]:
        """For ``metrics.json``: ε spent (over every step of the run), δ, σ, C and the sampling rate, with the
        accountant, the steps and the target. Before any step of this process, the figures of the last checkpoint
        loaded (a test of that checkpoint)."""
        if self.ledger.steps == 0 and self.checkpoint_record is not None:
            return {k: v for k, v in self.checkpoint_record.items() if k not in ("ledger", "noise_state")}
        plan = self.plan
        return {"epsilon": self.ledger.epsilon(), "delta": self.config.delta,
                "noise_multiplier": plan.noise_multiplier if plan else self.config.noise_multiplier,
                "max_grad_norm": self.config.max_grad_norm, "sample_rate": plan.sample_rate if plan else None,
                "accountant": self.config.accountant, "steps": self.ledger.steps,
                "target_epsilon": self.config.target_epsilon}
