"""The leaderboard of ``--strategy auto``: each candidate tried (:class:`Trial`) and the search's outcome
(:class:`Selection`), as the run records and the report shows them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .backbones.weights import NO_WEIGHTS
from .discovery import DATA_OPTIONS, command_flags, data_flags
from .heads import HeadSpec

if TYPE_CHECKING:
    from .training import TrainConfig


@dataclass
class Trial:
    """One leaderboard row: what was tried, how it scored on the holdout, what it cost."""

    backbone: str
    strategy: str
    layer: str | None = None
    unfreeze: int | None = None
    epochs: int | None = None
    score: float | None = None  # accuracy (or macro-F1, imbalanced) on the holdout (part of the training images)
    seconds: float = 0.0
    images_per_s: float | None = None
    status: str = "done"  # done | skipped | failed
    note: str = ""

    @property
    def label(self) -> str:
        detail = f" {self.layer}" if self.layer else f" --unfreeze {self.unfreeze}" if self.unfreeze else ""
        return f"{self.backbone} {self.strategy}{detail}"

    def options(self) -> dict[str, Any]:
        """The TrainConfig fields that reproduce this candidate."""
        # Every strategy field, None where the candidate has none: what the user gave --strategy auto
        # (a --layer, an --unfreeze) must not stay behind in the winner's configuration.
        return {"model": self.backbone, "strategy": self.strategy,
                "layer": self.layer if self.layer != "head-input" else None,  # linear-probe's default layer
                "unfreeze": self.unfreeze or None}  # fmt: skip


@dataclass
class Selection:
    budget_s: float
    train_images: int
    holdout_images: int
    trials: list[Trial] = field(default_factory=list)
    used_s: float = 0.0
    winner: Trial | None = None
    # Estimated seconds of one training epoch over every training image, per backbone (for the final run).
    epoch_seconds: dict[str, float] = field(default_factory=dict)
    metric: str = "accuracy"  # what scores the holdout: macro_f1 for imbalanced classes
    class_counts: dict[str, int] = field(default_factory=dict)  # training images per class
    # The run's own model and the weights it was given (weights, mean, std): other candidates load
    # their default weights (:meth:`weights_of`), so only a winning own model takes these.
    own_model: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None  # every candidate's input size, where the run gave one
    precision: str = "32"  # what the candidates' features and speeds were measured at

    def final_epochs(self, wanted: int) -> int:
        """Epochs the winner can train in what is left of the budget (at least one), up to ``wanted``."""
        if self.winner is None or self.winner.strategy not in ("fine-tune", "full", "gradual"):
            return wanted
        per_epoch = self.epoch_seconds.get(self.winner.backbone)
        if not per_epoch:
            return wanted
        return max(1, min(wanted, int((self.budget_s - self.used_s) // per_epoch)))

    def ranked(self) -> list[Trial]:
        done = sorted((t for t in self.trials if t.score is not None), key=lambda t: (-t.score, t.seconds))
        return [*done, *(t for t in self.trials if t.score is None)]

    def winner_options(self) -> dict[str, Any]:
        """The TrainConfig fields that train the winner: its options, and the run's weights if it is the run's model."""
        if self.winner is None:
            return {}
        return {**self.winner.options(), **self.weights_of(self.winner.backbone)}

    def weights_of(self, backbone: str) -> dict[str, Any]:
        """The weights (and mean, std) ``backbone`` is measured and trained with: the run's own for its own
        model, and for every model where the run asked for random weights; else each model's default."""
        own = self.own_model
        if backbone == own.get("model") or str(own.get("weights", "")).lower() in NO_WEIGHTS:
            return {k: v for k, v in own.items() if k != "model"}
        return {"weights": "DEFAULT", "mean": None, "std": None}

    def command(self, data: str) -> str:
        """The ``transferkit train`` command that trains the winner (on ``data``: DATA and its data flags)."""
        shown = {k: v for k, v in self.winner_options().items() if v is not None and v != "DEFAULT"}
        if shown and self.image_size:
            shown["image_size"] = self.image_size
        if not shown:
            return ""
        return f"transferkit train {data}{command_flags(shown)}"

    def table(self) -> str:
        heading = "holdout acc" if self.metric == "accuracy" else "holdout F1"
        lines = []
        if self.class_counts:
            counts = ", ".join(f"{n} {c}" for n, c in self.class_counts.items())
            scored = "accuracy" if self.metric == "accuracy" else "macro-F1 (imbalanced or multi-label classes)"
            lines.append(f"training images per class: {counts}; scored by {scored}")
        lines.append(f"{'candidate':<58} {heading:>11} {'seconds':>8} {'img/s':>7}  status")
        for t in self.ranked():
            score = "-" if t.score is None else f"{t.score:.4f}"
            speed = "-" if t.images_per_s is None else f"{t.images_per_s:.1f}"
            status = t.status + (f": {t.note}" if t.note else "")
            lines.append(f"{t.label[:58]:<58} {score:>11} {t.seconds:>8.1f} {speed:>7}  {status}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_seconds": round(self.budget_s, 1), "used_seconds": round(self.used_s, 1),
            "train_images": self.train_images, "holdout_images": self.holdout_images,
            "measured_on": "a stratified holdout of the training images; the validation split was not used",
            "leaderboard": [asdict(t) for t in self.ranked()],
            "winner": asdict(self.winner) if self.winner else None,
            "epoch_seconds": self.epoch_seconds,
            "metric": self.metric, "class_counts": self.class_counts, "precision": self.precision,
        }  # fmt: skip


def reproducing_flags(config: TrainConfig) -> str:
    """The flags besides the winner's own (``Selection.command``) that a resolved ``--strategy auto`` run
    trained with: its data options, and the options it was given that the winner's strategy reads."""
    from .training import TrainConfig  # here: Lightning's import is for a run that trains

    read = ["val_split", "seed", "batch_size", "balance", "precision", "calibration"]
    if config.strategy == "linear-probe":
        read.append("classifier")
    else:
        read += ["epochs", "lr", "optimizer", "weight_decay", "scheduler", "patience", "head"]
        read += ["head_dropout"] * bool(HeadSpec.parse(config.head).hidden)
        read += ["momentum"] * (config.optimizer == "sgd") + ["step_size", "gamma"] * (config.scheduler == "step")
        read += ["lr_decay"] * (config.strategy in ("fine-tune", "full", "gradual"))
        read += ["train_bn"] * (config.strategy in ("fine-tune", "gradual"))
        one_cached_view = config.strategy == "feature-extract" and config.feature_views == 1 and config.cache
        read += ["augment"] * (not one_cached_view) + ["feature_views"] * (config.strategy == "feature-extract")
    defaults = TrainConfig(data=config.data)
    given = {name: getattr(config, name) for name in read if getattr(config, name) != getattr(defaults, name)}
    switches = "".join(f" --{flag}" for flag, on in (("train-bn", given.pop("train_bn", False)),
                                                       ("no-cache", not config.cache)) if on)  # fmt: skip
    if "feature_views" in given:
        given["views"] = given.pop("feature_views")
    return data_flags({name: getattr(config, name) for name in DATA_OPTIONS}) + command_flags(given) + switches
