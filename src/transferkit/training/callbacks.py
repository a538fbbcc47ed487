"""Lightning callbacks of a run: the kept checkpoint, the history, gradual unfreezing, resumable state,
and the progress bar."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..checkpoint import save_checkpoint
from ..files import atomic_write
from ..model import TransferModel
from ..runs import write_history
from ..strategies import StrategySpec, apply_strategy


class StderrProgressBar(TQDMProgressBar):
    """Lightning's progress bar on stderr, where transferkit's own messages go: stdout keeps the result
    alone (the run directory), so ``RUN=$(transferkit train ...)`` holds a path, not the bar's lines."""

    def init_sanity_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):  # Lightning's bars write to sys.stdout as it is when made
            return super().init_sanity_tqdm()

    def init_train_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    def init_validation_tqdm(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A failed run's bars are closed as it fails: left to the garbage collector, one was drawn later,
        # over whatever the process showed next (a resumed run's --quiet output).
        for bar in (self._train_progress_bar, self._val_progress_bar):
            if bar is not None:
                bar.close()


class GradualUnfreezing(Callback):
    """Unfreezes one more layer group at each scheduled epoch; its state survives a resume.

    The trainable set is a function of the epoch alone, and the optimizer holds every group of the
    schedule from the start, so resuming mid-schedule restores the same optimizer layout.
    """

    def __init__(self, spec: StrategySpec) -> None:
        self.spec = spec
        self.unfrozen: list[str] = []
        self.events: list[dict[str, Any]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        groups = apply_strategy(pl_module.model, self.spec, epoch=trainer.current_epoch)
        added = [g for g in groups if g not in self.unfrozen]
        if added and self.unfrozen:
            self.events.append({"epoch": trainer.current_epoch, "unfrozen": added})
        self.unfrozen = groups

    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen": list(self.unfrozen), "events": list(self.events)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen = list(state_dict["unfrozen"])
        self.events = list(state_dict["events"])


class BestModelCheckpoint(Callback):
    """Writes the self-contained ``model.pt`` whenever ``metric`` (validation accuracy, or macro-F1 for
    imbalanced classes) improves; validation loss breaks ties.

    ``head_only`` (a frozen backbone, the head trained on cached features): every ``model.pt`` holds
    the same backbone, which is nearly all of its bytes (45 MB for a ResNet-18, 1.2 GB for a ViT-L),
    while a head epoch takes milliseconds. There the best head is kept (in memory, and in the rolling
    checkpoint that ``--resume`` reads), and ``model.pt`` is rewritten at an improvement only once
    ten times the last write's duration has passed since it (so writing takes at most a tenth of
    training), and at the end of training. A killed run keeps a ``model.pt`` that much behind at
    most, which ``--resume`` brings up to date.
    """

    def __init__(self, path: Path, extra: dict[str, Any], metric: str = "val_accuracy", head_only: bool = False) -> None:
        self.path = path
        self.extra = extra
        self.metric = metric
        self.head_only = head_only
        self.best: tuple[float, float] | None = None
        self.best_epoch = -1
        self.best_head: dict[str, torch.Tensor] | None = None  # head_only: the best epoch's head weights
        self.written_epoch = -1  # head_only: the epoch whose head model.pt holds
        self._next_write = 0.0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        score = (float(metrics[self.metric]), -float(metrics["val_loss"]))
        if self.best is not None and score <= self.best:
            return
        self.best, self.best_epoch = score, trainer.current_epoch
        if self.head_only:
            self.best_head = _head_state(pl_module.model)
            if time.perf_counter() >= self._next_write:
                self._write_best_head(trainer, pl_module.model)
            return
        # Every rank asks: under FSDP this gathers the full weights (a collective); else it is a plain read.
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            net = {k.removeprefix("model.net."): v for k, v in state.items() if k.startswith("model.net.")}
            save_checkpoint(pl_module.model, self.path, state_dict=net, epoch=trainer.current_epoch, **self.extra)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.head_only and self.best_head is not None and self.written_epoch != self.best_epoch:
            self._write_best_head(trainer, pl_module.model)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)  # an interrupted run keeps its best model.pt

    def _write_best_head(self, trainer: L.Trainer, model: TransferModel) -> None:
        assert self.best_head is not None
        if trainer.is_global_zero:  # the backbone is frozen: each rank's is the same, no gather needed
            started = time.perf_counter()
            net = {**model.net.state_dict(), **self.best_head}
            save_checkpoint(model, self.path, state_dict=net, epoch=self.best_epoch, **self.extra)
            self._next_write = started + 10 * (time.perf_counter() - started)
        self.written_epoch = self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"best": list(self.best) if self.best else None, "best_epoch": self.best_epoch}
        if self.head_only:
            state.update(best_head=self.best_head, written_epoch=self.written_epoch)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = tuple(state_dict["best"]) if state_dict["best"] else None  # type: ignore[assignment]
        self.best_epoch = state_dict["best_epoch"]
        self.best_head = state_dict.get("best_head")
        self.written_epoch = state_dict.get("written_epoch", self.best_epoch)


def _head_state(model: TransferModel) -> dict[str, torch.Tensor]:
    """A copy of the head's weights (and buffers), keyed as in the network's state_dict."""
    return {k: v.detach().clone() for k, v in model.net.state_dict().items() if model.record.is_head_key(k)}


class HistoryCSV(Callback):
    """One row per epoch in ``history.csv``: losses, accuracies, learning rate, what trained."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._start = time.perf_counter()
        self._lr: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        # Lightning steps epoch schedulers before on_train_epoch_end: read the LR this epoch used now.
        self._lr = trainer.optimizers[0].param_groups[-1]["lr"] if trainer.optimizers else None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        model: TransferModel = pl_module.model
        trainable, _ = model.parameter_counts()
        groups = sorted({g.name for g in model.groups for n, p in model.net.named_parameters()
                         if p.requires_grad and any(n == q or n.startswith(q + ".") for q in g.prefixes)},
                        key=[g.name for g in model.groups].index)  # fmt: skip
        row = {
            "epoch": trainer.current_epoch,
            "train_loss": _num(m.get("train_loss")),
            "train_accuracy": _num(m.get("train_accuracy")),
            "val_loss": _num(m.get("val_loss")),
            "val_accuracy": _num(m.get("val_accuracy")),
            "lr": self._lr,
            "trainable_params": trainable,
            "trainable_groups": " ".join(groups),
            "seconds": round(time.perf_counter() - self._start, 3),
            "val_macro_f1": _num(m.get("val_macro_f1")),
            "val_balanced_accuracy": _num(m.get("val_balanced_accuracy")),
        }
        self.rows.append(row)
        if trainer.is_global_zero:
            write_history(self.path, self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])


def _num(v: Any) -> float | None:
    return None if v is None else round(float(v), 6)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: a kill leaves the last good one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


class ResumableState(Callback):
    """What a resumed run needs beyond Lightning's own state: torch's global RNGs (dropout draws
    from the CPU's, or on a GPU from the GPU's) and how many passes the training sampler has made
    (it sets the data order)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        epoch = getattr(self.sampler, "epoch", 0)
        return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda, "sampler_epoch": epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch_rng"])
        cuda = state_dict.get("cuda_rng") or []
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        if self.sampler is not None:
            self.sampler.epoch = state_dict["sampler_epoch"]
