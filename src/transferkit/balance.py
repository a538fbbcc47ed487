"""Imbalanced classes: when to correct for them, how (a class-weighted loss or a balanced sampler),
and which number then chooses the best epoch and the strategy (macro-F1 instead of accuracy).

With one class at 90 % of the images, a model that always answers it scores 90 % accuracy; macro-F1
and balanced accuracy (the mean of per-class recalls) do not reward that, so an imbalanced run is
selected by macro-F1, and says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .data import EpochSeededSampler, Sample, class_counts
from .errors import TransferkitError

BALANCE_MODES = ("auto", "none", "loss", "sampler")
# auto corrects when the largest class has more than this many times the images of the smallest.
IMBALANCE_RATIO = 3.0


@dataclass(frozen=True)
class Balance:
    """What a run does about its class counts (recorded in metrics.json as ``balance``)."""

    mode: str  # none, loss or sampler: resolved
    requested: str
    class_counts: list[int]  # training images per class
    ratio: float  # largest class / smallest
    selection_metric: str  # val_accuracy, or val_macro_f1 when the classes are imbalanced

    @property
    def imbalanced(self) -> bool:
        return self.ratio > IMBALANCE_RATIO

    def class_weights(self) -> torch.Tensor | None:
        """scikit-learn's "balanced" weights, n / (classes × count): each class weighs the same in the loss."""
        if self.mode != "loss":
            return None
        counts = torch.tensor(self.class_counts, dtype=torch.float32).clamp_min(1)
        return counts.sum() / (len(counts) * counts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Balance:
        return cls(**d)


def resolve_balance(requested: str, train: Sequence[Sample], num_classes: int, multi_label: bool = False) -> Balance:
    """``--balance`` for these training samples: auto picks the class-weighted loss past IMBALANCE_RATIO."""
    if requested not in BALANCE_MODES:
        raise TransferkitError(f"unknown --balance {requested!r}; choose one of: {', '.join(BALANCE_MODES)}")
    if multi_label:
        if requested in ("loss", "sampler"):
            raise TransferkitError(f"--balance {requested} is for single-label data; multi-label data trains "
                                   f"one yes/no output per label: use --balance none (or auto)")  # fmt: skip
        return Balance("none", requested, _counts(train, num_classes), 1.0, "val_macro_f1")
    counts = _counts(train, num_classes)
    ratio = max(counts) / max(1, min(counts))
    imbalanced = ratio > IMBALANCE_RATIO
    mode = ("loss" if imbalanced else "none") if requested == "auto" else requested
    return Balance(mode, requested, counts, round(ratio, 3), "val_macro_f1" if imbalanced else "val_accuracy")


def _counts(train: Sequence[Sample], num_classes: int) -> list[int]:
    return class_counts(train, num_classes)


class BalancedSampler(EpochSeededSampler):
    """Each epoch draws as many indices as there are samples, with replacement, every class equally
    likely; the draw is a function of (seed, epoch) alone, so a resumed run draws the same."""

    def __init__(self, labels: Sequence[int], seed: int, with_aug_seeds: bool = True) -> None:
        super().__init__(len(labels), seed, shuffle=True, with_aug_seeds=with_aug_seeds)
        counts = Counter(labels)
        self.weights = torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)

    def __iter__(self) -> Iterator[Any]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        drawn = torch.multinomial(self.weights, self.length, replacement=True, generator=g).tolist()
        for position, index in enumerate(drawn):  # an image drawn twice gets two different crops
            yield (index, hash((self.seed, epoch, position)) & 0x7FFFFFFF) if self.with_aug_seeds else index


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """The mean recall of the classes the images have (scikit-learn's ``balanced_accuracy_score``), from
    a confusion matrix (rows: true classes): a class no image has is left out, not a recall of 0."""
    support = confusion.sum(dim=1)
    present = support > 0
    return float((confusion.diag()[present].double() / support[present]).mean()) if present.any() else 0.0
