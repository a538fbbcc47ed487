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

    The NLL is convex in 1/T, so a bounded scalar search finds it. The bounds matter when every
    held-out prediction is right: the NLL then keeps falling as T shrinks, and an unbounded fit
    would turn every answer into 100 %.
    """
    from scipy.optimize import minimize_scalar

    logits, labels = logits.double(), labels.long()

    def nll(inverse_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits * inverse_t, labels))

    found = minimize_scalar(nll, bounds=(1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE), method="bounded",
                            options={"xatol": 1e-6})  # fmt: skip
    return round(1 / float(found.x), 6)


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
