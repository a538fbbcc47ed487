"""Shared fixtures."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from helpers import make_colour_folder


@pytest.fixture(scope="session", autouse=True)
def _isolated_feature_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests (and the CLI processes they start) never touch the user's feature cache."""
    import os

    os.environ["TRANSFERKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA/train and DATA/val, two colour classes, 10 + 4 images each."""
    root = tmp_path_factory.mktemp("tiny")
    make_colour_folder(root / "train", 10, seed=1)
    make_colour_folder(root / "val", 4, seed=2)
    return root


@pytest.fixture(autouse=True)
def _quiet_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
