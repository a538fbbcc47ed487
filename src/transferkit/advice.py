"""Which strategy fits the data: its size, and how well the pretrained features already fit it.

Seed 004 (CS231n's transfer-learning notes) places a dataset in one of four scenarios,
small/large × similar/different to the pretraining data. Size is counted. Similarity is measured
in seconds from cached features: the cross-validated accuracy of a linear probe on the frozen
penultimate features of a per-class sample, corrected for chance,

    similarity = (probe accuracy - majority share) / (1 - majority share).

It measures what the choice of strategy hinges on: whether the pretrained features already
separate *these* classes. Separable classes can still be far from ImageNet, though (Fashion-MNIST's
greyscale thumbnails probe at 0.84 with efficientnet_lite0), so when the backbone still has its
ImageNet classifier, the mean top-1 ImageNet confidence on the same sample is the second signal:
images unlike ImageNet's get diffuse predictions (the maximum-softmax-probability out-of-distribution
baseline, Hendrycks & Gimpel 2017). Data is "similar" when both signals clear their thresholds;
measured here, hymenoptera gives similarity 0.93 / confidence 0.72, Fashion-MNIST 0.83 / 0.25.
"""

from __future__ import annotations

import shlex
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import DEFAULT_BACKBONE, Preprocessing, default_preprocessing, get_module, load_backbone
from .data import class_counts, first_label, shuffled_by_class
from .discovery import checked_data_options, command_flags, data_flags, discover_for
from .errors import TransferkitError
from .features import extract_features
from .model import TransferModel
from .probes import fit_linear_probe

SMALL_BELOW = 1000  # images per class (median) under which a dataset counts as small
SIMILAR_FROM = 0.7  # chance-corrected probe accuracy from which data counts as similar
CONFIDENT_FROM = 0.4  # mean ImageNet top-1 probability from which images look like ImageNet's


@dataclass
class Advice:
    data: str
    model: str
    images_per_class: dict[str, int]
    imbalance: float
    probe_accuracy: float
    chance: float
    similarity: float
    size: str
    domain: str
    strategy: str
    options: dict[str, Any]
    reasons: list[str]
    command: str
    imagenet_confidence: float | None = None
    sampled_per_class: int = 0
    probe_metric: str = "accuracy"  # macro-F1 on multi-label data
    sampled_images: int = 0  # the training images the probe measured (up to sampled_per_class of each class)
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.images_per_class.items())
        lines = [
            f"data: {self.data}",
            f"  images per class: {counts} (imbalance max/min {self.imbalance:.1f})",
            f"  linear probe on frozen {self.model} features: {self.probe_metric} {self.probe_accuracy:.3f} "
            f"(chance {self.chance:.3f}, {self.sampled_images} images, at most {self.sampled_per_class} a class) "
            f"→ similarity {self.similarity:.2f}",
        ]
        if self.imagenet_confidence is not None:
            lines.append(f"  mean ImageNet top-1 confidence: {self.imagenet_confidence:.2f}")
        lines += [
            f"scenario: {self.size} dataset, {self.domain} to the pretraining data",
            f"recommended strategy: {self.strategy}",
            *[f"  - {r}" for r in self.reasons],
            f"command: {self.command}",
        ]
        return "\n".join(lines)


def scenario(
    median_per_class: float,
    similarity: float,
    imagenet_confidence: float | None = None,
    small_below: float = SMALL_BELOW,
    similar_from: float = SIMILAR_FROM,
) -> tuple[str, str]:
    """(``small``|``large``, ``similar``|``different``)."""
    looks_like_imagenet = imagenet_confidence is None or imagenet_confidence >= CONFIDENT_FROM
    similar = similarity >= similar_from and looks_like_imagenet
    return ("small" if median_per_class < small_below else "large", "similar" if similar else "different")


def recommend(size: str, domain: str, model: TransferModel) -> tuple[str, dict[str, Any], list[str]]:
    """Strategy, its options and the reasons, for one of the four scenarios."""
    body = [g.name for g in model.groups if g.name != "head"]
    if size == "small" and domain == "similar":
        return "feature-extract", {}, [
            "few images per class: training pretrained layers would overfit them",
            "the frozen features already separate the classes, so a new head on top is enough",
        ]  # fmt: skip
    if size == "small":
        earlier = body[max(0, round(len(body) * 0.6) - 1)]
        return "linear-probe", {"layer": earlier}, [
            "few images per class: training pretrained layers would overfit them",
            "the last layer's features are specific to ImageNet and do not separate these classes well; "
            f"earlier, more generic features ({earlier}) transfer better to different data",
        ]  # fmt: skip
    if domain == "similar":
        return "fine-tune", {"unfreeze": 2}, [
            "enough images per class to adapt pretrained layers without overfitting",
            "the data resembles the pretraining data, so adapting the last layer groups is enough "
            "(discriminative learning rates keep earlier layers close to their pretrained values)",
        ]  # fmt: skip
    return "full", {"lr": 3e-4}, [
        "enough images per class to train the whole network",
        "the data differs from the pretraining data, so every layer has to adapt; pretrained weights are "
        "still a better start than random ones",
    ]  # fmt: skip


def _chance(labels: torch.Tensor) -> float:
    """The probe's score without looking at the images: the majority class's share, or on multi-label
    data (0/1 per class) the macro-F1 of answering yes to every class, 2p / (1 + p) for a class of share p."""
    if labels.ndim == 1:
        return max(torch.bincount(labels).tolist()) / len(labels)
    share = labels.float().mean(dim=0)
    return float((2 * share / (1 + share)).mean())


def _model_flags(model: str, weights: str, preprocessing: Preprocessing | None) -> str:
    """``--weights``, ``--mean``, ``--std`` and ``--image-size`` where they differ from ``model``'s own."""
    given: dict[str, Any] = {"weights": None if weights == "DEFAULT" else weights}
    usual = default_preprocessing(model)
    if preprocessing is not None:
        given.update({name: getattr(preprocessing, name) for name in ("mean", "std")
                      if tuple(getattr(preprocessing, name)) != tuple(getattr(usual, name))})  # fmt: skip
        if preprocessing.image_size != usual.image_size:
            given["image_size"] = preprocessing.image_size
    return command_flags(given)


def _imagenet_confidence(classifier: nn.Module | None, features: torch.Tensor) -> float | None:
    if classifier is None or not isinstance(classifier, nn.Linear) or classifier.out_features != 1000:
        return None
    with torch.no_grad():
        return float(classifier(features).softmax(dim=1).max(dim=1).values.mean())


def advise(
    data: str | Path,
    model: str = DEFAULT_BACKBONE,
    weights: str = "DEFAULT",
    per_class: int = 100,
    seed: int = 0,
    val_split: float = 0.2,
    small_below: float = SMALL_BELOW,
    similar_from: float = SIMILAR_FROM,
    cache_dir: Path | None = None,
    preprocessing: Any = None,
    precision: str = "auto",
    data_options: dict[str, Any] | None = None,
) -> Advice:
    """Measure the data and recommend a strategy (see the module docstring for the method).

    ``data`` is read as ``train`` reads it, with ``data_options`` (a label file and its columns, an
    exclude list: :data:`transferkit.discovery.DATA_OPTIONS`). On multi-label data the probe's score
    is its macro-F1, and chance that of answering yes to every class.
    """
    if per_class < 1:
        raise TransferkitError(f"--per-class must be at least 1, got {per_class}")
    splits = discover_for({"data": data, "val_split": val_split, "seed": seed, **checked_data_options(data_options)})
    backbone = load_backbone(model, weights, preprocessing=preprocessing)
    transfer = TransferModel(backbone, splits.class_names).eval()  # leaves backbone.model its ImageNet head
    original_head = None if backbone.weights == "none" else get_module(backbone.model, backbone.classifier_path)
    counts = dict(zip(splits.class_names, class_counts(splits.train, len(splits.class_names))))
    sample = [s for members in shuffled_by_class(splits.train, first_label, seed) for s in members[:per_class]]
    feats = extract_features(transfer, sample, cache_dir=cache_dir, precision=precision)
    # One C and 3 folds: a measurement that takes seconds, not a tuned classifier.
    fit = fit_linear_probe(feats.features, feats.labels, len(splits.class_names), "logreg", seed, (1.0,), 3)
    chance = _chance(feats.labels)
    similarity = max(0.0, min(1.0, (fit.cv_accuracy - chance) / (1 - chance)))
    confidence = _imagenet_confidence(original_head, feats.features)
    size, domain = scenario(statistics.median(counts.values()), similarity, confidence, small_below, similar_from)
    strategy, options, reasons = recommend(size, domain, transfer)
    reasons = [f"{size} dataset: median {statistics.median(counts.values()):g} training images per class "
               f"(threshold {small_below:g})",
               f"{domain} data: linear-probe similarity {similarity:.2f} (threshold {similar_from:g})"
               + ("" if confidence is None else f", ImageNet confidence {confidence:.2f} (threshold {CONFIDENT_FROM:g})"),
               *reasons]  # fmt: skip
    command = (f"transferkit train {shlex.quote(str(data))}{data_flags(data_options)} --model {model}"
               f"{_model_flags(model, weights, preprocessing)} --strategy {strategy}{command_flags(options)}")
    return Advice(
        data=str(data), model=model, images_per_class=counts,
        imbalance=max(counts.values()) / max(1, min(counts.values())),
        probe_accuracy=fit.cv_accuracy, chance=chance, similarity=similarity, size=size, domain=domain,
        strategy=strategy, options=options, reasons=reasons, command=command,
        imagenet_confidence=confidence,
        sampled_per_class=per_class, sampled_images=len(feats.labels),
        probe_metric="macro-F1" if splits.multi_label else "accuracy",
        thresholds={"small_below": small_below, "similar_from": similar_from},
    )  # fmt: skip
