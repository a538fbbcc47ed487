"""Training: a LightningModule, a configured Trainer, and the run directory it fills."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .backbones import DEFAULT_BACKBONE, Preprocessing, explicit_preprocessing, load_backbone
from .checkpoint import CHECKPOINT_NAME, save_checkpoint
from .files import atomic_write, write_json
from .data import EpochSeededSampler, build_transform, discover, make_loader
from .errors import TransferkitError
from .features import cache_supported, extract_features
from .model import TransferModel
from .performance import batch_to, compile_in_place, pick_device, resolve_precision, to_fast_layout, uses_convolutions
from .strategies import STRATEGIES, StrategySpec, apply_strategy, param_groups, parse_group_lrs, parse_unfreeze

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "cosine", "onecycle")
LIGHTNING_PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}


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
    resolved_from: dict[str, Any] = field(default_factory=dict)  # the advice / LR finder behind auto choices

    def __post_init__(self) -> None:
        if isinstance(self.unfreeze, str):
            parsed = parse_unfreeze(self.unfreeze)
            self.unfreeze = parsed if isinstance(parsed, int) else list(parsed)
        if isinstance(self.group_lr, str):
            self.group_lr = parse_group_lrs(self.group_lr)
        if self.optimizer not in OPTIMIZERS:
            raise TransferkitError(f"unknown --optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise TransferkitError(f"unknown --scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if self.strategy not in (*STRATEGIES, "auto"):
            raise TransferkitError(
                f"unknown --strategy {self.strategy!r}; choose one of: {', '.join((*STRATEGIES, 'auto'))}"
            )
        if self.layer and self.strategy not in ("linear-probe", "auto"):
            raise TransferkitError("--layer applies to --strategy linear-probe (the other strategies train a head on the last layer)")
        if self.epochs < 1:
            raise TransferkitError("--epochs must be at least 1")
        if self.batch_size < 1:
            raise TransferkitError("--batch-size must be at least 1")
        if self.lr != "auto":
            try:
                self.lr = float(self.lr)
            except ValueError:
                raise TransferkitError(f"--lr must be a number or auto, got {self.lr!r}") from None
            if not self.lr > 0:
                raise TransferkitError("--lr must be positive")

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


# --------------------------------------------------------------------------- Lightning pieces


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
        self.train_accuracy = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes=n, average="micro")
        self.channels_last = uses_convolutions(model) and not head_only
        self.skipped_files: set[tuple[str, str]] = set()

    def forward(self, x: torch.Tensor) -> Any:
        return self.model.head_module(x) if self.head_only else self.model(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor | None:
        x, y = batch[0], batch[1]
        if len(batch) > 2:  # images that failed to decode, by name
            self.skipped_files.update((b.path, b.reason) for b in batch[2])
        if len(x) == 0:
            return None  # every image of the batch failed to decode
        out = self(batch_to(x, self.device, self.channels_last))
        if isinstance(out, tuple):  # Inception v3 in training: (logits, aux_logits)
            logits, aux = out
            loss = nn.functional.cross_entropy(logits, y) + self.spec.aux_weight * nn.functional.cross_entropy(aux, y)
        else:
            logits = out
            loss = nn.functional.cross_entropy(logits, y)
        metric = self.train_accuracy if stage == "train" else self.val_accuracy
        metric(logits.detach(), y)
        kwargs = {"on_step": False, "on_epoch": True, "batch_size": len(y), "sync_dist": True}
        self.log(f"{stage}_loss", loss.detach(), prog_bar=stage == "val", **kwargs)
        self.log(f"{stage}_accuracy", metric, prog_bar=True, **kwargs)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        groups = param_groups(self.model, self.spec)
        cfg = self.config
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        elif cfg.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return {"optimizer": opt, "lr_scheduler": self._scheduler(opt)} if cfg.scheduler != "none" else opt

    def _scheduler(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        cfg = self.config
        if cfg.scheduler == "step":
            return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma), "interval": "epoch"}
        if cfg.scheduler == "cosine":
            return {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs), "interval": "epoch"}
        total = int(self.trainer.estimated_stepping_batches)
        onecycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)
        return {"scheduler": onecycle, "interval": "step"}


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
    """Writes the self-contained ``model.pt`` whenever validation accuracy improves (loss breaks ties)."""

    def __init__(self, path: Path, extra: dict[str, Any]) -> None:
        self.path = path
        self.extra = extra
        self.best: tuple[float, float] | None = None
        self.best_epoch = -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        score = (float(metrics["val_accuracy"]), -float(metrics["val_loss"]))
        if self.best is None or score > self.best:
            self.best, self.best_epoch = score, trainer.current_epoch
            # Every rank asks: under FSDP this gathers the full weights (a collective); else it is a plain read.
            state = trainer.strategy.lightning_module_state_dict()
            if trainer.is_global_zero:
                net = {k.removeprefix("model.net."): v for k, v in state.items() if k.startswith("model.net.")}
                save_checkpoint(pl_module.model, self.path, state_dict=net, epoch=trainer.current_epoch, **self.extra)

    def state_dict(self) -> dict[str, Any]:
        return {"best": list(self.best) if self.best else None, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = tuple(state_dict["best"]) if state_dict["best"] else None  # type: ignore[assignment]
        self.best_epoch = state_dict["best_epoch"]


class HistoryCSV(Callback):
    """One row per epoch in ``history.csv``: losses, accuracies, learning rate, what trained."""

    FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "trainable_params",
              "trainable_groups", "seconds")  # fmt: skip

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


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HistoryCSV.FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


# --------------------------------------------------------------------------- run directory


def create_run_dir(config: TrainConfig) -> Path:
    """A new run directory; an existing one is never reused (that would overwrite a run)."""
    if config.out:
        run_dir = Path(config.out).expanduser()
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise TransferkitError(
                f"run directory {run_dir} already exists; choose another --out or remove it (runs are never overwritten)"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.runs_root) / f"{config.model.replace('/', '_')}-{config.strategy}-{stamp}"
    for i in range(1, 1000):
        candidate = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise TransferkitError(f"could not create a new run directory next to {base}")


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


# --------------------------------------------------------------------------- the API


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*TensorBoard.*", ".*num_nodes.*",
                    ".*is an invalid value.*", ".*Checkpoint directory.*exists and is not empty.*",
                    ".*tensorboardX.*", ".*in eval mode at the start of training.*", ".*Total length of `.*`.*"):  # fmt: skip
        warnings.filterwarnings("ignore", message=pattern)


def build_model(config: TrainConfig, class_names: list[str]) -> TransferModel:
    backbone = load_backbone(config.model, config.weights, preprocessing=_explicit_preprocessing(config))
    return TransferModel(backbone, class_names, _head_spec(config))


def _head_spec(config: TrainConfig) -> Any:
    from .heads import HeadSpec

    return HeadSpec.parse(config.head, dropout=config.head_dropout)


def _explicit_preprocessing(config: TrainConfig) -> Preprocessing | None:
    return explicit_preprocessing(config.model, config.mean, config.std, config.image_size)


def train(data: str | Path, **options: Any) -> TrainResult:
    """Train a classifier on an image folder; returns the run directory and its metrics.

    >>> result = train("data/flowers", model="resnet18", strategy="fine-tune", unfreeze=2, epochs=5)  # doctest: +SKIP
    >>> result.val_accuracy, result.run_dir
    """
    command = options.pop("_command", None)
    return run_training(TrainConfig(data=str(data), **options), command=command)


def run_training(config: TrainConfig, command: str | None = None) -> TrainResult:
    """A new run: resolve ``auto`` choices, create the run directory, train, evaluate, report."""
    quiet_lightning()
    started = time.time()
    if rank_zero_only.rank > 0:
        return _join_as_worker_rank(config, started)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not config.out:
        raise TransferkitError("a multi-process launch (torchrun, SLURM) needs --out RUN_DIR, so every rank finds the run")
    check_sharding(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    splits = discover(config.data, config.val_split, config.seed)
    if config.strategy == "auto":
        config.resolved_from["advice"] = _follow_advice(config)
    lr_finder = None
    if config.lr == "auto":
        lr_finder = find_lr(config, splits)
        config.lr = lr_finder.suggestion
        config.resolved_from["lr_finder"] = lr_finder.summary()
    model, spec = _model_and_strategy(config, splits)
    run_dir = create_run_dir(config)
    if lr_finder is not None:
        lr_finder.plot(run_dir / "lr_find.png")
    (run_dir / "command.txt").write_text((command or " ".join(sys.argv)) + "\n")
    write_json(run_dir / "config.json", config.to_dict())  # last: other ranks wait for it
    # Ranks that Lightning spawns re-run this command; this tells them which run to join.
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    return _fit(run_dir, config, splits, model, spec, started)


RUN_DIR_ENV = "TRANSFERKIT_RUN_DIR"


def training_device(config: TrainConfig) -> torch.device:
    # "gpu" is Lightning's word for whichever accelerator is there; pick_device finds it.
    return pick_device(config.accelerator if config.accelerator not in ("auto", "gpu") else "auto")


def check_sharding(config: TrainConfig) -> None:
    """FSDP shards a network's trained weights across GPUs: refuse it where it cannot run or means nothing."""
    if not config.dist.startswith("fsdp"):
        return
    device = training_device(config)
    if device.type != "cuda":
        raise TransferkitError(f"--dist {config.dist} needs CUDA GPUs (Lightning's FSDP does not run on a "
                               f"{device.type}); use --dist ddp")  # fmt: skip
    if config.strategy in ("feature-extract", "linear-probe"):
        raise TransferkitError(f"--dist {config.dist} shards the weights being trained, and --strategy "
                               f"{config.strategy} trains only a head: use --dist ddp")  # fmt: skip


def _join_as_worker_rank(config: TrainConfig, started: float) -> TrainResult:
    """A non-zero rank: train in rank 0's run directory, with its resolved configuration; write nothing."""
    run_dir = Path(os.environ.get(RUN_DIR_ENV) or config.out or "")
    if not str(run_dir):
        raise TransferkitError("a worker rank cannot find its run directory; launch with --out RUN_DIR")
    wait_for_file(run_dir / "config.json")
    resolved = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    L.seed_everything(resolved.seed, workers=True, verbose=False)
    splits = discover(resolved.data, resolved.val_split, resolved.seed)
    model, spec = _model_and_strategy(resolved, splits)
    return _fit(run_dir, resolved, splits, model, spec, started)


def wait_for_file(path: Path, timeout: float = 3600.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TransferkitError(f"gave up waiting for {path} from rank 0 after {timeout:.0f} s")
        time.sleep(0.2)


def resume_training(run_dir: str | Path, command: str | None = None) -> TrainResult:
    """Continue an interrupted run from its last checkpoint, with its own configuration.

    The epoch-seeded sampler, per-image augmentation seeds and the RNG state saved in the
    checkpoint make the resumed run reach the same result as an uninterrupted one.
    """
    quiet_lightning()
    run_dir = Path(run_dir).expanduser()
    last = run_dir / "checkpoints" / "last.ckpt"
    if not (run_dir / "config.json").is_file():
        raise TransferkitError(f"{run_dir} is not a transferkit run directory (no config.json); give the run to resume")
    if (run_dir / "metrics.json").is_file():
        raise TransferkitError(f"run {run_dir} already finished; start a new run instead of --resume")
    if not last.is_file():
        raise TransferkitError(f"run {run_dir} has no checkpoints/last.ckpt yet (killed in its first epoch); start it again")
    config = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    with open(run_dir / "command.txt", "a") as f:
        f.write((command or " ".join(sys.argv)) + "\n")
    started = time.time()
    L.seed_everything(config.seed, workers=True, verbose=False)
    splits = discover(config.data, config.val_split, config.seed)
    model, spec = _model_and_strategy(config, splits)
    if spec.name == "linear-probe":
        raise TransferkitError("a linear probe has no epochs to resume; start it again")
    return _fit(run_dir, config, splits, model, spec, started, ckpt_path=last)


def _model_and_strategy(config: TrainConfig, splits: Any) -> tuple[TransferModel, StrategySpec]:
    model = build_model(config, splits.class_names)
    spec = config.strategy_spec()
    apply_strategy(model, spec, epoch=0)
    param_groups(model, spec)  # validates --group-lr before anything is written
    return model, spec


def _fit(
    run_dir: Path,
    config: TrainConfig,
    splits: Any,
    model: TransferModel,
    spec: StrategySpec,
    started: float,
    ckpt_path: Path | None = None,
) -> TrainResult:
    trainable, total = model.parameter_counts()
    device = training_device(config)
    precision = resolve_precision(config.precision, device, model, training=True)
    extra = {
        "strategy": spec.to_dict(),
        # Resolved where the checkpoint runs: bf16 is fast only on CPUs with native bf16.
        "inference_precision": config.precision,
        "train_config": config.to_dict(),
        **config.resolved_from,
    }
    model.record = model.record.with_extra(**extra)
    if spec.name == "linear-probe":
        return _run_linear_probe(model, splits, config, run_dir, device, extra, started)
    learner, train_loader, val_loader, feature_info = _learner_and_loaders(model, spec, splits, config, device, run_dir)
    if feature_info:
        precision = "32"  # the head alone is tiny; its features were computed at inference precision
    history = HistoryCSV(run_dir / "history.csv")
    best = BestModelCheckpoint(run_dir / CHECKPOINT_NAME, extra)
    # One rolling checkpoint, rewritten (atomically) at every epoch end: what --resume continues from.
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False)
    participation = Participation()
    callbacks: list[Callback] = [history, best, last, ResumableState(train_loader.sampler), participation]
    gradual = GradualUnfreezing(spec) if spec.name == "gradual" else None
    if gradual:
        callbacks.append(gradual)
    if config.patience:
        callbacks.append(EarlyStopping("val_accuracy", mode="max", patience=config.patience))
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=device.type if config.accelerator == "auto" else config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.dist,
        precision=LIGHTNING_PRECISION[precision],
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=_tensorboard_logger(run_dir),
        default_root_dir=str(run_dir),
        enable_progress_bar=not config.quiet,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    if not config.quiet:
        _print(f"{config.model} ({model.record.weights}) · {spec.name} · {len(splits.class_names)} classes · "
               f"{len(splits.train)} train / {len(splits.val)} val images · trainable {trainable:,} of {total:,} "
               f"parameters · precision {precision}" + (f" · resuming from {ckpt_path}" if ckpt_path else ""))  # fmt: skip
    to_fast_layout(model)
    trainer.fit(learner, train_loader, val_loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
    if not trainer.is_global_zero:  # metrics, checkpoint and report are rank 0's
        return TrainResult(run_dir=run_dir, metrics={}, history=history.rows)
    _add_skipped(splits, learner.skipped_files)
    return finish_run(run_dir, config, splits, history.rows, {
        "strategy": spec.name,
        "trainable_params": trainable,
        "total_params": total,
        "precision": precision,
        "best_epoch": best.best_epoch,
        "unfreeze_events": gradual.events if gradual else [],
        "world_size": trainer.world_size,
        "train_batches_per_rank": participation.batches_per_rank,
        **feature_info,
        **config.resolved_from,
        "train_seconds": round(time.time() - started, 2),
    }, started)  # fmt: skip


class Participation(Callback):
    """Counts each rank's training batches and gathers them on rank 0: proof that every rank trained."""

    def __init__(self) -> None:
        self.batches = 0
        self.batches_per_rank: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.batches += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gathered = pl_module.all_gather(torch.tensor([self.batches], device=pl_module.device))
        self.batches_per_rank = [int(v) for v in gathered.flatten().tolist()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: a kill leaves the last good one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


class ResumableState(Callback):
    """What a resumed run needs beyond Lightning's own state: torch's global RNG (dropout draws
    from it) and how many passes the training sampler has made (it sets the data order)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def state_dict(self) -> dict[str, Any]:
        return {"torch_rng": torch.get_rng_state(), "sampler_epoch": getattr(self.sampler, "epoch", 0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch_rng"])
        if self.sampler is not None:
            self.sampler.epoch = state_dict["sampler_epoch"]


def _learner_and_loaders(
    model: TransferModel,
    spec: StrategySpec,
    splits: Any,
    config: TrainConfig,
    device: torch.device,
    run_dir: Path | None = None,
) -> tuple[TransferLearner, Any, Any, dict[str, Any]]:
    """The learner and its loaders: over cached features when only the head trains, else over images."""
    if spec.name == "feature-extract" and config.cache and cache_supported(model):
        if config.compile:
            warnings.warn("--compile: not applied, only the head trains (on cached features)", stacklevel=2)
        train_loader, val_loader, feature_info = _feature_loaders(model, splits, config, device, run_dir)
        return TransferLearner(model, spec, config, head_only=True), train_loader, val_loader, feature_info
    prep = model.preprocessing
    loading = {"num_workers": config.num_workers, "device_type": device.type}
    train_loader = make_loader(splits.train, build_transform(prep, config.augment), config.batch_size,
                               shuffle=True, seed=config.seed, **loading)  # fmt: skip
    val_loader = make_loader(splits.val, build_transform(prep, "none"), config.batch_size, **loading)
    if config.compile:
        compile_in_place(model, device)
    return TransferLearner(model, spec, config), train_loader, val_loader, {}


@dataclass
class LRFinderResult:
    suggestion: float
    lrs: list[float]
    losses: list[float]

    def summary(self) -> dict[str, Any]:
        return {"suggestion": self.suggestion, "steps": len(self.lrs)}

    def plot(self, path: Path) -> Path:
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
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        return path


def find_lr(config: TrainConfig, splits: Any = None, num_training: int = 100) -> LRFinderResult:
    """Lightning's LR range test on the configured model and strategy; suggests the head's LR."""
    import tempfile

    from lightning.pytorch.tuner import Tuner

    quiet_lightning()
    L.seed_everything(config.seed, workers=True, verbose=False)
    splits = splits or discover(config.data, config.val_split, config.seed)
    probe = TrainConfig(**{**config.to_dict(), "lr": 1e-3, "scheduler": "none"})
    if probe.strategy in ("auto", "linear-probe"):
        raise TransferkitError("the LR finder needs a gradient-trained strategy: feature-extract, fine-tune, full or gradual")
    model = build_model(probe, splits.class_names)
    spec = probe.strategy_spec()
    apply_strategy(model, spec)
    device = training_device(config)
    learner, train_loader, _, _ = _learner_and_loaders(model, spec, splits, probe, device)
    to_fast_layout(model)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(accelerator=device.type, devices=1, logger=False, enable_checkpointing=False, max_epochs=-1,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
                            precision=LIGHTNING_PRECISION[resolve_precision(config.precision, device, model, True)])  # fmt: skip
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


def _feature_loaders(
    model: TransferModel, splits: Any, config: TrainConfig, device: torch.device, run_dir: Path | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """Loaders over cached backbone features: the backbone runs once per image (and view), not per epoch.

    In a multi-process run, rank 0 computes and caches the features; the other ranks wait for it and
    read them back, so nothing is computed or written twice.
    """
    from torch.utils.data import DataLoader, TensorDataset

    ready = run_dir / ".features-ready" if run_dir is not None else None
    if ready is not None and rank_zero_only.rank > 0:
        wait_for_file(ready)
    started = time.perf_counter()
    precision = resolve_precision(config.precision, device)
    common = {"cache_dir": Path(config.cache_dir) if config.cache_dir else None, "batch_size": config.batch_size,
              "num_workers": config.num_workers, "device": device, "precision": precision}  # fmt: skip
    augment = config.augment if config.feature_views > 1 else "none"
    train = extract_features(model, splits.train, augment=augment, views=config.feature_views, **common)
    val = extract_features(model, splits.val, **common)
    if ready is not None and rank_zero_only.rank == 0 and config.cache:
        ready.touch()
    _add_skipped(splits, [(p, "cannot decode") for p in train.skipped + val.skipped])
    sampler = EpochSeededSampler(len(train.labels), config.seed, with_aug_seeds=False)
    train_loader = DataLoader(TensorDataset(train.features, train.labels), batch_size=config.batch_size, sampler=sampler)
    val_loader = DataLoader(TensorDataset(val.features, val.labels), batch_size=max(256, config.batch_size))
    info = {
        "feature_cache": {"hits": train.hits + val.hits, "misses": train.misses + val.misses,
                          "views": config.feature_views, "augment": augment, "precision": precision},
        "feature_seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    if not config.quiet:
        _print(f"features: {info['feature_cache']['misses']} computed, {info['feature_cache']['hits']} from cache "
               f"in {info['feature_seconds']} s")  # fmt: skip
    return train_loader, val_loader, info


def _follow_advice(config: TrainConfig) -> dict[str, Any]:
    """Resolve ``--strategy auto`` in place; returns the advice to record in the run."""
    from .advice import advise

    advice = advise(config.data, config.model, config.weights, seed=config.seed, val_split=config.val_split,
                    cache_dir=Path(config.cache_dir) if config.cache_dir else None,
                    preprocessing=_explicit_preprocessing(config))  # fmt: skip
    config.strategy = advice.strategy
    for key, value in advice.options.items():
        setattr(config, key, value)
    if not config.quiet:
        _print(advice.text())
    return advice.to_dict()


def _run_linear_probe(
    model: TransferModel,
    splits: Any,
    config: TrainConfig,
    run_dir: Path,
    device: torch.device,
    extra: dict[str, Any],
    started: float,
) -> TrainResult:
    """Fit a scikit-learn linear classifier on cached features of ``config.layer``; save it as a run."""
    from .probes import fit_linear_probe

    precision = resolve_precision(config.precision, device)
    common = {"layer": config.layer, "cache_dir": Path(config.cache_dir) if config.cache_dir else None,
              "use_cache": config.cache, "batch_size": config.batch_size, "num_workers": config.num_workers,
              "device": device, "precision": precision}  # fmt: skip
    t0 = time.perf_counter()
    train = extract_features(model, splits.train, **common)
    feature_seconds = time.perf_counter() - t0
    fit = fit_linear_probe(train.features, train.labels, len(splits.class_names), config.classifier, config.seed)
    model.attach_probe(fit.probe, config.layer)
    probe_info = {"classifier": fit.classifier, "C": fit.C, "cv_accuracy": fit.cv_accuracy, "folds": fit.folds,
                  "layer": config.layer or "head-input"}  # fmt: skip
    save_checkpoint(model, run_dir / CHECKPOINT_NAME, epoch=0, linear_probe=probe_info, **extra)
    from .checkpoint import load_checkpoint
    from .inference import evaluate_samples

    val = evaluate_samples(load_checkpoint(run_dir / CHECKPOINT_NAME), splits.val, config.batch_size, config.num_workers)
    rows = [{"epoch": 0, "train_accuracy": round(fit.cv_accuracy, 6), "val_loss": round(val.loss, 6),
             "val_accuracy": round(val.accuracy, 6), "trainable_params": sum(p.numel() for p in fit.probe.parameters()),
             "trainable_groups": "probe", "seconds": round(time.perf_counter() - t0, 3)}]  # fmt: skip
    write_history(run_dir / "history.csv", rows)
    if not config.quiet:
        _print(f"linear probe ({fit.classifier}, C={fit.C:g}) on {probe_info['layer']}: "
               f"{fit.folds}-fold CV accuracy {fit.cv_accuracy:.4f}")  # fmt: skip
    return finish_run(run_dir, config, splits, rows, {
        "strategy": "linear-probe", "linear_probe": probe_info, "precision": precision,
        "trainable_params": rows[0]["trainable_params"], "total_params": model.parameter_counts()[1],
        "best_epoch": 0, "feature_cache": {"hits": train.hits, "misses": train.misses},
        "feature_seconds": round(feature_seconds, 2), "train_seconds": round(time.time() - started, 2),
        **config.resolved_from,
    }, started, val=val)  # fmt: skip


def _add_skipped(splits: Any, found: Any) -> None:
    """Record files that failed to decode during training or evaluation, once each."""
    known = {p for p, _ in splits.skipped}
    for path, reason in sorted(found):
        if path not in known:
            splits.skipped.append((path, reason))
            known.add(path)


def finish_run(
    run_dir: Path,
    config: TrainConfig,
    splits: Any,
    history: list[dict[str, Any]],
    info: dict[str, Any],
    started: float,
    val: Any = None,
) -> TrainResult:
    """Evaluate the best checkpoint exactly as ``transferkit evaluate`` would; write metrics.json."""
    from .checkpoint import load_checkpoint
    from .inference import evaluate_samples

    model = load_checkpoint(run_dir / CHECKPOINT_NAME)
    val = val or evaluate_samples(model, splits.val, config.batch_size, config.num_workers)
    _add_skipped(splits, val.skipped)
    metrics: dict[str, Any] = {
        "val_accuracy": val.accuracy,
        "val_loss": val.loss,
        "evaluation_precision": val.precision,  # what produced the val_* and test_* numbers on this machine
        "val_per_class": val.per_class,
        "val_confusion_matrix": val.confusion_matrix,
        "model": config.model,
        "weights": model.record.weights,
        "class_names": splits.class_names,
        "data": splits.summary(),
        "skipped_files": len(splits.skipped),
        "epochs_run": len(history),
        **info,
    }
    if splits.test:
        test = evaluate_samples(model, splits.test, config.batch_size, config.num_workers)
        metrics.update(test_accuracy=test.accuracy, test_loss=test.loss, test_per_class=test.per_class)
    metrics["total_seconds"] = round(time.time() - started, 2)
    write_json(run_dir / "metrics.json", metrics)
    from .reports import predictions_of, write_report

    write_report(run_dir, splits=splits, val_predictions=predictions_of(val))
    if not config.quiet:
        _print(f"val_accuracy {val.accuracy:.4f} (best epoch {info.get('best_epoch')}) · run directory: {run_dir}")
    return TrainResult(run_dir=run_dir, metrics=metrics, history=history)


def _tensorboard_logger(run_dir: Path) -> Any:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return False
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(str(run_dir), name="tensorboard", version="")


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

