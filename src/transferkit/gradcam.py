"""Where the model looked: Grad-CAM heatmaps (the ``grad-cam`` package) for CNNs and ViTs.

The layer explained is the deepest one with a spatial map that runs before the model's output: a
CNN's last convolutional stage (ResNet's ``layer4``, EfficientNet's ``bn2``, MobileNet's
``features.18``, ConvNeXt's ``features.7``), or a vision transformer's last block's first norm,
whose patch tokens (class, register and distillation tokens dropped) are laid back on the patch
grid. A linear probe on an earlier layer is explained at the layer it reads: the forward stops
there, and the gradient flows from the probe through its pooled features to that layer.

>>> from transferkit import load_backbone, TransferModel
>>> model = TransferModel(load_backbone("resnet18", "none"), ["a", "b"]).eval()
>>> [e.heatmap.shape for e in explain(model, torch.zeros(2, 3, 64, 64))], explain_layer(model, 64)
([(64, 64), (64, 64)], 'layer4')
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .backbones import Preprocessing, get_module
from .checkpoint import load_checkpoint
from .data import build_transform, check_whole_number, load_image
from .errors import TransferkitError
from .files import atomic_write, new_or_empty_folder
from .layers import resolve_layer
from .model import TransferModel
from .performance import autocast, batch_to, pick_device, to_fast_layout, uses_convolutions
from .prediction import inference_precision

OVERLAY_SUFFIX = "_gradcam.png"
# How much of the image shows through the colour map in an overlay (the rest is the heatmap).
IMAGE_WEIGHT = 0.5
# Lays a transformer's token activations (N, tokens, C) out as a feature map (N, C, rows, columns).
Reshape = Callable[[torch.Tensor], torch.Tensor] | None


@dataclass(frozen=True)
class Explanation:
    """One image's Grad-CAM: the heatmap lies on ``image``, both at the model's input size."""

    heatmap: np.ndarray  # (H, W) float32 in [0, 1]; 1 where the class's evidence is strongest
    image: np.ndarray  # (H, W, 3) uint8: the evaluation view the model saw (resized, centre-cropped)
    class_index: int  # the class explained: the predicted one unless a target was given
    label: str
    probability: float  # the model's probability of that class
    layer: str  # the module whose activations were weighed
    path: str | None = None

    def overlay(self) -> np.ndarray:
        return overlay(self.image, self.heatmap)


def explain(
    model: TransferModel | str | Path,
    images: Sequence[str | Path] | str | Path | torch.Tensor,
    target: int | str | Sequence[int | str] | None = None,
    batch_size: int = 16,
    precision: str | None = None,
) -> list[Explanation]:
    """Grad-CAM of each image for ``target`` (a class index or name, one per image, or None: the predicted class).

    ``model`` is a :class:`TransferModel` or a run directory (not an ONNX export: Grad-CAM needs the
    network's gradients). ``images`` are files (or one; evaluation view, as ``predict`` sees them) or a batch
    already preprocessed ``N × 3 × H × W``. Runs on the device ``predict`` uses (the model moves there), in
    eval mode; no parameter gets a gradient; a CNN is left in channels_last memory layout, as ``predict``
    leaves it (the same weights, faster).
    ``precision`` as ``predict``'s: by default the run's own, so the class explained is the one
    ``predict`` answers (bf16 on a CPU with native bf16 for ``auto``; the heatmaps then differ from
    fp32's by a few hundredths of their 0-1 range, and the forward pass is faster).
    """
    check_whole_number("batch_size", batch_size, 1)
    return list(_explanations(_eager_model(model), images, target, batch_size, precision))


def _explanations(
    model: TransferModel, images: Sequence[str | Path] | str | Path | torch.Tensor,
    target: int | str | Sequence[int | str] | None, batch_size: int, precision: str | None = None,
) -> Iterator[Explanation]:  # fmt: skip
    """:func:`explain`'s, a batch at a time: files are decoded as their batch comes, not all at once."""
    given = isinstance(images, torch.Tensor)
    if isinstance(images, (str, Path)):  # one file, as predict takes one (not its characters, one by one)
        images = [images]
    paths: list[str | None] = [None] * len(images) if given else [str(p) for p in images]
    if not paths:
        return
    targets = _targets(model, target, len(paths))
    prep = model.preprocessing
    height, width = tuple(images.shape[-2:]) if given else (prep.image_size, prep.image_size)
    device = pick_device()  # where predict runs it, so that the class explained is the one predict answers
    model.to(device)
    context = autocast(device, inference_precision(model, device, precision))
    channels_last = uses_convolutions(model)
    with _activation_gradients_only(model):
        to_fast_layout(model)  # as predict runs a CNN: channels_last convolutions, Grad-CAM's pass ~15 % faster here
        layer = _target_layer(model, height, width)
        for start in range(0, len(paths), batch_size):
            stop = start + batch_size
            views = images[start:stop] if given else torch.stack([_evaluation_view(p, prep) for p in paths[start:stop]])
            views = batch_to(views, device, channels_last)
            with context:
                yield from _explain_batch(model, layer, views, targets[start:stop], paths[start:stop])


def explain_layer(model: TransferModel, image_size: int) -> str:
    """The module path Grad-CAM reads for ``model`` at ``image_size`` (see the module's docstring)."""
    with _activation_gradients_only(model):
        return _target_layer(model, image_size, image_size)[0]


def overlay(image: np.ndarray, heatmap: np.ndarray, image_weight: float = IMAGE_WEIGHT) -> np.ndarray:
    """``image`` (H, W, 3 uint8) under the heatmap in the jet colour map: red where the model looked most."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, heatmap, use_rgb=True, image_weight=image_weight)


def write_overlays(model: TransferModel | str | Path, files: Sequence[str], out: str | Path,
                   batch_size: int = 16, precision: str | None = None,
                   targets: Sequence[int | str] | None = None) -> list[Path]:  # fmt: skip
    """``OUT/<image stem>_gradcam.png`` for each file (at the model's input size), all or nothing.

    ``targets``: the class to explain for each file (``predict``'s answers: with ``--tta`` or another
    runtime they need not be the top class of one plain forward); by default each file's top class.

    ``out`` must be new or empty. Images from several folders keep their sub-folders beneath the
    folder common to all (``OUT/blue/0_gradcam.png``); files that do not decode are skipped with a
    warning (``predict`` reports them); a stem repeated in one folder gets ``_2``, ``_3`` ….
    """
    target = check_explain_target(model, out)
    model = _eager_model(model)
    given = [None] * len(files) if targets is None else list(targets)
    if len(given) != len(files):
        raise TransferkitError(f"write_overlays: {len(given)} targets for {len(files)} files; give one per file")
    kept = [(f, t) for f, t in zip(files, given) if _decodes(f)]
    readable, wanted = [f for f, _ in kept], [t for _, t in kept]
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()  # beside the target: one rename publishes it whole
    written: list[Path] = []
    try:
        explained = _explanations(model, readable, wanted, batch_size, precision)
        for e, name in zip(explained, _overlay_names(readable)):
            picture = Image.fromarray(e.overlay())
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(staging / name, lambda tmp: picture.save(tmp, format="PNG"))
            written.append(target / name)
        os.replace(staging, target)  # POSIX rename replaces an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def check_explain_target(model: TransferModel | str | Path, out: str | Path) -> Path:
    """``out`` as a path if overlays of ``model`` can be written there; else the one-line error that says why."""
    if not isinstance(model, TransferModel):
        _refuse_unexplainable(model)
    return new_or_empty_folder(out, "--explain")


# --------------------------------------------------------------------------- the model and its inputs


def _eager_model(model: TransferModel | str | Path) -> TransferModel:
    if isinstance(model, TransferModel):
        return model
    _refuse_unexplainable(model)
    return load_checkpoint(model)


def _refuse_unexplainable(run: str | Path) -> None:
    """An ONNX export or a k-fold run is refused up front, with the file to give instead."""
    from .folds import fold_dirs

    if Path(run).suffix.lower() == ".onnx":
        raise TransferkitError(f"{run} is an ONNX export: Grad-CAM needs the network's gradients, "
                               "so give the run directory (or its model.pt) to explain")  # fmt: skip
    folds = fold_dirs(run)
    if folds:
        raise TransferkitError(f"{run} is a k-fold run (an ensemble of {len(folds)} models); explain one of its "
                               f"folds, e.g. {folds[0]}")  # fmt: skip


def _evaluation_view(path: str, prep: Preprocessing) -> torch.Tensor:
    try:
        image = load_image(path)
    except Exception as exc:  # PIL and torchvision raise many types for one meaning: not an image
        raise TransferkitError(f"cannot explain {path}: it does not decode ({type(exc).__name__})") from None
    return build_transform(prep, "none")(image)


def _decodes(path: str) -> bool:
    try:
        load_image(path)
    except Exception as exc:  # as _evaluation_view: any decoding failure
        warnings.warn(f"--explain: skipping {path}: cannot decode ({type(exc).__name__})", stacklevel=3)
        return False
    return True


def _pixels(views: torch.Tensor, prep: Preprocessing) -> np.ndarray:
    """Normalised views back to (N, H, W, 3) uint8, with the backbone's own mean and std."""
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    return ((views.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).movedim(1, -1).numpy()


def _targets(model: TransferModel, target: int | str | Sequence[int | str] | None, count: int) -> list[int | None]:
    names = model.class_names
    given = [target] * count if target is None or isinstance(target, (int, str)) else list(target)
    if len(given) != count:
        raise TransferkitError(f"explain: {len(given)} targets for {count} images; give one class, or one per image")
    out: list[int | None] = []
    for t in given:
        index = names.index(t) if isinstance(t, str) and t in names else t
        if index is not None and not (isinstance(index, int) and 0 <= index < len(names)):
            raise TransferkitError(f"explain: target {t!r} is not one of the classes ({', '.join(names)})")
        out.append(index)
    return out


# --------------------------------------------------------------------------- Grad-CAM


def _in_fp32(reshape: Reshape) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's activations and gradients as fp32 (grad-cam reads them with numpy, which has no bf16)."""
    return lambda x: (x if reshape is None else reshape(x)).float()


def _explain_batch(
    model: TransferModel, layer: tuple[str, nn.Module, Reshape], views: torch.Tensor, targets: list[int | None],
    paths: Sequence[str | None],
) -> list[Explanation]:  # fmt: skip
    from pytorch_grad_cam import GradCAM

    path, module, reshape = layer
    if views.is_inference():  # made under the caller's inference mode: autograd may not save it
        views = views.clone()
    # The gradient must reach the layer's output and go no further back: the output becomes a leaf
    # that wants one (hooked before grad-cam's hook sees it), so the backward pass runs through the
    # layers after it alone and the forward records no graph before it.
    leaf = module.register_forward_hook(_gradient_stops_here, prepend=True)
    cam = GradCAM(model=model, target_layers=[module], reshape_transform=_in_fp32(reshape))
    try:
        heatmaps = cam(views.float(), targets=[_ClassOf(t) for t in targets])
        logits = cam.outputs.detach().float()
    finally:
        cam.activations_and_grads.release()  # not `with cam`: its __exit__ swallows IndexErrors
        leaf.remove()
    chosen = [int(logits[i].argmax()) if t is None else t for i, t in enumerate(targets)]
    probabilities = model.probabilities(logits).cpu()
    pixels = _pixels(views, model.preprocessing)
    return [
        Explanation(np.clip(h, 0, 1).astype(np.float32), pixels[i], c, model.class_names[c],
                    float(probabilities[i, c]), path, None if paths[i] is None else str(paths[i]))
        for i, (h, c) in enumerate(zip(heatmaps, chosen))
    ]  # fmt: skip


def _gradient_stops_here(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output.detach().requires_grad_(True)


class _ClassOf:
    """Grad-CAM's target for one image: the logit of ``index``, or of the top class when None."""

    def __init__(self, index: int | None) -> None:
        self.index = index

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[int(logits.argmax()) if self.index is None else self.index]


@contextlib.contextmanager
def _activation_gradients_only(model: TransferModel) -> Iterator[None]:
    """fp32 eval mode with autograd on and the parameters frozen; the model's state (and .grad) is put back."""
    was_training = model.training
    wanted = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    dtypes = {p.dtype for p, _, _ in wanted}
    if dtypes - {torch.float32}:
        raise TransferkitError(f"explain needs a float32 model, this one holds {', '.join(map(str, dtypes))}")
    try:
        for p, _, _ in wanted:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            model.eval()
            yield
    finally:
        for p, flag, grad in wanted:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)



def _target_layer(model: TransferModel, height: int, width: int | None = None) -> tuple[str, nn.Module, Reshape]:
    """(path, module, token reshape) of the layer to explain, found by one forward of a blank image.

    Candidates, deepest last: a transformer's blocks' first norms, else each layer group's output
    module. The deepest that ran (a probe on an earlier layer stops the forward there) with a
    spatial map wins; a token map is reshaped to the patch grid.
    """
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    width = width or height
    candidates = _token_candidates(model) or _group_candidates(model)
    recorders = [ActivationsAndGradients(model, [module], None) for _, module in candidates]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=next(model.parameters()).device))
        shapes = [tuple(r.activations[0].shape) if r.activations else None for r in recorders]
    finally:
        for r in recorders:
            r.release()
    channels_last = _maps_channels_last(model.net)
    for (path, module), shape in reversed(list(zip(candidates, shapes))):
        if shape is not None and len(shape) == 4 and channels_last and shape[1] * shape[2] > 1:
            return path, module, _channels_first
        if shape is not None and len(shape) == 4 and not channels_last and shape[2] * shape[3] > 1:
            return path, module, None
        if shape is not None and len(shape) == 3 and _is_token_model(model):
            return path, module, _token_grid(_prefix_tokens(model), shape[1], height, width)
    names = ", ".join(path for path, _ in candidates)
    raise TransferkitError(f"Grad-CAM found no layer with a spatial map before {model.record.backbone}'s output "
                           f"(looked at {names}); it explains CNNs and vision transformers")  # fmt: skip


def _maps_channels_last(net: nn.Module) -> bool:
    """Whether ``net``'s feature maps are (N, H, W, C): timm's Swin says so (``output_fmt``); torchvision's
    keeps them so up to the permute before its pooling, and says nothing."""
    from torchvision.models.swin_transformer import SwinTransformer

    return getattr(net, "output_fmt", "NCHW") == "NHWC" or isinstance(net, SwinTransformer)


def _channels_first(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _group_candidates(model: TransferModel) -> list[tuple[str, nn.Module]]:
    head = model.head_module
    paths = {id(m): path for path, m in model.net.named_modules()}
    layers = [resolve_layer(model, g.name)[:2] for g in model.groups]
    if model.probe is not None and model.probe_module:  # the layer the probe reads, where the forward stops
        layers.append((model.probe_module, get_module(model.net, model.probe_module)))
    out: list[tuple[str, nn.Module]] = []
    for name, module in layers:
        if module is not head and all(module is not m for _, m in out):
            out.append((paths.get(id(module), name), module))
    return out


def _is_token_model(model: TransferModel) -> bool:
    return _transformer_blocks(model.net) is not None


def _transformer_blocks(net: nn.Module) -> tuple[str, nn.Module] | None:
    """A ViT's list of blocks: timm's ``blocks`` beside a ``patch_embed``, torchvision's ``encoder.layers``."""
    if hasattr(net, "patch_embed") and isinstance(getattr(net, "blocks", None), nn.Sequential):
        return "blocks", net.blocks
    if hasattr(net, "class_token") and isinstance(getattr(getattr(net, "encoder", None), "layers", None), nn.Sequential):
        return "encoder.layers", net.encoder.layers
    return None


def _token_candidates(model: TransferModel) -> list[tuple[str, nn.Module]]:
    # The norm before the last attention, not the last block's output: with a class-token head, the
    # patch tokens leaving the last block reach nothing, so their gradient is zero.
    found = _transformer_blocks(model.net)
    if found is None:
        return []
    prefix, blocks = found
    out = []
    for name, block in blocks.named_children():
        norm = next(((n, m) for n, m in block.named_modules() if isinstance(m, nn.LayerNorm)), None)
        if norm is not None:
            out.append((f"{prefix}.{name}.{norm[0]}", norm[1]))
    return out


def _prefix_tokens(model: TransferModel) -> int:
    """Class, register and distillation tokens ahead of the patches (timm's ``num_prefix_tokens``)."""
    net = model.net
    return int(getattr(net, "num_prefix_tokens", 1 if hasattr(net, "class_token") else 0))


def _token_grid(prefix: int, tokens: int, height: int, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    patches = tokens - prefix
    rows = max(1, round((patches * height / width) ** 0.5))
    columns = patches // rows
    if rows * columns != patches:
        raise TransferkitError(f"Grad-CAM: {patches} patch tokens do not tile a {height}x{width} image")

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, prefix:, :].reshape(t.shape[0], rows, columns, t.shape[2]).permute(0, 3, 1, 2)

    return reshape


# --------------------------------------------------------------------------- the output folder


def _overlay_names(files: Sequence[str]) -> list[str]:
    """Each overlay's path in OUT: the image's own beneath the folder common to all, so that
    ``blue/0.png`` and ``red/0.png`` read as such (a packed image's as its split's folder would:
    ``val/blue/0.png``); a stem repeated in one folder gets ``_2``, ``_3`` …"""
    from .shards import as_file_path

    files = [as_file_path(f) for f in files]
    parents = [Path(os.path.abspath(f)).parent for f in files]
    root = Path(os.path.commonpath(parents)) if parents else Path()
    names, used = [], set()
    for f, parent in zip(files, parents):
        stem, n = (parent.relative_to(root) / Path(f).stem).as_posix(), 1
        while (name := f"{stem}{'' if n == 1 else f'_{n}'}{OVERLAY_SUFFIX}") in used:
            n += 1
        used.add(name)
        names.append(name)
    return names
