"""torchvision's classification models by name, with its ``Weights`` enums (url, transforms, metadata)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..lean_imports import import_torchvision

import_torchvision()  # first: torchvision without dynamo's start-up cost
from torchvision import models as tv_models  # noqa: E402

from ..errors import TransferkitError
from .record import LayerGroup, Preprocessing, in_features
from .weights import NamedWeights, TorchvisionWeights, WeightsSource

# Containers whose children are the natural stages of a torchvision model.
_STAGE_CONTAINERS = {"features", "layers", "trunk_output", "blocks", "encoder"}
_LEAF_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.BatchNorm1d, nn.GroupNorm)
_POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d)
# Rebuilding these without weights must reproduce the graph the pretrained weights expect.
_AUX_FAMILIES = {"inception_v3": True, "googlenet": False}


VIT_IMAGE_SIZE = 224  # what torchvision builds a VisionTransformer for unless told otherwise


def _weights_size(name: str, weights: TorchvisionWeights, model_kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """``model_kwargs`` without an ``image_size`` the weights have already; another is a one-line error."""
    kwargs = dict(model_kwargs or {})
    size = kwargs.pop("image_size", None)
    own = int(weights.enum.transforms().crop_size[0])
    if size is not None and size != own:
        raise TransferkitError(f"--image-size {size}: torchvision's {name} weights are for {own}-pixel inputs (its "
                               f"position embeddings); leave out --image-size, or use a timm ViT (transferkit "
                               f"models 'timm/vit_*'), which resamples them, or --weights none")  # fmt: skip
    return kwargs or None


class TorchvisionSource:
    label = "torchvision"

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(tv_models.list_models(module=tv_models))

    def knows(self, name: str) -> bool:
        return name in tv_models.list_models(module=tv_models)

    def named_weights(self, name: str, weights: NamedWeights) -> TorchvisionWeights:
        enum = tv_models.get_model_weights(name)
        try:
            member = enum.DEFAULT if weights.name == "DEFAULT" else enum[weights.name]
        except KeyError:
            options = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__, "none", "a weights file"]))
            raise TransferkitError(f"unknown weights {weights.name!r} for {name}; choose one of: {options}") from None
        return TorchvisionWeights(member, weights.name)

    def input_size_kwargs(self, name: str, image_size: int) -> dict[str, Any]:
        """``image_size`` for a ViT, which torchvision builds for one input size (its position embeddings)."""
        return {"image_size": image_size} if name.startswith("vit_") and image_size != VIT_IMAGE_SIZE else {}

    def file_weights_kwargs(self, name: str) -> dict[str, Any]:
        """How to build ``name`` for a weights file given without its normalisation: as torchvision's own
        weights are built. Inception v3 and GoogLeNet's were trained on inputs scaled to [-1, 1], which
        their ``transform_input`` makes of the ImageNet-normalised ones that the usual preprocessing gives."""
        return {"transform_input": True} if name in _AUX_FAMILIES else {}

    def architecture(self, name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
        kwargs = dict(model_kwargs or {})
        if name in _AUX_FAMILIES:
            kwargs.setdefault("aux_logits", _AUX_FAMILIES[name])
            kwargs.setdefault("init_weights", True)
        return tv_models.get_model(name, weights=None, **kwargs)

    def build(self, name: str, weights: WeightsSource, model_kwargs: dict[str, Any] | None) -> tuple[nn.Module, dict]:
        if isinstance(weights, TorchvisionWeights):
            model_kwargs = _weights_size(name, weights, model_kwargs)
            model = _download(name, weights.enum)
            # A checkpoint rebuilt later must have the same graph as these weights imply.
            if name == "googlenet":
                model.aux_logits, model.aux1, model.aux2 = False, None, None
        else:
            model = self.architecture(name, model_kwargs)
        kwargs = dict(model_kwargs or {})
        if name in _AUX_FAMILIES:
            kwargs.update(aux_logits=_AUX_FAMILIES[name], transform_input=bool(model.transform_input), init_weights=False)
        return model, kwargs

    def preprocessing(self, name: str, weights: WeightsSource | None = None) -> Preprocessing:
        member = weights.enum if isinstance(weights, TorchvisionWeights) else tv_models.get_model_weights(name).DEFAULT
        t = member.transforms()
        return Preprocessing(
            image_size=int(t.crop_size[0]),
            resize_size=int(t.resize_size[0]),
            mean=tuple(float(v) for v in t.mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in t.std),  # type: ignore[arg-type]
            interpolation=t.interpolation.value,
        )

    def classifier_paths(self, model: nn.Module, name: str) -> tuple[str, tuple[str, ...]]:
        """(path of the final classifier, paths of auxiliary classifiers)."""
        last = None
        for path, module in model.named_modules():
            if path.startswith(("AuxLogits", "aux")):
                continue
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)):
                last = path
        if last is None:
            raise TransferkitError(f"no classifier found in {name}")
        extra = ("AuxLogits.fc",) if getattr(model, "AuxLogits", None) is not None else ()
        return last, extra

    def feature_dim(self, model: nn.Module, classifier_path: str) -> int:
        return in_features(model.get_submodule(classifier_path))

    def layer_groups(self, model: nn.Module, head_paths: tuple[str, ...]) -> list[LayerGroup]:
        return _stage_groups(model, head_paths)

    def offline_available(self, name: str) -> bool:
        url = tv_models.get_model_weights(name).DEFAULT.url
        return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()


def _download(name: str, member: Any) -> nn.Module:
    try:
        return tv_models.get_model(name, weights=member)
    except (OSError, RuntimeError, ValueError) as exc:  # urllib's URLError is an OSError
        filename = os.path.basename(member.url)
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise TransferkitError(
            f"could not get {name} weights {member} ({type(exc).__name__}: {str(exc)[:80]}); "
            f"connect once to download them, copy {filename} into {cache}, "
            f"or pass a local file with --weights FILE (or --weights none)"
        ) from None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _stage_groups(model: nn.Module, head_paths: tuple[str, ...]) -> list[LayerGroup]:
    """Stages of a torchvision model, from input to head: named children, or the stages of its stack."""
    head_parents = {p.rpartition(".")[0] for p in head_paths}
    units: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module, depth: int) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}{child_name}"
            if path in head_paths:
                continue
            expand = (depth == 0 and child_name in _STAGE_CONTAINERS) or (
                path in head_parents and isinstance(child, nn.Sequential)
            )
            expand = expand or (depth > 0 and child_name == "layers")
            if expand:
                walk(path + ".", child, depth + 1)
            elif _has_params(child) or isinstance(child, _POOL_TYPES):
                units.append((path, child))

    walk("", model, 0)
    groups: list[LayerGroup] = []
    run: list[str] = []
    run_parent = None

    def flush() -> None:
        nonlocal run
        if run:
            groups.append(LayerGroup(_leaf_run_name(model, run, first=not groups, head_paths=head_paths), tuple(run)))
        run = []

    for path, module in units:
        parent = path.rpartition(".")[0]
        if isinstance(module, _POOL_TYPES):
            flush()
        elif isinstance(module, _LEAF_TYPES):
            if parent != run_parent:
                flush()
            run_parent = parent
            run.append(path)
        else:
            flush()
            groups.append(LayerGroup(path, (path,)))
    flush()
    return groups


def _leaf_run_name(model: nn.Module, run: list[str], first: bool, head_paths: tuple[str, ...]) -> str:
    if first and len(run) > 1:
        return "stem"
    parent = run[0].rpartition(".")[0]
    if parent:
        siblings = [
            f"{parent}.{n}"
            for n, m in model.get_submodule(parent).named_children()
            if _has_params(m) and f"{parent}.{n}" not in head_paths
        ]
        if siblings == run:
            return parent
    if len(run) > 1 and all(path.rpartition(".")[0] == parent for path in run):
        # VGG's convolutions between two poolings: features.6-8, not features.6 (that module alone).
        return f"{run[0]}-{run[-1].rpartition('.')[2]}"
    return run[0]
