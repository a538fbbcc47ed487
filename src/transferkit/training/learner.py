"""The LightningModule: cross-entropy training of a TransferModel, on images or on cached features."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelExactMatch,
    MultilabelF1Score,
)

from ..balance import Balance, balanced_accuracy
from ..errors import TransferkitError
from ..model import TransferModel
from ..performance import batch_to, trains_channels_last, uses_convolutions
from ..strategies import StrategySpec, param_groups
from .config import TrainConfig

FROZEN_BACKBONE_KEY = "transferkit_frozen_backbone_digest"



class BalancedAccuracy(MulticlassConfusionMatrix):
    """:func:`balanced_accuracy` of the epoch, as evaluation computes it (torchmetrics' macro accuracy
    counts a class the validation images lack, but which was predicted, as a recall of 0)."""

    def compute(self) -> torch.Tensor:
        return torch.tensor(balanced_accuracy(super().compute()))

class TransferLearner(L.LightningModule):
    """Cross-entropy training of a :class:`TransferModel` (plus Inception's aux loss)."""

    def __init__(self, model: TransferModel, spec: StrategySpec, config: TrainConfig, head_only: bool = False) -> None:
        super().__init__()
        self.model = model
        # head_only: batches are cached backbone features, and only the head runs.
        self.head_only = head_only
        self.spec = spec
        self.config = config
        n = len(model.class_names)
        self.multi_label = model.multi_label
        if self.multi_label:  # accuracy: exact match (every label of an image right), as in metrics.json
            accuracy = functools.partial(MultilabelAccuracy, num_labels=n)
            f1 = functools.partial(MultilabelF1Score, num_labels=n)
            self.train_accuracy: Metric = MultilabelExactMatch(num_labels=n)
            self.val_accuracy: Metric = MultilabelExactMatch(num_labels=n)
        else:
            accuracy = functools.partial(MulticlassAccuracy, num_classes=n)
            f1 = functools.partial(MulticlassF1Score, num_classes=n)
            self.train_accuracy = accuracy(average="micro")
            self.val_accuracy = accuracy(average="micro")
        # For imbalanced classes (balance.py) and multi-label data: the numbers that choose the best epoch there.
        self.val_macro_f1 = f1(average="macro")
        self.val_balanced_accuracy = MultilabelAccuracy(num_labels=n, average="macro") if self.multi_label \
            else BalancedAccuracy(num_classes=n)  # fmt: skip
        balance = config.resolved_from.get("balance")
        weights = Balance.from_dict(balance).class_weights() if balance else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.convolutional = uses_convolutions(model) and not head_only
        self.skipped_files: set[tuple[str, str]] = set()
        self._trained_images = 0  # this epoch's, on this rank
        self._untrained: set[tuple[str, str]] = set()  # this epoch's training files that did not decode
        self._frozen_digest: str | None = None
        # Set by the LR finder: each group's LR as a multiple of --lr (or fixed by --group-lr), which
        # Lightning's range test would otherwise sweep at one LR for all (layer3 at the head's, not a
        # hundredth of it).
        self.lr_range_test = False
        self._lr_sweep: list[tuple[float, float | None]] = []

    def forward(self, x: torch.Tensor) -> Any:
        return self.model.head_module(x) if self.head_only else self.model(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor | None:
        x, y = batch[0], batch[1]
        if len(batch) > 2:  # images that failed to decode, by name
            self.skipped_files.update((b.path, b.reason) for b in batch[2])
            if stage == "train":
                self._untrained.update((b.path, b.reason) for b in batch[2])
        if len(x) == 0:
            return None  # every image of the batch failed to decode
        if stage == "train":
            self._trained_images += len(x)
        channels_last = self.convolutional and trains_channels_last(self.device, self.config.compile)
        out = self(batch_to(x, self.device, channels_last))
        if isinstance(out, tuple):  # Inception v3 in training: (logits, aux_logits)
            logits, aux = out
            loss = self._loss(logits, y, stage) + self.spec.aux_weight * self._loss(aux, y, stage)
        else:
            logits = out
            loss = self._loss(logits, y, stage)
        # Probabilities for multi-label metrics: given logits that all lie in [0, 1] (a small batch),
        # torchmetrics would take them for probabilities and skip the sigmoid.
        scores = logits.detach().float().sigmoid() if self.multi_label else logits.detach()
        metric = self.train_accuracy if stage == "train" else self.val_accuracy
        metric(scores, y)
        kwargs = {"on_step": False, "on_epoch": True, "batch_size": len(y), "sync_dist": True}
        self.log(f"{stage}_loss", loss.detach(), prog_bar=stage == "val", **kwargs)
        self.log(f"{stage}_accuracy", metric, prog_bar=True, **kwargs)
        if stage == "val":
            for name in ("val_macro_f1", "val_balanced_accuracy"):
                getattr(self, name)(scores, y)
                self.log(name, getattr(self, name), **kwargs)
        return loss

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        if self.multi_label:  # one yes/no per class
            return nn.functional.binary_cross_entropy_with_logits(logits.float(), y.float())
        # Class weights correct training only: the validation loss stays the plain, comparable one.
        weight = self.class_weights if stage == "train" else None
        return nn.functional.cross_entropy(logits, y, weight=weight)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only the head trains on cached features: the rolling checkpoint written every epoch keeps
        # the head alone (kilobytes instead of the whole backbone) and the frozen backbone's digest.
        if self.head_only:
            from ..features import weights_digest

            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self._is_head_key(k)}
            if self._frozen_digest is None:  # the backbone is frozen: hashing it once is enough
                self._frozen_digest = weights_digest(self.model)
            checkpoint[FROZEN_BACKBONE_KEY] = self._frozen_digest

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if FROZEN_BACKBONE_KEY not in checkpoint:
            return
        from ..features import weights_digest

        if checkpoint[FROZEN_BACKBONE_KEY] != weights_digest(self.model):
            raise TransferkitError("--resume: the backbone built now differs from the one this run's head was trained "
                                   "on (its weights changed); start a new run instead")  # fmt: skip
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}

    def _is_head_key(self, key: str) -> bool:
        return key.startswith("model.net.") and self.model.record.is_head_key(key.removeprefix("model.net."))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        # An epoch's last batch of one image: BatchNorm in training mode cannot normalise a single value
        # per channel (ResNet's 1x1 maps at 32 px), so it normalises that image by its running statistics.
        # The step is taken all the same (a skipped step is an error under DDP, and the image counts).
        if len(batch[0]) != 1:  # first: the walk over modules below would cost every step of a long epoch
            return self._step(batch, "train")
        training = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        for m in training:
            m.eval()
        try:
            return self._step(batch, "train")
        finally:
            for m in training:
                m.train()

    def on_train_epoch_start(self) -> None:
        self._trained_images, self._untrained = 0, set()

    def on_validation_epoch_start(self) -> None:
        """Stop a training none of whose images decoded this epoch (on any rank), before its checkpoints say
        it trained: every batch would have been skipped."""
        if self.trainer.state.fn != "fit" or self.trainer.sanity_checking:
            return
        trained = self.trainer.strategy.reduce(torch.tensor(float(self._trained_images), device=self.device), None,
                                               reduce_op="sum")  # fmt: skip
        if float(trained) == 0:
            path, reason = min(self._untrained) if self._untrained else ("", "")
            example = f", e.g. {path}: {reason}" if path else ""
            raise TransferkitError(f"no training image could be decoded in epoch {self.current_epoch} "
                                   f"({len(self._untrained)} skipped{example}); fix or replace them")  # fmt: skip

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        cfg = self.config
        groups = without_decay_on_norms_and_biases(param_groups(self.model, self.spec), cfg.weight_decay)
        self._lr_sweep = [(g["lr"] / cfg.lr, g["lr"] if g["name"].partition("/")[0] in self.spec.group_lrs else None)
                          for g in groups]  # fmt: skip
        opt = make_optimizer(groups, cfg, cfg.lr)
        made = make_scheduler(opt, cfg, lambda: int(self.trainer.estimated_stepping_batches))
        return opt if made is None else {"optimizer": opt, "lr_scheduler": {"scheduler": made[0], "interval": made[1]}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.lr_range_test:  # the range test's scheduler sets every group to the swept LR before each step
            for group, (ratio, fixed) in zip(optimizer.param_groups, self._lr_sweep, strict=True):
                group["lr"] = fixed if fixed is not None else group["lr"] * ratio


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """``--optimizer`` over ``groups`` (each may carry its own LR), at ``lr`` where a group has none."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    return (torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW)(groups, lr=lr)


def make_scheduler(
    opt: torch.optim.Optimizer, config: TrainConfig, total_steps: Callable[[], int]
) -> tuple[torch.optim.lr_scheduler.LRScheduler, str] | None:
    """``--scheduler`` for ``opt`` and whether it steps each "epoch" or each "step" (``total_steps()`` of
    them, read for onecycle alone); None for ``none``."""
    if config.scheduler == "none":
        return None
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, config.step_size, config.gamma), "epoch"
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs), "epoch"
    max_lr = [g["lr"] for g in opt.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps()), "step"


def without_decay_on_norms_and_biases(groups: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Each LR group split in two: weights decay, biases and normalisation parameters do not.

    Decaying a norm's scale or a bias pulls it towards zero, which no regulariser means to do
    (timm's ``param_groups_weight_decay`` and torchvision's references follow the same rule:
    parameters with fewer than two dimensions are exempt).
    """
    split = []
    for group in groups:
        params = group["params"]
        for suffix, chosen, decay in (("", [p for p in params if p.ndim > 1], weight_decay),
                                      ("/no_decay", [p for p in params if p.ndim <= 1], 0.0)):  # fmt: skip
            if chosen:
                split.append({**group, "name": group["name"] + suffix, "params": chosen, "weight_decay": decay})
    return split
