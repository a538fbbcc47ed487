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

from .lean_imports import defer_unused_imports

__version__ = "0.1.0"

defer_unused_imports()

_EXPORTS = {
    "Backbone": "backbones", "LayerGroup": "backbones", "Preprocessing": "backbones",
    "list_backbones": "backbones", "load_backbone": "backbones", "offline_weights_available": "backbones",
    "explicit_preprocessing": "backbones", "DEFAULT_BACKBONE": "backbones",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "TransferkitError": "errors",
    "HeadSpec": "heads", "ModelRecord": "model", "TransferModel": "model",
    "PRECISIONS": "performance",
    "AUGMENTATIONS": "data", "discover": "data", "BALANCE_MODES": "balance", "LabelColumns": "label_tables",
    "StrategySpec": "strategies", "apply_strategy": "strategies", "param_groups": "strategies",
    "STRATEGIES": "strategies",
    "CLASSIFIERS": "probes",
    "TrainConfig": "training", "TrainResult": "training", "find_lr": "training", "OPTIMIZERS": "training",
    "SCHEDULERS": "training",
    "train": "workflow", "resume_training": "workflow",
    "Evaluation": "inference", "evaluate": "inference", "predict": "inference", "format_predictions": "inference",
    "RUNTIMES": "runtimes",
    "advise": "advice", "measure_candidates": "selection", "select": "selection", "extract_features": "features", "write_features": "features",
    "export": "exports", "FORMATS": "exports", "DEFAULT_TOLERANCE": "exports",
    "QUANTIZATIONS": "quantize", "DEFAULT_MAX_DROP": "quantize",
    "inspect_data": "inspection", "Inspection": "inspection",
    "explain": "gradcam", "Explanation": "gradcam",
    "cache_root": "files", "cache_info": "files", "clear_cache": "files",
    "write_report": "reports", "load_run": "reports", "format_comparison": "reports", "write_comparison": "reports",
    "run_demo": "demo",
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
