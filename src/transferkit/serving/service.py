"""The model behind the HTTP routes: the runner ``predict --runtime auto`` would choose, and its one loop.

Uploaded images are checked from their header (an image? not a decompression bomb?) before they
queue; a batch of them is written to a temporary folder and predicted by
:func:`~transferkit.prediction.predict_samples` with :func:`~transferkit.prediction.top_k_results`,
so the service decodes, preprocesses and answers exactly as ``transferkit predict`` does.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..image_files import IMAGE_FORMATS, MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, shape_problem
from ..errors import TransferkitError
from ..runtimes import AUTO_EXPORT_FROM, runner_for
from ..prediction import EagerRunner, EnsembleRunner, Runner, predict_samples, read_sidecar, top_k_results


class RequestProblem(TransferkitError):
    """A request the service refuses: an HTTP status and a one-line reason for the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """One image of a request: the name it is answered under, its bytes, its format, the labels wanted."""

    name: str
    data: bytes
    format: str  # PIL's name for it: JPEG, PNG, ...
    top_k: int


def check_image(name: str, data: bytes) -> str:
    """The image format of ``data`` read from its header, or a :class:`RequestProblem` saying why not."""
    if not data:
        raise RequestProblem(422, f"{name} is empty; send the image's bytes")
    try:  # on the event loop's thread, never two at once: catch_warnings is not thread-safe
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                width, height, fmt = im.width, im.height, im.format or "image"
    except Image.DecompressionBombError:
        raise RequestProblem(413, f"{name} has too many pixels to decode safely; send a smaller image") from None
    except Exception:  # PIL raises several types for "not an image I know"
        raise RequestProblem(422, f"{name} is not an image (JPEG, PNG, PPM, BMP, GIF, TIFF or WebP)") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise RequestProblem(413, f"{name} is {width} x {height} pixels, more than decoding allows; "
                                  "send a smaller image")
    if shape_problem(width, height):
        raise RequestProblem(422, f"{name} is {width} x {height} pixels, longer than {MAX_ASPECT_RATIO}:1; "
                                  "crop it to the part to classify")
    return fmt


def choose_runner(run: str | Path, runtime: str = "auto") -> tuple[Runner, Path | None]:
    """The runner ``transferkit predict --runtime RUNTIME`` would use for a large job on ``run``, and its ONNX file.

    A service predicts many images, so ``auto`` decides as for a job of many: ONNX Runtime where the
    run's precision is fp32 on this machine (exporting once into the cache if the run has no export),
    eager PyTorch where it resolves to bf16. An ``.onnx`` file (fp32 or int8) is served by ONNX Runtime.
    """
    runner = runner_for(run, runtime, images=AUTO_EXPORT_FROM)
    return runner, getattr(runner, "path", None)


class ImageService:
    """Predicts uploads with one runner; ``info`` describes the model for ``GET /info``."""

    def __init__(self, run: str | Path, runtime: str = "auto", batch_size: int = 32) -> None:
        self.runner, onnx = choose_runner(run, runtime)
        self.batch_size = batch_size
        self.info = describe(self.runner, onnx)
        self._warm_up()

    def predict(self, uploads: list[Upload]) -> list[dict[str, Any]]:
        """``predict --json``'s entry for each upload, in order."""
        with tempfile.TemporaryDirectory(prefix="transferkit-serve-") as tmp:
            paths = []
            for i, upload in enumerate(uploads):
                # The suffix picks the decoder: JPEGs take libjpeg-turbo's fast path, as in predict.
                path = Path(tmp) / f"{i}.{'jpg' if upload.format == 'JPEG' else upload.format.lower()}"
                path.write_bytes(upload.data)
                paths.append(str(path))
            # Decoded here, by threads: worker processes would start again for every batch (on a GPU),
            # forked from a threaded server. An image that fails to decode is answered as an error.
            by_position = predict_samples(self.runner, paths, self.batch_size, num_workers=0,
                                          warn_undecodable=False).by_position()  # fmt: skip
        names = self.runner.class_names
        return [
            top_k_results([u.name], {0: by_position[i]} if i in by_position else {}, names, u.top_k,
                          self.runner.thresholds)[0]
            for i, u in enumerate(uploads)
        ]

    def _warm_up(self) -> None:
        # The first forward pass allocates and plans; a client should not pay for it.
        size = self.runner.preprocessing.image_size
        self.runner(torch.zeros(1, 3, size, size))


def describe(runner: Runner, onnx: Path | None = None) -> dict[str, Any]:
    """Classes, model and preprocessing of what ``runner`` runs, from the checkpoint's record or ``onnx``'s sidecar."""
    if onnx is not None:
        meta = read_sidecar(onnx)
        model = {key: meta.get(key) for key in ("backbone", "weights", "head")}
        model["file"] = str(onnx)
        if meta.get("quantization"):
            model["quantization"] = meta["quantization"]
        runtime = "onnxruntime"
    else:
        first = runner.runners[0] if isinstance(runner, EnsembleRunner) else runner  # a k-fold run: its first fold
        assert isinstance(first, EagerRunner)
        record = first.model.record
        model = {"backbone": record.backbone, "weights": record.weights, "head": str(record.head),
                 "strategy": record.strategy}  # fmt: skip
        if isinstance(runner, EnsembleRunner):  # its answers are the folds' mean, not the first fold's
            model["ensemble_of_folds"] = len(runner.runners)
        runtime = "torch"
    return {
        "classes": list(runner.class_names),
        "model": model,
        "preprocessing": runner.preprocessing.to_dict(),
        "runtime": runtime,
        "precision": runner.precision,
        "device": runner.device_type,
    }
