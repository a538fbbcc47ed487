"""Real ImageNet weights, offline: efficientnet_lite0 from its package, mobilenet_v2 from ../shared."""

from __future__ import annotations

import pytest
import torch
from helpers import requires_shared

from transferkit import load_backbone
from transferkit.backbones import Preprocessing
from transferkit.data import build_transform, load_image

# sample image → acceptable ImageNet labels (index into torchvision's 1000)
EXPECTED = {
    "parrot.jpg": ("macaw",),
    "hot_dog.jpg": ("hotdog",),
    "dragonfly.bmp": ("dragonfly",),
    "cat.bmp": ("Egyptian cat", "tabby", "tiger cat"),
    "bird.bmp": ("chickadee",),
}


def _labels() -> list[str]:
    return requires_shared("weights", "imagenet_labels.txt").read_text().splitlines()[1:]  # drop "background"


def _top(bb, name: str, k: int) -> list[str]:
    path = requires_shared("sample_images", name)
    x = build_transform(bb.preprocessing, "none")(load_image(str(path)))[None]
    with torch.no_grad():
        logits = bb.model.eval()(x)
    labels = _labels()
    return [labels[i] for i in logits[0].topk(k).indices]


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_efficientnet_lite0_predicts_imagenet_labels(lite0, name: str) -> None:
    top1 = _top(lite0, name, 1)[0]
    assert any(top1.startswith(e) for e in EXPECTED[name]), top1


def test_efficientnet_lite0_sees_an_owl(lite0) -> None:
    assert any("owl" in label for label in _top(lite0, "owl.jpg", 5))


def test_mobilenet_v2_from_the_shared_file_predicts_imagenet_labels() -> None:
    path = requires_shared("weights", "mobilenet_v2_imagenet.pth")
    bb = load_backbone("mobilenet_v2", weights=str(path), preprocessing=Preprocessing(224, 256, (0.5,) * 3, (0.5,) * 3))
    assert _top(bb, "parrot.jpg", 1)[0].startswith("macaw")
    assert _top(bb, "hot_dog.jpg", 1)[0].startswith("hotdog")
