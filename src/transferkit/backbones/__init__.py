"""Pretrained backbones: torchvision, timm and offline EfficientNet-Lite, from a hub or a local file.

A :class:`Backbone` is the plain record every later step uses: the model, where its classifier
sits, the feature dimension, the layer groups from input to head, and the preprocessing that
belongs to its weights. Each place backbones come from is one *source* (a small adapter in its own
module, listed in ``SOURCES``); which source a name belongs to, and what ``--weights`` means for it,
is decided once, here.

>>> bb = load_backbone("resnet18", weights="none")
>>> bb.classifier_path, bb.feature_dim, bb.group_names[-3:]
('fc', 512, ['layer3', 'layer4', 'head'])
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from typing import Any

from torch import nn

from ..errors import TransferkitError
from .record import Backbone, LayerGroup, Preprocessing, get_module, group_of, set_module, with_leftovers
from .timm_source import PREFIX as TIMM_PREFIX
from .timm_source import LitePackageSource, TimmSource
from .torchvision_source import TorchvisionSource
from .weights import (
    FileWeights,
    NamedWeights,
    NoWeights,
    WeightsSource,
    load_weights_file,
    read_state_dict,
    resolve_weights_argument,
)

__all__ = [
    "Backbone", "LayerGroup", "Preprocessing", "SOURCES", "DEFAULT_BACKBONE", "build_architecture",
    "default_preprocessing", "explicit_preprocessing", "get_module", "group_of", "list_backbones", "load_backbone",
    "offline_weights_available", "read_state_dict", "resolve_weights", "set_module", "source_for",
]  # fmt: skip

DEFAULT_BACKBONE = "efficientnet_lite0"

# In the order a name is matched: the offline packages' names, then "timm/<name>", then torchvision's.
SOURCES: tuple[Any, ...] = (LitePackageSource(), TimmSource(), TorchvisionSource())


def source_for(name: str) -> Any:
    """The source that builds ``name``; an unknown name is a one-line error with close matches."""
    for source in SOURCES:
        if source.knows(name):
            return source
    spelled = TimmSource().spelling_of(name)
    if spelled:
        raise TransferkitError(f"unknown model {name!r}; did you mean {spelled}? "
                               f"(timm's models are named {TIMM_PREFIX}NAME)")  # fmt: skip
    known = [n for s in SOURCES if type(s) is not TimmSource for n in s.names()]  # not timm's thousands
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise TransferkitError(f"unknown model {name!r}{hint} (list them with: transferkit models)")


def resolve_weights(name: str, weights: str | None) -> WeightsSource:
    """``--weights`` for backbone ``name``, as a typed source: decided once, in a fixed order."""
    given = resolve_weights_argument(weights)
    if isinstance(given, NamedWeights):
        return source_for(name).named_weights(name, given)
    return given


def build_architecture(name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The bare architecture with random weights (what a checkpoint is loaded into)."""
    return source_for(name).architecture(name, model_kwargs)


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | None = "DEFAULT",
    preprocessing: Preprocessing | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """Load a backbone with its weights.

    ``weights`` is ``"DEFAULT"``, a torchvision enum name such as ``"IMAGENET1K_V1"`` (or a timm
    tag), ``"none"`` for random weights, or a path to a local weights file (state_dict, a dict
    holding one, or safetensors). ``preprocessing`` overrides what the weights' metadata says; give
    it for a local file whose normalisation differs from the architecture's usual one.
    """
    source = source_for(name)
    resolved = resolve_weights(name, weights)
    if model_kwargs and not isinstance(resolved, NoWeights):
        raise TransferkitError("model_kwargs change the architecture and are only allowed with weights='none'")
    default_prep = source.preprocessing(name, resolved)
    if preprocessing is not None:  # a ViT built for one input size is built for the one asked for
        model_kwargs = {**source.input_size_kwargs(name, preprocessing.image_size), **(model_kwargs or {})} or None
    usual = preprocessing is None or (preprocessing.mean, preprocessing.std) == (default_prep.mean, default_prep.std)
    if isinstance(resolved, FileWeights) and usual:  # the usual normalisation: built as the source's weights are
        model_kwargs = {**source.file_weights_kwargs(name), **(model_kwargs or {})} or None
    model, kwargs = source.build(name, resolved, model_kwargs)
    classifier_path, extra = source.classifier_paths(model, name)
    if isinstance(resolved, FileWeights):
        load_weights_file(model, resolved.path, name, (classifier_path, *extra))
        if preprocessing is None:
            warnings.warn(
                f"no preprocessing given for weights file {resolved.path.name}; using {name}'s usual "
                f"mean={default_prep.mean} std={default_prep.std} (pass mean/std if the file expects others)",
                stacklevel=2,
            )
    if preprocessing is not None and preprocessing.image_size != default_prep.image_size:
        _check_runs_at(model, name, preprocessing.image_size, default_prep.image_size)
    head_paths = (classifier_path, *extra)
    groups = with_leftovers(model, [*source.layer_groups(model, head_paths), LayerGroup("head", head_paths)])
    return Backbone(
        name=name,
        model=model,
        classifier_path=classifier_path,
        feature_dim=source.feature_dim(model, classifier_path),
        groups=groups,
        preprocessing=preprocessing or default_prep,
        weights=resolved.recorded(),
        model_kwargs=kwargs,
        extra_head_paths=extra,
        source=source.label,
    )


def _check_runs_at(model: nn.Module, name: str, size: int, own: int) -> None:
    """One forward of a blank image at ``--image-size``: some architectures take only some sizes (MaxViT's
    7x7 windows want multiples of 224), and their own errors would come at the first batch, as a traceback."""
    import torch

    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except Exception as exc:  # each architecture fails in its own words
        raise TransferkitError(f"--image-size {size}: {name} does not run on {size}-pixel inputs "
                               f"({type(exc).__name__}); give its own size, {own}, or another") from None  # fmt: skip
    finally:
        model.train(was_training)


def default_preprocessing(name: str) -> Preprocessing:
    """The architecture's usual preprocessing, from weights metadata alone (no model is built)."""
    return source_for(name).preprocessing(name)


def explicit_preprocessing(
    name: str, mean: list[float] | None = None, std: list[float] | None = None, image_size: int | None = None
) -> Preprocessing | None:
    """``name``'s usual preprocessing with the user's overrides, or None when there are none."""
    if not (mean or std or image_size is not None):
        return None
    return default_preprocessing(name).with_overrides(mean=mean, std=std, image_size=image_size)


def offline_weights_available(name: str) -> bool:
    """Whether ``name``'s default pretrained weights can be loaded without a network right now."""
    return source_for(name).offline_available(name)


def list_backbones(pattern: str = "*", include_timm: bool = False) -> list[str]:
    """Backbone names matching a shell-style pattern (``resnet*``, ``timm/convnext*``)."""
    include_timm = include_timm or pattern.startswith(TIMM_PREFIX)
    names = sorted({n for s in SOURCES if include_timm or type(s) is not TimmSource for n in s.names(pattern)})
    return [n for n in names if fnmatch.fnmatch(n, pattern)]
