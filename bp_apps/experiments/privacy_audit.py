"""The privacy audit behind ``bp-apps privacy-audit --ckpt C``: can an attacker tell the model's training examples
from examples it never saw?

The attack is Yeom et al.'s (2018) loss threshold: call an example a training member when the model's loss on it is
below a threshold. A model that memorised its training set gives its members conspicuously small losses, and the
attack succeeds; a model trained with differential privacy cannot depend much on any one example, which bounds
every such attack (at (ε, δ), the advantage TPR − FPR is at most e^ε − 1 + δ, far tighter in practice). Two
figures summarise it over every threshold at once: the ROC AUC of the loss as a membership score (0.5: no better
than a coin) and the best threshold's advantage (chosen knowing the answers, so an upper estimate of what an
attacker who has to guess the threshold achieves). The train/test accuracy gap, the overfitting that drives the
attack, is printed beside them.

Members are examples of the run's own training set (the training subset and validation split rebuilt from the data
module's settings saved in the checkpoint), non-members the test split, which training never reads; the same
number of each, drawn by ``seed``, both preprocessed as in evaluation (no augmentation).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from bp_apps.core.io import load_checkpoint_dict
from bp_apps.core.privacy import PRIVACY_KEY
from bp_apps.vision.data import DATAMODULES, VisionDataModule
from bp_apps.vision.task import ImageClassifier, check_checkpoint

__all__ = ["DEFAULT_MEMBERS", "attack_figures", "audit_checkpoint", "example_losses", "format_audit",
           "rebuild_datamodule"]

DEFAULT_MEMBERS = 2000
"""Members (and as many non-members) audited by default: enough for an AUC within about ±0.01."""
EVAL_BATCH = 500


def rebuild_datamodule(checkpoint: dict[str, Any], source: str) -> VisionDataModule:
    """The image data module a checkpoint was trained with, from the class and settings Lightning saved with it
    (``datamodule_hyper_parameters``), with augmentation and worker processes off. Only the suite's own data modules
    (:data:`bp_apps.vision.data.DATAMODULES`) are rebuilt: a checkpoint never names code to import."""
    hparams = checkpoint.get("datamodule_hyper_parameters")
    if not isinstance(hparams, dict):
        raise ValueError(f"{source}: the checkpoint names no data module settings (field 'datamodule_hyper_parameters'"
                         "): it was not trained through a data module, so its training members cannot be rebuilt")
    known = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in DATAMODULES.values()}
    state_name = next((v.get("datamodule") for k, v in checkpoint.items()
                       if isinstance(v, dict) and v.get("datamodule") == k), None)
    class_path = hparams.get("_class_path") or next((p for p, c in known.items() if c.__qualname__ == state_name), None)
    cls = known.get(str(class_path))
    if cls is None:
        names = ", ".join(sorted(c.__qualname__ for c in known.values()))
        raise ValueError(f"{source}: trained on {class_path or state_name or 'an unnamed data module'}; the audit "
                         f"rebuilds the suite's image data modules only ({names})")
    taken = inspect.signature(cls.__init__).parameters
    settings = {k: v for k, v in hparams.items() if not k.startswith("_") and k in taken}
    settings.update({"augment": False, "num_workers": 0} if "augment" in taken else {"num_workers": 0})
    return cls(**settings)


@torch.no_grad()
def example_losses(model: ImageClassifier, dataset: Dataset, collate: Any,
                   batch_size: int = EVAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's cross-entropy under ``model`` (eval mode, no label smoothing) and whether it is classified
    correctly, in the order of ``dataset``."""
    losses, correct = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        logits = model(x).float()
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        correct.append(logits.argmax(-1) == y)
    return torch.cat(losses), torch.cat(correct)


def attack_figures(member_losses: torch.Tensor, non_member_losses: torch.Tensor) -> dict[str, float]:
    """The loss-threshold attack's ROC AUC (score: minus the loss, members positive), its best advantage
    max(TPR − FPR) over thresholds and that threshold (a loss; examples at or below it are called members)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if len(member_losses) == 0 or len(non_member_losses) == 0:
        raise ValueError("the audit needs at least one member and one non-member")
    labels = np.concatenate([np.ones(len(member_losses)), np.zeros(len(non_member_losses))])
    scores = -torch.cat([member_losses, non_member_losses]).double().numpy()
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.argmax(tpr - fpr))
    threshold = float(-thresholds[best]) if np.isfinite(thresholds[best]) else float("inf")
    return {"auc": float(roc_auc_score(labels, scores)), "advantage": float(tpr[best] - fpr[best]),
            "threshold": threshold}


def _draw(dataset: Dataset, count: int, generator: torch.Generator) -> Subset:
    order = torch.randperm(len(dataset), generator=generator)[:count]  # type: ignore[arg-type]
    return Subset(dataset, order.sort().values.tolist())


def audit_checkpoint(ckpt: str | Path, members: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The loss-threshold membership-inference audit of an image-classification checkpoint: ``members`` training
    examples (default :data:`DEFAULT_MEMBERS`, at most the training and test set sizes) against as many test
    examples. The report: the attack's AUC, advantage and threshold, accuracy and mean loss of both groups and
    their gap, and the checkpoint's privacy accounting when it was trained privately."""
    path = Path(ckpt)
    if members is not None and members < 1:
        raise ValueError(f"--members must be at least 1, got {members}")
    checkpoint = load_checkpoint_dict(path)
    check_checkpoint(checkpoint, source=str(path))
    data = rebuild_datamodule(checkpoint, str(path))
    model = ImageClassifier.load(path)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    train_set, test_set = data.train_set, data.test_set
    if train_set is None or test_set is None or len(test_set) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{path}: its data module has no test split to draw non-members from")
    count = min(members or DEFAULT_MEMBERS, len(train_set), len(test_set))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    collate = data.test_dataloader().collate_fn  # evaluation preprocessing (augmentation is off)
    member_losses, member_correct = example_losses(model, _draw(train_set, count, generator), collate)
    other_losses, other_correct = example_losses(model, _draw(test_set, count, generator), collate)
    train_acc, test_acc = float(member_correct.float().mean()), float(other_correct.float().mean())
    record = checkpoint.get(PRIVACY_KEY)
    privacy = ({k: v for k, v in record.items() if k not in ("ledger", "noise_state")}
               if isinstance(record, dict) else None)
    return {"checkpoint": str(path), "data": type(data).__name__, "members": count, "non_members": count,
            "seed": seed, "attack": attack_figures(member_losses, other_losses),
            "train_accuracy": train_acc, "test_accuracy": test_acc, "accuracy_gap": train_acc - test_acc,
            "train_loss": float(member_losses.mean()), "test_loss": float(other_losses.mean()),
            "privacy": privacy}


def format_audit(report: dict[str, Any]) -> str:
    """The audit as a few lines of text."""
    attack = report["attack"]
    privacy = report.get("privacy")
    lines = [f"membership inference (loss threshold, Yeom et al. 2018) on {report['checkpoint']}",
             f"  data: {report['data']}, {report['members']} training members vs {report['non_members']} test "
             "examples",
             f"  attack AUC {attack['auc']:.4f} (0.5: chance), best advantage TPR-FPR {attack['advantage']:.4f} "
             f"at loss <= {attack['threshold']:.4g}",
             f"  accuracy: train {report['train_accuracy']:.4f}, test {report['test_accuracy']:.4f}, gap "
             f"{report['accuracy_gap']:+.4f}; mean loss: train {report['train_loss']:.4f}, test "
             f"{report['test_loss']:.4f}"]
    if privacy:
        lines.append(f"  trained with DP-SGD: ε={privacy.get('epsilon', float('nan')):.3f} spent up to this checkpoint "
                     f"at δ={privacy.get('delta')}, noise_multiplier {privacy.get('noise_multiplier', 0):.4g}, "
                     f"max_grad_norm {privacy.get('max_grad_norm')}")
    else:
        lines.append("  trained without differential privacy")
    return "\n".join(lines)
