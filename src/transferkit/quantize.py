"""int8 ONNX models: ONNX Runtime's static quantization, calibrated on a run's training images.

``transferkit export RUN --format onnx --quantize int8`` (see :func:`transferkit.exports.export`)
exports the verified fp32 model, then quantizes it here with
``onnxruntime.quantization.quantize_static``: weights int8 per output channel, activations int8
with ranges measured (MinMax) on preprocessed training images, as QuantizeLinear/DequantizeLinear
pairs (QDQ), which ONNX Runtime fuses into int8 kernels. The softmax stays fp32, so probabilities
keep their resolution.

An int8 model cannot match fp32 to 1e-4, so it is checked on what matters: its top-1 agreement with
the fp32 model and the accuracy of both on the run's validation images. The export is refused when
the accuracy drops by more than ``max_drop`` points.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backbones import Preprocessing
from .data import build_transform, make_loader
from .discovery import discover_for
from .errors import TransferkitError
from .prediction import OnnxRunner, predict_samples
from .samples import Sample, relabelled, shuffled_by_class

QUANTIZATIONS = ("int8",)
DEFAULT_MAX_DROP = 2.0  # accuracy points an int8 model may lose against fp32 on the validation images
CALIBRATION_IMAGES = 200  # ONNX Runtime's guidance: a few hundred representative inputs
MAX_CHECK_IMAGES = 2000
METHOD = "ONNX Runtime static quantization: QDQ, int8 weights per channel, int8 activations (MinMax calibration)"


@dataclass(frozen=True)
class QuantizationCheck:
    """How an int8 model compares with its fp32 original on the run's validation images."""

    images: int
    agreement: float  # share of images whose top-1 label is the fp32 model's
    accuracy_fp32: float
    accuracy_int8: float
    max_drop: float  # points
    calibration_images: int

    @property
    def drop(self) -> float:
        """Accuracy points lost (negative: gained)."""
        return 100 * (self.accuracy_fp32 - self.accuracy_int8)

    @property
    def passed(self) -> bool:
        return self.drop <= self.max_drop

    def to_dict(self) -> dict[str, Any]:
        return {"quantization": "int8", "method": METHOD, "calibration_images": self.calibration_images,
                "validation_images": self.images, "top1_agreement": self.agreement,
                "accuracy_fp32": self.accuracy_fp32, "accuracy_int8": self.accuracy_int8,
                "accuracy_drop_points": self.drop, "max_drop_points": self.max_drop}  # fmt: skip

    def summary(self) -> str:
        return (f"int8 against fp32 on {self.images} validation images: top-1 agreement {self.agreement:.1%}, "
                f"accuracy {self.accuracy_fp32:.1%} -> {self.accuracy_int8:.1%} (drop {self.drop:+.1f} points, "
                f"limit {self.max_drop:g}); calibrated on {self.calibration_images} training images")  # fmt: skip


def run_samples(run_dir: Path, class_names: list[str] | None = None) -> tuple[list[Sample], list[Sample]]:
    """The run's training and validation images, found as training found them (folders or a label file);
    labelled by ``class_names`` (the model's) where given, whatever classes the data has gained or lost since."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skipped files were reported at training time
            splits = discover_for(config)
    except (OSError, ValueError, KeyError, TypeError, TransferkitError) as exc:
        raise TransferkitError(
            f"--quantize int8 calibrates on the run's training images and checks on its validation images, "
            f"which cannot be read from {run_dir} ({str(exc)[:120]}); put the run's data back where config.json "
            "says, or export fp32 without --quantize"
        ) from None
    if not splits.train or not splits.val:
        raise TransferkitError(f"the run's data under {config['data']} has no training or no validation images; "
                               "--quantize int8 needs both")  # fmt: skip
    if class_names is None:
        return splits.train, splits.val
    # By name: a class folder added since training would otherwise shift every label by one.
    try:
        return (relabelled(splits.train, splits.class_names, class_names, config["data"]),
                relabelled(splits.val, splits.class_names, class_names, config["data"]))  # fmt: skip
    except TransferkitError as exc:
        raise TransferkitError(f"{exc}. --quantize int8 calibrates and checks on the run's data: give it back its "
                               "classes, or export fp32 without --quantize") from None  # fmt: skip


def spread(samples: list[Sample], count: int, seed: int = 0) -> list[Sample]:
    """Up to ``count`` samples taken from every class in turn, so calibration sees each class."""
    groups = shuffled_by_class(samples, lambda s: s[1], seed)
    taken: list[Sample] = []
    for i in range(max(map(len, groups), default=0)):
        taken += [group[i] for group in groups if i < len(group)]
    return taken[:count]


def calibration_reader(samples: list[Sample], prep: Preprocessing, input_name: str, batch_size: int = 16) -> Any:
    """An ONNX Runtime ``CalibrationDataReader`` over ``samples``, preprocessed as for prediction."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.count = 0
            self.batches: Iterator[dict[str, Any]] = self._batches()

        def _batches(self) -> Iterator[dict[str, Any]]:
            loader = make_loader(samples, build_transform(prep, "none"), batch_size, device_type="cpu")
            for images, _, _ in loader:
                if len(images):
                    self.count += len(images)
                    yield {input_name: images.numpy()}

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    return Reader()


def quantize_int8(fp32: Path, out: Path, reader: Any) -> None:
    """Quantize ONNX model ``fp32`` into ``out``, activation ranges from ``reader``'s batches."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="transferkit-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph clean-up first, as ONNX Runtime recommends before quantizing.
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(
            str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            # The QDQ operators only: the default list also holds Softmax, whose int8 output would round
            # the probabilities; the last linear layer stays fp32 too, so its logits are not rounded.
            op_types_to_quantize=sorted(QDQRegistry), nodes_to_exclude=_last_linear(prepared),
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            # Ranges are folded in every few batches, so calibration memory does not grow with the image count.
            extra_options={"CalibMaxIntermediateOutputs": 4},
        )  # fmt: skip


def _last_linear(model: Path) -> list[str]:
    """The nodes computing the logits that the output's softmax (or sigmoid) turns into probabilities.

    The classifier's Gemm, or its MatMul and bias Add, and any scaling after it (a temperature's
    Div); found from the graph's output, so that the MatMuls feeding a transformer's attention
    softmax are still quantized.
    """
    import onnx

    graph = onnx.load(str(model)).graph
    producer = {output: node for node in graph.node for output in node.output}
    names: list[str] = []
    last = producer.get(graph.output[0].name)
    node = producer.get(last.input[0]) if last is not None and last.op_type in ("Softmax", "Sigmoid") else None
    while node is not None and node.op_type in ("Gemm", "MatMul", "Add", "Div", "Mul"):
        names.append(node.name)
        node = None if node.op_type in ("Gemm", "MatMul") else producer.get(node.input[0])
    return names


def check_int8(
    fp32: Path, int8: Path, val: list[Sample], class_names: list[str], prep: Preprocessing, max_drop: float,
    calibration_images: int,
) -> QuantizationCheck:  # fmt: skip
    """Both models through the one prediction path on the validation images (loaded back from their files)."""
    samples = spread(val, MAX_CHECK_IMAGES)
    predicted = []
    for path in (fp32, int8):
        result = predict_samples(OnnxRunner(path, class_names, prep), samples)
        predicted.append(dict(zip(result.positions.tolist(), result.probabilities.argmax(dim=1).tolist())))
    both = sorted(set(predicted[0]) & set(predicted[1]))
    if not both:
        raise TransferkitError("no validation image of the run could be decoded to check the int8 model")
    labels = torch.tensor([samples[i][1] for i in both])
    fp32_top1, int8_top1 = (torch.tensor([p[i] for i in both]) for p in predicted)
    return QuantizationCheck(
        images=len(both), agreement=float((fp32_top1 == int8_top1).float().mean()),
        accuracy_fp32=float((fp32_top1 == labels).float().mean()),
        accuracy_int8=float((int8_top1 == labels).float().mean()),
        max_drop=max_drop, calibration_images=calibration_images,
    )  # fmt: skip
