"""What is wrong with a labelled image set, found from its cached features: ``transferkit inspect``.

- likely label errors: out-of-fold probabilities of a cross-validated linear probe (scikit-learn),
  ranked by cleanlab's ``find_label_issues`` (by self-confidence);
- near-duplicates within a split, and leaks between splits: the cosine similarity of each image's
  nearest neighbours in feature space (an exact cosine search); byte-identical files by SHA-256;
- outliers: the images farthest from their nearest neighbours; images that do not decode.

The features come from the feature cache (:mod:`transferkit.features`): after one extraction, or a
frozen-backbone run on the same data (``run=``), an inspection costs seconds. What it finds goes to
a folder (:meth:`Inspection.write`): ``inspection.html`` (thumbnails, :mod:`transferkit.reports.inspection_page`),
``inspection.json`` (:meth:`Inspection.to_dict`) and ``suspects.txt``, a list ``train --exclude`` reads.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backbones import DEFAULT_BACKBONE, Preprocessing, load_backbone
from .checkpoint import load_checkpoint
from .data import ImageFolderSplits, decode_failure, label_indices, load_image
from .discovery import LABEL_FILE_SUFFIXES, NOT_IN_A_CLASS_FOLDER, warn_unused_val_split
from .errors import TransferkitError
from .features import extract_features
from .files import new_or_empty_folder, write_json
from .inspection_checks import (
    FOLDS,
    NEIGHBOURS,
    file_digests,
    keep_order,
    label_issues,
    nearest_neighbours,
    outlier_scores,
    similar_pairs,
)
from .inspection_data import discover_as_run, train_data_argument
from .model import TransferModel
from .performance import pick_device, resolve_precision
from .reports.inspection_page import write_inspection_page
from .runs import INSPECTION_JSON
from .shards import is_url

# A pair is a near-duplicate when its cosine distance is under this fraction of the data's median nearest-
# neighbour distance: a rule that adapts to how alike the images are (cleanlab's Datalab uses it with 0.13). On
# hymenoptera (efficientnet_lite0): similarity >= 0.92, re-saved or brightened copies, not distinct photos (<= 0.81).
DUPLICATE_RATIO = 0.25
OUTLIER_FRACTION = 0.01  # the share of images listed as outliers, the least alike first
SPLITS = ("train", "val", "test")
JSON_NAME, PAGE_NAME, SUSPECTS_NAME = INSPECTION_JSON, "inspection.html", "suspects.txt"


@dataclass
class Neighbour:
    path: str
    split: str
    label: str
    similarity: float  # cosine similarity of the features


@dataclass
class LabelIssue:
    path: str
    split: str
    given: str
    suggested: str
    given_probability: float  # out of fold: the probe never saw this image
    suggested_probability: float
    neighbours: list[Neighbour]


@dataclass
class Pair:
    """Two images whose features nearly coincide: ``path`` is the copy to drop, ``match`` the one to keep.

    Kept: the copy in the later split (test, then val), so that evaluation sets stay as they are.
    """

    path: str
    split: str
    label: str
    match: str
    match_split: str
    match_label: str
    similarity: float
    identical: bool  # the same bytes


@dataclass
class IdenticalFiles:
    sha256: str
    paths: list[str]  # the one to keep first
    splits: list[str]


@dataclass
class Outlier:
    path: str
    split: str
    label: str
    score: float  # mean cosine distance to its nearest neighbours
    neighbours: list[Neighbour]


@dataclass
class Undecodable:
    path: str
    reason: str


@dataclass
class Inspection:
    """What :func:`inspect_data` found; ``to_dict()`` is ``inspection.json``."""

    data: str
    run: str | None
    backbone: str
    weights: str
    layer: str
    precision: str
    class_names: list[str]
    multi_label: bool
    images: dict[str, int]  # per split, as found in the data
    settings: dict[str, Any]
    label_issues: list[LabelIssue] = field(default_factory=list)
    leaks: list[Pair] = field(default_factory=list)
    duplicates: list[Pair] = field(default_factory=list)
    identical_files: list[IdenticalFiles] = field(default_factory=list)
    outliers: list[Outlier] = field(default_factory=list)
    undecodable: list[Undecodable] = field(default_factory=list)
    feature_cache: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    out: str | None = None
    train_data: str = ""  # DATA with its label file options, as `transferkit train` takes them

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "suspects": len(self.suspects()), "train_command": self.train_command()}

    def suspects(self) -> dict[str, list[str]]:
        """Each image to review, once, with every reason; label issues first, as on the page."""
        reasons: dict[str, list[str]] = {}
        k = self.settings.get("neighbours", NEIGHBOURS)
        for issue in self.label_issues:
            reasons.setdefault(issue.path, []).append(
                f"label issue: labelled {issue.given!r} ({issue.given_probability:.2f}), "
                f"looks like {issue.suggested!r} ({issue.suggested_probability:.2f})")  # fmt: skip
        for kind, pairs in (("leak", self.leaks), ("duplicate", self.duplicates)):
            for pair in pairs:
                alike = "the same bytes as" if pair.identical else f"{pair.similarity:.3f} alike to"
                clash = f", labelled {pair.label!r} there {pair.match_label!r}" if pair.label != pair.match_label else ""
                reasons.setdefault(pair.path, []).append(f"{kind}: {alike} {pair.match} ({pair.match_split}){clash}")
        for group in self.identical_files:
            for path in group.paths[1:]:
                reasons.setdefault(path, []).append(f"identical file: the same bytes as {group.paths[0]}")
        for outlier in self.outliers:
            reasons.setdefault(outlier.path, []).append(
                f"outlier: mean cosine distance {outlier.score:.3f} to its {k} nearest images")
        for bad in self.undecodable:
            reasons.setdefault(bad.path, []).append(f"undecodable: {bad.reason}")
        return reasons

    def suspects_text(self) -> str:
        """``suspects.txt``: one path a line, each after ``#`` lines saying why (what ``--exclude`` reads)."""
        lines = [
            f"# transferkit inspect {self.data}: images to review ({self.backbone}, {self.layer} features).",
            "# Delete the lines of the images you want to keep, then leave the rest out of training:",
            f"#   {self.train_command()}",
            "# One image path a line; blank lines and lines starting with # are ignored.",
            "",
        ]
        for path, why in self.suspects().items():
            lines += [*(f"# {reason}" for reason in why), path, ""]
        return "\n".join(lines)

    def train_command(self) -> str:
        """The command that trains on the same data without the suspects."""
        suspects = shlex.quote(str(Path(self.out or ".") / SUSPECTS_NAME))
        return f"transferkit train {self.train_data or shlex.quote(self.data)} --exclude {suspects}"

    def summary(self) -> str:
        """The command line's report: counts, thresholds, time, and where the files are."""
        s, cache, t = self.settings, self.feature_cache, self.timings
        rows = [
            ("label issues", len(self.label_issues), "cleanlab on out-of-fold linear-probe probabilities"),
            ("leaks", len(self.leaks), f"across splits, similarity >= {s['duplicate_similarity']:.3f}"),
            ("duplicates", len(self.duplicates), "within a split"),
            ("identical files", len(self.identical_files), "groups of files with the same bytes"),
            ("outliers", len(self.outliers), f"the {s['outlier_fraction']:.0%} least like the rest"),
            ("undecodable", len(self.undecodable), "files not usable as images: damaged, empty, a format not read"),
        ]
        head = (f"inspected {sum(self.images.values())} images of {self.data} with {self.backbone} ({self.layer}): "
                f"features {t.get('features', 0):.1f} s ({cache.get('misses', 0)} computed, {cache.get('hits', 0)} "
                f"from cache), checks {t.get('checks', 0):.1f} s")  # fmt: skip
        lines = [head, *(f"  {name:<16}{count:>6}  {what}" for name, count, what in rows), *self.notes]
        if self.out:
            out = Path(self.out)
            lines += [f"wrote {out / PAGE_NAME}, {JSON_NAME} and {SUSPECTS_NAME} ({len(self.suspects())} to review)",
                      f"review the page, then: {self.train_command()}"]  # fmt: skip
        return "\n".join(lines)

    def write(self, out: str | Path) -> Path:
        """Write the page, the JSON and the list into the folder ``out`` (new or empty), all or nothing."""
        target = new_or_empty_folder(out, "--out")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()  # beside the target: one rename publishes it whole
        try:
            self.out = str(target.absolute())
            started = time.perf_counter()
            write_inspection_page(staging / PAGE_NAME, self.to_dict())
            self.timings["page"] = round(time.perf_counter() - started, 3)
            (staging / SUSPECTS_NAME).write_text(self.suspects_text(), encoding="utf-8")
            write_json(staging / JSON_NAME, self.to_dict())
            os.replace(staging, target)  # POSIX rename replaces an empty folder
        except BaseException:
            self.out = None
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target


def default_out_dir(data: str | Path | None, run: str | Path | None = None) -> Path:
    """``<DATA name>-inspection`` in the current folder (``<RUN name>-inspection`` for a run's own data)."""
    source = Path(data if data is not None else run or ".").expanduser().absolute()
    name = source.stem if source.suffix.lower() in LABEL_FILE_SUFFIXES else source.name
    return Path(f"{name or 'data'}-inspection")


def inspect_data(
    data: str | Path | None = None,
    run: str | Path | None = None,
    model: str = DEFAULT_BACKBONE,
    weights: str = "DEFAULT",
    layer: str | None = None,
    precision: str | None = None,
    out: str | Path | None = None,
    folds: int = FOLDS,
    seed: int = 0,
    neighbours: int = NEIGHBOURS,
    duplicate_ratio: float = DUPLICATE_RATIO,
    duplicate_similarity: float | None = None,
    outlier_fraction: float = OUTLIER_FRACTION,
    labels: str | Path | None = None,
    exclude: str | Path | None = None,
    val_split: float | None = None,
    data_options: dict[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
) -> Inspection:
    """Inspect the labelled images of ``data`` (any layout :func:`~transferkit.data.discover` reads).

    ``run``: a run directory whose backbone (weights, preprocessing, layer, precision) gives the
    features, so those the run cached are reused; ``data`` then defaults to the run's data.
    Otherwise ``model``/``weights`` (and ``preprocessing``) name the backbone. ``duplicate_similarity``
    fixes the near-duplicate threshold instead of ``duplicate_ratio``'s. ``labels``, ``exclude``,
    ``val_split`` (default 0.2, or the run's) and ``data_options`` (``path_col``, ``label_col``, ``split_col``,
    ``label_sep``, ``image_ext``) read the data as ``train`` does. ``out``: also write the folder (see
    :meth:`Inspection.write`); it must be new or empty, and is checked before any work.
    """
    _check_settings(folds, neighbours, duplicate_ratio, duplicate_similarity, outlier_fraction)
    if out is not None:
        new_or_empty_folder(out, "--out")
    started = time.perf_counter()
    net, config = _model(run, model, weights, preprocessing)
    options = {"labels": labels, "exclude": exclude, "val_split": val_split, **(data_options or {})}
    splits = discover_as_run(data, config, {key: value for key, value in options.items() if value is not None}, seed)
    warn_unused_val_split(val_split, splits)
    layer = layer if layer is not None else config.get("layer")
    device = pick_device()
    precision = resolve_precision(precision or config.get("precision") or "auto", device)
    # A multi-label image's label (a 0/1 per class) as the classes it has: what the checks and the page take.
    rows = [(_absolute(p), label_indices(label) if splits.multi_label else label, split)
            for split in SPLITS for p, label in (getattr(splits, split) or [])]  # fmt: skip
    if net is None:
        names = splits.class_names if len(splits.class_names) > 1 else [*splits.class_names, "_"]
        net = TransferModel(load_backbone(model, weights, preprocessing=preprocessing), names).eval()
    # Labels stay here: the extractor needs the paths alone (and a multi-label tuple is no tensor).
    cache = cache_dir or config.get("cache_dir")
    feats = extract_features(net, [(p, 0) for p, _, _ in rows], layer=layer, batch_size=batch_size, device=device,
                             precision=precision, cache_dir=Path(cache) if cache else None)  # fmt: skip
    features_done = time.perf_counter()
    result = Inspection(
        data=str(splits.root), train_data=train_data_argument(data, config, options),
        run=str(run) if run is not None else None, backbone=net.record.backbone,
        weights=net.record.weights, layer=layer or "head-input", precision=precision,
        class_names=list(splits.class_names), multi_label=splits.multi_label,
        images={split: len(getattr(splits, split) or []) for split in SPLITS},
        settings={"folds": folds, "seed": seed, "neighbours": neighbours, "duplicate_ratio": duplicate_ratio,
                  "duplicate_similarity": duplicate_similarity, "outlier_fraction": outlier_fraction},
        feature_cache={"hits": feats.hits, "misses": feats.misses},
    )  # fmt: skip
    _run_checks(result, rows, feats.features.numpy(), set(feats.skipped), splits)
    result.timings = {"features": round(features_done - started, 3),
                      "checks": round(time.perf_counter() - features_done, 3), **result.timings}  # fmt: skip
    if out is not None:
        result.write(out)
    return result


def _check_settings(folds: int, neighbours: int, ratio: float, similarity: float | None, fraction: float) -> None:
    if folds < 2:
        raise TransferkitError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if neighbours < 1:
        raise TransferkitError(f"--neighbours {neighbours}: give at least 1")
    if not 0 < ratio < 1:
        raise TransferkitError(f"--duplicate-ratio {ratio} must be between 0 and 1")
    if similarity is not None and not -1 <= similarity <= 1:
        raise TransferkitError(f"--duplicate-similarity {similarity} must be a cosine similarity, -1 to 1")
    if not 0 <= fraction < 1:
        raise TransferkitError(f"--outlier-fraction {fraction} must be at least 0 and below 1")


def _model(
    run: str | Path | None, model: str, weights: str, preprocessing: Preprocessing | None
) -> tuple[TransferModel | None, dict[str, Any]]:
    """The run's network and training options, or (None, {}) to load ``model`` once the classes are known."""
    if run is None:
        return None, {}
    if model != DEFAULT_BACKBONE or weights != "DEFAULT" or preprocessing is not None:
        raise TransferkitError("--run brings its own backbone; leave out --model, --weights, --mean, --std and --image-size")
    net = load_checkpoint(run)
    # A linear-probe run's probe reads the features itself; here the features are what is wanted.
    net.probe = None
    return net, dict(net.record.extra.get("train_config") or {})


def _label_text(label: Any, names: list[str]) -> str:
    return " + ".join(names[i] for i in label) if isinstance(label, tuple) else names[label]


def _run_checks(
    result: Inspection, rows: list[tuple[str, Any, str]], features: np.ndarray, skipped: set[str],
    splits: ImageFolderSplits,
) -> None:  # fmt: skip
    """Fill ``result``'s findings from the features of ``rows`` (path, label, split) that decoded."""
    names, s = splits.class_names, result.settings
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    kept = [row for row in rows if row[0] not in skipped]
    paths, splits_of = [p for p, _, _ in kept], [split for _, _, split in kept]
    texts = [_label_text(label, names) for _, label, _ in kept]

    neighbours, similarity = nearest_neighbours(features, max(s["neighbours"], 10))
    threshold = s["duplicate_similarity"]
    if threshold is None:
        threshold = 1 - s["duplicate_ratio"] * float(np.median(1 - similarity[:, 0])) if len(features) > 1 else 1.0
    s["duplicate_similarity"] = round(float(threshold), 4)
    timings["neighbours"], tick = time.perf_counter() - tick, time.perf_counter()

    def near(i: int) -> list[Neighbour]:
        return [Neighbour(paths[j], splits_of[j], texts[j], round(float(sim), 4))
                for j, sim in zip(neighbours[i][: s["neighbours"]], similarity[i][: s["neighbours"]])]  # fmt: skip

    found = label_issues(features, [label for _, label, _ in kept], len(names), s["folds"], s["seed"],
                         splits.multi_label)  # fmt: skip
    if found.note:
        result.notes.append(found.note)
    s["folds_used"] = found.folds
    for i, suggested, p_given, p_suggested in found.issues:
        result.label_issues.append(LabelIssue(paths[i], splits_of[i], texts[i], _label_text(suggested, names),
                                              round(p_given, 4), round(p_suggested, 4), near(i)))  # fmt: skip
    timings["label_issues"], tick = time.perf_counter() - tick, time.perf_counter()
    digests = file_digests([p for p, _, _ in rows])
    timings["hashing"], tick = time.perf_counter() - tick, time.perf_counter()
    order = keep_order(paths, splits_of, SPLITS, {i: p_given for i, _, p_given, _ in found.issues})
    for drop, keep, sim in similar_pairs(neighbours, similarity, threshold, order):
        pair = Pair(paths[drop], splits_of[drop], texts[drop], paths[keep], splits_of[keep], texts[keep],
                    round(float(sim), 4), digests.get(paths[drop], "a") == digests.get(paths[keep], "b"))  # fmt: skip
        (result.duplicates if pair.split == pair.match_split else result.leaks).append(pair)
    result.identical_files = _identical_files(digests, {p: split for p, _, split in rows},
                                              {i.path: i.given_probability for i in result.label_issues})  # fmt: skip
    timings["pairs"], tick = time.perf_counter() - tick, time.perf_counter()

    scores = outlier_scores(similarity, s["neighbours"])
    count = math.ceil(s["outlier_fraction"] * len(paths)) if len(paths) > s["neighbours"] else 0
    for i in np.argsort(-scores, kind="stable")[:count]:
        result.outliers.append(Outlier(paths[i], splits_of[i], texts[i], round(float(scores[i]), 4), near(i)))
    timings["outliers"] = time.perf_counter() - tick

    result.undecodable = _undecodable(splits, sorted(skipped))
    result.timings = {name: round(seconds, 3) for name, seconds in timings.items()}


def _identical_files(
    digests: dict[str, str], split_of: dict[str, str], suspected: dict[str, float]
) -> list[IdenticalFiles]:
    """Groups of files with the same bytes, the one to keep first (as for near-duplicate pairs)."""
    groups: dict[str, list[str]] = {}
    for path, digest in digests.items():
        groups.setdefault(digest, []).append(path)
    found = []
    for digest, members in groups.items():
        if len(members) > 1:
            members.sort(key=lambda p: (-SPLITS.index(split_of[p]), -suspected.get(p, 1.0), p))
            found.append(IdenticalFiles(digest, members, [split_of[p] for p in members]))
    return found


def _absolute(path: str) -> str:
    """A local path made absolute (the page and suspects.txt name files so); a URL's image as it is."""
    return path if is_url(path) else os.path.abspath(path)


def _undecodable(splits: ImageFolderSplits, failed: list[str]) -> list[Undecodable]:
    """Files the data scan refused from their header, and those that failed to decode in full."""
    found = [Undecodable(_absolute(p), reason) for p, reason in splits.skipped
             if not reason.startswith(("not an image file extension", NOT_IN_A_CLASS_FOLDER))]  # fmt: skip
    for path in failed:
        try:
            load_image(path)
            reason = "failed to decode during feature extraction"
        except Exception as exc:  # whatever the decoder says is the reason
            reason = decode_failure(exc)
        found.append(Undecodable(path, reason))
    return found
