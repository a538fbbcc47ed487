"""The top-level API: every name the package lists is the object its module defines."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import transferkit
from transferkit.backbones import Preprocessing, load_backbone

SMALL = Preprocessing(image_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_every_top_level_name_is_its_modules_object_even_after_the_module_is_imported() -> None:
    for name, module_name in transferkit._EXPORTS.items():
        module = importlib.import_module(f"transferkit.{module_name}")
        # Importing a submodule sets an attribute of the same name on the package: a function named
        # like a module (export/export.py) would then resolve to the module instead.
        assert getattr(transferkit, name) is getattr(module, name), name
    assert sorted(transferkit.__all__) == sorted(transferkit._EXPORTS)


def test_predict_refuses_no_images_and_top_k_below_one_and_takes_one_path(tiny_dataset: Path) -> None:
    model = transferkit.TransferModel(load_backbone("resnet18", "none", preprocessing=SMALL), ["blue", "red"]).eval()
    with pytest.raises(transferkit.TransferkitError, match="no images given; give image files or folders"):
        transferkit.predict(model, [])
    with pytest.raises(transferkit.TransferkitError, match="--top-k must be at least 1, got 0"):
        transferkit.predict(model, tiny_dataset / "val", top_k=0)
    one = tiny_dataset / "val" / "red" / "0.png"
    assert [r["path"] for r in transferkit.predict(model, one, top_k=1)] == [str(one)]
