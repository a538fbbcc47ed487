"""Lists of labelled images (samples): their classes, grouped by class, split train/val, relabelled.

A sample is ``(path, class index)``, or ``(path, 0/1 per class)`` for multi-label data. Where the
samples come from (folders, label files, packed shards) is :mod:`transferkit.discovery`'s.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

from .errors import TransferkitError

# (path, class index), or (path, 0/1 per class) for multi-label data.
Sample = tuple[str, int | tuple[int, ...]]
T = TypeVar("T")


def shuffled_by_class(items: Sequence[T], label: Callable[[T], int], seed: int) -> list[list[T]]:
    """``items`` grouped by class (classes in label order), each group in a seeded random order.

    The one per-class sampler: the train/val split, advise's sample and the report's grids all draw
    from it, so a seed means the same thing everywhere.
    """
    rng = random.Random(seed)
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(label(item), []).append(item)
    ordered = [groups[k] for k in sorted(groups)]
    for group in ordered:
        rng.shuffle(group)
    return ordered


def stratified_split(samples: list[Sample], val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split each class by ``val_split``, the same way for the same seed (multi-label: by first label)."""
    if not 0 < val_split < 1:
        raise TransferkitError(f"--val-split must be between 0 and 1, got {val_split}")
    train: list[Sample] = []
    val: list[Sample] = []
    for members in shuffled_by_class(samples, first_label, seed):
        n_val = min(len(members) - 1, max(1, round(len(members) * val_split))) if len(members) > 1 else 0
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)


def label_indices(label: int | tuple[int, ...]) -> tuple[int, ...]:
    """The classes a sample belongs to: its class index, or the 1s of a multi-label sample's 0/1 tuple."""
    return tuple(i for i, v in enumerate(label) if v) if isinstance(label, tuple) else (label,)


def first_label(sample: Sample) -> int:
    """A sample's class, or its first class (multi-label): what stratified splits go by."""
    return label_indices(sample[1])[0]


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Images per class (a multi-label image counts for each of its classes)."""
    counts = Counter(i for _, label in samples for i in label_indices(label))
    return [counts.get(i, 0) for i in range(num_classes)]


def relabelled(samples: Sequence[Sample], names: list[str], target: list[str], source: object) -> list[Sample]:
    """``samples`` labelled by the classes ``names``, relabelled by ``target`` (a model's classes)."""
    if names == target:
        return list(samples)
    unknown = sorted(set(names) - set(target))
    if unknown:
        raise TransferkitError(f"{source} has classes the model does not know: {', '.join(unknown)}; expected a "
                               f"subset of: {', '.join(target)}")  # fmt: skip
    position = [target.index(name) for name in names]

    def mapped(label: int | tuple[int, ...]) -> int | tuple[int, ...]:
        ids = {position[i] for i in label_indices(label)}
        return tuple(int(i in ids) for i in range(len(target))) if isinstance(label, tuple) else min(ids)

    return [(path, mapped(label)) for path, label in samples]
