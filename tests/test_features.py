"""Feature cache: hits, misses and every kind of invalidation; layers; training from cached features."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from helpers import make_colour_folder

from transferkit import Preprocessing, TransferkitError, TransferModel, load_backbone
from transferkit.cli import main
from transferkit.data import scan_class_folder
from transferkit.features import extract_features
from transferkit.files import cache_info, clear_cache
from transferkit.layers import resolve_layer

SMALL = Preprocessing(image_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)


def _model(prep: Preprocessing = SMALL, seed: int = 0) -> TransferModel:
    torch.manual_seed(seed)
    return TransferModel(load_backbone("resnet18", weights="none", preprocessing=prep), ["blue", "red"]).eval()


@pytest.fixture
def images(tmp_path: Path) -> list[tuple[str, int]]:
    make_colour_folder(tmp_path / "imgs", 3)
    return scan_class_folder(tmp_path / "imgs")[1]


def test_second_extraction_is_all_hits_and_identical(images: list, tmp_path: Path) -> None:
    model = _model()
    first = extract_features(model, images, cache_dir=tmp_path / "c", num_workers=0)
    second = extract_features(model, images, cache_dir=tmp_path / "c", num_workers=0)
    assert (first.hits, first.misses) == (0, 6) and (second.hits, second.misses) == (6, 0)
    assert first.features.shape == (6, 512) and torch.equal(first.features, second.features)
    assert torch.equal(first.labels, second.labels)


@pytest.mark.precision
def test_extraction_leaves_the_callers_random_stream_alone(images: list, tmp_path: Path) -> None:
    # Computing (its loader draws seeds) or reading from the cache: what the caller draws next is the same.
    model = _model()
    for _ in ("computed", "from the cache"):
        torch.manual_seed(7)
        extract_features(model, images, cache_dir=tmp_path, num_workers=0)
        assert torch.equal(torch.rand(3), torch.manual_seed(7) and torch.rand(3))


def test_features_equal_the_models_own_penultimate_output(images: list, tmp_path: Path) -> None:
    model = _model()
    feats = extract_features(model, images[:2], cache_dir=tmp_path / "c", num_workers=0, precision="32").features
    from transferkit.data import build_transform, load_image

    x = torch.stack([build_transform(SMALL)(load_image(p)) for p, _ in images[:2]])
    with torch.no_grad():
        net = model.net
        h = net.avgpool(net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))))
    assert torch.allclose(feats, h.flatten(1), atol=1e-5)


def test_changed_file_is_a_miss(images: list, tmp_path: Path) -> None:
    model = _model()
    extract_features(model, images, cache_dir=tmp_path / "c", num_workers=0)
    path = images[0][0]
    from PIL import Image

    Image.new("RGB", (40, 48), (10, 200, 10)).save(path)
    os.utime(path, ns=(1, 1))  # a new content with a new mtime
    again = extract_features(model, images, cache_dir=tmp_path / "c", num_workers=0)
    assert (again.hits, again.misses) == (5, 1)


@pytest.mark.parametrize("change", ["preprocessing", "weights", "layer"])
def test_what_the_features_depend_on_invalidates_them(images: list, tmp_path: Path, change: str) -> None:
    base = _model()
    extract_features(base, images, cache_dir=tmp_path / "c", num_workers=0)
    layer = None
    if change == "preprocessing":
        model = _model(SMALL.with_overrides(mean=(0.4, 0.4, 0.4)))
    elif change == "weights":
        model = _model()
        with torch.no_grad():
            model.net.layer1[0].conv1.weight.mul_(1.01)
    else:
        model, layer = base, "layer3"
    again = extract_features(model, images, layer=layer, cache_dir=tmp_path / "c", num_workers=0)
    assert (again.hits, again.misses) == (0, 6)


def test_a_new_head_does_not_invalidate(images: list, tmp_path: Path) -> None:
    model = _model()
    extract_features(model, images, cache_dir=tmp_path / "c", num_workers=0)
    with torch.no_grad():
        model.head_module.weight.add_(1.0)
    assert extract_features(model, images, cache_dir=tmp_path / "c", num_workers=0).hits == 6


def test_layers_by_group_or_module_path(images: list, tmp_path: Path) -> None:
    model = _model()
    assert extract_features(model, images, layer="layer3", cache_dir=tmp_path, num_workers=0).features.shape == (6, 256)
    assert extract_features(model, images, layer="layer2.1.bn2", use_cache=False, num_workers=0).features.shape == (6, 128)
    with pytest.raises(TransferkitError, match="layer group"):
        resolve_layer(model, "layer9")


def test_a_group_is_read_after_its_activation_and_at_its_own_modules() -> None:
    x = torch.randn(2, 3, 32, 32)
    resnet = _model()
    with torch.no_grad():  # the stem is conv1, bn1 and relu: its output is what layer1 reads, not bn1's
        stem = resnet.net.relu(resnet.net.bn1(resnet.net.conv1(x))).mean(dim=(2, 3))
        assert torch.allclose(resnet.features(x, "stem"), stem)
    torch.manual_seed(0)  # a ViT's first group is conv_proj (with the class token): not the whole encoder
    vit = TransferModel(load_backbone("vit_b_16", weights="none", model_kwargs={"image_size": 32}), ["blue", "red"])
    with torch.no_grad():
        assert torch.allclose(vit.eval().features(x, "conv_proj"), vit.net.conv_proj(x).mean(dim=(2, 3)))
    alexnet = TransferModel(load_backbone("alexnet", weights="none"), ["blue", "red"]).eval()
    assert [g.name for g in alexnet.groups][:3] == ["features.0", "features.3", "features.6-10"]
    with torch.no_grad():  # a module path that names one convolution reads that convolution
        x = torch.randn(1, 3, 64, 64)
        assert alexnet.features(x, "features.6").shape == (1, 384)
        assert alexnet.features(x, "features.6-10").min() >= 0  # after features.10's ReLU


def test_augmented_views_are_cached_and_deterministic(images: list, tmp_path: Path) -> None:
    model = _model()
    a = extract_features(model, images, augment="light", views=3, cache_dir=tmp_path / "a", num_workers=0)
    b = extract_features(model, images, augment="light", views=3, cache_dir=tmp_path / "b", num_workers=0)
    assert a.features.shape == (18, 512) and torch.allclose(a.features, b.features)
    assert not torch.allclose(a.features[0], a.features[1])  # two views of one image differ


def test_clear_cache_and_cache_info(images: list, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extract_features(_model(), images, cache_dir=tmp_path / "c", num_workers=0)  # --cache-dir means one folder
    assert clear_cache(tmp_path / "c") == {"features": 6, "exports": 0, "shards": 0}
    assert not (tmp_path / "c" / "features").exists()
    # A --cache-dir that holds other things too: only what transferkit stored there goes.
    extract_features(_model(), images, cache_dir=tmp_path / "shared", num_workers=0)
    mine = [tmp_path / "shared" / name for name in ("features/notes.txt", "exports/model.onnx", "shards/data/x.bin")]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    # cache info counts and sizes what clear would remove, and nothing else.
    store_bytes = sum(p.stat().st_size for p in (tmp_path / "shared" / "features").rglob("*")
                      if p.is_file() and p.name != "notes.txt")  # fmt: skip
    assert cache_info(tmp_path / "shared") == {"features": {"count": 6, "bytes": store_bytes},
                                               "exports": {"count": 0, "bytes": 0},
                                               "shards": {"count": 0, "bytes": 0}}  # fmt: skip
    assert store_bytes > 6 * 512 * 2  # six 512-wide vectors, at 16 bits or more
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "shared")]) == 0
    assert re.search(r"features +6 feature vectors", capsys.readouterr().out)
    assert clear_cache(tmp_path / "shared") == {"features": 6, "exports": 0, "shards": 0}
    assert sorted(p for p in (tmp_path / "shared").rglob("*") if p.is_file()) == sorted(mine)
    assert cache_info(tmp_path / "shared")["features"] == {"count": 0, "bytes": 0}
    features = ["features", str(tmp_path), "--out", str(tmp_path / "f.npz")]
    for command in (["cache", "info"], ["cache", "clear"], features):
        assert main([*command, "--cache-dir", str(mine[0])]) == 2
        assert f"--cache-dir {mine[0]} is a file, not a folder; give the cache's folder" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as patch:  # the cache named by the variable instead
        patch.setenv("TRANSFERKIT_CACHE_DIR", str(mine[0]))
        assert main(["cache", "clear"]) == 2
        assert f"TRANSFERKIT_CACHE_DIR {mine[0]} is a file, not a folder" in capsys.readouterr().err


def test_feature_extract_training_uses_the_cache(tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import train

    options = {"model": "resnet18", "weights": "none", "image_size": 32, "epochs": 3, "lr": 0.05, "quiet": True,
               "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    first = train(tiny_dataset, out=str(tmp_path / "r1"), **options)
    second = train(tiny_dataset, out=str(tmp_path / "r2"), **options)
    assert first.metrics["feature_cache"]["misses"] == 28 and second.metrics["feature_cache"]["hits"] == 28
    assert first.val_accuracy == second.val_accuracy
    assert (tmp_path / "r2" / "model.pt").is_file() and len(second.history) == 3
    assert clear_cache(tmp_path / "cache")["features"] == 28  # `cache clear --cache-dir` finds what train stored


def test_linear_probe_separates_a_separable_dataset(tmp_path: Path) -> None:
    from transferkit.probes import fit_linear_probe

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 4
    labels = torch.arange(3).repeat_interleave(30)
    feats = centers[labels] + torch.randn(90, 16, generator=g)
    for classifier in ("logreg", "svm"):
        fit = fit_linear_probe(feats, labels, 3, classifier)
        assert fit.cv_accuracy > 0.95
        assert (fit.probe(feats).argmax(1) == labels).float().mean() > 0.95
    noise = fit_linear_probe(torch.randn(90, 16, generator=g), labels, 3)
    assert noise.cv_accuracy < 0.6  # labels unrelated to features: about chance


@pytest.mark.parametrize("classifier", ["logreg", "svm"])
def test_a_balanced_linear_probe_finds_more_of_a_rare_class(classifier: str) -> None:
    """90 images of one class, 10 of another, overlapping: weighing each class the same trades some
    of the common class's recall for the rare one's, as a trained head's class-weighted loss does."""
    from transferkit.probes import fit_linear_probe

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 90 + [1] * 10)
    feats = torch.randn(100, 8, generator=g)
    feats[:, 0] += 1.5 * labels  # one feature tells the classes apart, not cleanly
    plain = fit_linear_probe(feats, labels, 2, classifier)
    balanced = fit_linear_probe(feats, labels, 2, classifier, balanced=True, by_macro_f1=True)

    def rare_recall(probe: torch.nn.Module) -> float:
        return float((probe(feats).argmax(1)[labels == 1] == 1).float().mean())

    assert rare_recall(balanced.probe) > rare_recall(plain.probe)


@pytest.mark.precision
@pytest.mark.parametrize("classifier", ["logreg", "svm"])
def test_linear_probe_run_evaluates_and_predicts_like_any_run(tiny_dataset: Path, tmp_path: Path, classifier: str) -> None:
    from transferkit import evaluate, load_checkpoint, predict, train

    result = train(tiny_dataset, model="resnet18", weights="none", image_size=32, strategy="linear-probe",
                   classifier=classifier, layer="layer2", quiet=True, out=str(tmp_path / "probe"))  # fmt: skip
    assert result.metrics["linear_probe"]["layer"] == "layer2" and result.val_accuracy >= 0.75
    model = load_checkpoint(result.run_dir)
    assert model.probe is not None and model.probe_layer == "layer2"
    evaluation = evaluate(result.run_dir, tiny_dataset / "val")  # the run's precision, resolved here as in training
    assert evaluation.accuracy == result.val_accuracy and evaluation.precision == result.metrics["evaluation_precision"]
    out = predict(result.run_dir, [tiny_dataset / "val" / "red"], top_k=1)
    assert [r["predictions"][0]["label"] for r in out].count("red") >= 3


@pytest.mark.precision
def test_features_use_the_machines_precision_and_are_cached_apart(
    images: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transferkit.performance import NATIVE_BF16_ENV

    model = _model()
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")  # as on a CPU without native bf16: fp32
    fp32 = extract_features(model, images[:2], cache_dir=tmp_path / "c", num_workers=0)
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")  # as on one with it: bf16, which the fp32 vectors must not stand in for
    bf16 = extract_features(model, images[:2], cache_dir=tmp_path / "c", num_workers=0)
    assert fp32.misses == bf16.misses == 2 and not torch.equal(fp32.features, bf16.features)
    cosine = torch.nn.functional.cosine_similarity(fp32.features, bf16.features)
    assert bool((cosine > 0.99).all())  # the same features, rounded to bf16's 8 significant bits


@pytest.mark.precision
def test_a_frozen_run_is_evaluated_on_its_cached_features_with_the_numbers_of_the_whole_model(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    from transferkit import evaluate, train

    result = train(tiny_dataset, model="resnet18", weights="none", image_size=32, strategy="feature-extract",
                   epochs=2, batch_size=4, cache_dir=str(tmp_path / "cache"), quiet=True, out=str(tmp_path / "run"))  # fmt: skip
    assert result.metrics["evaluated_on"] == "cached features"
    # evaluate runs every image through the whole model (backbone and head): the same numbers, exactly.
    evaluation = evaluate(result.run_dir, tiny_dataset / "val", batch_size=4)
    assert evaluation.precision == result.metrics["evaluation_precision"]
    assert evaluation.accuracy == result.metrics["val_accuracy"] and evaluation.loss == result.metrics["val_loss"]
    # Image by image, not only in aggregate: the head on cached vectors is the whole model's last step.
    from transferkit import load_checkpoint
    from transferkit.inference import evaluate_cached_features, evaluate_samples

    model = load_checkpoint(result.run_dir)
    _, samples, _ = scan_class_folder(tiny_dataset / "val")
    cached = evaluate_cached_features(model, samples, batch_size=4, cache_dir=tmp_path / "cache")
    whole = evaluate_samples(model, samples, batch_size=4)
    assert [p["probability"] for p in cached.predictions] == [p["probability"] for p in whole.predictions]


def test_a_transformer_stage_is_read_at_its_own_last_block(images: list, tmp_path: Path) -> None:
    from transferkit.layers import resolve_layer

    model = TransferModel(load_backbone("timm/vit_tiny_patch16_224", "none"), ["blue", "red"]).eval()
    first = resolve_layer(model, "blocks.0-2")[1]
    assert first is dict(model.net.named_modules())["blocks.2"]
    early = extract_features(model, images[:2], layer="blocks.0-2", cache_dir=tmp_path, num_workers=0).features
    late = extract_features(model, images[:2], layer="blocks.9-10", cache_dir=tmp_path, num_workers=0).features
    assert not torch.allclose(early, late)
