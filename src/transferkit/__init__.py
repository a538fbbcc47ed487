"""transferkit: an accurate, evaluated, exportable image classifier from a folder of images.

>>> import transferkit
>>> result = transferkit.train("data/hymenoptera", strategy="feature-extract", epochs=10)  # doctest: +SKIP
>>> transferkit.evaluate(result.run_dir, "data/hymenoptera/val").accuracy  # doctest: +SKIP
>>> transferkit.predict(result.run_dir, ["photo.jpg"], top_k=2)  # doctest: +SKIP

Names are imported on first use, so that the command line starts (and can choose its memory
allocator) before torch is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Backbone": "backbones", "LayerGroup": "backbones", "Preprocessing": "backbones",
    "list_backbones": "backbones", "load_backbone": "backbones",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "TransferkitError": "errors",
    "HeadSpec": "heads", "ModelRecord": "model", "TransferModel": "model",
    "Evaluation": "inference", "evaluate": "inference", "predict": "inference",
    "StrategySpec": "strategies", "apply_strategy": "strategies", "param_groups": "strategies",
    "TrainConfig": "training", "TrainResult": "training", "train": "training", "resume_training": "training",
    "advise": "advice", "export": "export", "extract_features": "features", "write_report": "reports",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
