"""Where a backbone's weights come from, decided once: the ``--weights`` argument as a typed source.

In the spirit of timm's ``_resolve_pretrained_source``: one function looks at the argument in a
fixed order (no weights, a local file, else a name the backbone's own source knows) and returns
one of the records below; nothing later guesses from strings again.

>>> resolve_weights_argument("none")
NoWeights()
>>> resolve_weights_argument("/tmp/model.pth")
FileWeights(path=PosixPath('/tmp/model.pth'))
>>> resolve_weights_argument("IMAGENET1K_V1")
NamedWeights(name='IMAGENET1K_V1')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..errors import TransferkitError

NO_WEIGHTS = {"none", "random", "scratch"}
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class NoWeights:
    """Random initialisation."""

    def recorded(self) -> str:
        return "none"


@dataclass(frozen=True)
class FileWeights:
    """A local state_dict (or a dict holding one, or safetensors): never unpickled code."""

    path: Path

    def recorded(self) -> str:
        return str(self.path.resolve())


@dataclass(frozen=True)
class NamedWeights:
    """A name the backbone's source resolves: ``DEFAULT``, a torchvision enum name, a timm tag."""

    name: str

    def recorded(self) -> str:
        return self.name


@dataclass(frozen=True)
class TorchvisionWeights:
    """A torchvision ``WeightsEnum`` member: its url, transforms and metadata travel together."""

    enum: Any
    given: str

    def recorded(self) -> str:
        return self.given


@dataclass(frozen=True)
class TimmHubWeights:
    """A timm pretrained tag, fetched through timm's Hugging Face hub cache ("" is the default tag)."""

    tag: str

    def recorded(self) -> str:
        return self.tag or "DEFAULT"


@dataclass(frozen=True)
class PackageWeights:
    """Weights shipped in an installed Python package: available offline."""

    package: str
    attribute: str

    def recorded(self) -> str:
        return "DEFAULT"


WeightsSource = Union[NoWeights, FileWeights, TorchvisionWeights, TimmHubWeights, PackageWeights]


def resolve_weights_argument(weights: str | os.PathLike[str] | None) -> NoWeights | FileWeights | NamedWeights:
    """The source-independent part: no weights, a local file, or a name for the backbone's source."""
    if isinstance(weights, os.PathLike):
        return FileWeights(Path(weights).expanduser())
    if weights is None or weights.strip().lower() in NO_WEIGHTS:
        return NoWeights()
    if weights.lower().endswith(WEIGHT_FILE_SUFFIXES) or os.sep in weights or Path(weights).expanduser().is_file():
        return FileWeights(Path(weights).expanduser())
    return NamedWeights(weights)


# --------------------------------------------------------------------------- weights files


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a state_dict file, a dict holding one, or safetensors; never runs pickled code."""
    if path.is_dir():
        raise TransferkitError(f"--weights {path} is a folder: give the weights file in it (.pth, .pt, .bin or "
                               f".safetensors)")  # fmt: skip
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


def load_weights_file(model: nn.Module, path: Path, name: str, head_paths: tuple[str, ...]) -> None:
    """Load a local weights file into ``model``; a head of another class count is skipped."""
    own = model.state_dict()
    state = _under_best_prefix(read_state_dict(Path(path)), own)
    if not set(state) & set(own) and len(state) == len(own):
        state = _match_by_order(state, own, path, name)
    state = _position_embedding_resampled(model, state, own)
    head_keys = {k for k in own if any(k.startswith(p + ".") for p in head_paths)}
    # BatchNorm's step counters: files saved before PyTorch 0.4.1 have none, and nothing reads them in eval.
    missing = [k for k in own if k not in state and k not in head_keys and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and state[k].shape != own[k].shape and k not in head_keys]
    if missing or unexpected or wrong_shape:
        detail = "; ".join(
            f"{label} {len(keys)} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        )
        if not missing and not unexpected and all("pos_embed" in key for key in wrong_shape):  # torchvision's ViT
            raise TransferkitError(f"weights file {path} has position embeddings for another image size than "
                                   f"{name} here ({detail}); give the --image-size it was saved at")  # fmt: skip
        raise TransferkitError(f"weights file {path} does not fit {name} ({detail}); pass the --model it was saved from")
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)


def _under_best_prefix(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a wrapper's checkpoint (Lightning's ``self.model.``, a ``net.``, transferkit's
    ``model.net.``) under the prefix whose names then match the model's best; the wrapper's others (a
    loss's class weights) are left out. ``state`` itself where no prefix matches more of it."""
    best, best_hits = state, len(state.keys() & own.keys())
    if best_hits == len(state):
        return state
    prefixes = {".".join(key.split(".")[:n]) + "." for key in state for n in (1, 2, 3) if key.count(".") >= n}
    for prefix in sorted(prefixes):
        under = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        hits = len(under.keys() & own.keys())
        if hits > best_hits:
            best, best_hits = under, hits
    return best


def _position_embedding_resampled(
    model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A timm ViT's position embeddings saved at another image size, resampled to this one's patch grid,
    as timm does when it loads its own weights at another ``img_size``."""
    saved, wanted = state.get("pos_embed"), own.get("pos_embed")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if saved is None or wanted is None or saved.shape == wanted.shape or grid is None or saved.dim() != 3:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix_tokens = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    return {**state, "pos_embed": resample_abs_pos_embed(saved, list(grid), num_prefix_tokens=prefix_tokens)}


def _match_by_order(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: Path, name: str
) -> dict[str, torch.Tensor]:
    # Ports of one architecture (efficientnet_pytorch vs timm) name tensors differently but store
    # them in the same order; equal shapes all along make the correspondence unambiguous.
    if any(a.shape != b.shape for a, b in zip(state.values(), own.values())):
        raise TransferkitError(f"weights file {path} does not fit {name}: its tensor names and shapes differ")
    return dict(zip(own, state.values()))
