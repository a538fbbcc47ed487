"""``train`` and ``resume``: a run from start to finish. Choices left to ``auto`` are resolved, the
run directory is created, :mod:`transferkit.training` fills it, and then the best checkpoint is
evaluated exactly as ``transferkit evaluate`` would (``metrics.json``) and the report is written.
This is the one module that joins training to the stages after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .balance import resolve_balance
from .calibration import calibration_summary, fit_temperature, logits_of
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .data import ImageFolderSplits, Sample, discover_for
from .discovery import warn_unused_val_split
from .errors import TransferkitError
from .files import check_writable_folder, remove_leftovers, write_json
from .inference import Evaluation, evaluate_cached_features, evaluate_samples
from .leaderboard import reproducing_flags
from .model import TransferModel
from .multilabel import targets_of, tune_thresholds
from .runs import SEARCH_PROGRESS, create_run_dir, removed_unless_trained, write_history
from .training import Fitted, TrainConfig, TrainResult, find_lr, fit, model_and_strategy, quiet_lightning
from .training.fit import RUN_DIR_ENV, add_skipped, check_launch, join_as_worker_rank, say
from .training.loggers import log_run_files


def train(data: str | Path, callbacks: list[Callback] = (), **options: Any) -> TrainResult:  # type: ignore[assignment]
    """Train a classifier on an image folder; returns the run directory and its metrics.

    ``options`` are :class:`~transferkit.training.TrainConfig`'s fields; ``callbacks`` are Lightning
    callbacks added to the run's own (they are not saved with it).

    >>> result = train("data/flowers", model="resnet18", strategy="fine-tune", unfreeze=2, epochs=5)  # doctest: +SKIP
    >>> result.val_accuracy, result.run_dir
    """
    command = options.pop("_command", None)
    _check_option_names(options)
    return run_training(TrainConfig(data=str(data), **options), command=command, callbacks=list(callbacks))


def _check_option_names(options: dict[str, Any]) -> None:
    """A misspelt option (``epoch=5``) is a one-line error with the names it may have meant, not a TypeError."""
    import difflib

    known = [f.name for f in dataclasses.fields(TrainConfig) if f.init and f.name != "data"]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see help(transferkit.TrainConfig) for the options"
            raise TransferkitError(f"train() has no option {name!r}; {hint}")


def run_training(config: TrainConfig, command: str | None = None, callbacks: list[Callback] = ()) -> TrainResult:  # type: ignore[assignment]
    """A new run: resolve ``auto`` choices, create the run directory, train, evaluate, report."""
    quiet_lightning()
    started = time.time()
    if config.folds and (str(config.devices) not in ("auto", "1") or config.num_nodes > 1
                         or int(os.environ.get("WORLD_SIZE", "1")) > 1):  # fmt: skip
        raise TransferkitError("--folds trains its folds one after another in one process: give --devices 1 and "
                               "--num-nodes 1, and launch it without torchrun or srun")  # fmt: skip
    if rank_zero_only.rank > 0:
        fitted = join_as_worker_rank(config, callbacks)
        return TrainResult(run_dir=fitted.run_dir, metrics={}, history=fitted.history)  # metrics are rank 0's
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not config.out:
        raise TransferkitError("a multi-process launch (torchrun, SLURM) needs --out RUN_DIR, so every rank finds the run")
    check_launch(config)
    if config.out:  # before the images are read and any search or training is done
        check_writable_folder("--out", Path(config.out).expanduser())
    L.seed_everything(config.seed, workers=True, verbose=False)
    splits = discover_for(config)
    if config.folds:
        return _train_folds(config, splits, command, callbacks)
    warn_unused_val_split(config.val_split, splits)
    _resolve_balance(config, splits)
    run_dir = None
    if config.strategy == "auto":
        progress = _SearchProgress(config, command)
        config.resolved_from["selection"] = _measured_choice(config, splits, progress)
        run_dir = progress.run_dir
    return _train_resolved(config, splits, run_dir, command, callbacks, started)


def _train_resolved(
    config: TrainConfig, splits: ImageFolderSplits, run_dir: Path | None, command: str | None,
    callbacks: list[Callback], started: float,
) -> TrainResult:  # fmt: skip
    """Train a configuration whose choices are made (bar ``--lr auto``), in ``run_dir`` or a new one."""
    lr_finder = None
    if config.lr == "auto":
        lr_finder = find_lr(config, splits)
        config.lr = lr_finder.suggestion
        config.resolved_from["lr_finder"] = lr_finder.summary()
    model, spec = model_and_strategy(config, splits)
    new = run_dir is None
    given_empty_dir = new and config.out is not None and Path(config.out).expanduser().is_dir()
    run_dir = run_dir or create_run_dir(config)
    with removed_unless_trained(run_dir, keep_dir=given_empty_dir) if new else contextlib.nullcontext():
        if lr_finder is not None:
            lr_finder.plot(run_dir / "lr_find.png")
        with open(run_dir / "command.txt", "a") as f:
            f.write((command or " ".join(sys.argv)) + "\n")
        write_json(run_dir / "config.json", config.to_dict())  # last: other ranks wait for it
        os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
        fitted = fit(run_dir, config, splits, model, spec, callbacks=callbacks)
    return finish_run(fitted, config, splits, started)


def _train_folds(
    config: TrainConfig, splits: ImageFolderSplits, command: str | None, callbacks: list[Callback],
    parent: Path | None = None,
) -> TrainResult:  # fmt: skip
    """``--folds K``: K runs on K stratified splits of the training and validation images pooled (a test
    split stays the test split of every fold), then each metric's mean and standard deviation. Given the
    ``parent`` of an interrupted k-fold run, its finished folds are kept, its unfinished one resumed."""
    from .folds import FOLDS_NAME, stratified_folds, summarize_folds
    from .reports import load_run, write_comparison

    if config.strategy == "auto":
        raise TransferkitError("--folds with --strategy auto would repeat the search in every fold; measure once "
                               "with --strategy auto, then give its choice with --folds")  # fmt: skip
    folds = stratified_folds(splits.train + splits.val, int(config.folds or 0), config.seed)
    if parent is None:
        parent = create_run_dir(config)
        write_json(parent / "config.json", config.to_dict())
    with open(parent / "command.txt", "a") as f:
        f.write((command or " ".join(sys.argv)) + "\n")
    results = []
    for k, (train, val) in enumerate(folds, 1):
        fold_dir = parent / f"fold-{k}"
        # One device: the folds run one after another in this process ("auto" would start one per GPU).
        fold_config = TrainConfig(**{**config.to_dict(), "folds": None, "out": str(fold_dir), "resolved_from": {},
                                     "devices": 1})  # fmt: skip
        fold_splits = dataclasses.replace(splits, train=sorted(train), val=sorted(val),
                                          layout=f"fold {k} of {len(folds)}", skipped=list(splits.skipped))  # fmt: skip
        fold_config.resolved_from["fold_images"] = _fold_images_digest(fold_splits)
        if (fold_dir / "config.json").is_file():
            _check_same_fold(fold_dir, fold_config, k)
        if (fold_dir / "metrics.json").is_file():  # finished before the interruption
            results.append(TrainResult(fold_dir, json.loads((fold_dir / "metrics.json").read_text()), []))
            continue
        _resolve_balance(fold_config, fold_splits)
        L.seed_everything(config.seed, workers=True, verbose=False)  # every fold starts from the same model
        if not config.quiet:
            say(f"fold {k} of {len(folds)}: {len(train)} training, {len(val)} validation images")
        if (fold_dir / "checkpoints" / "last.ckpt").is_file():
            results.append(_resume_fit(fold_dir, fold_splits, command, callbacks, config.quiet))
        else:  # not started, or stopped in its first epoch: (re)started in its own directory
            started_dir = fold_dir if fold_dir.exists() else None
            results.append(_train_resolved(fold_config, fold_splits, started_dir, command, callbacks, time.time()))
    runs = [r.run_dir.name for r in results]
    write_json(parent / FOLDS_NAME, {"folds": len(folds), "runs": runs, "seed": config.seed})
    metrics = {**summarize_folds([r.metrics for r in results]), "folds": len(folds), "fold_runs": runs,
               "fold_metrics": [{k: r.metrics.get(k) for k in ("val_accuracy", "val_loss", "val_macro_f1")}
                                for r in results],
               "model": config.model, "strategy": results[0].metrics.get("strategy"),
               "class_names": splits.class_names}  # fmt: skip
    write_json(parent / "metrics.json", metrics)
    write_comparison([load_run(r.run_dir) for r in results], parent / "compare.html")
    if not config.quiet:
        say(f"{len(folds)} folds: val_accuracy {metrics['val_accuracy']:.4f} ± {metrics['val_accuracy_std']:.4f} "
            f"· run directory: {parent}")  # fmt: skip
    return TrainResult(run_dir=parent, metrics=metrics, history=[])


def _resolve_balance(config: TrainConfig, splits: ImageFolderSplits) -> None:
    """--balance for this data, recorded with the run; an imbalanced run says how it is corrected and chosen."""
    balance = resolve_balance(config.balance, splits.train, len(splits.class_names), splits.multi_label)
    config.resolved_from["balance"] = balance.to_dict()
    if balance.imbalanced and not config.quiet:
        counts = ", ".join(f"{n} {c}" for n, c in zip(splits.class_names, balance.class_counts))
        fix = {"loss": "class-weighted loss", "sampler": "class-balanced sampling", "none": "no correction"}
        say(f"imbalanced classes (training images: {counts}; largest/smallest {balance.ratio:g}): "
            f"{fix[balance.mode]}, best epoch chosen by macro-F1")  # fmt: skip


def resume_training(
    run_dir: str | Path, command: str | None = None, callbacks: list[Callback] = (),  # type: ignore[assignment]
    quiet: bool | None = None,
) -> TrainResult:  # fmt: skip
    """Continue an interrupted run from its last checkpoint, with its own configuration.

    The epoch-seeded sampler, per-image augmentation seeds and the RNG state saved in the
    checkpoint make the resumed run reach the same result as an uninterrupted one. ``quiet``
    (no progress bar) changes nothing of the result; None keeps the run's own setting.
    """
    quiet_lightning()
    run_dir = Path(run_dir).expanduser()
    last = run_dir / "checkpoints" / "last.ckpt"
    if not (run_dir / "config.json").is_file() and (run_dir / SEARCH_PROGRESS).is_file():
        return _resume_search(run_dir, command, callbacks, quiet)
    if not (run_dir / "config.json").is_file():
        raise TransferkitError(f"{run_dir} is not a transferkit run directory (no config.json); give the run to resume")
    if (run_dir / "metrics.json").is_file():
        raise TransferkitError(f"run {run_dir} already finished; start a new run instead of --resume")
    config = _saved_config(json.loads((run_dir / "config.json").read_text()), quiet)
    parent = run_dir.resolve().parent
    if _is_k_fold_run(parent) and run_dir.resolve().name.startswith("fold-"):
        raise TransferkitError(f"{run_dir} is a fold of the k-fold run {parent}: resume the whole run, with "
                               f"transferkit train --resume {parent}")  # fmt: skip
    winner_unstarted = "selection" in config.resolved_from and not last.is_file()  # killed after its search
    if not config.folds and not last.is_file() and not winner_unstarted:
        raise TransferkitError(f"run {run_dir} has no checkpoints/last.ckpt yet (killed in its first epoch); "
                               f"start it again")  # fmt: skip
    L.seed_everything(config.seed, workers=True, verbose=False)
    splits = discover_for(config)
    if winner_unstarted:  # the measured choice stands: the winner is trained from its start, in the run
        _remove_leftovers_of(run_dir)
        return _train_resolved(config, splits, run_dir, command, callbacks, time.time())
    if config.folds:
        _remove_leftovers_of(run_dir)  # the k-fold run's own files; each fold's as it is resumed
        return _train_folds(config, splits, command, callbacks, parent=run_dir)
    return _resume_fit(run_dir, splits, command, callbacks, config.quiet)


def _remove_leftovers_of(run_dir: Path) -> None:
    """The files the interrupted process was writing when it died, in a run being resumed."""
    for folder in (run_dir, run_dir / "checkpoints"):
        remove_leftovers(folder)


def _saved_config(saved: dict[str, Any], quiet: bool | None) -> TrainConfig:
    """A run's configuration as saved, with the resuming command's ``quiet`` where it gave one; one that
    this version refuses (saved by an earlier one) is said to be the run's, not the resuming command's."""
    try:
        config = TrainConfig(**{**saved, **({} if quiet is None else {"quiet": quiet})})
        if config.strategy != "auto" and config.lr != "auto":
            config.strategy_spec()
    except TransferkitError as exc:
        raise TransferkitError(f"cannot resume {saved.get('out')}: this version refuses its saved configuration "
                               f"({exc}); start the run again") from None
    return config


def _resume_fit(
    run_dir: Path, splits: ImageFolderSplits, command: str | None, callbacks: list[Callback], quiet: bool
) -> TrainResult:  # fmt: skip
    """Continue the run in ``run_dir`` from its last checkpoint, on ``splits`` (its own data), and finish it."""
    run_dir = run_dir.resolve()  # the run directory printed and returned is absolute, as a new run's
    config = _saved_config(json.loads((run_dir / "config.json").read_text()), quiet)
    _remove_leftovers_of(run_dir)
    with open(run_dir / "command.txt", "a") as f:
        f.write((command or " ".join(sys.argv)) + "\n")
    started = time.time()
    L.seed_everything(config.seed, workers=True, verbose=False)
    model, spec = model_and_strategy(config, splits)
    if spec.name == "linear-probe":
        raise TransferkitError("a linear probe has no epochs to resume; start it again")
    fitted = fit(run_dir, config, splits, model, spec, ckpt_path=run_dir / "checkpoints" / "last.ckpt",
                 callbacks=callbacks)  # fmt: skip
    return finish_run(fitted, config, splits, started)


def resume_target(run_dir: str | Path | None) -> Path | None:
    """What ``train --resume`` continues after the run in ``run_dir`` was interrupted: the run, or the
    k-fold run it is a fold of; None where it has no checkpoint to continue from yet."""
    if run_dir is None or not (Path(run_dir) / "checkpoints" / "last.ckpt").is_file():
        return None
    run_dir = Path(run_dir)
    return run_dir.parent if _is_k_fold_run(run_dir.parent) and run_dir.name.startswith("fold-") else run_dir


def _is_k_fold_run(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "config.json").read_text()).get("folds"))
    except (OSError, ValueError):
        return False


def _fold_images_digest(splits: ImageFolderSplits) -> str:
    """What a fold trains and validates on, in a few bytes: a resumed k-fold run checks that it is unchanged."""
    listing = json.dumps([splits.train, splits.val], default=str).encode()
    return hashlib.sha256(listing).hexdigest()[:16]


def _check_same_fold(fold_dir: Path, fold_config: TrainConfig, k: int) -> None:
    recorded = json.loads((fold_dir / "config.json").read_text()).get("resolved_from", {}).get("fold_images")
    if recorded not in (None, fold_config.resolved_from["fold_images"]):  # None: a run of a version before the check
        raise TransferkitError(f"{fold_dir} trained on other images than fold {k} of {fold_config.data} has now (the "
                               f"data changed since the k-fold run started); start a new k-fold run")  # fmt: skip




class _SearchProgress:
    """Saves a search after each trial, in the run directory, made when the first trial is measured.

    Bad input (an unknown model, a budget too small) is refused before that, and a search whose every
    trial failed (weights that cannot be had offline) has nothing to resume: both leave nothing.
    """

    def __init__(self, config: TrainConfig, command: str | None, run_dir: Path | None = None) -> None:
        self.config = config.to_dict()  # as given: strategy auto, with its budget and models
        self.command, self.run_dir = command, run_dir

    def __call__(self, selection: Any) -> None:
        if self.run_dir is None:
            if all(trial.score is None for trial in selection.trials):
                return
            self.run_dir = create_run_dir(TrainConfig(**self.config))
        state = {"config": self.config, "command": self.command, "spent_seconds": selection.used_s,
                 "trials": [asdict(t) for t in selection.trials]}  # fmt: skip
        write_json(self.run_dir / SEARCH_PROGRESS, state)


def _measured_choice(
    config: TrainConfig, splits: ImageFolderSplits, progress: _SearchProgress,
    previous: list[Any] = (), spent_s: float = 0.0,  # type: ignore[assignment]
) -> dict[str, Any]:  # fmt: skip
    """Resolve ``--strategy auto`` by measurement (:mod:`transferkit.selection`); returns what to record."""
    from .selection import select

    selection = select(config, splits, config.budget, config.models, quiet=config.quiet, previous=previous,
                       spent_s=spent_s, on_trial=progress)  # fmt: skip
    assert selection.winner is not None
    for key, value in selection.winner_options().items():
        setattr(config, key, value)
    config.epochs = selection.final_epochs(config.epochs)
    config.budget, config.models = None, None  # spent: the resolved config trains (or resumes) the winner
    reproduced = selection.command(shlex.quote(config.data) + reproducing_flags(config))
    record = {**selection.to_dict(), "command": reproduced}
    if not config.quiet:
        say(f"{selection.table()}\nchosen: {selection.winner.label} ({selection.used_s:.0f} s of "
            f"{selection.budget_s:.0f} s measuring); reproduce with: {record['command']}")  # fmt: skip
    return record


def _resume_search(run_dir: Path, command: str | None, callbacks: list[Callback], quiet: bool | None) -> TrainResult:
    """Continue an interrupted ``--strategy auto`` search from its saved trials, then train the winner."""
    from .leaderboard import Trial

    state = json.loads((run_dir / SEARCH_PROGRESS).read_text())
    config = _saved_config(state["config"], quiet)
    _remove_leftovers_of(run_dir)
    started = time.time()
    L.seed_everything(config.seed, workers=True, verbose=False)
    splits = discover_for(config)
    previous = [Trial(**t) for t in state["trials"] if t["status"] == "done"]
    progress = _SearchProgress(config, state.get("command"), run_dir)
    with open(run_dir / "command.txt", "a") as f:
        f.write(f"{state.get('command') or ''}\n")  # the search's own command, then this one (below)
    config.resolved_from["selection"] = _measured_choice(config, splits, progress, previous, state["spent_seconds"])
    return _train_resolved(config, splits, run_dir, command, callbacks, started)


def finish_run(fitted: Fitted, config: TrainConfig, splits: ImageFolderSplits, started: float) -> TrainResult:
    """Evaluate the best checkpoint exactly as ``transferkit evaluate`` would; write metrics.json and the report."""
    if not fitted.global_zero:  # metrics, checkpoint and report are rank 0's
        return TrainResult(run_dir=fitted.run_dir, metrics={}, history=fitted.history)
    run_dir, history = fitted.run_dir, fitted.history
    evaluation_started = time.perf_counter()
    model = load_checkpoint(run_dir / CHECKPOINT_NAME)
    val, calibration = _evaluate_and_fit_decisions(model, run_dir, splits.val, config, fitted.info)
    add_skipped(splits, val.skipped)
    if history and history[-1].get("val_accuracy") is None:  # a linear probe: its one row gets its numbers now
        history[-1].update(val_loss=round(val.loss, 6), val_accuracy=round(val.accuracy, 6))
        write_history(run_dir / "history.csv", history)
    metrics: dict[str, Any] = {
        "val_accuracy": val.accuracy,
        "val_loss": val.loss,
        "val_balanced_accuracy": val.balanced_accuracy,
        "val_macro_f1": val.macro_f1,
        **({"multi_label": True, "val_mean_average_precision": val.mean_average_precision,
            "val_micro_f1": val.micro_f1, "thresholds": model.thresholds} if val.multi_label else {}),
        **({"calibration": calibration} if calibration else {}),
        "evaluation_precision": val.precision,  # what produced the val_* and test_* numbers on this machine
        "evaluated_on": "cached features" if _from_cached_features(fitted.info) else "images",
        "val_per_class": val.per_class,
        "val_confusion_matrix": val.confusion_matrix,
        "model": config.model,
        "weights": model.record.weights,
        "class_names": splits.class_names,
        "data": splits.summary(),
        "skipped_files": len(splits.skipped),
        "epochs_run": len(history),
        **fitted.info,
    }
    if splits.test:
        test = _final_evaluation(model, splits.test, config, fitted.info)
        metrics.update(test_accuracy=test.accuracy, test_loss=test.loss, test_per_class=test.per_class,
                       test_balanced_accuracy=test.balanced_accuracy, test_macro_f1=test.macro_f1)
    metrics["evaluation_seconds"] = round(time.perf_counter() - evaluation_started, 2)
    metrics["total_seconds"] = round(time.time() - started, 2)
    write_json(run_dir / "metrics.json", metrics)
    if not config.quiet:  # the result first; the report's figures take a few seconds more
        say(f"val_accuracy {val.accuracy:.4f} (best epoch {fitted.info.get('best_epoch')}) · run directory: {run_dir}")
    from .reports import predictions_of, write_report  # matplotlib's import, for the report alone

    write_report(run_dir, splits=splits, val_predictions=predictions_of(val), model=model)
    log_run_files(fitted.loggers, run_dir, metrics)  # --logger: final metrics, config, metrics and report
    return TrainResult(run_dir=run_dir, metrics=metrics, history=history)


def _evaluate_and_fit_decisions(
    model: TransferModel, run_dir: Path, val: list[Sample], config: TrainConfig, info: dict[str, Any]
) -> tuple[Evaluation, dict[str, Any] | None]:
    """The validation evaluation, after fitting on it what decides answers: a multi-label model's
    per-class thresholds, or a single-label model's calibration temperature (unless a linear probe
    brought its own, fitted out of fold). Both are saved with the model, then the model is evaluated
    as ``transferkit evaluate`` will run it."""
    calibrate = config.calibration == "temperature" and not model.multi_label
    raw = _final_evaluation(model, val, config, info, calibrated=False)
    if not calibrate and not model.multi_label:
        return raw, None
    decoded = {p["path"] for p in raw.predictions}
    kept = [s for s in val if s[0] in decoded]
    labels = targets_of(kept) if model.multi_label else torch.tensor([label for _, label in kept])
    if model.multi_label:
        model.record = model.record.with_extra(thresholds=tune_thresholds(raw.probabilities, labels))
    elif "temperature" not in model.record.extra:
        temperature = fit_temperature(logits_of(raw.probabilities), labels)
        model.record = model.record.with_extra(temperature=temperature, calibration_fitted_on="validation")
    save_checkpoint(model, run_dir / CHECKPOINT_NAME)
    final = _final_evaluation(model, val, config, info)
    if not calibrate:
        return final, None
    fitted_on = model.record.extra.get("calibration_fitted_on", "validation")
    return final, calibration_summary(raw.probabilities, final.probabilities, labels, model.temperature, fitted_on)


def _final_evaluation(
    model: TransferModel, samples: list[Sample], config: TrainConfig, info: dict[str, Any], calibrated: bool = True
) -> Evaluation:
    """The run's evaluation; a head trained on cached features is evaluated on them (same numbers, no backbone)."""
    if _from_cached_features(info):
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        return evaluate_cached_features(model, samples, config.batch_size, config.num_workers, cache_dir=cache_dir,
                                        calibrated=calibrated)  # fmt: skip
    return evaluate_samples(model, samples, config.batch_size, config.num_workers, calibrated=calibrated)


def _from_cached_features(info: dict[str, Any]) -> bool:
    return info.get("strategy") == "feature-extract" and "feature_cache" in info
