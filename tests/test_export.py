"""ONNX and torch.export (pt2) exports: usable without transferkit, checked at export time, never overwritten."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import transferkit
from transferkit.checkpoint import save_checkpoint
from transferkit.cli import main
from transferkit.data import build_transform, load_image
from transferkit.exports import export
from transferkit.prediction import sidecar_path
from transferkit.performance import NATIVE_BF16_ENV

# Runs in a fresh interpreter with only numpy and the runtime: what a consumer of the export has.
CONSUMER = """
import json, sys
import numpy as np
fmt, model_path, inputs_path, out_path = sys.argv[1:]
x = np.load(inputs_path)
meta = json.load(open(model_path + ".json"))
if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    run = lambda batch: session.run(None, {meta["input"]["name"]: batch})[0]
else:
    import torch
    module = torch.export.load(model_path).module()
    run = lambda batch: module(torch.from_numpy(batch)).detach().numpy()
np.savez(out_path, one=run(x[:1]), five=run(x[:5]))
assert not [m for m in sys.modules if m.startswith("transferkit")], "the export must not need transferkit"
"""


@pytest.fixture(scope="module")
def run_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    transferkit.train(str(tiny_dataset), model="resnet18", weights="none", image_size=32, epochs=1, quiet=True,
                      out=str(out))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def exports(run_dir: Path) -> dict[str, Path]:
    """An ONNX export at its default place (Python API) and a torch.export one elsewhere (CLI)."""
    onnx_path = export(run_dir, "onnx").path
    pt2_path = run_dir.parent / "elsewhere" / "classifier.pt2"
    assert main(["export", str(run_dir), "--format", "pt2", "--out", str(pt2_path)]) == 0
    return {"onnx": onnx_path, "pt2": pt2_path}


@pytest.fixture(scope="module")
def val_batch(run_dir: Path, tiny_dataset: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Five preprocessed validation images and the checkpoint's probabilities on them."""
    model = transferkit.load_checkpoint(run_dir)
    transform = build_transform(model.preprocessing)
    files = sorted((tiny_dataset / "val").rglob("*.*"))[:5]
    x = torch.stack([transform(load_image(str(f))) for f in files])
    with torch.no_grad():
        return x, model.probabilities(model(x))  # calibrated, as the export is


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_runs_in_a_fresh_process_without_transferkit(
    fmt: str, exports: dict[str, Path], val_batch: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    x, expected = val_batch
    np.save(tmp_path / "x.npy", x.numpy())
    subprocess.run([sys.executable, "-c", CONSUMER, fmt, str(exports[fmt]), str(tmp_path / "x.npy"),
                    str(tmp_path / "out.npz")], check=True, timeout=300)  # fmt: skip
    out = np.load(tmp_path / "out.npz")
    assert out["one"].shape == (1, 2) and out["five"].shape == (5, 2)  # the batch size is dynamic
    np.testing.assert_allclose(out["one"], expected[:1].numpy(), atol=1e-4)
    np.testing.assert_allclose(out["five"], expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["five"].sum(axis=1), 1, atol=1e-5)  # probabilities, not logits


def test_sidecar_has_class_names_preprocessing_and_the_check(exports: dict[str, Path], run_dir: Path) -> None:
    assert exports["onnx"] == run_dir / "model.onnx"
    model = transferkit.load_checkpoint(run_dir)
    for path in exports.values():
        meta = json.loads(sidecar_path(path).read_text())
        assert meta["class_names"] == ["blue", "red"]
        prep = meta["preprocessing"]
        from_checkpoint = model.preprocessing
        assert transferkit.Preprocessing.from_dict(prep) == from_checkpoint
        assert prep["image_size"] == 32 and prep["crop"] == "center"
        assert meta["input"]["shape"] == ["batch", 3, 32, 32]
        assert "validation images" in meta["check"]["inputs"]
        assert meta["check"]["max_abs_diff"] <= meta["check"]["tolerance"] == 1e-4


@pytest.mark.precision
def test_predict_with_the_onnx_export_matches_the_run(
    exports: dict[str, Path], run_dir: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = {}
    for run, extra in ((run_dir, ["--precision", "32"]), (exports["onnx"], [])):  # eager PyTorch vs ONNX Runtime
        assert main(["predict", str(run), str(tiny_dataset / "val"), "--top-k", "2", "--json", *extra]) == 0
        results[run] = json.loads(capsys.readouterr().out)
    from_run, from_onnx = results[run_dir], results[exports["onnx"]]
    assert [r["path"] for r in from_onnx] == [r["path"] for r in from_run] and len(from_run) == 8
    for a, b in zip(from_run, from_onnx):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        for p, q in zip(a["predictions"], b["predictions"]):
            assert q["probability"] == pytest.approx(p["probability"], abs=1e-4)


def test_failed_check_raises_and_leaves_no_file(run_dir: Path, tmp_path: Path) -> None:
    # No runtime reproduces PyTorch's float rounding exactly, so a tolerance of 0 cannot be met.
    with pytest.raises(transferkit.TransferkitError, match=r"differ from the checkpoint's by up to .*tolerance 0"):
        export(run_dir, "onnx", out=tmp_path / "strict.onnx", tolerance=0)
    assert list(tmp_path.iterdir()) == []


def test_weights_past_the_external_data_size_are_exported_beside_the_model_under_its_name(
    run_dir: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model of over 1.5 GB keeps its weights in NAME.onnx.data, which the model names: the pair is
    written under its final names (never a temporary one), so it can be moved and served as a pair."""
    import onnx

    from transferkit import exports

    monkeypatch.setattr(exports, "ONNX_EXTERNAL_DATA_BYTES", 0)  # this small model as if it were that large
    written = export(run_dir, "onnx", out=tmp_path / "big" / "model.onnx").path
    assert sorted(p.name for p in written.parent.iterdir()) == ["model.onnx", "model.onnx.data", "model.onnx.json"]
    proto = onnx.load(str(written), load_external_data=False)
    locations = {entry.value for t in proto.graph.initializer for entry in t.external_data if entry.key == "location"}
    assert locations == {"model.onnx.data"}
    moved = Path(shutil.copytree(written.parent, tmp_path / "moved"))
    image = str(tiny_dataset / "val" / "red" / "0.png")
    assert transferkit.predict(moved / "model.onnx", image) == transferkit.predict(written, image)
    # Exported again as a small model (its weights inside it), the large one's weights file goes.
    monkeypatch.setattr(exports, "ONNX_EXTERNAL_DATA_BYTES", 1536 << 20)
    assert export(run_dir, "onnx", out=written, force=True).path == written
    assert sorted(p.name for p in written.parent.iterdir()) == ["model.onnx", "model.onnx.json"]
    assert transferkit.predict(written, image) == transferkit.predict(moved / "model.onnx", image)


def test_existing_output_is_kept_without_force(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"keep me")
    assert main(["export", str(run_dir), "--out", str(target)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me" and not sidecar_path(target).exists()
    assert main(["export", str(run_dir), "--out", str(target), "--force"]) == 0
    assert target.stat().st_size > 1000 and sidecar_path(target).is_file()
    target.unlink()  # a sidecar left without its model describes nothing: exported again without --force
    assert main(["export", str(run_dir), "--out", str(target)]) == 0
    assert target.stat().st_size > 1000 and json.loads(sidecar_path(target).read_text())


def test_without_the_runs_data_the_check_uses_random_tensors(run_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(run_dir / "model.pt", moved / "model.pt")  # no config.json: the data is unknown
    result = export(moved / "model.pt", "pt2")
    assert result.path == moved / "model.pt2" and result.path.is_file()
    assert "random tensors" in result.checked_on and "random tensors" in result.summary()


@pytest.mark.slow
def test_predict_onnx_without_onnxruntime_says_how_to_install_it(exports: dict[str, Path], tiny_dataset: Path) -> None:
    # None in sys.modules makes `import onnxruntime` raise ImportError, as on a machine without it.
    code = ("import sys; sys.modules['onnxruntime'] = None; "
            "from transferkit.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "predict", str(exports["onnx"]), str(tiny_dataset / "val")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "pip install onnxruntime" in proc.stderr


def test_bad_format_and_help(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(transferkit.TransferkitError, match="choose one of: onnx, pt2"):
        export(run_dir, "tflite")
    with pytest.raises(transferkit.TransferkitError, match="TorchScript.*use --format pt2"):
        export(run_dir, "torchscript")
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "example:\n  transferkit export runs/my-run" in capsys.readouterr().out
    for fmt, wrong, suffix in (("onnx", "model.pt2", ".onnx"), ("pt2", "model.onnx", ".pt2")):  # predict reads .onnx
        assert main(["export", str(run_dir), "--format", fmt, "--out", str(run_dir / "x" / wrong)]) == 2
        assert f"must end in {suffix} for --format {fmt}" in capsys.readouterr().err
    assert not (run_dir / "x").exists()


@pytest.mark.precision
def test_predict_on_a_run_prefers_its_onnx_export_where_the_run_runs_fp32(
    run_dir: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transferkit import predict

    run = tmp_path / "run-with-export"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("model.onnx*"))
    eager = predict(run, [tiny_dataset / "val"], top_k=2, precision="32")
    export(run, "onnx")
    (run / "model.onnx.json").write_text((run / "model.onnx.json").read_text().replace('"red"', '"RED"'))
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")  # a CPU without native bf16: the run's precision resolves to fp32
    fast = predict(run, [tiny_dataset / "val"], top_k=2)
    assert any(p["label"] == "RED" for r in fast for p in r["predictions"])  # it ran the export
    assert [[p["label"].lower() for p in r["predictions"]] for r in fast] == [
        [p["label"] for p in r["predictions"]] for r in eager
    ]
    forced = predict(run, [tiny_dataset / "val"], top_k=2, precision="32")  # an explicit precision means eager
    assert not any(p["label"] == "RED" for r in forced for p in r["predictions"])
    # model.pt changed since the export (a resumed run, another temperature): the old export is not used.
    changed = transferkit.load_checkpoint(run)
    changed.record = changed.record.with_extra(temperature=2.0)
    save_checkpoint(changed, run / "model.pt")
    assert not any(p["label"] == "RED" for r in predict(run, [tiny_dataset / "val"], top_k=2) for p in r["predictions"])
    # On a CPU with native bf16 the run resolves to bf16: eager bf16 is faster there than ONNX Runtime
    # fp32, and auto never answers in another precision than the one evaluate measured.
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    native = predict(run, [tiny_dataset / "val"], top_k=2)
    assert not any(p["label"] == "RED" for r in native for p in r["predictions"])
    assert native == predict(run, [tiny_dataset / "val"], top_k=2, runtime="torch", precision="bf16")


@pytest.mark.precision
def test_runtime_choice_and_the_cached_export(run_dir: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import TransferkitError, predict
    from transferkit.exports import cached_export_path

    run = tmp_path / "run-without-export"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("model.onnx*"))
    cached = cached_export_path(run / "model.pt")
    images = [tiny_dataset / "val"]
    eager = predict(run, images, top_k=2, runtime="torch")  # at the run's precision on this machine
    # auto on 8 images: exporting would cost more than ONNX Runtime saves, so PyTorch runs and nothing is written.
    assert predict(run, images, top_k=2) == eager and not cached.exists()
    fast = predict(run, images, top_k=2, runtime="onnx")  # exports once, verified, into the cache
    assert cached.is_file() and sidecar_path(cached).is_file() and not (run / "model.onnx").exists()
    eager_fp32 = predict(run, images, top_k=2, runtime="torch", precision="32")  # the export runs fp32
    for a, b in zip(eager_fp32, fast):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        for p, q in zip(a["predictions"], b["predictions"]):
            assert q["probability"] == pytest.approx(p["probability"], abs=1e-4)
    made = cached.stat().st_mtime_ns
    sidecar_path(cached).write_text(sidecar_path(cached).read_text().replace('"red"', '"RED"'))
    again = predict(run, images, top_k=2)
    assert cached.stat().st_mtime_ns == made
    if _runs_fp32_here(run):  # auto now finds the cached export and uses it as is
        assert any(p["label"] == "RED" for r in again for p in r["predictions"])
    else:  # bf16 here: auto stays with eager bf16, whatever exports exist
        assert again == eager
    sidecar_path(cached).unlink()  # as a crash between an export's two renames could leave it: exported again
    assert predict(run, images, top_k=2, runtime="onnx") == fast and sidecar_path(cached).is_file()
    with pytest.raises(TransferkitError, match="--runtime torch"):
        predict(cached, images, runtime="torch")
    with pytest.raises(TransferkitError, match="--precision applies to --runtime torch"):
        predict(run, images, runtime="onnx", precision="bf16")
    with pytest.raises(TransferkitError, match="choose one of: auto, torch, onnx"):
        predict(run, images, runtime="tensorrt")


def _runs_fp32_here(run: Path) -> bool:
    from transferkit.checkpoint import read_metadata
    from transferkit.prediction import inference_precision

    return inference_precision(read_metadata(run), torch.device("cpu")) == "32"


@pytest.mark.precision
def test_auto_runtime_exports_for_a_large_job(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import make_colour_folder

    from transferkit import predict
    from transferkit.exports import cached_export_path
    from transferkit.runtimes import AUTO_EXPORT_FROM

    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("model.onnx*"))
    make_colour_folder(tmp_path / "many", AUTO_EXPORT_FROM // 2, size=(32, 32))
    assert not cached_export_path(run / "model.pt").exists()
    results = predict(run, [tmp_path / "many"])
    assert len(results) == AUTO_EXPORT_FROM and all(r["predictions"] for r in results)
    if not _runs_fp32_here(run):  # bf16 here: auto runs eager bf16 for jobs of every size, and exports nothing
        assert not cached_export_path(run / "model.pt").exists()
        assert results == predict(run, [tmp_path / "many"], runtime="torch")
        monkeypatch.setenv(NATIVE_BF16_ENV, "0")  # the rest of this test is about CPUs without native bf16
        results = predict(run, [tmp_path / "many"])
    assert cached_export_path(run / "model.pt").is_file()
    # Where no export can be written, auto warns and predicts with PyTorch; --runtime onnx says what to do.
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.warns(UserWarning, match="predicting with PyTorch"):
        eager = predict(run, [tmp_path / "many"])
    assert [r["predictions"][0]["label"] for r in eager] == [r["predictions"][0]["label"] for r in results]
    with pytest.raises(transferkit.TransferkitError, match=r"give a writable --cache-dir \(or TRANSFERKIT_CACHE_DIR\)"):
        predict(run, [tmp_path / "many"], runtime="onnx")


@pytest.mark.parametrize("format", ["onnx", "pt2"])
def test_a_linear_probe_exports_without_the_layers_after_its_own(tiny_dataset: Path, tmp_path: Path, format: str) -> None:
    from transferkit import predict

    run = transferkit.train(str(tiny_dataset), model="resnet18", weights="none", image_size=32, quiet=True,
                            strategy="linear-probe", layer="layer3", out=str(tmp_path / "probe")).run_dir  # fmt: skip
    result = export(run, format)
    assert result.max_abs_diff <= result.tolerance and sidecar_path(result.path).is_file()
    if format == "onnx":
        import onnx

        modules = [weights.name for weights in onnx.load(str(result.path)).graph.initializer]  # model.net.layer3...
        exported = predict(run, [tiny_dataset / "val"], runtime="onnx")  # RUN/model.onnx, made from model.pt
        eager = predict(run, [tiny_dataset / "val"], runtime="torch", precision="32")
        for a, b in zip(eager, exported):
            assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
    else:
        program = torch.export.load(str(result.path))
        modules = [str(node.meta.get("nn_module_stack", "")) for node in program.graph.nodes]
    # The network ran to its end while it was traced; what the probe does not use was removed from the file.
    assert any("net.layer3" in m for m in modules) and not any("net.layer4" in m or "net.fc" in m for m in modules)


def test_images_in_memory_are_predicted_as_their_files_are(tiny_dataset: Path, tmp_path: Path) -> None:
    """A notebook's PIL images and uint8 arrays: the same answers as their files, under their names."""
    from PIL import Image

    from transferkit import TransferModel, load_backbone
    from transferkit.backbones import explicit_preprocessing

    backbone = load_backbone("resnet18", "none", preprocessing=explicit_preprocessing("resnet18", image_size=32))
    torch.manual_seed(0)
    model = TransferModel(backbone, ["a", "b", "c"]).eval()  # a random head: every image answered differently
    files = [str(p) for p in sorted((tiny_dataset / "val").rglob("*.*"))[:3]]
    exif = Image.Exif()
    exif[0x0112] = 6  # a photo taken sideways: predicted upright, from its file or from memory
    Image.open(files[0]).convert("RGB").save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    files.append(str(tmp_path / "sideways.jpg"))
    from_files = transferkit.predict(model, files, top_k=3)
    assert len({json.dumps(r["predictions"]) for r in from_files}) == len(files)
    opened = [Image.open(f) for f in files]
    assert transferkit.predict(model, opened, top_k=3) == from_files  # answered under their file names
    from transferkit.data import upright

    arrays = [np.asarray(upright(im).convert("RGB")) for im in opened]
    from_arrays = transferkit.predict(model, arrays, top_k=3)
    assert [r["path"] for r in from_arrays] == ["<image 0>", "<image 1>", "<image 2>", "<image 3>"]
    assert [r["predictions"] for r in from_arrays] == [r["predictions"] for r in from_files]
    assert transferkit.predict(model, arrays[1], top_k=3)[0]["predictions"] == from_files[1]["predictions"]
    with pytest.raises(transferkit.TransferkitError, match=r"image 0 is a float32 array of shape \(8, 8, 3\)"):
        transferkit.predict(model, [np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(transferkit.TransferkitError, match=r"uint8 arrays \(H x W x 3\), not tensors"):
        transferkit.predict(model, torch.zeros(2, 3, 8, 8))
