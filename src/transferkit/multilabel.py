"""Multi-label data: several classes per image, one yes/no (a sigmoid) per class.

A class is predicted when its probability reaches its own threshold, tuned on the validation
images for that class's F1 (rare classes often need a threshold well below 0.5). Metrics are
torchmetrics': mean average precision (threshold-free), micro- and macro-F1, per-class precision,
recall, F1 and average precision, and exact-match accuracy (every class of the image right).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import TransferkitError
from .samples import Sample

# Candidate thresholds: fine enough for F1, coarse enough not to fit the validation noise.
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


def targets_of(samples: list[Sample]) -> torch.Tensor:
    """(N, classes) 0/1 targets of multi-label samples."""
    return torch.tensor([label for _, label in samples], dtype=torch.long)


def tune_thresholds(probabilities: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per class, the threshold of :data:`THRESHOLD_GRID` with the best F1 (ties: the one nearest 0.5)."""
    thresholds = []
    for c in range(targets.shape[1]):
        p, t = probabilities[:, c], targets[:, c].bool()
        best = max(THRESHOLD_GRID, key=lambda th: (_f1(p >= th, t), -abs(th - 0.5)))
        thresholds.append(best)
    return thresholds


def _f1(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    tp = float((predicted & truth).sum())
    denominator = float(predicted.sum() + truth.sum())
    return 2 * tp / denominator if denominator else 0.0


def multilabel_metrics(
    names: list[str], probabilities: torch.Tensor, targets: torch.Tensor, thresholds: list[float]
) -> dict[str, Any]:
    """Every multi-label metric, at ``thresholds``."""
    from torchmetrics.functional.classification import (
        multilabel_accuracy,
        multilabel_average_precision,
        multilabel_exact_match,
        multilabel_f1_score,
        multilabel_precision,
        multilabel_recall,
    )

    if len(probabilities) == 0:
        raise TransferkitError("no image could be decoded for evaluation")
    n = len(names)
    predicted = (probabilities >= torch.tensor(thresholds)).long()  # thresholds applied, then 0.5 below
    common = {"num_labels": n, "threshold": 0.5}
    ap = multilabel_average_precision(probabilities, targets, num_labels=n, average=None)
    per = {m: fn(predicted, targets, average=None, **common).tolist() for m, fn in
           (("precision", multilabel_precision), ("recall", multilabel_recall), ("f1", multilabel_f1_score))}  # fmt: skip
    support = targets.sum(dim=0).tolist()
    return {
        "accuracy": float(multilabel_exact_match(predicted, targets, num_labels=n)),
        "balanced_accuracy": float(multilabel_accuracy(predicted, targets, average="macro", **common)),
        "mean_average_precision": float(torch.nan_to_num(ap).mean()),
        "micro_f1": float(multilabel_f1_score(predicted, targets, average="micro", **common)),
        "macro_f1": float(multilabel_f1_score(predicted, targets, average="macro", **common)),
        "loss": float(torch.nn.functional.binary_cross_entropy(probabilities.clamp(1e-7, 1 - 1e-7), targets.float())),
        "per_class": {name: {"precision": per["precision"][i], "recall": per["recall"][i], "f1": per["f1"][i],
                             "average_precision": float(torch.nan_to_num(ap[i])), "threshold": thresholds[i],
                             "support": int(support[i])} for i, name in enumerate(names)},  # fmt: skip
        "predicted": predicted,
    }


def labels_over_threshold(probabilities: torch.Tensor, names: list[str], thresholds: list[float]) -> list[dict[str, Any]]:
    """One image's predicted classes (probability at or over the class's threshold), most probable first."""
    order = probabilities.argsort(descending=True).tolist()
    return [{"label": names[i], "probability": round(float(probabilities[i]), 6), "threshold": thresholds[i]}
            for i in order if probabilities[i] >= thresholds[i]]  # fmt: skip
