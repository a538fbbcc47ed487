"""A run's configuration (saved as ``config.json``) and its result."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from ..backbones import DEFAULT_BACKBONE
from ..backbones.weights import FileWeights, resolve_weights_argument
from ..errors import TransferkitError
from ..heads import HeadSpec
from ..shards import is_url
from ..strategies import STRATEGIES, StrategySpec, parse_group_lrs, parse_unfreeze
from .loggers import check_loggers

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "cosine", "onecycle")
LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")  # gpu: Lightning's word for whichever GPU is there
MAX_SEED = 2**32 - 1  # seeds NumPy (and so Lightning's seed_everything) accepts


def _valid_devices(devices: int | str) -> bool:
    """Lightning's forms: a count, -1 for all, or comma-separated device indices (``0,1``)."""
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return True
    if text.isdigit():
        return int(text) >= 1
    return "," in text and all(part.strip().isdigit() for part in text.split(",") if part.strip())


WHOLE_NUMBER_FIELDS = ("epochs", "unfreeze_every", "step_size", "batch_size", "folds", "seed", "num_nodes",
                       "patience", "feature_views", "num_workers", "image_size")  # fmt: skip
REAL_NUMBER_FIELDS = ("head_dropout", "lr_decay", "aux_weight", "momentum", "weight_decay", "gamma", "val_split")


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.json`` in the run directory."""

    data: str
    model: str = DEFAULT_BACKBONE
    weights: str = "DEFAULT"
    strategy: str = "feature-extract"
    unfreeze: int | list[str] | None = None
    head: str = "linear"
    head_dropout: float | None = None
    epochs: int = 10
    lr: float | str = 1e-3
    lr_decay: float | None = None
    group_lr: dict[str, float] = field(default_factory=dict)
    unfreeze_every: int = 1
    unfreeze_at: list[int] = field(default_factory=list)
    train_bn: bool = False
    aux_weight: float = 0.4
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    step_size: int = 7
    gamma: float = 0.1
    batch_size: int = 32
    augment: str = "light"
    val_split: float = 0.2
    labels: str | None = None  # a CSV of labels for the images in DATA (DATA itself may be the CSV)
    path_col: str | None = None  # label file columns, detected from common names unless given
    label_col: str | None = None
    split_col: str | None = None
    label_sep: str | None = None  # between several labels in one cell (multi-label); "|" or ";" are detected
    image_ext: str | None = None  # Kaggle-style ids without an extension: the images' extension
    exclude: str | None = None  # a file listing images to leave out (transferkit inspect's suspects.txt)
    balance: str = "auto"  # imbalanced classes: auto, none, loss (class-weighted) or sampler
    calibration: str = "temperature"  # fit a temperature on held-out predictions after training, or none
    folds: int | None = None  # k-fold: K runs on K stratified splits, reported as mean ± std (folds.py)
    seed: int = 0
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    dist: str = "auto"
    patience: int | None = None
    classifier: str = "logreg"
    layer: str | None = None
    cache: bool = True
    feature_views: int = 1
    cache_dir: str | None = None
    num_workers: int | None = None
    compile: bool = False
    mean: list[float] | None = None
    std: list[float] | None = None
    image_size: int | None = None
    out: str | None = None
    runs_root: str = "runs"
    quiet: bool = False
    budget: str | None = None  # --strategy auto: wall-clock budget of the search and the final training
    models: list[str] | None = None  # --strategy auto: candidate backbones (default: those available offline)
    resolved_from: dict[str, Any] = field(default_factory=dict)  # the selection / LR finder behind auto choices
    loggers: tuple[str, ...] = ()  # --logger: tensorboard, csv, mlflow, wandb; () = none

    def __post_init__(self) -> None:
        self._check_number_types()
        # config.json is read again from any working directory (report, --resume, inspect --run).
        for name in ("data", "labels", "exclude", "out"):
            setattr(self, name, _absolute(getattr(self, name)))
        if isinstance(resolve_weights_argument(self.weights), FileWeights):  # a path, given as text or a Path
            self.weights = _absolute(self.weights)
        if self.calibration not in ("temperature", "none"):
            raise TransferkitError(f"unknown --calibration {self.calibration!r}; choose temperature or none")
        # Strategy options are parsed and checked by StrategySpec alone; the config keeps their JSON form.
        if isinstance(self.unfreeze, str):
            parsed = parse_unfreeze(self.unfreeze)
            self.unfreeze = parsed if isinstance(parsed, int) else list(parsed)
        self.group_lr = parse_group_lrs(self.group_lr)
        if self.optimizer not in OPTIMIZERS:
            raise TransferkitError(f"unknown --optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise TransferkitError(f"unknown --scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if self.strategy not in (*STRATEGIES, "auto"):
            raise TransferkitError(
                f"unknown --strategy {self.strategy!r}; choose one of: {', '.join((*STRATEGIES, 'auto'))}"
            )
        if isinstance(self.models, str):
            self.models = [m.strip() for m in self.models.split(",") if m.strip()]
        if (self.budget is not None or self.models) and self.strategy != "auto":
            raise TransferkitError("--budget and --models apply to --strategy auto (the measured choice)")
        if self.group_lr and self.strategy == "auto":  # names of groups that some candidates never train
            raise TransferkitError("--group-lr sets the LRs of one strategy's groups: give it with the strategy "
                                   "--strategy auto chooses (transferkit advise prints it), not with auto")  # fmt: skip
        if self.layer and self.strategy not in ("linear-probe", "auto"):
            raise TransferkitError("--layer applies to --strategy linear-probe (the other strategies train a head on the last layer)")
        self.loggers = check_loggers(self.loggers)
        head = HeadSpec.parse(self.head, dropout=self.head_dropout)  # a bad --head or --head-dropout, now
        if self.head_dropout and not head.hidden and self.strategy != "auto":
            raise TransferkitError(f"--head-dropout applies to an MLP head (--head mlp:256); --head {self.head} "
                                   f"has no hidden layer to drop")  # fmt: skip
        for option, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size),
                              ("--step-size", self.step_size), ("--views", self.feature_views),
                              ("--num-nodes", self.num_nodes)):  # fmt: skip
            if value < 1:
                raise TransferkitError(f"{option} must be at least 1, got {value}")
        self._check_ranges()
        if self.lr != "auto":
            try:
                self.lr = float(self.lr)
            except ValueError:
                raise TransferkitError(f"--lr must be a number or auto, got {self.lr!r}") from None
            if not (self.lr > 0 and math.isfinite(self.lr)):
                raise TransferkitError(f"--lr must be a positive number, got {self.lr:g}")

    def _check_number_types(self) -> None:
        """From Python, ``epochs="3"`` is named here, not failing a comparison in the checks below."""
        for name in WHOLE_NUMBER_FIELDS:
            self._check_number_type(name, Integral, "a whole number")
        for name in REAL_NUMBER_FIELDS:
            self._check_number_type(name, Real, "a number")

    def _check_number_type(self, name: str, kind: type, words: str) -> None:
        value = getattr(self, name)
        option = "--views" if name == "feature_views" else "--" + name.replace("_", "-")
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise TransferkitError(f"{option} must be {words}, got {value!r}")
        if value is not None and not isinstance(value, Integral) and not math.isfinite(value):
            raise TransferkitError(f"{option} must be a finite number, got {value!r}")
        if value is not None:  # NumPy's numbers as Python's, for config.json
            setattr(self, name, int(value) if isinstance(value, Integral) else float(value))

    def _check_ranges(self) -> None:
        """Numbers and names that torch or Lightning would refuse with a traceback once the run has begun."""
        at_least_one = {"--unfreeze-every": self.unfreeze_every, "--patience": self.patience}
        not_negative = {"--weight-decay": self.weight_decay, "--aux-weight": self.aux_weight,
                        "--num-workers": self.num_workers}  # fmt: skip
        for option, value in at_least_one.items():
            if value is not None and value < 1:
                raise TransferkitError(f"{option} must be at least 1, got {value}")
        for option, value in not_negative.items():
            if value is not None and value < 0:
                raise TransferkitError(f"{option} must not be negative, got {value}")
        if not 0 <= self.momentum <= 1:
            raise TransferkitError(f"--momentum must be between 0 and 1, got {self.momentum}")
        for option, value in (("--gamma", self.gamma), ("--lr-decay", self.lr_decay)):
            if value is not None and not value > 0:
                raise TransferkitError(f"{option} must be positive, got {value}")
        if self.accelerator not in ACCELERATORS:
            raise TransferkitError(f"unknown --accelerator {self.accelerator!r}; choose one of: {', '.join(ACCELERATORS)}")
        if self.folds is not None and self.folds < 2:  # 0 would otherwise quietly train one run
            raise TransferkitError(f"--folds {self.folds}: give at least 2 (5 is usual)")
        if not 0 <= self.seed <= MAX_SEED:
            raise TransferkitError(f"--seed must be from 0 to {MAX_SEED} (NumPy's seeds), got {self.seed}")
        self._check_unfreeze_schedule()
        if not _valid_devices(self.devices):
            raise TransferkitError(f"--devices must be auto, a count of at least 1, -1 (all) or device indices such as "
                                   f"0,1; got {self.devices!r}")  # fmt: skip

    def _check_unfreeze_schedule(self) -> None:
        if any(isinstance(e, bool) or not isinstance(e, Integral) or e < 0 for e in self.unfreeze_at):
            raise TransferkitError(f"--unfreeze-at takes epochs 0 or more (counted from 0), e.g. 2,4,6; got "
                                   f"{','.join(map(str, self.unfreeze_at))}")  # fmt: skip
        self.unfreeze_at = [int(e) for e in self.unfreeze_at]
        first = min(self.unfreeze_at) if self.unfreeze_at else self.unfreeze_every
        if self.strategy == "gradual" and first >= self.epochs:  # it would train the head alone, as feature-extract
            raise TransferkitError(f"--strategy gradual unfreezes its first group at epoch {first} (counted from 0), "
                                   f"after the last of --epochs {self.epochs}: give more --epochs, or an earlier "
                                   f"{'--unfreeze-at' if self.unfreeze_at else '--unfreeze-every'}")  # fmt: skip

    def strategy_spec(self) -> StrategySpec:
        if self.lr == "auto":
            raise TransferkitError("--lr auto must be resolved by the LR finder first")
        return StrategySpec(
            name=self.strategy,
            unfreeze=tuple(self.unfreeze) if isinstance(self.unfreeze, list) else self.unfreeze,
            lr=float(self.lr),
            lr_decay=self.lr_decay,
            group_lrs=dict(self.group_lr),
            unfreeze_every=self.unfreeze_every,
            unfreeze_at=tuple(self.unfreeze_at),
            train_bn=self.train_bn,
            aux_weight=self.aux_weight,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _absolute(path: Any) -> Any:
    """A local path as an absolute one; a URL (a packed dataset in a store), or no path, as it is."""
    if not path or is_url(str(path)):
        return path
    return os.path.abspath(os.path.expanduser(str(path)))


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def val_accuracy(self) -> float:
        return float(self.metrics["val_accuracy"])

    def __repr__(self) -> str:
        return f"TrainResult(run_dir={str(self.run_dir)!r}, val_accuracy={self.val_accuracy:.4f})"
