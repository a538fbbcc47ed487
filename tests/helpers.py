"""Test helpers: small generated image folders, and the ../shared data when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(os.environ.get("TRANSFERKIT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
COLOURS = {"red": 0, "green": 1, "blue": 2}


def requires_shared(*parts: str) -> Path:
    """The path under ../shared, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data beside the project checkout)")
    return path


def make_colour_folder(root: Path, per_class: int, size: tuple[int, int] = (40, 48), seed: int = 0,
                       classes: tuple[str, ...] = ("red", "blue")) -> Path:  # fmt: skip
    """Noisy images whose dominant colour is their class: separable, but not trivially identical."""
    rng = np.random.default_rng(seed)
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 90, (*size, 3)).astype(np.uint8)
            a[..., COLOURS[c]] += 140
            Image.fromarray(a).save(d / (f"{i}.jpg" if i % 2 else f"{i}.png"))
    return root
