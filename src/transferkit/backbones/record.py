"""What every later step knows of a backbone: its preprocessing, its layer groups, and the network."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..errors import TransferkitError


def _per_channel(option: str, values: Sequence[float] | None) -> tuple[float, ...] | None:
    """An RGB image's three values; one value stands for all three (greyscale's statistics)."""
    if values is None or len(values) == 0:
        return None
    if len(values) not in (1, 3):
        raise TransferkitError(f"{option} takes 1 or 3 numbers (one per RGB channel), got {len(values)}: "
                               f"{','.join(map(str, values))}")  # fmt: skip
    return tuple(float(v) for v in values) * (3 if len(values) == 1 else 1)


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a backbone's weights (evaluation view)."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(d["image_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
        )

    def with_overrides(
        self,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        image_size: int | None = None,
        resize_size: int | None = None,
    ) -> Preprocessing:
        if image_size is not None and image_size < 1:
            raise TransferkitError(f"--image-size must be at least 1 pixel, got {image_size}")
        mean, std = _per_channel("--mean", mean), _per_channel("--std", std)
        if std is not None and not all(s > 0 and math.isfinite(s) for s in std):
            raise TransferkitError(f"--std must be positive (images are divided by it), got {','.join(map(str, std))}")
        if mean is not None and not all(math.isfinite(m) for m in mean):
            raise TransferkitError(f"--mean must be finite numbers, got {','.join(map(str, mean))}")
        size = image_size or self.image_size
        resize = resize_size or (
            self.resize_size if image_size is None else round(size * self.resize_size / self.image_size)
        )
        return Preprocessing(
            image_size=size,
            resize_size=resize,
            mean=tuple(mean) if mean else self.mean,  # type: ignore[arg-type]
            std=tuple(std) if std else self.std,  # type: ignore[arg-type]
            interpolation=self.interpolation,
        )


@dataclass(frozen=True)
class LayerGroup:
    """A named set of parameters; a parameter belongs to the group with its longest matching prefix."""

    name: str
    prefixes: tuple[str, ...]


@dataclass
class Backbone:
    """A pretrained network and what is known of it: where its classifier sits, its groups, its preprocessing."""

    name: str
    model: nn.Module
    classifier_path: str
    feature_dim: int
    groups: list[LayerGroup]
    preprocessing: Preprocessing
    weights: str  # as recorded: "none", "DEFAULT", an enum name or tag, or a weights file's absolute path
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    extra_head_paths: tuple[str, ...] = ()
    source: str = "torchvision"

    @property
    def head_paths(self) -> tuple[str, ...]:
        return (self.classifier_path, *self.extra_head_paths)

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    raise TransferkitError(f"unsupported classifier module {type(module).__name__}")


def group_of(param_name: str, groups: list[LayerGroup]) -> str | None:
    """Name of the group owning ``param_name`` (longest matching prefix wins)."""
    best, best_len = None, -1
    for g in groups:
        for p in g.prefixes:
            if (param_name == p or param_name.startswith(p + ".")) and len(p) > best_len:
                best, best_len = g.name, len(p)
    return best


def with_leftovers(model: nn.Module, groups: list[LayerGroup]) -> list[LayerGroup]:
    # Bare parameters (ViT's class token and position embedding) join the first group.
    leftovers = [n for n, _ in model.named_parameters() if group_of(n, groups) is None]
    if leftovers:
        first = groups[0]
        groups[0] = LayerGroup(first.name, (*first.prefixes, *leftovers))
    return groups
