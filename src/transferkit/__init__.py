"""transferkit: an accurate, evaluated, exportable image classifier from a folder of images.

>>> import transferkit
>>> result = transferkit.train("data/hymenoptera", strategy="feature-extract", epochs=10)  # doctest: +SKIP
>>> transferkit.evaluate(result.run_dir, "data/hymenoptera/val").accuracy  # doctest: +SKIP
>>> transferkit.predict(result.run_dir, ["photo.jpg"], top_k=2)  # doctest: +SKIP
"""

from .backbones import Backbone, LayerGroup, Preprocessing, list_backbones, load_backbone
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import TransferkitError
from .heads import HeadSpec, TransferModel
from .inference import Evaluation, evaluate, predict
from .strategies import StrategySpec, apply_strategy, param_groups
from .training import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "Backbone", "Evaluation", "HeadSpec", "LayerGroup", "Preprocessing", "StrategySpec", "TrainConfig",
    "TrainResult", "TransferModel", "TransferkitError", "apply_strategy", "evaluate", "list_backbones",
    "load_backbone", "load_checkpoint", "param_groups", "predict", "save_checkpoint", "train",
]  # fmt: skip
