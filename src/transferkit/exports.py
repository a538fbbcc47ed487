"""Export a trained model to ONNX or a torch.export program, checked against its checkpoint; predict with ONNX.

An export maps a batch of preprocessed images (``N × 3 × H × W`` float32, normalised, any N) to
class probabilities (``N × classes``, softmax inside). Beside ``FILE`` the sidecar ``FILE.json``
(``model.onnx`` → ``model.onnx.json``) holds the class names and the preprocessing, so the export
is usable without transferkit::

    import json, onnxruntime
    meta = json.load(open("model.onnx.json"))    # class_names, preprocessing (see its "steps")
    probs = onnxruntime.InferenceSession("model.onnx").run(None, {"images": batch})[0]

    import torch                                  # --format pt2: PyTorch alone runs it
    probs = torch.export.load("model.pt2").module()(torch.from_numpy(batch))

Before an export is moved into place it is loaded back from its file and its probabilities on a
few validation images of the run (random tensors when the run's data is gone) are compared with
the checkpoint's; a difference above the tolerance fails the export and leaves no file.

``quantize="int8"`` (``--quantize int8``) writes ``model.int8.onnx``: the verified fp32 export,
quantized by ONNX Runtime and checked against it on accuracy (see :mod:`transferkit.quantize`).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones import Preprocessing
from .checkpoint import load_checkpoint, resolve_checkpoint_path
from .errors import TransferkitError
from .files import atomic_write, atomic_write_with_companions, cache_root
from .model import TransferModel
from .prediction import SIDECAR_FORMAT, EagerRunner, ExportedProgramRunner, OnnxRunner, read_sidecar, sidecar_path
from .quantize import (
    CALIBRATION_IMAGES,
    DEFAULT_MAX_DROP,
    QUANTIZATIONS,
    QuantizationCheck,
    calibration_reader,
    check_int8,
    quantize_int8,
    run_samples,
    spread,
)

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
QUANTIZED_NAME = "model.{}.onnx"  # model.int8.onnx: beside model.onnx, never mistaken for it by predict
# TorchScript (torch.jit.trace) is deprecated by PyTorch in favour of torch.export, which pt2 is.
RETIRED_FORMATS = {"torchscript": "pt2"}
DEFAULT_TOLERANCE = 1e-4  # max abs difference of probabilities; fp32 ONNX Runtime differs by ~1e-7
CHECK_IMAGES = 8
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
PREPROCESSING_STEPS = (
    "decode to RGB; resize the shorter side to resize_size (antialiased, given interpolation); "
    "centre-crop image_size x image_size; scale pixels to [0, 1]; subtract mean and divide by std per channel; "
    "stack as float32 N x 3 x image_size x image_size"
)


class Probabilities(nn.Module):
    """The classifier with its softmax, so an export's consumer never needs to know about logits."""

    def __init__(self, model: TransferModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.probabilities(self.model(x))  # softmax, or per-class sigmoids (multi-label)


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    checked_on: str  # "8 validation images" or "8 random tensors"
    max_abs_diff: float
    tolerance: float
    quantization: QuantizationCheck | None = None  # an int8 export's check against its fp32 original

    def summary(self) -> str:
        if self.quantization is not None:
            kept = "" if self.quantization.passed else " (over the limit, kept by --force)"
            return f"wrote {self.path} and {self.sidecar.name}; {self.quantization.summary()}{kept}"
        return (
            f"wrote {self.path} and {self.sidecar.name}; checked on {self.checked_on}: max abs probability "
            f"difference from the checkpoint {self.max_abs_diff:.2g} (tolerance {self.tolerance:g})"
        )


def checkpoint_digest(checkpoint: Path) -> str:
    """SHA-256 of a checkpoint file: it names ``predict``'s cached export, and an export's sidecar records it."""
    import hashlib

    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_export_path(checkpoint: Path) -> Path:
    """Where ``predict`` keeps the ONNX export it made of ``checkpoint``: named by the file's content."""
    return cache_root() / "exports" / f"{checkpoint_digest(checkpoint)[:24]}.onnx"


def made_from(export_file: Path, checkpoint: Path) -> bool:
    """Whether ``export_file`` is the fp32 export of ``checkpoint`` as it is now (its sidecar says so).

    An int8 model is never taken for it, whatever its name: a lossy model is only run when asked for by name.
    """
    try:
        sidecar = read_sidecar(export_file)
    except TransferkitError:  # no sidecar, or not one
        return False
    return "quantization" not in sidecar and sidecar.get("checkpoint_sha256") == checkpoint_digest(checkpoint)


def export(
    run: str | Path,
    format: str = "onnx",
    out: str | Path | None = None,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    quantize: str | None = None,
    max_drop: float = DEFAULT_MAX_DROP,
) -> ExportResult:
    """Export a run's model (default ``RUN/model.onnx`` or ``RUN/model.pt2``) with its sidecar.

    ``quantize="int8"``: an int8 ONNX model (default ``RUN/model.int8.onnx``), refused when its
    accuracy on the run's validation images is more than ``max_drop`` points below fp32's, unless
    ``force``.

    >>> export("runs/my-run", "onnx").path  # doctest: +SKIP
    PosixPath('runs/my-run/model.onnx')
    """
    _check_format(format)
    if quantize is not None and (quantize not in QUANTIZATIONS or format != "onnx"):
        raise TransferkitError(f"--quantize {quantize} is not available for --format {format}; "
                               f"choose --format onnx --quantize {' or '.join(QUANTIZATIONS)}")  # fmt: skip
    if quantize is not None and not -100 <= max_drop <= 100:  # nan, too, which would refuse every model
        raise TransferkitError(f"--max-drop is an accuracy drop in points, from -100 to 100; got {max_drop}")
    checkpoint = resolve_checkpoint_path(run)
    run_dir = checkpoint.parent
    model = load_checkpoint(checkpoint)
    default = QUANTIZED_NAME.format(quantize) if quantize else FORMATS[format]
    target = Path(out).expanduser() if out is not None else run_dir / default
    prep = model.preprocessing
    check = validation_inputs(run_dir, prep)
    if check is None:
        inputs, what = random_inputs(prep)
        check = inputs, f"{what} (the run's validation images were not found)"
    if quantize is not None:
        return _export_int8(model, run_dir, target, check, force, tolerance, max_drop, str(checkpoint.resolve()))
    return export_model(model, target, format, check=check, force=force, tolerance=tolerance,
                        source=str(checkpoint.resolve()))  # fmt: skip


def export_model(
    model: TransferModel,
    out: str | Path,
    format: str = "onnx",
    check: tuple[torch.Tensor, str] | None = None,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    source: str | None = None,
) -> ExportResult:
    """Export ``model`` to ``out``, verified on ``check`` = (preprocessed images, what they are).

    Without ``check``, random tensors stand in for images.
    """
    _check_format(format)
    if not tolerance >= 0:
        raise TransferkitError(f"--tolerance must be a number >= 0, got {tolerance}")
    out = Path(out)
    _check_outputs(out, format, force)
    prep = model.preprocessing
    inputs, checked_on = check if check is not None else random_inputs(prep)
    net = Probabilities(model).eval().float().to("cpu", memory_format=torch.contiguous_format)
    example = inputs[:1].repeat(2, 1, 1, 1)
    diff = 0.0

    def write_and_verify(tmp: Path) -> None:
        nonlocal diff
        try:
            _WRITERS[format](net, example, tmp)
        except Exception as exc:  # the exporters raise many types; all mean "this network does not export"
            raise TransferkitError(
                f"{format} export of {model.record.backbone} failed ({type(exc).__name__}: {_first_line(exc)}); "
                "try the other --format"
            ) from None
        reference = EagerRunner(model, torch.device("cpu"), precision="32")(inputs)
        # Loaded back from the file, as a consumer would. Batch 1 differs from the traced batch of 2,
        # so a batch size frozen into the graph fails here.
        exported = _RUNNERS[format](tmp, model.class_names, prep)
        diff = max(_max_abs_diff(exported(inputs[:1]), reference[:1]), _max_abs_diff(exported(inputs), reference))
        if not diff <= tolerance:
            raise TransferkitError(
                f"export check failed: the {format} model's probabilities differ from the checkpoint's by up to "
                f"{diff:.3g} on {checked_on} (tolerance {tolerance:g}); nothing was written. Try the other --format, "
                "or raise --tolerance if that difference is acceptable"
            )
        _write_sidecar(model, ExportResult(out, sidecar_path(out), format, checked_on, diff, tolerance), source)

    with torch.no_grad():
        atomic_write_with_companions(out, write_and_verify, companions=(f"{out.name}.data",))
    return ExportResult(out, sidecar_path(out), format, checked_on, diff, tolerance)


def _export_int8(
    model: TransferModel, run_dir: Path, out: Path, check: tuple[torch.Tensor, str], force: bool, tolerance: float,
    max_drop: float, source: str,
) -> ExportResult:  # fmt: skip
    """The fp32 export (verified as always) in a temporary folder, quantized into ``out`` if accurate enough."""
    if model.record.extra.get("multi_label"):
        raise TransferkitError("--quantize int8 is checked by top-1 accuracy, which a multi-label model does not "
                               "have; export it in fp32 (without --quantize)")  # fmt: skip
    _check_outputs(out, "onnx", force)
    train, val = run_samples(run_dir, model.class_names)
    quality: QuantizationCheck | None = None
    with tempfile.TemporaryDirectory(prefix="transferkit-export-") as tmp:
        fp32 = export_model(model, Path(tmp) / "fp32.onnx", "onnx", check=check, tolerance=tolerance, source=source)

        def int8_result() -> ExportResult:
            # "check" stays the fp32 export's check against the checkpoint; the int8 model's is "quantization".
            return ExportResult(out, sidecar_path(out), "onnx", fp32.checked_on, fp32.max_abs_diff, tolerance, quality)

        def write_and_check(path: Path) -> None:
            nonlocal quality
            reader = calibration_reader(spread(train, CALIBRATION_IMAGES), model.preprocessing, INPUT_NAME)
            try:
                quantize_int8(fp32.path, path, reader)
            except Exception as exc:  # ONNX Runtime's quantizer raises many types; all mean "cannot quantize"
                raise TransferkitError(f"int8 quantization of {model.record.backbone} failed ({type(exc).__name__}: "
                                       f"{str(exc)[:200]}); export fp32 without --quantize") from None  # fmt: skip
            quality = check_int8(fp32.path, path, val, model.class_names, model.preprocessing, max_drop, reader.count)
            if not quality.passed and not force:
                raise TransferkitError(f"int8 export refused, nothing was written: {quality.summary()}. Pass --force "
                                       "to keep it anyway, or --max-drop to change the limit")  # fmt: skip
            _write_sidecar(model, int8_result(), source)

        atomic_write(out, write_and_check)
    return int8_result()


def _check_outputs(out: Path, format: str, force: bool) -> None:
    """An export goes to a file name ``predict`` recognises, never over a folder, over a file only with --force."""
    suffix = Path(FORMATS[format]).suffix  # what predict (.onnx) and torch.export's loaders (.pt2) recognise
    if out.suffix.lower() != suffix:
        raise TransferkitError(f"--out {out} must end in {suffix} for --format {format}")
    for path in (out, sidecar_path(out)):
        if path.is_dir():
            raise TransferkitError(f"--out {out}: {path} is a folder; give a file name")
    # A sidecar whose model is gone describes nothing, and is replaced; an existing model is kept.
    if out.exists() and not force:
        raise TransferkitError(f"{out} already exists; pass --force to overwrite it, or choose another --out")


def _write_sidecar(model: TransferModel, result: ExportResult, source: str | None) -> None:
    """Called once the export is verified and before it is renamed into place: an export is never there without
    its sidecar (a crash between the two renames, a moment apart, leaves the sidecar alone, which readers skip)."""
    metadata = _sidecar(model, model.preprocessing, result, model.preprocessing.image_size, source)
    atomic_write(result.sidecar, lambda tmp: tmp.write_text(json.dumps(metadata, indent=2) + "\n"))


def _first_line(exc: BaseException) -> str:
    """An exporter's message on one line (its first, without the terminal colours torch.onnx adds)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return lines[0][:200] if lines else ""


def _check_format(format: str) -> None:
    if format in RETIRED_FORMATS:
        raise TransferkitError(f"--format {format} is no longer written (PyTorch deprecated TorchScript); use "
                               f"--format {RETIRED_FORMATS[format]} (torch.export, loads with PyTorch alone) or onnx")
    if format not in FORMATS:
        raise TransferkitError(f"unknown --format {format!r}; choose one of: {', '.join(FORMATS)}")


def _sidecar(
    model: TransferModel, prep: Preprocessing, result: ExportResult, size: int, source: str | None
) -> dict[str, Any]:
    """What a consumer needs beside the file, all of it from the model's record."""
    from . import __version__

    record = model.record
    return {
        "format": SIDECAR_FORMAT,
        "model_format": result.format,
        "file": result.path.name,
        "class_names": list(record.class_names),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(record.class_names)],
                   "softmax": not record.extra.get("multi_label"),  # multi-label: a sigmoid per class, and
                   **({"thresholds": list(record.extra.get("thresholds") or [0.5] * len(record.class_names))}
                      if record.extra.get("multi_label") else {})},  # its classes' decision thresholds
        "preprocessing": {**prep.to_dict(), "crop": "center", "steps": PREPROCESSING_STEPS},
        "backbone": record.backbone,
        "weights": record.weights,
        "head": str(record.head),
        "checkpoint": source,
        "checkpoint_sha256": checkpoint_digest(Path(source)) if source and Path(source).is_file() else None,
        "check": {"inputs": result.checked_on, "max_abs_diff": result.max_abs_diff, "tolerance": result.tolerance},
        **({"quantization": result.quantization.to_dict()} if result.quantization else {}),
        "transferkit_version": __version__,
    }


# --------------------------------------------------------------------------- check inputs


def validation_inputs(run_dir: Path, prep: Preprocessing, count: int = CHECK_IMAGES) -> tuple[torch.Tensor, str] | None:
    """Up to ``count`` of the run's validation images, preprocessed; None when its data is unavailable."""
    from .data import build_transform, load_image

    try:
        val = run_samples(run_dir)[1]
    except TransferkitError:
        return None
    transform = build_transform(prep, "none")
    step = max(1, len(val) // count)  # spread over the sorted list, so over the classes
    images = []
    for path, _ in val[::step]:
        try:
            images.append(transform(load_image(path)))
        except Exception:  # an image that no longer decodes is simply not used for the check
            continue
        if len(images) == count:
            break
    if not images:
        return None
    return torch.stack(images), f"{len(images)} validation image{'s' * (len(images) > 1)}"


def random_inputs(prep: Preprocessing, count: int = CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    # Uniform pixels, normalised like real images, so activations stay in the range images give.
    pixels = torch.rand(count, 3, prep.image_size, prep.image_size, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    return (pixels - mean) / std, f"{count} random tensors"


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------- formats


def _batch_free() -> dict[str, Any]:
    # Only the batch size varies: H and W are fixed by the preprocessing the sidecar records.
    return {"x": {0: torch.export.Dim("batch", min=1)}}


# Weights past this size go to NAME.onnx.data beside the model (protobuf's limit is 2 GB); the exporter
# decides so by the same size, and this says it where the size is known.
ONNX_EXTERNAL_DATA_BYTES = 1536 << 20


def _write_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    # torch.export-based exporter (onnxscript), PyTorch's current one; the TorchScript-based one is deprecated.
    program = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=_batch_free(), verbose=False,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])  # fmt: skip
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    program.save(str(path), external_data=weights > ONNX_EXTERNAL_DATA_BYTES)


def _write_pt2(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    program = torch.export.export(net, (example,), dynamic_shapes=_batch_free())
    # Functional ops only (no decompositions): what a linear probe leaves unused of the network is then removed.
    with open(path, "wb") as f:  # a file object: torch.export warns of a name not ending in .pt2 (the temporary one)
        torch.export.save(program.run_decompositions({}), f)


_WRITERS = {"onnx": _write_onnx, "pt2": _write_pt2}
# Read back as a consumer would, through the one prediction path.
_RUNNERS = {"onnx": OnnxRunner, "pt2": ExportedProgramRunner}
