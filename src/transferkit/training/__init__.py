"""Training: the configuration, the LightningModule, its callbacks, the LR finder, and fitting a run.

``config`` → ``learner`` (+ ``callbacks``) → ``fit``; ``lr_find`` runs the same learner through
Lightning's tuner. Training writes the model, the history and its own checkpoints into the run
directory and imports nothing of the stages after it: the final evaluation and the report are
:mod:`transferkit.workflow`'s.
"""

from .callbacks import AtomicCheckpointIO, BestModelCheckpoint, GradualUnfreezing, HistoryCSV, ResumableState
from .config import LIGHTNING_PRECISION, OPTIMIZERS, SCHEDULERS, TrainConfig, TrainResult
from .fit import Fitted, build_model, fit, model_and_strategy, quiet_lightning, training_device
from .learner import TransferLearner
from .lr_find import LRFinderResult, find_lr

__all__ = [
    "AtomicCheckpointIO", "BestModelCheckpoint", "Fitted", "GradualUnfreezing", "HistoryCSV", "LIGHTNING_PRECISION",
    "LRFinderResult", "OPTIMIZERS", "ResumableState", "SCHEDULERS", "TrainConfig", "TrainResult", "TransferLearner",
    "build_model", "find_lr", "fit", "model_and_strategy", "quiet_lightning", "training_device",
]  # fmt: skip
