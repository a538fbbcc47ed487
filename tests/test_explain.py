"""Grad-CAM: heatmaps at the model's input size, on the planted evidence, for CNNs, ViTs and probes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transferkit
from transferkit.backbones import Preprocessing, load_backbone
from transferkit.cli import main as cli_main
from transferkit.data import build_transform, load_image
from transferkit.gradcam import _token_grid, explain, explain_layer, overlay, write_overlays
from transferkit.heads import LinearProbe
from transferkit.model import TransferModel
from transferkit.reports.figures import denormalise

SMALL = Preprocessing(image_size=64, resize_size=72, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _resnet(classes: tuple[str, ...] = ("blue", "red")) -> TransferModel:
    torch.manual_seed(0)
    return TransferModel(load_backbone("resnet18", "none", preprocessing=SMALL), list(classes)).eval()


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))


def test_heatmaps_lie_on_the_evaluation_view_at_the_models_input_size(tiny_dataset: Path) -> None:
    model = _resnet()
    files = _images(tiny_dataset / "val")  # 40 x 48 px images; the model sees 64 x 64 crops
    model.train()
    with torch.inference_mode():  # a caller's inference mode must not stop the gradients Grad-CAM needs
        found = explain(model, files, batch_size=3)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    model.eval()
    assert [e.path for e in found] == files and {e.layer for e in found} == {"layer4"}
    view = build_transform(SMALL, "none")(load_image(files[0]))
    assert found[0].heatmap.shape == (64, 64) and found[0].heatmap.dtype == np.float32
    assert np.array_equal(found[0].image, denormalise(view, SMALL.mean, SMALL.std))
    for e in found:
        assert e.heatmap.min() >= 0 and e.heatmap.max() == pytest.approx(1, abs=1e-3)
    with torch.no_grad():
        probabilities = model.probabilities(model(torch.stack([view])))[0]
    assert found[0].class_index == int(probabilities.argmax()) and found[0].label == model.class_names[found[0].class_index]
    assert found[0].probability == pytest.approx(float(probabilities.max()), abs=1e-5)
    for one in (files[0], Path(files[0])):  # one file, as predict takes one
        assert [(e.path, e.class_index) for e in explain(model, one)] == [(files[0], found[0].class_index)]
    # A given class, by name or index, is the one explained; its heatmap is its own, not the predicted one's.
    other = 1 - found[0].class_index
    named = explain(model, files[:1], target=model.class_names[other])[0]
    assert (named.class_index, named.probability) == (other, pytest.approx(float(probabilities[other]), abs=1e-5))
    assert not np.allclose(named.heatmap, found[0].heatmap)
    # A preprocessed batch of any size: heatmaps at its height x width.
    batch = explain(model, torch.randn(2, 3, 48, 80), target=[0, 1])
    assert [(e.heatmap.shape, e.image.shape, e.class_index) for e in batch] == [((48, 80), (48, 80, 3), 0),
                                                                               ((48, 80), (48, 80, 3), 1)]  # fmt: skip
    picture = overlay(found[0].image, found[0].heatmap)
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8


def test_bf16_heatmaps_are_fp32_ones_within_a_few_hundredths(tiny_dataset: Path) -> None:
    """The report explains at the machine's precision (bf16 where native): the same maps, faster."""
    model, files = _resnet(), _images(tiny_dataset / "val")
    fp32, bf16 = (explain(model, files, target=0, precision=p) for p in ("32", "bf16"))
    assert all(e.heatmap.dtype == np.float32 and e.heatmap.shape == (64, 64) for e in bf16)
    differences = [float(np.abs(a.heatmap - b.heatmap).max()) for a, b in zip(fp32, bf16)]
    assert max(differences) < 0.1, differences
    assert [a.probability for a in fp32] == pytest.approx([b.probability for b in bf16], abs=0.02)


def test_explain_refuses_bad_targets_and_undecodable_files(tmp_path: Path) -> None:
    model = _resnet()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(transferkit.TransferkitError, match="target 'green' is not one of the classes"):
        explain(model, torch.zeros(1, 3, 64, 64), target="green")
    with pytest.raises(transferkit.TransferkitError, match="2 targets for 1 images"):
        explain(model, torch.zeros(1, 3, 64, 64), target=[0, 1])
    with pytest.raises(transferkit.TransferkitError, match="batch_size must be a whole number of at least 1, got 0"):
        explain(model, [str(broken)], batch_size=0)  # said range()'s "arg 3 must not be zero"
    with pytest.raises(transferkit.TransferkitError, match="cannot explain .*broken.jpg: it does not decode"):
        explain(model, [str(broken)])
    with pytest.raises(transferkit.TransferkitError, match="model.onnx is an ONNX export: .* give the run directory"):
        explain(str(tmp_path / "model.onnx"), [str(broken)])


@pytest.mark.parametrize("name", ["mobilenet_v2", pytest.param("convnext_tiny", marks=pytest.mark.slow)])
def test_cnns_are_explained_at_their_last_spatial_stage(name: str) -> None:
    # ConvNeXt's last group is the classifier's LayerNorm on pooled 1 x 1 features: one stage further back.
    model = TransferModel(load_backbone(name, "none", preprocessing=SMALL), ["a", "b"]).eval()
    found = explain(model, torch.randn(2, 3, 64, 64))
    assert [e.heatmap.shape for e in found] == [(64, 64)] * 2
    assert found[0].layer == {"mobilenet_v2": "features.18", "convnext_tiny": "features.7"}[name]


@pytest.mark.parametrize("name, layer", [("resnet18", "layer4"), ("mobilenet_v2", "features.18")])
def test_heatmaps_are_grad_cams_own_and_the_backward_pass_stops_at_the_layer(name: str, layer: str) -> None:
    """grad-cam used the plain way (every parameter trainable, fp32) gives the same maps; ours runs no
    backward through the layer explained or any before it: the gradient stops at the layer's output."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = TransferModel(load_backbone(name, "none", preprocessing=SMALL), ["a", "b", "c"]).eval()
    x, targets = torch.randn(3, 3, 64, 64), [2, 0, 1]
    convolutions = [m for m in model.net.get_submodule(layer).modules() if isinstance(m, torch.nn.Conv2d)]
    reached = []
    hooks = [m.register_full_backward_hook(lambda *a: reached.append(a)) for m in convolutions]
    ours = explain(model, x, target=targets, precision="32")
    for h in hooks:
        h.remove()
    assert convolutions and not reached and {e.layer for e in ours} == {layer}
    assert all(p.grad is None for p in model.parameters())
    with GradCAM(model=model, target_layers=[model.net.get_submodule(layer)]) as cam:
        plain = cam(x.clone(), targets=[ClassifierOutputTarget(t) for t in targets])
    for e, expected in zip(ours, plain):
        assert np.allclose(np.clip(expected, 0, 1), e.heatmap, atol=1e-5)


def test_torchvisions_swin_is_explained_on_its_channels_last_maps_as_grad_cam_would() -> None:
    """Its maps are (N, H, W, C) and it does not say so (timm's Swin does): read channels-first, the heatmap
    was drawn over columns x channels."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = TransferModel(load_backbone("swin_t", "none", preprocessing=SMALL), ["a", "b"]).eval()
    x, targets = torch.randn(2, 3, 64, 64), [0, 1]
    ours = explain(model, x, target=targets, precision="32")
    layer = model.net.get_submodule(ours[0].layer)
    with GradCAM(model=model, target_layers=[layer], reshape_transform=lambda t: t.permute(0, 3, 1, 2)) as cam:
        plain = cam(x.clone(), targets=[ClassifierOutputTarget(t) for t in targets])
    for e, expected in zip(ours, plain):
        assert np.allclose(np.clip(expected, 0, 1), e.heatmap, atol=1e-5)


def test_the_layer_moves_back_where_the_input_is_too_small_for_a_map() -> None:
    model = _resnet()
    # 32 px: layer4 is 1 x 1 (one number per channel: nothing to locate), layer3 still 2 x 2.
    assert explain_layer(model, 32) == "layer3" and explain(model, torch.randn(1, 3, 32, 32))[0].heatmap.shape == (32, 32)
    with pytest.raises(transferkit.TransferkitError, match="no layer with a spatial map before resnet18's output"):
        explain(model, torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("name, prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_vision_transformers_are_explained_on_their_patch_grid(name: str, prefix: int) -> None:
    torch.manual_seed(0)
    model = TransferModel(load_backbone(f"timm/{name}", "none"), ["a", "b", "c"]).eval()
    assert model.net.num_prefix_tokens == prefix  # class (and distillation) tokens are dropped, not drawn
    found = explain(model, torch.randn(2, 3, 224, 224))
    assert [e.heatmap.shape for e in found] == [(224, 224)] * 2 and found[0].layer == "blocks.11.norm1"
    assert found[0].heatmap.std() > 0.01  # random weights: no claim on where, only that it is a map


def test_token_grid_puts_each_patch_token_at_its_row_and_column() -> None:
    tokens = torch.arange(2 + 12, dtype=torch.float32).view(1, 14, 1).expand(1, 14, 5)  # 2 prefix + 3 x 4 patches
    grid = _token_grid(2, 14, 48, 64)(tokens)  # a 48 x 64 image of 16 px patches: 3 rows of 4
    assert grid.shape == (1, 5, 3, 4)
    assert grid[0, 0].tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13]]


def test_a_linear_probe_on_an_earlier_layer_is_explained_at_the_layer_it_reads() -> None:
    # The probe's logits come from layer2's pooled features, so the gradient reaches layer2 (and nothing later runs).
    model = _resnet()
    torch.manual_seed(1)
    model.attach_probe(LinearProbe(torch.zeros(128), torch.ones(128), torch.randn(2, 128), torch.zeros(2)), "layer2")
    x = torch.randn(2, 3, 64, 64)
    found = explain(model, x)
    assert [(e.layer, e.heatmap.shape) for e in found] == [("layer2", (64, 64))] * 2
    with torch.no_grad():
        expected = model.probabilities(model(x)).max(dim=1).values
    assert [e.probability for e in found] == pytest.approx(expected.tolist(), abs=1e-5)
    model.attach_probe(LinearProbe(torch.zeros(512), torch.ones(512), torch.randn(2, 512), torch.zeros(2)), None)
    assert explain(model, x)[0].layer == "layer4"  # a probe on the head's input: the last stage


@pytest.fixture(scope="module")
def run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("explain-runs") / "run"
    return transferkit.train(tiny_dataset, model="resnet18", weights="none", image_size=32, epochs=1, quiet=True,
                             out=str(out)).run_dir  # fmt: skip


def test_predict_explain_writes_one_overlay_per_image_at_the_input_size(
    run: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _images(tiny_dataset / "val" / "red")
    out = tmp_path / "overlays"
    assert cli_main(["predict", str(run), *files, "--explain", str(out), "--runtime", "torch"]) == 0
    written = sorted(out.iterdir())
    assert [p.name for p in written] == sorted(f"{Path(f).stem}_gradcam.png" for f in files)
    for p in written:
        with Image.open(p) as im:  # the image as the model saw it (32 x 32 crop), not the 40 x 48 original
            assert (im.format, im.size, im.mode) == ("PNG", (32, 32), "RGB")
    assert f"wrote {len(files)} Grad-CAM overlays to {out}" in capsys.readouterr().err
    # The same overlays as the API's.
    first = transferkit.explain(run, files[:1])[0]
    assert np.array_equal(np.asarray(Image.open(written[0])), overlay(first.image, first.heatmap))


def test_predict_explain_explains_the_class_it_prints_also_where_tta_changed_it(
    run: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _images(tiny_dataset)  # with --tta the answer is six views' average: not always one view's top class
    out = tmp_path / "overlays"
    assert cli_main(["predict", str(run), *files, "--tta", "--top-k", "1", "--json", "--explain", str(out)]) == 0
    printed = [r["predictions"][0]["label"] for r in json.loads(capsys.readouterr().out)]
    expected = transferkit.explain(run, files, target=printed)
    for f, e in zip(files, expected, strict=True):
        written = out / Path(f).relative_to(tiny_dataset).with_name(f"{Path(f).stem}_gradcam.png")
        assert np.array_equal(np.asarray(Image.open(written)), overlay(e.image, e.heatmap)), written


def test_predict_explain_on_a_multi_label_image_with_no_class_over_its_threshold_explains_its_top_class(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _resnet()
    model.record = model.record.with_extra(multi_label=True, thresholds=[1.0, 1.0])  # no class is ever over
    transferkit.save_checkpoint(model, tmp_path / "run" / "model.pt")
    image = _images(tiny_dataset / "val")[0]
    assert cli_main(["predict", str(tmp_path / "run"), image, "--json", "--explain", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"] == []
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{Path(image).stem}_gradcam.png"]


def test_overlays_explain_the_class_given_for_each_file(run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    files = _images(tiny_dataset / "val")
    top = [e.label for e in transferkit.explain(run, files)]
    other = [{"blue": "red", "red": "blue"}[label] for label in top]
    default = write_overlays(run, files, tmp_path / "top")
    given = write_overlays(run, files, tmp_path / "other", targets=other)
    for path, top_path, e in zip(given, default, transferkit.explain(run, files, target=other), strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), overlay(e.image, e.heatmap))
        assert not np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(top_path)))


def test_predict_explain_refuses_a_used_folder_and_an_onnx_file_before_predicting(
    run: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _images(tiny_dataset / "val")[0]
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert cli_main(["predict", str(run), image, "--explain", str(used)]) == 2
    err = capsys.readouterr()
    assert f"--explain {used} already exists and is not empty; choose another --explain or remove it" in err.err
    assert err.out == "" and sorted(p.name for p in used.iterdir()) == ["notes.txt"]
    assert cli_main(["predict", str(run), image, "--explain", str(used / "notes.txt")]) == 2
    notes = used / "notes.txt"
    assert f"--explain {notes} is a file, not a folder; choose another --explain" in capsys.readouterr().err
    assert cli_main(["predict", str(run / "model.onnx"), image, "--explain", str(tmp_path / "new")]) == 2
    assert "is an ONNX export: Grad-CAM needs the network's gradients" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_k_fold_run_is_refused_with_the_fold_to_give(run: Path, tmp_path: Path) -> None:
    folds = tmp_path / "kfold"
    folds.mkdir()
    (folds / "fold-1").symlink_to(run)
    (folds / "folds.json").write_text(json.dumps({"runs": ["fold-1"]}))
    with pytest.raises(transferkit.TransferkitError, match="is a k-fold run .*; explain one of its folds, e.g. .*fold-1"):
        explain(folds, ["photo.jpg"])


def test_the_report_shows_where_a_probe_on_an_earlier_layer_looked(tiny_dataset: Path, tmp_path: Path) -> None:
    probe = transferkit.train(tiny_dataset, model="resnet18", weights="none", image_size=32, strategy="linear-probe",
                              layer="layer2", quiet=True, out=str(tmp_path / "probe")).run_dir  # fmt: skip
    page = (probe / "report.html").read_text(encoding="utf-8")
    assert '<section id="where"><h2>Where the model looked (Grad-CAM)</h2>' in page
    assert "at layer <code>layer2</code>" in page  # the layer the probe reads (4 x 4 at 32 px), not layer4
    for name in ("gradcam_predictions.png", "gradcam_top_losses.png"):
        with Image.open(probe / "report" / name) as im:
            assert im.size == (1440, 220)  # 8 validation images, as the Images section's grids
    # Without its data the report says why there is no Grad-CAM, and keeps no grid of an earlier report.
    config = json.loads((probe / "config.json").read_text())
    (probe / "config.json").write_text(json.dumps({**config, "data": str(tmp_path / "gone")}))
    page = transferkit.write_report(probe).read_text(encoding="utf-8")
    assert re.search(r'<p class="note">Grad-CAM not drawn: [^<]*gone does not exist', page)
    assert not (probe / "report" / "gradcam_predictions.png").exists()


def test_overlays_keep_their_images_sub_folders_and_repeated_names_get_their_own(run: Path, tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for folder in ("a", "b"):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "photos" / folder / "same.png")
    Image.fromarray(pixels).save(tmp_path / "photos" / "a" / "same.jpg")  # one stem twice in one folder
    (tmp_path / "photos" / "a" / "broken.png").write_bytes(b"not a png")  # skipped with a warning: predict reports it
    with pytest.warns(UserWarning, match="skipping .*broken.png"):
        written = write_overlays(run, _images(tmp_path / "photos"), tmp_path / "out")
    expected = ["a/same_2_gradcam.png", "a/same_gradcam.png", "b/same_gradcam.png"]
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == expected
    on_disk = [p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")]
    assert sorted(on_disk) == expected


# --------------------------------------------------------------------------- does it look at the evidence?

SIDE, PATCH = 224, 80
PATCH_COLOUR = (255, 40, 40)


def _patch_folder(root: Path, per_class: int, seed: int) -> None:
    """Class "patch": a bright square at a random place on textured noise; class "plain": the noise alone."""
    rng = np.random.default_rng(seed)
    for name in ("patch", "plain"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(40, 200, (SIDE, SIDE, 3)).astype(np.uint8)
            if name == "patch":
                x, y = rng.integers(0, SIDE - PATCH, 2)
                pixels[y : y + PATCH, x : x + PATCH] = PATCH_COLOUR
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def _patch_box(path: str, prep: Preprocessing) -> tuple[float, float, float, float]:
    """The planted square in the model's input: found in the file, then resized and centre-cropped as the view is."""
    pixels = np.asarray(Image.open(path))
    ys, xs = np.nonzero(np.all(pixels == PATCH_COLOUR, axis=-1))
    scale, offset = prep.resize_size / SIDE, (prep.resize_size - prep.image_size) / 2
    return xs.min() * scale - offset, ys.min() * scale - offset, (xs.max() + 1) * scale - offset, \
        (ys.max() + 1) * scale - offset  # fmt: skip


@pytest.mark.slow
def test_heatmaps_peak_on_the_planted_discriminative_patch(tmp_path: Path) -> None:
    _patch_folder(tmp_path / "data" / "train", 24, seed=0)
    _patch_folder(tmp_path / "data" / "val", 8, seed=1)
    _patch_folder(tmp_path / "held-out", 16, seed=2)
    result = transferkit.train(tmp_path / "data", model="efficientnet_lite0", weights="DEFAULT",
                               strategy="feature-extract", epochs=10, augment="none", quiet=True,
                               out=str(tmp_path / "run"))  # fmt: skip
    model = transferkit.load_checkpoint(result.run_dir)
    found = explain(model, _images(tmp_path / "held-out" / "patch"))
    assert {e.layer for e in found} == {"bn2"} and [e.label for e in found].count("patch") >= 15
    # The heatmap comes from a 7 x 7 map (32 px cells): its peak sits on a cell centre, so "on the
    # patch" is within half a cell of the square's edges.
    half_cell = model.preprocessing.image_size / 7 / 2
    peaks, contrasts = 0, 0
    for e in found:
        x0, y0, x1, y1 = _patch_box(e.path, model.preprocessing)
        y, x = np.unravel_index(e.heatmap.argmax(), e.heatmap.shape)
        peaks += x0 - half_cell <= x < x1 + half_cell and y0 - half_cell <= y < y1 + half_cell
        inside = np.zeros(e.heatmap.shape, dtype=bool)
        inside[max(0, round(y0)) : round(y1), max(0, round(x0)) : round(x1)] = True
        contrasts += e.heatmap[inside].mean() > 3 * e.heatmap[~inside].mean()
    assert peaks >= 0.8 * len(found), f"heatmap peaks on the patch in {peaks} of {len(found)} images"
    assert contrasts >= 0.8 * len(found), f"heat inside the patch > 3x outside in {contrasts} of {len(found)}"
