"""One prediction path: a runner per runtime maps a batch of preprocessed images to class
probabilities, and one loop runs a runner over images. ``evaluate``, ``predict``, the export check
and the reports all predict through here.

A runner has ``class_names``, ``preprocessing``, ``precision`` and ``device_type``, and is called on
a float32 ``N × 3 × H × W`` batch, returning ``N × classes`` probabilities on the CPU. A new runtime
is one new runner class.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .backbones import Preprocessing
from .data import BadImage, Sample, build_transform, make_loader
from .errors import TransferkitError
from .model import TransferModel
from .performance import (
    autocast,
    batch_to,
    compile_in_place,
    inference_mode,
    pick_device,
    resolve_precision,
    to_fast_layout,
)

SIDECAR_FORMAT = "transferkit-export/1"


class Runner(Protocol):
    class_names: list[str]
    preprocessing: Preprocessing
    precision: str  # "32", "bf16" or "16": what the numbers were computed at
    device_type: str
    thresholds: list[float] | None  # a multi-label model's per-class decision thresholds

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def inference_precision(model: TransferModel | dict[str, Any], device: torch.device, requested: str | None = None) -> str:
    """The precision a checkpoint (model or metadata) runs at on ``device``: ``requested``, else the run's own.

    A run records ``--precision`` as given; ``auto`` resolves on the machine that runs the model
    (bf16 on a GPU or a CPU with native bf16, else fp32), so one machine always gives the same
    answers for a run, and the numbers say which precision produced them.
    """
    meta = model if isinstance(model, dict) else model.record.extra
    return resolve_precision(requested or meta.get("inference_precision", "32"), device)


class EagerRunner:
    """The model in eager PyTorch, in eval mode, channels_last, at its precision on this device."""

    def __init__(
        self, model: TransferModel, device: torch.device | None = None, precision: str | None = None,
        compile: bool = False, calibrated: bool = True,
    ) -> None:  # fmt: skip
        self.calibrated = calibrated  # False: the network's own softmax, without the fitted temperature
        self.device = device or pick_device()
        self.model = to_fast_layout(model.to(self.device))
        if compile:
            compile_in_place(model, self.device)
        self.precision = inference_precision(model, self.device, precision)
        self.class_names = model.class_names
        self.thresholds = model.thresholds if model.multi_label else None
        self.preprocessing = model.preprocessing
        self.device_type = self.device.type

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with inference_mode(self.model), autocast(self.device, self.precision):
            logits = self.model(batch_to(images, self.device, channels_last=True))
        return self.model.probabilities(logits, self.calibrated).cpu()


def head_probabilities(
    model: TransferModel, features: torch.Tensor, device: torch.device | None = None, precision: str | None = None,
    batch_size: int = 256, calibrated: bool = True,
) -> torch.Tensor:  # fmt: skip
    """The head alone on pooled backbone features (``extract_features``'s, at the same precision).

    Bit for bit what :class:`EagerRunner` computes after the backbone: the cached vectors are the
    head's own input (bf16 values kept exactly in float32), and under the same autocast the head's
    first layer casts them back as it would have.
    """
    device = device or pick_device()
    precision = inference_precision(model, device, precision)
    # The whole model moves, as every runner moves it: a head alone on a GPU left the backbone behind on the
    # CPU, and the next whole forward (the report's Grad-CAM) mixed the two devices.
    head = model.to(device).head_module
    with inference_mode(model), autocast(device, precision):
        logits = [head(batch.to(device)).float().cpu() for batch in features.split(batch_size)]
    return model.probabilities(torch.cat(logits), calibrated) if logits else torch.empty(0, len(model.class_names))


class OnnxRunner:
    """An ONNX export in ONNX Runtime (fp32); class names and preprocessing from its sidecar unless given."""

    precision = "32"
    device_type = "cpu"

    def __init__(
        self, path: str | Path, class_names: list[str] | None = None, preprocessing: Preprocessing | None = None
    ) -> None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise TransferkitError(f"{path} does not exist; give an ONNX export (transferkit export) or a run directory")
        self.path = path
        meta = read_sidecar(path) if class_names is None or preprocessing is None else {}
        self.class_names = list(class_names or meta["class_names"])
        self.preprocessing = preprocessing or Preprocessing.from_dict(meta["preprocessing"])
        self.thresholds = meta.get("output", {}).get("thresholds")  # multi-label exports only
        if meta.get("quantization"):  # what /info and evaluate report: its weights are int8, not fp32
            self.precision = meta["quantization"]["quantization"]
        self.session = onnx_session(path)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: images.float().numpy()})[0])


class ExportedProgramRunner:
    """A ``torch.export`` program (``.pt2``), as PyTorch alone runs it (fp32, CPU)."""

    precision = "32"
    device_type = "cpu"
    thresholds = None

    def __init__(self, path: str | Path, class_names: list[str], preprocessing: Preprocessing) -> None:
        with open(path, "rb") as f:  # by its content: the file being checked before its rename has another suffix
            self.module = torch.export.load(f).module()
        self.class_names, self.preprocessing = class_names, preprocessing

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(images.float()).detach()


# Test-time augmentation: the plain view, its mirror image, and four corner crops of 7/8 of it scaled
# back to the input size (each runs the whole network: six views cost about six times the time).
TTA_VIEWS = ("identity", "hflip", "crop-top-left", "crop-top-right", "crop-bottom-left", "crop-bottom-right")
TTA_CROP = 0.875


def tta_view(images: torch.Tensor, view: str) -> torch.Tensor:
    """One test-time view of a preprocessed ``N × 3 × H × W`` batch."""
    if view == "identity":
        return images
    if view == "hflip":
        return images.flip(-1)
    if view.startswith("crop-"):
        h, w = images.shape[-2:]
        ch, cw = round(h * TTA_CROP), round(w * TTA_CROP)
        top = 0 if "top" in view else h - ch
        left = 0 if "left" in view else w - cw
        crop = images[..., top : top + ch, left : left + cw]
        return torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    raise TransferkitError(f"unknown test-time view {view!r}; choose from: {', '.join(TTA_VIEWS)}")


class AugmentedRunner:
    """Any runner over several views of each batch, its probabilities averaged (test-time augmentation)."""

    def __init__(self, runner: Runner, views: tuple[str, ...] = TTA_VIEWS) -> None:
        self.runner, self.views = runner, views
        self.class_names, self.preprocessing = runner.class_names, runner.preprocessing
        self.precision, self.device_type, self.thresholds = runner.precision, runner.device_type, runner.thresholds

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.runner(tta_view(images, view)) for view in self.views]).mean(dim=0)


class EnsembleRunner:
    """Several runners of the same classes, their probabilities averaged (a k-fold run's models)."""

    def __init__(self, runners: list[Runner]) -> None:
        first = runners[0]
        self.runners = runners
        self.class_names, self.preprocessing = first.class_names, first.preprocessing
        self.precision, self.device_type = first.precision, first.device_type
        # Multi-label: each class's threshold averaged over the members, as their probabilities are.
        self.thresholds = (None if first.thresholds is None else
                           [sum(t) / len(t) for t in zip(*(r.thresholds or [] for r in runners))])  # fmt: skip

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([runner(images) for runner in self.runners]).mean(dim=0)


@dataclass
class Predictions:
    """Probabilities of the images that decoded, by their position in the list given."""

    probabilities: torch.Tensor  # (N, classes)
    positions: torch.Tensor  # (N,) indices into the samples predicted
    bad: list[BadImage]
    precision: str

    def by_position(self) -> dict[int, torch.Tensor]:
        return dict(zip(self.positions.tolist(), self.probabilities))


def predict_samples(
    runner: Runner, samples: list[Sample] | list[str], batch_size: int = 32, num_workers: int | None = None,
    warn_undecodable: bool = True,
) -> Predictions:  # fmt: skip
    """Run ``runner`` over image files (or (path, label) samples), evaluation view, a batch at a time.

    An image that fails to decode drops out and is listed in ``bad`` (and warned of, unless not
    ``warn_undecodable``); the others keep their position.
    """
    paths = [s if isinstance(s, str) else s[0] for s in samples]
    # Each image's loader "label" is its position: one that fails to decode leaves a traceable gap.
    loader = make_loader([(p, i) for i, p in enumerate(paths)], build_transform(runner.preprocessing, "none"),
                         batch_size, num_workers=num_workers, device_type=runner.device_type,
                         warn_undecodable=warn_undecodable)  # fmt: skip
    probabilities, positions, bad = [], [], []
    for images, indices, failed in loader:
        bad += failed
        if len(images):
            probabilities.append(runner(images))
            positions.append(indices)
    if not probabilities:
        return Predictions(torch.empty(0, len(runner.class_names)), torch.empty(0, dtype=torch.long), bad,
                           runner.precision)  # fmt: skip
    return Predictions(torch.cat(probabilities), torch.cat(positions), bad, runner.precision)


def top_k_results(
    files: list[str], by_position: dict[int, torch.Tensor], class_names: list[str], top_k: int,
    thresholds: list[float] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """predict's result structure; a file missing from ``by_position`` could not be decoded.

    With ``thresholds`` (a multi-label model's), every class at or over its threshold, however many.
    """
    from .multilabel import labels_over_threshold

    k = max(1, min(top_k, len(class_names)))
    results: list[dict[str, Any]] = []
    for i, file in enumerate(files):
        if i not in by_position:
            results.append({"path": file, "error": "cannot decode image", "predictions": []})
            continue
        if thresholds is not None:
            results.append({"path": file, "predictions": labels_over_threshold(by_position[i], class_names, thresholds)})
            continue
        values, top = by_position[i].topk(k)
        results.append({
            "path": file,
            "predictions": [
                {"label": class_names[int(j)], "probability": round(float(v), 6)} for v, j in zip(values, top)
            ],
        })  # fmt: skip
    return results


# --------------------------------------------------------------------------- export files


def sidecar_path(path: str | Path) -> Path:
    """An export's JSON sidecar: ``model.onnx`` → ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar of export ``path``, checked to be one."""
    side = sidecar_path(path)
    if not side.is_file():
        raise TransferkitError(
            f"{side} is missing; it holds the class names of {Path(path).name}: re-run transferkit export"
        )
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        reason = type(exc).__name__
        raise TransferkitError(f"{side} is not readable JSON ({reason}); re-run transferkit export") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise TransferkitError(f"{side} is not a transferkit export sidecar; re-run transferkit export")
    return meta


def onnx_session(path: str | Path) -> Any:
    """An ONNX Runtime session on ``path`` (GPU when onnxruntime-gpu has one, else CPU).

    Sessions are kept for the last few files (keyed by path, size and mtime, so a new export is
    picked up): repeated ``predict`` calls from a notebook skip the graph optimisation.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise TransferkitError("ONNX exports need ONNX Runtime: pip install onnxruntime") from None
    stat = Path(path).stat()
    return _session(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _session(path: str, size: int, mtime_ns: int) -> Any:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types, all meaning "not a usable model"
        reason = str(exc)[:120]
        raise TransferkitError(f"{path} is not a loadable ONNX model ({reason}); re-run transferkit export") from None
