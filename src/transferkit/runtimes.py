"""Which runner predicts for ``predict``, ``evaluate`` and ``serve``: eager PyTorch, a k-fold run's
ensemble, or ONNX Runtime on an export (``--runtime``), each optionally under test-time augmentation."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint, read_metadata, resolve_checkpoint_path
from .errors import TransferkitError
from .folds import fold_dirs
from .model import TransferModel
from .performance import pick_device
from .prediction import AugmentedRunner, EagerRunner, OnnxRunner, inference_precision

RUNTIMES = ("auto", "torch", "onnx")
# Below this many images, exporting first (a few seconds) costs more than ONNX Runtime saves.
AUTO_EXPORT_FROM = 256


def runner_for(
    run: str | Path | TransferModel, runtime: str = "auto", images: int = 1, precision: str | None = None,
    compile: bool = False, calibrated: bool = True, tta: bool = False,
) -> Any:  # fmt: skip
    """The runner ``predict`` uses for ``images`` images of ``run`` (``serve`` asks as for many): a k-fold
    run's ensemble, ONNX Runtime on an export (see :func:`transferkit.predict`'s ``runtime``), or eager
    PyTorch; wrapped for test-time augmentation with ``tta``."""
    if runtime not in RUNTIMES:
        raise TransferkitError(f"unknown --runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    if not calibrated and runtime == "onnx":
        raise TransferkitError("--calibration none needs --runtime torch (an export has the temperature inside)")
    if not calibrated and isinstance(run, (str, Path)) and Path(run).suffix.lower() == ".onnx":
        raise TransferkitError(f"--calibration none needs the run directory, not its export {run} (an export has "
                               "the temperature inside)")  # fmt: skip
    folds = fold_dirs(run) or []
    if folds and runtime == "onnx":
        raise TransferkitError(f"--runtime onnx runs one model, and {run} is a k-fold run of {len(folds)}: give "
                               f"--runtime torch (their average), or one fold's run, e.g. {folds[0]}")  # fmt: skip
    members = [load_checkpoint(d) for d in folds]
    onnx = None if members else _onnx_model_for(run, runtime if calibrated else "torch", images, precision, compile)
    if members:  # a k-fold run: the folds' models averaged
        runner: Any = ensemble(members, precision, compile, calibrated)
    elif onnx is not None:
        runner = OnnxRunner(onnx)
    else:
        runner = EagerRunner(run if isinstance(run, TransferModel) else load_checkpoint(run), pick_device(),
                             precision, compile, calibrated)  # fmt: skip
    return AugmentedRunner(runner) if tta else runner


def fold_models(run: Any) -> list[TransferModel]:
    return [load_checkpoint(d) for d in fold_dirs(run) or []]


def ensemble(members: list[TransferModel], precision: str | None, compile: bool, calibrated: bool) -> Any:
    from .prediction import EnsembleRunner

    device = pick_device()
    return EnsembleRunner([EagerRunner(m, device, precision, compile, calibrated) for m in members])


def _onnx_model_for(run: Any, runtime: str, images: int, precision: str | None, compile: bool) -> Path | None:
    """The ONNX file ``predict`` runs, or None for eager PyTorch (see :func:`transferkit.predict`'s ``runtime``)."""
    torch_only = "--precision" if precision else "--compile" if compile else None
    if isinstance(run, (str, Path)) and Path(run).suffix.lower() == ".onnx":
        if runtime == "torch" or torch_only:
            raise TransferkitError(f"{run} is an ONNX export, run by ONNX Runtime only: give the run directory for "
                                   f"{torch_only or '--runtime torch'}")  # fmt: skip
        return Path(run).expanduser()
    if not isinstance(run, (str, Path)) or runtime == "torch":
        if runtime == "onnx":
            raise TransferkitError("--runtime onnx needs a run directory or an .onnx file, not a model object")
        return None
    if runtime == "onnx" and torch_only:
        raise TransferkitError(f"{torch_only} applies to --runtime torch; --runtime onnx runs the fp32 export")
    if runtime == "auto" and (torch_only or pick_device().type != "cpu" or not _installed("onnxruntime")):
        return None
    from .exports import cached_export_path, export, made_from

    checkpoint = resolve_checkpoint_path(run)
    if runtime == "auto" and inference_precision(read_metadata(checkpoint), pick_device()) != "32":
        # The export runs fp32. Where the run's precision resolves to bf16 (a CPU with native bf16),
        # eager bf16 is faster than ONNX Runtime fp32 and is what evaluate measured: the same command
        # must not switch between numerically different paths with the job's size.
        return None
    beside, cached = checkpoint.parent / "model.onnx", cached_export_path(checkpoint)
    if beside.is_file() and made_from(beside, checkpoint):  # not one exported before the model last changed
        return beside
    if cached.is_file() and made_from(cached, checkpoint):
        return cached
    if runtime == "auto" and (images < AUTO_EXPORT_FROM or not _installed("onnx")):
        return None
    try:
        export(checkpoint, "onnx", out=cached, force=True)  # over a cached file left without its sidecar
    except (TransferkitError, OSError) as exc:  # e.g. an unexportable network, an unwritable cache
        if runtime == "onnx" and isinstance(exc, OSError):
            raise TransferkitError(f"cannot write an ONNX export under {cached.parent} ({exc}); give a "
                                   "writable --cache-dir (or TRANSFERKIT_CACHE_DIR), or run transferkit export "
                                   "RUN") from None  # fmt: skip
        if runtime == "onnx":
            raise  # the exporter's own one-line error
        warnings.warn(f"predicting with PyTorch: no ONNX export could be made ({exc})", stacklevel=3)
        return None
    return cached


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
