"""Calibrated probabilities: temperature scaling (Guo et al., 2017) fitted on held-out predictions.

A network's softmax is usually over-confident: of the answers it gives at "95 %", fewer than 95 %
are right. Dividing its logits by one temperature T > 1, fitted to minimise the negative
log-likelihood on images it did not train on (the validation images, or a linear probe's
out-of-fold predictions), makes the probabilities mean what they say without changing any
prediction (the order of the classes is kept). T lives in the model record, so ``evaluate``,
``predict``, the report and exports (the ONNX graph divides by it) all use it.

Expected calibration error (torchmetrics') and the negative log-likelihood are measured before and
after; the reliability curve (scikit-learn's ``calibration_curve``) is what the report draws.
"""

from __future__ import annotations

from typing import Any

import torch

CALIBRATIONS = ("temperature", "none")
# The temperatures a fit may choose: sharpening by up to 5x, softening by up to 10x.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.2, 10.0
ECE_BINS = 15
RELIABILITY_BINS = 10


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [:data:`MIN_TEMPERATURE`, :data:`MAX_TEMPERATURE`] minimising the NLL of ``softmax(logits / T)``.

    The NLL is convex in b = 1/T, with derivative ``mean(E_p[z] - z_label)`` and second derivative
    ``mean(Var_p[z])`` (p = softmax(b z)), so Newton's method kept inside a shrinking bracket finds
    it in a few steps (the same T as scipy's bounded search, a test holds them equal, without
    importing ``scipy.optimize``: 0.3-0.7 s of every run's start-up). The bounds matter when every
    held-out prediction is right: the NLL then keeps falling as T shrinks, and an unbounded fit
    would turn every answer into 100 %.
    """
    logits, labels = logits.double(), labels.long()
    logits = logits - logits.max(dim=1, keepdim=True).values  # softmax is shift-invariant; keeps b*z finite
    labelled = logits.gather(1, labels[:, None]).squeeze(1)

    def slope_and_curvature(b: float) -> tuple[float, float]:
        p = torch.softmax(logits * b, dim=1)
        mean_z = (p * logits).sum(1)
        variance = (p * logits.square()).sum(1) - mean_z.square()
        return float((mean_z - labelled).mean()), float(variance.mean())

    low, high = 1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE
    if slope_and_curvature(low)[0] >= 0:
        return MAX_TEMPERATURE
    if slope_and_curvature(high)[0] <= 0:
        return MIN_TEMPERATURE
    b = 1.0 if low < 1.0 < high else (low + high) / 2
    for _ in range(100):
        slope, curvature = slope_and_curvature(b)
        if slope > 0:
            high = b
        else:
            low = b
        step = b - slope / curvature if curvature > 0 else None
        b = step if step is not None and low < step < high else (low + high) / 2
        if high - low < 1e-9 or abs(slope) < 1e-12:
            break
    return round(1 / b, 6)


def logits_of(probabilities: torch.Tensor) -> torch.Tensor:
    """Logits up to a per-row constant (all softmax needs), from probabilities."""
    return probabilities.double().clamp_min(1e-12).log()


def calibration_summary(
    before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor, temperature: float, fitted_on: str
) -> dict[str, Any]:
    """ECE and NLL before and after, and both reliability curves: ``metrics.json``'s ``calibration``."""
    return {
        "method": "temperature", "temperature": temperature, "fitted_on": fitted_on,
        "ece_before": expected_calibration_error(before, labels), "ece_after": expected_calibration_error(after, labels),
        "nll_before": negative_log_likelihood(before, labels), "nll_after": negative_log_likelihood(after, labels),
        "reliability": {"before": reliability_curve(before, labels), "after": reliability_curve(after, labels)},
    }  # fmt: skip


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    from torchmetrics.functional.classification import multiclass_calibration_error

    n = probabilities.shape[1]
    return float(multiclass_calibration_error(probabilities.float(), labels, num_classes=n, n_bins=ECE_BINS))


def negative_log_likelihood(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return float(torch.nn.functional.nll_loss(probabilities.double().clamp_min(1e-12).log(), labels))


def reliability_curve(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """Mean confidence and accuracy of the top answer, per confidence bin (empty bins left out).

    The same bins and numbers as scikit-learn's ``calibration_curve(strategy="uniform")`` (a test
    holds them equal), computed here because importing ``sklearn.calibration`` costs a run about a
    second of start-up for these few lines.
    """
    import numpy as np

    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double().numpy()
    confidence_np = confidence.double().numpy()
    bins = np.searchsorted(np.linspace(0.0, 1.0, RELIABILITY_BINS + 1)[1:-1], confidence_np)
    total = np.bincount(bins, minlength=RELIABILITY_BINS)
    shown = total != 0
    mean_confidence = np.bincount(bins, weights=confidence_np, minlength=RELIABILITY_BINS)[shown] / total[shown]
    accuracy = np.bincount(bins, weights=correct, minlength=RELIABILITY_BINS)[shown] / total[shown]
    return {"confidence": [round(float(c), 4) for c in mean_confidence], "accuracy": [round(float(a), 4) for a in accuracy]}
