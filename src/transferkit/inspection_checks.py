"""The checks of ``transferkit inspect`` on plain arrays: label issues, neighbours, similar pairs, outliers, digests.

Each is a small function of a feature matrix (or of file paths), testable without a backbone;
:mod:`transferkit.inspection` feeds them the cached features and turns their indices into records.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import TransferkitError
from .shards import image_bytes, is_packed_image

FOLDS = 5
NEIGHBOURS = 5
# C of the logistic regression on standardised features (scikit-learn's default). Out-of-fold accuracy
# on hymenoptera (efficientnet_lite0 features) was the same for C from 0.01 to 1, but C = 0.1 gave
# probabilities too timid for cleanlab's per-class thresholds: flipped labels of a clear-cut
# multi-label set went unfound (3 of 5, against 5 of 5 at C = 1).
PROBE_C = 1.0
# lbfgs iterations: out-of-fold probabilities (and cleanlab's findings) at 100 equalled those at 1,000
# on hymenoptera, a Fashion-MNIST subset and generated shapes; near-separable features never converge.
MAX_ITER = 200


@dataclass
class LabelIssues:
    """cleanlab's label issues, most likely first: (row, suggested label, p(given label), p(suggested))."""

    issues: list[tuple[int, Any, float, float]]
    folds: int
    note: str | None = None


def label_issues(
    features: np.ndarray, labels: Sequence[Any], num_classes: int, folds: int = FOLDS, seed: int = 0,
    multi_label: bool = False,
) -> LabelIssues:  # fmt: skip
    """Out-of-fold probabilities of a linear probe on ``features``, ranked by cleanlab's ``find_label_issues``.

    Every probability is predicted by a probe that never saw that image, which is what cleanlab's
    confident learning needs. Single-label: multinomial logistic regression, stratified folds (no more
    than the smallest class has images; classes of one image sit out). Multi-label: one-vs-rest.
    """
    x = np.asarray(features, dtype=np.float64)
    if multi_label:
        return _multi_label_issues(x, labels, num_classes, folds, seed)
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=num_classes)
    rows = np.flatnonzero(counts[y] >= 2)
    classes, y_rows = np.unique(y[rows], return_inverse=True)
    if len(classes) < 2:
        return LabelIssues([], 0, "label issues not sought: fewer than 2 classes have 2 or more images")
    note = None
    if len(rows) < len(y):
        note = f"label issues not sought for {len(y) - len(rows)} image(s) of classes with a single image"
    n_folds = min(folds, int(np.bincount(y_rows).min()))
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    probe = _standardised(LogisticRegression(C=PROBE_C, max_iter=MAX_ITER))
    probs = _out_of_fold(probe, x[rows], y_rows, StratifiedKFold(n_folds, shuffle=True, random_state=seed))
    ranked = _find_label_issues()(y_rows, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    issues = []
    for i in ranked:
        other = probs[i].copy()
        other[y_rows[i]] = -1  # the suggestion is the likeliest *other* class
        best = int(other.argmax())
        issues.append((int(rows[i]), int(classes[best]), float(probs[i, y_rows[i]]), float(probs[i, best])))
    return LabelIssues(issues, n_folds, note)


def _multi_label_issues(x: np.ndarray, labels: Sequence[Any], num_classes: int, folds: int, seed: int) -> LabelIssues:
    """One-vs-rest probes; a suggestion is the set of classes at p >= 0.5."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.multiclass import OneVsRestClassifier

    targets = np.zeros((len(labels), num_classes), dtype=np.int64)
    for row, label in enumerate(labels):
        targets[row, list(label)] = 1
    n_folds = min(folds, len(labels))
    if n_folds < 2:
        return LabelIssues([], 0, "label issues not sought: fewer than 2 images")
    # A class that every image has, or none, has nothing to get wrong (and cleanlab refuses it): it sits out.
    varying = np.flatnonzero(targets.min(axis=0) != targets.max(axis=0))
    if len(varying) == 0:
        return LabelIssues([], 0, "label issues not sought: every class is on every image or on none")
    probe = OneVsRestClassifier(_standardised(LogisticRegression(C=PROBE_C, max_iter=MAX_ITER)))
    probs = _out_of_fold(probe, x, targets, KFold(n_folds, shuffle=True, random_state=seed))
    sets = [list(np.flatnonzero(row[varying])) for row in targets]
    ranked = _find_label_issues(multi_label=True)(sets, probs[:, varying], return_indices_ranked_by="self_confidence",
                                                  n_jobs=1)  # fmt: skip
    issues = []
    for i in ranked:
        suggested = probs[i] >= 0.5
        issues.append((int(i), tuple(int(c) for c in np.flatnonzero(suggested)), _set_probability(probs[i], targets[i]),
                       _set_probability(probs[i], suggested)))  # fmt: skip
    return LabelIssues(issues, n_folds)


def _set_probability(probs: np.ndarray, members: np.ndarray) -> float:
    """The one-vs-rest probes' probability of exactly this set of labels (each class independently)."""
    return float(np.prod(np.where(members.astype(bool), probs, 1.0 - probs)))


def _find_label_issues(multi_label: bool = False) -> Any:
    try:
        if multi_label:
            from cleanlab.multilabel_classification.filter import find_label_issues
        else:
            from cleanlab.filter import find_label_issues
    except ImportError:
        raise TransferkitError("finding label issues needs cleanlab: pip install 'transferkit[inspect]'") from None
    return find_label_issues


def _standardised(model: Any) -> Any:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), model)


def _out_of_fold(model: Any, x: np.ndarray, y: np.ndarray, cv: Any) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_predict
    from threadpoolctl import threadpool_limits

    # One BLAS thread: the probe's products are small, and beside torch's thread pool numpy's and
    # scipy's OpenBLAS pools contend. Measured on 2 cores (3,000 x 1280 features, 10 classes): one
    # lbfgs fit 1.0 s on one thread, 7-15 s on two.
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        # Near-separable features: lbfgs stops at max_iter with probabilities that rank as well.
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="Label not .* is present in all training examples")
        return np.asarray(cross_val_predict(model, x, y, cv=cv, method="predict_proba"))


def nearest_neighbours(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows by cosine similarity, most alike first: (indices, similarities).

    An exact search: unit vectors multiplied a block of rows at a time against all of them, keeping
    each row's top k + 1 (itself among them); memory stays at one block (~256 MB) whatever the row
    count. It finds the neighbours scikit-learn's brute-force ``NearestNeighbors`` finds, 2.7-3.3x
    faster on 2 cores (``benchmarks/inspect_data.py --neighbours-rows 20000``: 4.2 s against 11.5 s).
    """
    import torch

    n = len(features)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0))
    unit = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features, dtype=np.float32)), dim=1)
    rows = max(1, (1 << 26) // n)  # a block of rows × n similarities, 4 bytes each
    similarity, index = np.empty((n, k + 1), dtype=np.float32), np.empty((n, k + 1), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, n, rows):
            top = (unit[start:start + rows] @ unit.T).topk(k + 1, dim=1)
            similarity[start:start + rows], index[start:start + rows] = top.values.numpy(), top.indices.numpy()
    # A row is not its own neighbour; an exact copy can tie with it, so it goes by index, not by column.
    own = index == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True
    return index[~own].reshape(n, k), similarity[~own].reshape(n, k).astype(np.float64)


def keep_order(
    paths: Sequence[str], splits: Sequence[str], split_names: Sequence[str], suspected: Mapping[int, float] = {}
) -> np.ndarray:
    """Each image's rank as the copy to keep (lowest kept): later splits first (test, val, train), then
    by the probability of its label where it is ``suspected`` (1 where not), then by path.

    Keeping the evaluation copy leaves validation and test sets as they are; the training copy goes.
    Of a mislabelled copy and its original, both suspected, the one the probe believes less goes.
    """
    order = sorted(range(len(paths)), key=lambda i: (-list(split_names).index(splits[i]), -suspected.get(i, 1.0),
                                                     paths[i]))  # fmt: skip
    rank = np.empty(len(paths), dtype=np.int64)
    rank[order] = np.arange(len(paths))
    return rank


def similar_pairs(
    neighbours: np.ndarray, similarity: np.ndarray, threshold: float, rank: np.ndarray
) -> list[tuple[int, int, float]]:
    """(drop, keep, similarity) of each neighbour pair at least ``threshold`` alike, most alike first."""
    found: dict[tuple[int, int], float] = {}
    for i, column in zip(*np.nonzero(similarity >= threshold)):
        j = int(neighbours[i, column])
        keep, drop = (int(i), j) if rank[i] < rank[j] else (j, int(i))
        found[(drop, keep)] = max(found.get((drop, keep), -2.0), float(similarity[i, column]))
    return sorted(((drop, keep, sim) for (drop, keep), sim in found.items()), key=lambda t: (-t[2], t[0], t[1]))


def outlier_scores(similarity: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance to the ``k`` nearest other images: high where the feature space is empty."""
    if similarity.shape[1] == 0:
        return np.zeros(len(similarity))
    return 1.0 - similarity[:, :k].mean(axis=1)


def file_digests(paths: Sequence[str]) -> dict[str, str]:
    """SHA-256 of each file that shares its size with another: only those can be byte-identical.

    A packed image's size is not on disk: its bytes are read from the shard once (no decoding),
    and hashed then.
    """
    by_size: dict[int, list[str]] = {}
    packed: dict[str, str] = {}
    for path in paths:
        try:
            if is_packed_image(path):
                data = image_bytes(path)
                size, packed[path] = len(data), hashlib.sha256(data).hexdigest()
            else:
                size = os.stat(path).st_size
        except OSError:
            continue  # gone since the scan: nothing to compare
        by_size.setdefault(size, []).append(path)
    return {path: packed.get(path) or hashlib.sha256(image_bytes(path)).hexdigest()
            for same in by_size.values() if len(same) > 1 for path in same}  # fmt: skip
