"""int8 ONNX exports: calibrated on the run's training images, checked on accuracy, refused above the drop limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import transferkit
from transferkit.cli import main
from transferkit.exports import ExportResult
from transferkit.prediction import sidecar_path

pytest.importorskip("onnxruntime", reason='int8 exports need ONNX Runtime: pip install -e ".[onnx]"')
pytest.importorskip("onnxscript", reason='ONNX exports need onnxscript: pip install -e ".[onnx]"')


@pytest.fixture(scope="module")
def run_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quantize") / "run"
    transferkit.train(str(tiny_dataset), model="resnet18", weights="none", image_size=32, epochs=1, quiet=True,
                      out=str(out))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def int8(run_dir: Path) -> ExportResult:
    # Random weights: whether int8 keeps their near-chance accuracy is luck, so the limit is wide here;
    # the refusal has its own test.
    return transferkit.export(run_dir, "onnx", quantize="int8", max_drop=100)


def top1(results: list[dict]) -> dict[str, str]:
    return {Path(r["path"]).name + Path(r["path"]).parent.name: r["predictions"][0]["label"] for r in results}


@pytest.mark.slow
def test_int8_export_records_agreement_and_accuracy_as_predict_measures_them(
    int8: ExportResult, run_dir: Path, tiny_dataset: Path
) -> None:
    assert int8.path == run_dir / "model.int8.onnx" and int8.sidecar.is_file()
    meta = json.loads(int8.sidecar.read_text())
    q = meta["quantization"]
    assert q == int8.quantization.to_dict() and q["quantization"] == "int8"
    assert meta["class_names"] == ["blue", "red"] and meta["check"]["max_abs_diff"] <= 1e-4  # the fp32 export's check
    assert q["calibration_images"] == 20 and q["validation_images"] == 8  # every training and validation image here
    # The same numbers from the outside: predict on both exports, labels from the class folders.
    fp32 = transferkit.export(run_dir, "onnx").path
    val = tiny_dataset / "val"
    truth = {p.name + p.parent.name: p.parent.name for p in val.rglob("*.*")}
    a, b = top1(transferkit.predict(fp32, [val])), top1(transferkit.predict(int8.path, [val]))
    assert q["top1_agreement"] == pytest.approx(sum(a[k] == b[k] for k in a) / len(a))
    assert q["accuracy_fp32"] == pytest.approx(sum(a[k] == truth[k] for k in a) / len(a))
    assert q["accuracy_int8"] == pytest.approx(sum(b[k] == truth[k] for k in b) / len(b))
    assert q["accuracy_drop_points"] == pytest.approx(100 * (q["accuracy_fp32"] - q["accuracy_int8"]))
    assert "top-1 agreement" in int8.summary() and "calibrated on 20 training images" in int8.summary()


@pytest.mark.slow
def test_int8_model_has_int8_weights_and_fp32_probabilities(int8: ExportResult) -> None:
    import onnx

    graph = onnx.load(str(int8.path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops
    assert int8.path.stat().st_size < 0.4 * (int8.path.parent / "model.pt").stat().st_size  # 1 byte a weight, not 4
    producers = {o: n for n in graph.node for o in n.output}
    classifier = next(n for n in graph.node if n.op_type == "Gemm")  # resnet18's fc, its only Gemm
    # The classifier stays fp32 (its inputs come straight in, not through a DequantizeLinear), so the
    # logits are not rounded to int8.
    assert not [i for i in classifier.input if i in producers and producers[i].op_type == "DequantizeLinear"]


@pytest.mark.slow
def test_a_drop_over_the_limit_is_refused_and_leaves_nothing(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "strict.onnx"
    # Only an int8 model 100 points more accurate than fp32 (all right where fp32 was all wrong) passes this.
    assert main(["export", str(run_dir), "--quantize", "int8", "--out", str(out), "--max-drop", "-100"]) == 2
    err = capsys.readouterr().err
    assert "int8 export refused, nothing was written" in err and "limit -100" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    assert main(["export", str(run_dir), "--quantize", "int8", "--out", str(out), "--max-drop", "-100", "--force"]) == 0
    assert "kept by --force" in capsys.readouterr().err
    assert json.loads(sidecar_path(out).read_text())["quantization"]["max_drop_points"] == -100


@pytest.mark.slow
def test_predict_reads_an_int8_export_like_any_onnx_export(
    int8: ExportResult, tiny_dataset: Path
) -> None:
    results = transferkit.predict(int8.path, [tiny_dataset / "val"], top_k=2)
    assert len(results) == 8
    for r in results:
        assert [p["label"] for p in r["predictions"]] in (["blue", "red"], ["red", "blue"])
        assert sum(p["probability"] for p in r["predictions"]) == pytest.approx(1, abs=1e-5)


@pytest.mark.slow
def test_without_the_runs_data_int8_says_what_it_needs(run_dir: Path, tmp_path: Path) -> None:
    shutil.copy(run_dir / "model.pt", tmp_path / "model.pt")  # no config.json: the data is unknown
    with pytest.raises(transferkit.TransferkitError, match="calibrates on the run's training images"):
        transferkit.export(tmp_path / "model.pt", "onnx", quantize="int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.slow
def test_int8_accuracy_is_scored_by_class_name_when_the_data_changed_since_training(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """A run on blue, green, red whose data lost blue since: green and red images are still scored as
    such, not as the model's classes 0 and 1 (blue and green)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    for split in ("train", "val"):
        shutil.copytree(data / split / "blue", data / split / "green")
    run = transferkit.train(str(data), model="resnet18", weights="none", image_size=32, epochs=1, quiet=True,
                            out=str(tmp_path / "run")).run_dir  # fmt: skip
    for split in ("train", "val"):
        shutil.rmtree(data / split / "blue")
    q = transferkit.export(run, "onnx", quantize="int8", max_drop=100).quantization.to_dict()
    answers = transferkit.predict(transferkit.export(run, "onnx").path, [data / "val"])
    right = [Path(r["path"]).parent.name == r["predictions"][0]["label"] for r in answers]
    assert q["accuracy_fp32"] == pytest.approx(sum(right) / len(right))
    # A class the model does not know cannot be scored: said, with the fix.
    for split in ("train", "val"):
        shutil.copytree(data / split / "red", data / split / "yellow")
    with pytest.raises(transferkit.TransferkitError, match="classes the model does not know: yellow.*give it back"):
        transferkit.export(run, "onnx", quantize="int8", out=tmp_path / "other.onnx", max_drop=100)


@pytest.mark.slow
def test_an_int8_model_named_model_onnx_is_never_run_in_the_fp32_exports_place(
    run_dir: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.pt", "config.json"):
        shutil.copy(run_dir / name, run / name)
    transferkit.export(run, "onnx", quantize="int8", out=run / "model.onnx", max_drop=100)
    val = [tiny_dataset / "val"]

    def probabilities(**options: str) -> list[float]:
        return [p["probability"] for r in transferkit.predict(run, val, **options) for p in r["predictions"]]

    fp32 = probabilities(runtime="torch", precision="32")
    assert probabilities(runtime="onnx") == pytest.approx(fp32, abs=1e-4)  # the fp32 export's, made anew


def test_quantize_options_are_checked_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path), "--format", "pt2", "--quantize", "int8"]) == 2
    assert "--quantize int8 is not available for --format pt2" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--max-drop", "1"]) == 2
    assert "--max-drop applies to --quantize int8" in capsys.readouterr().err
    for value in ("nan", "101"):  # nan would refuse every model; a drop is at most 100 points
        with pytest.raises(SystemExit):
            main(["export", str(tmp_path), "--quantize", "int8", "--max-drop", value])
        assert "argument --max-drop: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--quantize", "int4"])
    assert "unknown --quantize 'int4'; choose one of: int8" in capsys.readouterr().err
