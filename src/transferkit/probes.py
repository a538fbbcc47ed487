"""Linear probes: logistic regression or a linear SVM on (standardised) frozen CNN features.

Seed 004's "CNN codes + a linear classifier". C is chosen by stratified cross-validation; the
fitted scaler and classifier become a :class:`~transferkit.heads.LinearProbe`, a plain torch
module, so the run's checkpoint predicts like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import TransferkitError
from .heads import LinearProbe

CLASSIFIERS = ("logreg", "svm")
C_GRID = (0.01, 0.1, 1.0, 10.0)


@dataclass
class ProbeFit:
    probe: LinearProbe
    classifier: str
    C: float
    cv_accuracy: float  # multi-label or balanced: cross-validated macro-F1
    folds: int


def _folds(labels: np.ndarray, most: int) -> int:
    smallest = int(np.bincount(labels).min())
    if smallest < 2:
        raise TransferkitError("a linear probe needs at least 2 training images per class")
    return min(most, smallest)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    classifier: str = "logreg",
    seed: int = 0,
    c_grid: tuple[float, ...] = C_GRID,
    max_folds: int = 5,
    balanced: bool = False,
    by_macro_f1: bool = False,
) -> ProbeFit:
    """Standardise, choose C by cross-validation, refit on everything (``max_folds=0``: the first C, no CV).

    For imbalanced classes, as a trained head's loss and best epoch: ``balanced``, each class weighs
    the same in the fit; ``by_macro_f1``, C is chosen by macro-F1 rather than accuracy.
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if classifier not in CLASSIFIERS:
        raise TransferkitError(f"unknown --classifier {classifier!r}; choose one of: {', '.join(CLASSIFIERS)}")
    x = features.double().numpy()
    y = labels.numpy()
    if y.ndim == 2:  # multi-label (0/1 per class): one binary classifier per class
        return _fit_one_vs_rest(x, y, classifier, seed, c_grid, max_folds)
    model = _classifier(classifier, balanced=balanced)
    pipeline = make_pipeline(StandardScaler(), model)
    if max_folds == 0:  # a measurement, not a tuned classifier: one C, one fit
        pipeline.set_params(**{f"{type(model).__name__.lower()}__C": c_grid[0]}).fit(x, y)
        fitted_pipeline, best_c, cv_accuracy, folds = pipeline, c_grid[0], float("nan"), 0
    else:
        folds = _folds(y, max_folds)
        search = GridSearchCV(pipeline, {f"{type(model).__name__.lower()}__C": list(c_grid)},
                              scoring="f1_macro" if by_macro_f1 else None,
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed), n_jobs=1)  # fmt: skip
        search.fit(x, y)
        fitted_pipeline, cv_accuracy = search.best_estimator_, float(search.best_score_)
        best_c = float(next(iter(search.best_params_.values())))
    scaler, fitted = fitted_pipeline[0], fitted_pipeline[1]
    weight, bias = _as_multiclass(fitted.coef_, fitted.intercept_, num_classes, fitted.classes_)
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    probe = LinearProbe(
        torch.from_numpy(scaler.mean_).float(), torch.from_numpy(scale).float(), weight.float(), bias.float()
    )
    return ProbeFit(probe, classifier, float(best_c), cv_accuracy, folds)


def _classifier(name: str, C: float = 1.0, balanced: bool = False) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    weights = "balanced" if balanced else None
    if name == "logreg":
        return LogisticRegression(C=C, max_iter=2000, class_weight=weights)
    return LinearSVC(C=C, max_iter=10000, class_weight=weights)


def out_of_fold_logits(
    features: torch.Tensor, labels: torch.Tensor, classifier: str, C: float, folds: int, seed: int = 0,
    balanced: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Each training image's probe logits from a probe that did not see it (scikit-learn's
    ``cross_val_predict``): held-out predictions to calibrate a probe on without a validation split."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = _classifier(classifier, C, balanced)
    x, y = features.double().numpy(), labels.numpy()
    cv = StratifiedKFold(max(2, min(folds or 5, int(np.bincount(y).min()))), shuffle=True, random_state=seed)
    scores = torch.from_numpy(cross_val_predict(make_pipeline(StandardScaler(), model), x, y, cv=cv,
                                                method="decision_function"))  # fmt: skip
    return torch.stack([torch.zeros_like(scores), scores], dim=1) if scores.ndim == 1 else scores


def _fit_one_vs_rest(
    x: np.ndarray, y: np.ndarray, classifier: str, seed: int, c_grid: tuple[float, ...], max_folds: int
) -> ProbeFit:
    """scikit-learn's one-vs-rest over the classes, C chosen by K-fold macro-F1; rows of weights for sigmoids."""
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    base = _classifier(classifier)
    pipeline = make_pipeline(StandardScaler(), OneVsRestClassifier(base))
    grid = {"onevsrestclassifier__estimator__C": list(c_grid)}
    if max_folds == 0:
        fitted_pipeline = pipeline.set_params(**{k: v[0] for k, v in grid.items()}).fit(x, y)
        best_c, score, folds = c_grid[0], float("nan"), 0
    else:
        folds = max(2, min(max_folds, len(y) // 2))
        search = GridSearchCV(pipeline, grid, scoring="f1_macro", cv=KFold(folds, shuffle=True, random_state=seed),
                              n_jobs=1)  # fmt: skip
        search.fit(x, y)
        fitted_pipeline, score = search.best_estimator_, float(search.best_score_)
        best_c = float(next(iter(search.best_params_.values())))
    scaler, ovr = fitted_pipeline[0], fitted_pipeline[1]
    weight = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64)
    bias = torch.zeros(y.shape[1], dtype=torch.float64)
    for c, estimator in enumerate(ovr.estimators_):
        if hasattr(estimator, "coef_"):
            weight[c], bias[c] = torch.from_numpy(estimator.coef_[0]), float(estimator.intercept_[0])
        else:  # a class every (or no) training image has: always (never) predicted
            bias[c] = 1e4 if y[0, c] else -1e4
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    probe = LinearProbe(torch.from_numpy(scaler.mean_).float(), torch.from_numpy(scale).float(), weight.float(),
                        bias.float())  # fmt: skip
    return ProbeFit(probe, classifier, float(best_c), score, folds)


def _as_multiclass(
    coef: np.ndarray, intercept: np.ndarray, num_classes: int, classes: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of weights per class; a binary model's single row becomes (0, w) so softmax = sigmoid."""
    if coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    weight = torch.zeros(num_classes, coef.shape[1], dtype=torch.float64)
    bias = torch.full((num_classes,), -1e4, dtype=torch.float64)  # classes absent from training never win
    for row, cls in enumerate(classes):
        weight[int(cls)] = torch.from_numpy(coef[row])
        bias[int(cls)] = float(intercept[row])
    return weight, bias
