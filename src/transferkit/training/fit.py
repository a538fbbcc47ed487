"""Training a model into its run directory: the Trainer, its loaders (images or cached features), the
linear probe, and the ranks of a multi-process launch. What comes after (the final evaluation,
metrics.json, the report) is the caller's: :mod:`transferkit.workflow`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ..backbones import Preprocessing, explicit_preprocessing, load_backbone
from ..balance import BalancedSampler
from ..checkpoint import CHECKPOINT_NAME, save_checkpoint
from ..data import EpochSeededSampler, ImageFolderSplits, build_transform, make_loader
from ..errors import TransferkitError
from ..features import cache_supported, extract_features
from ..heads import HeadSpec
from ..model import TransferModel
from ..performance import compile_in_place, pick_device, resolve_precision, to_fast_layout, trains_channels_last
from ..runs import write_history
from ..strategies import StrategySpec, apply_strategy, param_groups
from .callbacks import (
    AtomicCheckpointIO,
    BestModelCheckpoint,
    GradualUnfreezing,
    HistoryCSV,
    ResumableState,
    StderrProgressBar,
)
from .config import LIGHTNING_PRECISION, TrainConfig
from .feature_data import FeatureData
from .loggers import build_loggers
from .learner import TransferLearner

# Ranks that Lightning spawns re-run the command; this tells them which run directory to join.
RUN_DIR_ENV = "TRANSFERKIT_RUN_DIR"


@dataclass
class Fitted:
    """What training left in the run directory, for the caller to evaluate and report."""

    run_dir: Path
    history: list[dict[str, Any]]
    info: dict[str, Any]  # strategy, parameters, precision, best epoch, feature cache, seconds: for metrics.json
    global_zero: bool = True  # False on the other ranks of a multi-process run, which write nothing
    loggers: list[Any] = field(default_factory=list)  # --logger's, for the final metrics and files


def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*TensorBoard.*", ".*num_nodes.*",
                    ".*is an invalid value.*", ".*Checkpoint directory.*exists and is not empty.*",
                    ".*tensorboardX.*", ".*in eval mode at the start of training.*", ".*Total length of `.*`.*"):  # fmt: skip
        warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def _interrupts_as_keyboard_interrupt(trainer: L.Trainer) -> Iterator[None]:
    """Ctrl+C stays a KeyboardInterrupt: Lightning's graceful shutdown (the checkpoint callbacks' exception
    hooks run) ends in ``sys.exit(1)`` with Ctrl+C ignored from then on, which would end a notebook's
    kernel cell as an exit and the command silently with status 1."""
    try:
        yield
    except SystemExit:
        if not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt from None


def explicit_preprocessing_of(config: TrainConfig) -> Preprocessing | None:
    return explicit_preprocessing(config.model, config.mean, config.std, config.image_size)


def build_model(config: TrainConfig, class_names: list[str]) -> TransferModel:
    backbone = load_backbone(config.model, config.weights, preprocessing=explicit_preprocessing_of(config))
    return TransferModel(backbone, class_names, HeadSpec.parse(config.head, dropout=config.head_dropout))


def model_and_strategy(config: TrainConfig, splits: ImageFolderSplits) -> tuple[TransferModel, StrategySpec]:
    model = build_model(config, splits.class_names)
    if splits.multi_label:
        model.record = model.record.with_extra(multi_label=True)
    spec = config.strategy_spec()
    apply_strategy(model, spec, epoch=0)
    param_groups(model, spec)  # validates --group-lr before anything is written
    _check_auxiliary_input_size(model, spec, cached=config.cache)
    return model, spec


# Inception v3's auxiliary classifier pools a 5x5 window of 3 from Mixed_6e's map, then convolves it
# 5x5: below 299-pixel inputs that map is too small, and the first training step would fail.
AUXILIARY_MIN_IMAGE_SIZE = 299


def _check_auxiliary_input_size(model: TransferModel, spec: StrategySpec, cached: bool = True) -> None:
    """The network runs in training mode (its auxiliary classifier too) on images, not cached features."""
    has_auxiliary = getattr(model.net, "aux_logits", False) and getattr(model.net, "AuxLogits", None) is not None
    size = model.preprocessing.image_size
    on_images = spec.name in ("fine-tune", "full", "gradual") or (spec.name == "feature-extract" and not cached)
    if has_auxiliary and on_images and size < AUXILIARY_MIN_IMAGE_SIZE:
        instead = "leave out --no-cache" if spec.name == "feature-extract" else "--strategy feature-extract"
        raise TransferkitError(f"--image-size {size}: {model.record.backbone}'s auxiliary classifier trains on inputs "
                               f"of at least {AUXILIARY_MIN_IMAGE_SIZE} pixels; give --image-size "
                               f"{AUXILIARY_MIN_IMAGE_SIZE} or more, or {instead}")  # fmt: skip


def training_device(config: TrainConfig) -> torch.device:
    # "gpu" is Lightning's word for whichever accelerator is there; pick_device finds it.
    return pick_device(config.accelerator if config.accelerator not in ("auto", "gpu") else "auto")


def check_launch(config: TrainConfig) -> None:
    """Refuse, before a run directory exists, an accelerator this machine lacks, a distributed strategy
    Lightning does not know (Lightning would raise its traceback once training starts), or fp16 training
    on a CPU."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "gpu": pick_device("auto").type != "cpu"}  # fmt: skip
    if not available.get(config.accelerator, True):
        raise TransferkitError(f"--accelerator {config.accelerator}: this machine has no such device; "
                               f"use --accelerator auto or cpu")  # fmt: skip
    if training_device(config).type == "cpu" and not (str(config.devices) == "auto" or str(config.devices).isdigit()):
        # Lightning's CPU accelerator takes a count of processes, not -1 or GPU indices.
        raise TransferkitError(f"--devices {config.devices}: on a CPU give a count of processes (--devices 2) or "
                               f"auto")  # fmt: skip
    if config.strategy != "linear-probe" and not (config.strategy == "feature-extract" and config.cache):
        device = training_device(config)
        lightning_precision(resolve_precision(config.precision, device), device)  # a network trains at it
    known = ("auto", *StrategyRegistry.available_strategies())
    if config.dist not in known:
        raise TransferkitError(f"unknown --dist {config.dist!r}; choose one of: {', '.join(known)}")
    if config.dist.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise TransferkitError(f"--dist {config.dist} needs the deepspeed package: pip install deepspeed, or use "
                               f"--dist ddp")  # fmt: skip
    check_sharding(config)


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


def lightning_precision(precision: str, device: torch.device) -> str:
    """Lightning's name for the precision a network trains at. fp16 training on a CPU is refused: Lightning
    trains bf16 there instead (saying so in a warning), while the run would record fp16."""
    if precision == "16" and device.type == "cpu":
        raise TransferkitError("--precision 16: fp16 training needs a GPU; on a CPU use --precision bf16 or 32")
    return LIGHTNING_PRECISION[precision]


def training_precision(requested: str, device: torch.device, model: TransferModel, spec: StrategySpec,
                       epochs: int) -> str:  # fmt: skip
    """The precision the run trains at, judged on every group that trains in it: gradual unfreezing's
    whole schedule, not its first epoch's head alone (a depthwise group unfrozen later trains fp32)."""
    if spec.name != "gradual":
        return resolve_precision(requested, device, model, training=True)
    apply_strategy(model, spec, epoch=max(epochs - 1, 0))
    try:
        return resolve_precision(requested, device, model, training=True)
    finally:
        apply_strategy(model, spec, epoch=0)


def wait_for_file(path: Path, timeout: float = 3600.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TransferkitError(f"gave up waiting for {path} from rank 0 after {timeout:.0f} s")
        time.sleep(0.2)


def join_as_worker_rank(config: TrainConfig, callbacks: list[Callback] = ()) -> Fitted:  # type: ignore[assignment]
    """A non-zero rank: train in rank 0's run directory, with its resolved configuration; write nothing."""
    import json

    from ..data import discover_for

    run_dir = Path(os.environ.get(RUN_DIR_ENV) or config.out or "")
    if not str(run_dir):
        raise TransferkitError("a worker rank cannot find its run directory; launch with --out RUN_DIR")
    wait_for_file(run_dir / "config.json")
    resolved = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    L.seed_everything(resolved.seed, workers=True, verbose=False)
    splits = discover_for(resolved)
    model, spec = model_and_strategy(resolved, splits)
    return fit(run_dir, resolved, splits, model, spec, callbacks=callbacks)


def fit(
    run_dir: Path,
    config: TrainConfig,
    splits: ImageFolderSplits,
    model: TransferModel,
    spec: StrategySpec,
    ckpt_path: Path | None = None,
    callbacks: list[Callback] = (),  # type: ignore[assignment]
) -> Fitted:
    """Train ``model`` by ``spec``; writes model.pt (best epoch), history.csv and Lightning's last.ckpt."""
    started = time.time()
    trainable, total = model.parameter_counts()
    device = training_device(config)
    precision = training_precision(config.precision, device, model, spec, config.epochs)
    extra = {
        "strategy": spec.to_dict(),
        # Resolved where the checkpoint runs: bf16 is fast only on CPUs with native bf16.
        "inference_precision": config.precision,
        "train_config": config.to_dict(),
        **config.resolved_from,
    }
    model.record = model.record.with_extra(**extra)
    loggers = build_loggers(config.loggers, run_dir, config.to_dict(), global_zero=rank_zero_only.rank == 0)
    if spec.name == "linear-probe":
        probed = fit_linear_probe_run(model, splits, config, run_dir, device, extra)
        probed.loggers = loggers
        return probed
    data = feature_data(model, spec, splits, config, device)
    if data is not None:  # each rank extracts its share of the features in the data's setup
        learner, loaders, sampler = TransferLearner(model, spec, config, head_only=True), {"datamodule": data}, data
        precision = "32"  # the head alone is tiny; its features were computed at inference precision
    else:
        learner, train_loader, val_loader, _ = learner_and_loaders(model, spec, splits, config, device, run_dir)
        loaders, sampler = {"train_dataloaders": train_loader, "val_dataloaders": val_loader}, train_loader.sampler
    history = HistoryCSV(run_dir / "history.csv")
    selection_metric = (config.resolved_from.get("balance") or {}).get("selection_metric", "val_accuracy")
    # The head alone trains on cached features: model.pt need not be rewritten with its whole frozen backbone at
    # every improvement (not under FSDP, whose sharded weights only a collective gathers).
    head_only = data is not None and "fsdp" not in str(config.dist).lower()
    best = BestModelCheckpoint(run_dir / CHECKPOINT_NAME, extra, selection_metric, head_only=head_only)
    # One rolling checkpoint, rewritten (atomically) at every epoch end: what --resume continues from.
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False)
    gradual = GradualUnfreezing(spec) if spec.name == "gradual" else None
    own: list[Callback] = [history, best, last, ResumableState(sampler), *([gradual] if gradual else [])]
    if config.patience:
        own.append(EarlyStopping(selection_metric, mode="max", patience=config.patience))
    if not config.quiet and not any(isinstance(c, ProgressBar) for c in callbacks):
        own.append(StderrProgressBar())
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=device.type if config.accelerator == "auto" else config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.dist,
        precision=lightning_precision(precision, device),
        callbacks=[*own, *callbacks],
        plugins=[AtomicCheckpointIO()],
        logger=loggers or False,
        default_root_dir=str(run_dir),
        enable_progress_bar=not config.quiet,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    if not config.quiet:
        say(f"{config.model} ({model.record.weights}) · {spec.name} · {len(splits.class_names)} classes · "
            f"{len(splits.train)} train / {len(splits.val)} val images · trainable {trainable:,} of {total:,} "
            f"parameters · precision {precision}" + (f" · resuming from {ckpt_path}" if ckpt_path else ""))  # fmt: skip
    if trains_channels_last(device, config.compile):
        to_fast_layout(model)
    with _interrupts_as_keyboard_interrupt(trainer):
        trainer.fit(learner, **loaders, ckpt_path=str(ckpt_path) if ckpt_path else None)
    add_skipped(splits, learner.skipped_files | set(data.skipped if data else []))
    info = {
        "strategy": spec.name,
        "trainable_params": trainable,
        "total_params": total,
        "precision": precision,
        "best_epoch": best.best_epoch,
        "unfreeze_events": gradual.events if gradual else [],
        "world_size": trainer.world_size,
        **(data.info if data else {}),
        **config.resolved_from,
        "train_seconds": round(time.time() - started, 2),
    }
    return Fitted(run_dir, history.rows, info, global_zero=trainer.is_global_zero, loggers=loggers)


def learner_and_loaders(
    model: TransferModel,
    spec: StrategySpec,
    splits: ImageFolderSplits,
    config: TrainConfig,
    device: torch.device,
    run_dir: Path | None = None,
) -> tuple[TransferLearner, Any, Any, dict[str, Any]]:
    """The learner and its loaders: over cached features when only the head trains, else over images."""
    if spec.name == "feature-extract" and config.cache and cache_supported(model):
        train_loader, val_loader, feature_info = _feature_loaders(model, splits, config, device, run_dir)
        return TransferLearner(model, spec, config, head_only=True), train_loader, val_loader, feature_info
    prep = model.preprocessing
    loading = {"num_workers": config.num_workers, "device_type": device.type}
    train_loader = make_loader(splits.train, build_transform(prep, config.augment), config.batch_size,
                               shuffle=True, seed=config.seed, sampler=_balanced_sampler(splits.train, config),
                               **loading)  # fmt: skip
    val_loader = make_loader(splits.val, build_transform(prep, "none"), config.batch_size, **loading)
    if config.compile:
        compile_in_place(model, device)
    return TransferLearner(model, spec, config), train_loader, val_loader, {}


def feature_data(
    model: TransferModel, spec: StrategySpec, splits: ImageFolderSplits, config: TrainConfig, device: torch.device
) -> FeatureData | None:
    """The head's data when only the head trains on stored features, else None (it trains on images)."""
    if not (spec.name == "feature-extract" and config.cache and cache_supported(model)):
        return None
    if config.compile:
        warnings.warn("--compile: not applied, only the head trains (on cached features)", stacklevel=2)
    return FeatureData(model, splits, config, device, lambda labelled: _balanced_sampler(
        labelled, config, with_aug_seeds=False) or EpochSeededSampler(len(labelled), config.seed, with_aug_seeds=False))


def _feature_loaders(
    model: TransferModel, splits: Any, config: TrainConfig, device: torch.device, run_dir: Path | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """Loaders over stored backbone features, in this process alone (the LR finder's, a benchmark's)."""
    data = feature_data(model, StrategySpec("feature-extract"), splits, config, device)
    assert data is not None
    data.prepare()
    add_skipped(splits, data.skipped)
    return data.train_dataloader(), data.val_dataloader(), data.info


def _balanced_sampler(train: list[Any], config: TrainConfig, with_aug_seeds: bool = True) -> BalancedSampler | None:
    """``--balance sampler``'s class-balanced order, else None (the plain seeded shuffle)."""
    if (config.resolved_from.get("balance") or {}).get("mode") != "sampler":
        return None
    return BalancedSampler([label for _, label in train], config.seed, with_aug_seeds)


def fit_linear_probe_run(
    model: TransferModel,
    splits: ImageFolderSplits,
    config: TrainConfig,
    run_dir: Path,
    device: torch.device,
    extra: dict[str, Any],
) -> Fitted:
    """Fit a scikit-learn linear classifier on cached features of ``config.layer``; save it as the run's model.

    Its one history row has no validation numbers yet: the caller's final evaluation supplies them.
    """
    from ..calibration import fit_temperature
    from ..probes import fit_linear_probe, out_of_fold_logits

    started = time.time()
    precision = resolve_precision(config.precision, device)
    t0 = time.perf_counter()
    train = extract_features(model, splits.train, layer=config.layer, use_cache=config.cache,
                             cache_dir=Path(config.cache_dir) if config.cache_dir else None,
                             batch_size=config.batch_size, num_workers=config.num_workers, device=device,
                             precision=precision)  # fmt: skip
    feature_seconds = time.perf_counter() - t0
    balance = config.resolved_from.get("balance") or {}
    weighted = balance.get("mode") in ("loss", "sampler")  # a fit has no sampler: both weigh each class the same
    by_macro_f1 = balance.get("selection_metric") == "val_macro_f1"  # imbalanced or multi-label classes
    fit = fit_linear_probe(train.features, train.labels, len(splits.class_names), config.classifier, config.seed,
                           balanced=weighted, by_macro_f1=by_macro_f1)  # fmt: skip
    model.attach_probe(fit.probe, config.layer)
    if config.calibration == "temperature" and not model.multi_label:  # calibrated on out-of-fold predictions
        oof = out_of_fold_logits(train.features, train.labels, fit.classifier, fit.C, fit.folds, config.seed,
                                 balanced=weighted)  # fmt: skip
        model.record = model.record.with_extra(temperature=fit_temperature(oof, train.labels),
                                               calibration_fitted_on="out-of-fold (training images)")  # fmt: skip
    probe_info = {"classifier": fit.classifier, "C": fit.C, "cv_accuracy": fit.cv_accuracy, "folds": fit.folds,
                  "cv_scored_by": "macro-F1" if by_macro_f1 else "accuracy",
                  "layer": config.layer or "head-input"}  # fmt: skip
    save_checkpoint(model, run_dir / CHECKPOINT_NAME, epoch=0, linear_probe=probe_info, **extra)
    rows = [{"epoch": 0, "train_accuracy": round(fit.cv_accuracy, 6), "val_loss": None, "val_accuracy": None,
             "trainable_params": sum(p.numel() for p in fit.probe.parameters()), "trainable_groups": "probe",
             "seconds": round(time.perf_counter() - t0, 3)}]  # fmt: skip
    write_history(run_dir / "history.csv", rows)
    if not config.quiet:
        say(f"linear probe ({fit.classifier}, C={fit.C:g}) on {probe_info['layer']}: "
            f"{fit.folds}-fold CV {probe_info['cv_scored_by']} {fit.cv_accuracy:.4f}")  # fmt: skip
    info = {
        "strategy": "linear-probe", "linear_probe": probe_info, "precision": precision,
        "trainable_params": rows[0]["trainable_params"], "total_params": model.parameter_counts()[1],
        "best_epoch": 0, "feature_cache": {"hits": train.hits, "misses": train.misses},
        "feature_seconds": round(feature_seconds, 2), **config.resolved_from,
        "train_seconds": round(time.time() - started, 2),
    }  # fmt: skip
    return Fitted(run_dir, rows, info)


def add_skipped(splits: Any, found: Any) -> None:
    """Record files that failed to decode during training or evaluation, once each."""
    known = {p for p, _ in splits.skipped}
    for path, reason in sorted(found):
        if path not in known:
            splits.skipped.append((path, reason))
            known.add(path)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
