"""Lightning's LR range test on the configured model and strategy, and fastai's rule for reading it."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from ..data import check_whole_number, discover_for
from ..errors import TransferkitError
from ..files import atomic_write
from ..performance import to_fast_layout, trains_channels_last
from ..strategies import apply_strategy
from .config import TrainConfig
from .fit import (
    build_model,
    learner_and_loaders,
    lightning_precision,
    quiet_lightning,
    training_device,
    training_precision,
)


@dataclass
class LRFinderResult:
    suggestion: float
    lrs: list[float]
    losses: list[float]

    def summary(self) -> dict[str, Any]:
        return {"suggestion": self.suggestion, "steps": len(self.lrs)}

    def plot(self, path: Path) -> Path:
        """The loss against the LR, in the format ``path``'s suffix names (:data:`PLOT_FORMATS`)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses)
        ax.axvline(self.suggestion, color="tab:red", linestyle="--", label=f"suggested {self.suggestion:.2g}")
        ax.set(xscale="log", xlabel="learning rate (head)", ylabel="training loss", title="LR range test")
        ax.legend()
        fig.tight_layout()
        image_format = plot_format(path)
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=image_format))
        return path


PLOT_FORMATS = ("png", "pdf", "svg")


def plot_format(path: str | Path) -> str:
    """The format a plot at ``path`` is written in, from its suffix, or the one-line error."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise TransferkitError(f"--plot {path} must end in {', '.join('.' + f for f in PLOT_FORMATS)}")
    return suffix


def find_lr(config: TrainConfig, splits: Any = None, num_training: int = 100) -> LRFinderResult:
    """Lightning's LR range test on the configured model and strategy; suggests the head's LR."""
    import tempfile

    from lightning.pytorch.tuner import Tuner

    check_whole_number("num_training", num_training, 2, " (the LRs tried)")
    quiet_lightning()
    L.seed_everything(config.seed, workers=True, verbose=False)
    splits = splits or discover_for(config)
    probe = TrainConfig(**{**config.to_dict(), "lr": 1e-3, "scheduler": "none"})
    if probe.strategy in ("auto", "linear-probe"):
        raise TransferkitError("the LR finder needs a gradient-trained strategy: feature-extract, fine-tune, full or gradual")
    model = build_model(probe, splits.class_names)
    spec = probe.strategy_spec()
    apply_strategy(model, spec)
    device = training_device(config)
    learner, train_loader, _, _ = learner_and_loaders(model, spec, splits, probe, device)
    learner.lr_range_test = True  # each group swept at its own multiple of the head's LR, as it trains
    if trains_channels_last(device, probe.compile):  # as fit lays it out
        to_fast_layout(model)
    # As fit trains: the head alone on cached features at fp32, a network at its schedule's precision.
    precision = "32" if learner.head_only else training_precision(config.precision, device, model, spec, config.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(accelerator=device.type, devices=1, logger=False, enable_checkpointing=False, max_epochs=-1,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
                            precision=lightning_precision(precision, device))  # fmt: skip
        # Lightning's LR finder always draws its own tqdm bar (on stderr): --quiet silences it here.
        silent = contextlib.redirect_stderr(io.StringIO()) if config.quiet else contextlib.nullcontext()
        with silent, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")  # the finder needs none
            finder = Tuner(trainer).lr_find(learner, train_dataloaders=train_loader, min_lr=1e-6, max_lr=1.0,
                                            num_training=num_training, update_attr=False)  # fmt: skip
    lrs, losses = [float(v) for v in finder.results["lr"]], [float(v) for v in finder.results["loss"]]
    if len(lrs) < 10:
        raise TransferkitError("the LR finder could not suggest a rate (too few batches?); pass --lr explicitly")
    # fastai's rule: a tenth of the LR at the smoothed loss's minimum. The steepest-slope rule picks
    # noise when the loss never diverges, as with a linear head on cached features.
    skip = len(lrs) // 10
    best = min(range(skip, len(lrs)), key=losses.__getitem__)
    return LRFinderResult(float(f"{lrs[best] / 10:.3g}"), lrs, losses)
