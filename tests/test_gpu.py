"""On a CUDA GPU: training, evaluation, prediction, features, export and Grad-CAM run there, at its
precision, and what they write works on a machine without one. CI has no GPU, so these skip there;
where one is, `pytest tests/test_gpu.py` runs them (the rest of the suite then runs on it too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transferkit import evaluate, explain, load_checkpoint, predict, train
from transferkit.performance import resolve_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI machines have none)")

TINY = {"model": "resnet18", "weights": "none", "image_size": 32, "quiet": True, "batch_size": 8}
# Ampere or later computes bf16 natively (a T4 or V100 would emulate it): there auto is bf16, else fp16.
GPU_PRECISION = "bf16" if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) else "16"


def _on_cpu_only(*args: str) -> subprocess.CompletedProcess:
    """``python -m transferkit ARGS`` in a process that sees no GPU, as on the machine a run is copied to."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip


def test_auto_precision_on_a_gpu_is_its_half_precision_for_training_and_inference() -> None:
    model = torch.nn.Conv2d(4, 4, 3, groups=4)  # depthwise: kept fp32 on a CPU's training, not on a GPU
    assert resolve_precision("auto", torch.device("cuda"), model, training=True) == GPU_PRECISION
    assert resolve_precision("auto", torch.device("cuda")) == GPU_PRECISION


@pytest.mark.precision
def test_a_frozen_run_trains_on_the_gpu_and_evaluate_there_equals_its_metrics(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    result = train(tiny_dataset, strategy="feature-extract", epochs=2, cache_dir=str(tmp_path / "cache"),
                   out=str(tmp_path / "run"), **TINY)  # fmt: skip
    assert result.metrics["evaluation_precision"] == GPU_PRECISION
    assert result.metrics["evaluated_on"] == "cached features"
    evaluation = evaluate(result.run_dir, tiny_dataset / "val", batch_size=8)
    assert evaluation.precision == GPU_PRECISION
    assert evaluation.accuracy == result.metrics["val_accuracy"] and evaluation.loss == result.metrics["val_loss"]


@pytest.mark.precision
@pytest.mark.parametrize("strategy", ["fine-tune", "gradual"])
def test_a_fine_tuned_run_trains_in_mixed_precision_on_the_gpu(
    tiny_dataset: Path, tmp_path: Path, strategy: str
) -> None:
    result = train(tiny_dataset, strategy=strategy, unfreeze_every=1, epochs=2, lr=0.01, out=str(tmp_path / "run"),
                   **TINY)  # fmt: skip
    assert result.metrics["precision"] == GPU_PRECISION and len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(float(row["train_loss"]))) for row in result.history)
    evaluation = evaluate(result.run_dir, tiny_dataset / "val", batch_size=8)
    assert evaluation.accuracy == result.metrics["val_accuracy"] and evaluation.loss == result.metrics["val_loss"]


def test_a_run_trained_on_the_gpu_predicts_and_evaluates_on_a_machine_without_one(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    result = train(tiny_dataset, strategy="fine-tune", epochs=1, lr=0.01, out=str(tmp_path / "run"), **TINY)
    images = sorted(str(p) for p in (tiny_dataset / "val").rglob("*.png"))
    on_gpu = [r["predictions"][0]["label"] for r in predict(result.run_dir, images, top_k=1)]
    proc = _on_cpu_only("predict", str(result.run_dir), *images, "--top-k", "1", "--json", "--precision", "32")
    assert proc.returncode == 0, proc.stderr
    on_cpu = [r["predictions"][0]["label"] for r in json.loads(proc.stdout)]
    # The GPU ran bf16/fp16, the CPU fp32: the labels agree on all but, at most, a near tie.
    assert sum(a == b for a, b in zip(on_gpu, on_cpu, strict=True)) >= len(images) - 1
    proc = _on_cpu_only("evaluate", str(result.run_dir), str(tiny_dataset / "val"), "--json")
    assert proc.returncode == 0, proc.stderr


def test_a_linear_probe_fits_on_gpu_features(tiny_dataset: Path, tmp_path: Path) -> None:
    result = train(tiny_dataset, strategy="linear-probe", layer="layer3", out=str(tmp_path / "probe"), **TINY)
    assert result.metrics["linear_probe"]["layer"] == "layer3"
    evaluation = evaluate(result.run_dir, tiny_dataset / "val", batch_size=8)
    assert evaluation.accuracy == result.val_accuracy


def test_features_written_on_the_gpu_load_where_there_is_none(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "features.pt"
    proc = subprocess.run([sys.executable, "-m", "transferkit", "features", str(tiny_dataset / "train"), "--model",
                           "resnet18", "--weights", "none", "--image-size", "32", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    code = "import sys, torch; print(*[tuple(v.shape) for v in torch.load(sys.argv[1]).values() if torch.is_tensor(v)])"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    loaded = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env)
    assert loaded.returncode == 0, loaded.stderr
    assert "(20, 512)" in loaded.stdout


def test_grad_cam_runs_on_the_gpu_with_the_whole_model_and_leaves_it_as_it_was(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    result = train(tiny_dataset, strategy="fine-tune", epochs=1, lr=0.01, out=str(tmp_path / "run"), **TINY)
    model = load_checkpoint(result.run_dir).eval()
    model.head_module.cuda()  # as a head evaluated alone on the GPU left it: the backbone on the CPU
    trainable = [p.requires_grad for p in model.parameters()]
    images = sorted((tiny_dataset / "val").rglob("*.png"))[:3]
    explanations = explain(model, images)
    assert len(explanations) == 3 and all(e.heatmap.min() >= 0 and e.heatmap.max() <= 1 for e in explanations)
    assert {p.device.type for p in model.parameters()} == {"cuda"}  # where predict runs it
    assert [p.requires_grad for p in model.parameters()] == trainable and not model.training


def test_an_onnx_export_of_a_gpu_trained_run_matches_it(tiny_dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="ONNX exports need ONNX Runtime (the onnx extra)")
    pytest.importorskip("onnxscript", reason="ONNX exports need onnxscript (the onnx extra)")
    from transferkit import export

    result = train(tiny_dataset, strategy="fine-tune", epochs=1, lr=0.01, out=str(tmp_path / "run"), **TINY)
    exported = export(result.run_dir, "onnx", out=tmp_path / "model.onnx")
    assert exported.path.is_file() and exported.max_abs_diff <= exported.tolerance


def test_augmenting_an_image_leaves_the_gpus_random_stream_alone(tiny_dataset: Path) -> None:
    from transferkit.backbones import Preprocessing
    from transferkit.data import ImageDataset, build_transform, discover

    transform = build_transform(Preprocessing(image_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3), "light")
    dataset = ImageDataset(discover(tiny_dataset).train, transform)
    before = torch.cuda.get_rng_state()
    dataset[(0, 123)]  # seeded for this image alone: dropout on the GPU must not see the seed
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_measured_selection_scores_every_cached_candidate_on_the_gpu(tiny_dataset: Path) -> None:
    from transferkit import measure_candidates

    selection = measure_candidates(tiny_dataset, model="resnet18", weights="none", models="resnet18", image_size=32)
    assert {(t.strategy, t.status, t.note) for t in selection.trials} == {("linear-probe", "done", ""),
                                                                          ("feature-extract", "done", "")}


@pytest.mark.slow
def test_ddp_on_one_gpu_and_compile_train(tiny_dataset: Path, tmp_path: Path) -> None:
    ddp = train(tiny_dataset, strategy="fine-tune", epochs=1, dist="ddp", devices=1, out=str(tmp_path / "ddp"), **TINY)
    assert ddp.metrics["epochs_run"] == 1
    # Compiled, after an LR range test on the same compiled network: channels_last weights failed inductor's
    # stride check of convolution backward on a GPU (pytorch#171622).
    compiled = train(tiny_dataset, strategy="fine-tune", epochs=1, compile=True, lr="auto", out=str(tmp_path / "c"),
                     **TINY)  # fmt: skip
    assert compiled.metrics["epochs_run"] == 1
