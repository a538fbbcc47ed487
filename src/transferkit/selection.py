"""Measured model selection: the backbone, layer and strategy that score best on *this* data, within a
time budget, instead of a rule of thumb.

Candidates are compared on the training images only: a stratified, seeded fifth of them (the
*holdout*) is set aside, each candidate learns from the rest and is scored by its accuracy on the
holdout. The validation split that the run reports is never looked at while choosing.

1. Cheap candidates first, on cached features, for every candidate backbone: logistic-regression
   probes on the last layer and on an earlier one, and the new head trained on the cached
   features (the ``feature-extract`` strategy). Extracting the features is most of the cost, and
   the cache keeps them for the final training.
2. Then, for the best backbone, the strategies that train pretrained layers (``fine-tune`` of the
   last two groups, ``full``) by successive halving: one epoch each, and the better half goes on to
   three. A trial whose estimated cost does not fit the budget left is not started, and says so.
3. The winner is trained on all the training images (holdout included) with what is left.

Every candidate, run, skipped or failed, is a row of the leaderboard kept in the run's metrics.
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .backbones import DEFAULT_BACKBONE, SOURCES, source_for
from .balance import Balance, resolve_balance
from .data import ImageFolderSplits, Sample, class_counts, first_label, shuffled_by_class
from .errors import TransferkitError
from .features import extract_features
from .leaderboard import Selection, Trial
from .model import TransferModel
from .performance import resolve_precision
from .probes import fit_linear_probe
from .strategies import apply_strategy
from .training import TrainConfig, build_model, fit, quiet_lightning, training_device

HOLDOUT_SHARE = 0.2
TRAINABLE = ({"strategy": "fine-tune", "unfreeze": 2}, {"strategy": "full"})
RUNGS = (1, 3)  # epochs of a trainable trial at each rung of successive halving
# A training step (forward + backward) costs about this many inference passes.
TRAIN_PASSES = 3.0


# --------------------------------------------------------------------------- budget and candidates


def parse_budget(text: str | float | None, train_images: int) -> float:
    """Seconds from ``90``, ``90s``, ``5m``, ``1h`` or ``auto`` (60 s + 0.15 s per training image)."""
    if text is None or str(text).strip().lower() == "auto":
        return 60.0 + 0.15 * train_images
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text).lower())
    if not match:
        raise TransferkitError(f"bad --budget {text!r}: use seconds or a duration such as 90s, 5m, 1h (or auto)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def candidate_backbones(config: TrainConfig, requested: list[str] | None) -> list[str]:
    """``--models`` as given (each checked), else the run's model and every backbone whose weights are here."""
    if requested:
        for name in requested:
            source_for(name)  # an unknown name is a one-line error with close names
        return list(dict.fromkeys(requested))
    if config.weights.lower() in ("none", "random", "scratch") or config.mean or config.std:
        return [config.model]  # random or a user's own weights: other backbones are not comparable choices
    offline = [n for s in SOURCES if s.label != "timm" for n in s.names() if s.offline_available(n)]
    return list(dict.fromkeys([config.model, *offline]))


def holdout_split(samples: list[Sample], seed: int) -> tuple[list[Sample], list[Sample]]:
    """A stratified, seeded holdout of the training images (at least one image per class stays in training)."""
    learn: list[Sample] = []
    holdout: list[Sample] = []
    for members in shuffled_by_class(samples, first_label, seed + 1):
        n = min(len(members) - 1, max(1, round(len(members) * HOLDOUT_SHARE))) if len(members) > 1 else 0
        holdout += members[:n]
        learn += members[n:]
    return sorted(learn), sorted(holdout)


# --------------------------------------------------------------------------- the search


class Search:
    """One search; ``previous`` trials (of a search that was interrupted) are taken as measured, not re-run."""

    def __init__(
        self, config: TrainConfig, splits: ImageFolderSplits, budget_s: float, quiet: bool,
        previous: list[Trial] = (), spent_s: float = 0.0,  # type: ignore[assignment]
        on_trial: Callable[[Selection], None] | None = None,
    ) -> None:  # fmt: skip
        self.config, self.splits, self.quiet = config, splits, quiet
        self.previous = {_key(t): t for t in previous}
        self.on_trial = on_trial
        self.learn, self.holdout = holdout_split(splits.train, config.seed)
        if not self.holdout:
            raise TransferkitError("--strategy auto needs at least 2 training images per class to hold some out")
        self.device = training_device(config)
        self.precision = resolve_precision(config.precision, self.device)
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else None
        self.started = time.perf_counter() - spent_s
        balance = config.resolved_from.get("balance") or {}
        # Imbalanced classes are scored by macro-F1 (balance.py), on the holdout as on validation.
        self.metric = "macro_f1" if balance.get("selection_metric") == "val_macro_f1" else "accuracy"
        counts = class_counts(splits.train, len(splits.class_names))
        own = {"model": config.model, "weights": config.weights, "mean": config.mean, "std": config.std}
        self.selection = Selection(budget_s, len(self.learn), len(self.holdout), metric=self.metric,
                                   class_counts=dict(zip(splits.class_names, counts)), own_model=own,
                                   image_size=config.image_size, precision=self.precision)  # fmt: skip
        self.speed: dict[str, float] = {}  # backbone → inference images/s, measured
        self.fit_seconds = 0.0  # the longest probe fit so far: part of the next probe's estimate
        # Measured extraction speed over the pure forward speed: decoding and resizing, learnt as it goes.
        self.loading_factor = 1.0

    def left(self) -> float:
        return self.selection.budget_s - (time.perf_counter() - self.started)

    def restored(self, trial: Trial) -> bool:
        """Whether ``trial`` was measured before the search was interrupted (then it is recorded as it was)."""
        previous = self.previous.get(_key(trial))
        if previous is None:
            return False
        self.selection.trials.append(previous)
        return True

    def record(self, trial: Trial) -> Trial:
        self.selection.trials.append(trial)
        self.selection.used_s = time.perf_counter() - self.started
        if self.on_trial is not None:
            self.on_trial(self.selection)
        if not self.quiet:
            score = "" if trial.score is None else f" holdout {self.metric.replace('_', '-')} {trial.score:.4f}"
            print(f"  {trial.label}:{score} ({trial.status}{': ' + trial.note if trial.note else ''}, "
                  f"{trial.seconds:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
        return trial

    def skip(self, trial: Trial, estimate: float, kept: float = 0.0) -> None:
        keeping = f", and {kept:.0f} s kept for training the winner" if kept else ""
        trial.status = "skipped"
        trial.note = f"would overrun the budget (about {estimate:.0f} s{keeping}; {self.left():.0f} s left)"
        self.record(trial)

    def run(self, backbones: list[str], trainable: bool = True) -> Selection:
        for name in backbones:
            self.cached_candidates(name)
        done = [t for t in self.selection.trials if t.score is not None]
        if not done:
            raise TransferkitError("no candidate could be measured: " + "; ".join(
                f"{t.label}: {t.note}" for t in self.selection.trials))  # fmt: skip
        best_backbone = max(done, key=lambda t: t.score).backbone  # type: ignore[arg-type, return-value]
        if trainable:
            self.trainable_candidates(best_backbone)
        ranked = self.selection.ranked()
        self.selection.winner = ranked[0]
        self.selection.used_s = time.perf_counter() - self.started
        return self.selection

    # ------------------------------------------------------------------ stage 1: cached features

    def cached_candidates(self, name: str) -> None:
        started = time.perf_counter()
        try:
            model = self._model(name)
            speed = self.speed[name] = _inference_speed(model, self.device, self.precision)
        except Exception as exc:  # a backbone that cannot be built or run: recorded, and the search goes on
            self.record(Trial(name, "feature-extract", status="failed", note=_reason(exc),
                              seconds=time.perf_counter() - started))  # fmt: skip
            return
        images = len(self.learn) + len(self.holdout)
        speed *= self.loading_factor
        estimate = images * 1.6 / speed + 2  # the last layer, and an earlier one stopped ~60 % of the way
        if not self.selection.trials and not self.previous and estimate > self.left():  # a resumed search goes on
            raise TransferkitError(
                f"--budget {self.selection.budget_s:.0f}s cannot fit even the cheapest candidate: features of "
                f"{images} training images with {name} take about {estimate:.0f} s here; give --budget "
                f"{math.ceil(estimate * 1.5 + 10)}s or more"
            )
        measured_before = any(key[0] == name for key in self.previous)  # its trials are restored, not re-run
        if estimate > self.left() and not measured_before:
            self.skip(Trial(name, "feature-extract", images_per_s=round(speed, 1)), estimate)
            return
        body = [g.name for g in model.groups if g.name != "head"]
        earlier = body[max(0, round(len(body) * 0.6) - 1)] if body else None
        per_pass = images / speed + 1  # one pass over the images; the probe's own fit is measured as it goes
        given = [(self.config.layer, 1.0)] if self.config.layer not in (None, earlier, "head", "head-input") else []
        for layer, passes in ((None, 1.0), (earlier, 0.6), *given):  # a --layer given is one probe more
            self._probe(model, name, layer, estimate=passes * per_pass + self.fit_seconds)
        self._head_on_features(model, name)

    def _features(self, model: TransferModel, layer: str | None) -> tuple[Any, Any, float]:
        t0 = time.perf_counter()
        common = {"layer": layer, "cache_dir": self.cache_dir, "use_cache": self.config.cache, "device": self.device,
                  "batch_size": self.config.batch_size, "precision": self.precision}  # fmt: skip
        learn, holdout = extract_features(model, self.learn, **common), extract_features(model, self.holdout, **common)
        return learn, holdout, time.perf_counter() - t0

    def _probe(self, model: TransferModel, name: str, layer: str | None, estimate: float) -> None:
        t0 = time.perf_counter()
        trial = Trial(name, "linear-probe", layer=layer or "head-input")
        if self.restored(trial):
            return
        if min(self.selection.class_counts.values()) < 2:  # the final fit cross-validates C: it could not train
            trial.status, trial.note = "skipped", "a linear probe needs at least 2 training images per class"
            self.record(trial)
            return
        if estimate > self.left() and self.selection.trials:
            self.skip(trial, estimate)
            return
        try:
            learn, holdout, extraction = self._features(model, layer)
            # Scored on the holdout, so no inner cross-validation: one fit at C = 1 (the final run tunes C).
            # Class-weighted where the run corrects for imbalanced classes, as the final fit will be.
            weighted = (self.config.resolved_from.get("balance") or {}).get("mode") in ("loss", "sampler")
            fitted = fit_linear_probe(learn.features, learn.labels, len(self.splits.class_names),
                                      self.config.classifier, self.config.seed, c_grid=(1.0,), max_folds=0,
                                      balanced=weighted)  # fmt: skip
            self.fit_seconds = max(self.fit_seconds, time.perf_counter() - t0 - extraction)
            with torch.no_grad():
                trial.score = _score(fitted.probe(holdout.features), holdout.labels, self.metric)
            computed = learn.misses + holdout.misses
            trial.images_per_s = round(computed / extraction, 1) if computed and extraction > 0 else None
            if layer is None and trial.images_per_s and name in self.speed:
                self.loading_factor = min(1.0, trial.images_per_s / self.speed[name])
        except Exception as exc:
            trial.status, trial.note = "failed", _reason(exc)
        trial.seconds = round(time.perf_counter() - t0, 2)
        self.record(trial)

    def _head_on_features(self, model: TransferModel, name: str) -> None:
        """The ``feature-extract`` strategy's head, trained as training does, on the cached features."""
        t0 = time.perf_counter()
        trial = Trial(name, "feature-extract", epochs=self.config.epochs)
        if self.restored(trial):
            return
        if self.left() <= 0:
            self.skip(trial, 0.0)
            return
        try:
            learn, holdout, _ = self._features(model, None)
            trial.score = _train_head(model, learn, holdout, self.config, self.metric)
        except Exception as exc:
            trial.status, trial.note = "failed", _reason(exc)
        trial.seconds = round(time.perf_counter() - t0, 2)
        self.record(trial)

    # ------------------------------------------------------------------ stage 2: trainable, by halving

    def trainable_candidates(self, name: str) -> None:
        if name not in self.speed:
            return
        speed = self.speed[name] * self.loading_factor
        epoch_s = (len(self.learn) * TRAIN_PASSES + len(self.holdout)) / speed + 3  # + Lightning's start
        # Keep enough for the winner's final training: one epoch on every training image.
        reserve = len(self.splits.train) * TRAIN_PASSES / speed + 5
        self.selection.epoch_seconds[name] = round(reserve, 1)
        unfreeze = self.config.unfreeze  # given to auto: the fine-tune candidate's, instead of 2
        unfreeze = ",".join(unfreeze) if isinstance(unfreeze, (list, tuple)) else unfreeze
        alive = [{**c, "unfreeze": unfreeze} if unfreeze and "unfreeze" in c else dict(c) for c in TRAINABLE]
        for rung, epochs in enumerate(RUNGS):
            results: list[tuple[float, dict[str, Any]]] = []
            for options in alive:
                trial = Trial(name, options["strategy"], unfreeze=options.get("unfreeze"), epochs=epochs,
                              images_per_s=round(speed, 1))  # fmt: skip
                if self.restored(trial):
                    trial = self.selection.trials[-1]
                    if trial.score is not None:
                        results.append((trial.score, options))
                    continue
                estimate = epochs * epoch_s
                if estimate + reserve > self.left():
                    self.skip(trial, estimate, kept=reserve)
                    continue
                self._train_trial(trial, options)
                if trial.score is not None:
                    results.append((trial.score, options))
            if rung + 1 < len(RUNGS):
                results.sort(key=lambda r: -r[0])
                alive = [options for _, options in results[: max(1, math.ceil(len(results) / 2))]]
                if not alive:
                    return

    def _train_trial(self, trial: Trial, options: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        lr = self.config.lr if self.config.lr != "auto" else 1e-3  # the LR finder runs for the winner only
        balance = {k: v for k, v in self.config.resolved_from.items() if k == "balance"}
        # One process, no experiment loggers and no compile: a measurement, timed against the budget.
        cfg = TrainConfig(**{**self.config.to_dict(), "layer": None, **options, "model": trial.backbone,
                             "epochs": trial.epochs, "lr": lr, "budget": None, "models": None, "quiet": True,
                             "out": None, "resolved_from": balance, "loggers": (), "compile": False,
                             "devices": 1, "num_nodes": 1, "dist": "auto"})  # fmt: skip
        trial_splits = ImageFolderSplits(self.splits.root, self.splits.class_names, self.learn, self.holdout)
        try:
            model = self._model(trial.backbone, cfg)
            spec = cfg.strategy_spec()
            with tempfile.TemporaryDirectory(prefix="transferkit-trial-") as tmp:
                fitted = fit(Path(tmp), cfg, trial_splits, model, spec)
            column = f"val_{self.metric}"
            trial.score = max(r[column] for r in fitted.history if r.get(column) is not None)
        except Exception as exc:
            trial.status, trial.note = "failed", _reason(exc)
        trial.seconds = round(time.perf_counter() - t0, 2)
        self.record(trial)

    def _model(self, name: str, config: TrainConfig | None = None) -> TransferModel:
        """``name`` with the run's head; with ``config``, its strategy applied (a trainable trial)."""
        cfg = config or TrainConfig(**{**self.config.to_dict(), "model": name, "resolved_from": {}})
        for field_name, value in self.selection.weights_of(cfg.model).items():
            setattr(cfg, field_name, value)
        model = build_model(cfg, self.splits.class_names)
        if self.splits.multi_label:
            model.record = model.record.with_extra(multi_label=True)
        if config is not None:
            apply_strategy(model, config.strategy_spec())
        return model


def select(
    config: TrainConfig, splits: ImageFolderSplits, budget: str | float | None = None,
    models: list[str] | None = None, quiet: bool = False, trainable: bool = True,
    previous: list[Trial] = (), spent_s: float = 0.0,  # type: ignore[assignment]
    on_trial: Callable[[Selection], None] | None = None,
) -> Selection:  # fmt: skip
    """Measure the candidates for ``config``'s data within ``budget`` (see the module docstring).

    ``trainable=False`` stops after the cheap stage on cached features (what ``advise`` prints).
    ``on_trial`` is called after each trial (to save the progress); ``previous`` and ``spent_s``
    continue a search from what it saved.
    """
    quiet_lightning()
    search = Search(config, splits, parse_budget(budget, len(splits.train)), quiet, previous, spent_s, on_trial)
    backbones = candidate_backbones(config, models)
    if not quiet:
        print(f"selection: {len(backbones)} backbone(s), budget {search.selection.budget_s:.0f} s, scored on "
              f"{len(search.holdout)} held-out training images", file=sys.stderr, flush=True)  # fmt: skip
    return search.run(backbones, trainable)


# --------------------------------------------------------------------------- measuring


def _inference_speed(model: TransferModel, device: torch.device, precision: str) -> float:
    """Images/s of one forward pass at the model's own input size (a warm-up batch, then a timed one)."""
    from .performance import autocast, batch_to, inference_mode, synchronize, to_fast_layout

    size = model.preprocessing.image_size
    x = torch.randn(8, 3, size, size)
    to_fast_layout(model.to(device))
    with inference_mode(model), autocast(device, precision):
        model(batch_to(x[:2], device, channels_last=True))
        synchronize(device)
        t0 = time.perf_counter()
        model(batch_to(x, device, channels_last=True))
        synchronize(device)
    return 8 / max(time.perf_counter() - t0, 1e-6)


def _train_head(model: TransferModel, learn: Any, holdout: Any, config: TrainConfig, metric: str = "accuracy") -> float:
    """A copy of the new head trained on cached features as training would (its optimizer and scheduler, the
    run's epochs)."""
    import copy

    from .training.learner import make_optimizer, make_scheduler, without_decay_on_norms_and_biases

    generator = torch.Generator().manual_seed(config.seed)
    # On the CPU, with the cached features: measuring its speed may have moved the model to a GPU.
    head = copy.deepcopy(model.head_module).cpu().train()
    groups = without_decay_on_norms_and_biases([{"name": "head", "params": list(head.parameters())}],
                                               config.weight_decay)  # fmt: skip
    optimizer = make_optimizer(groups, config, float(config.lr) if config.lr != "auto" else 1e-3)
    x, y = learn.features, learn.labels
    steps = config.epochs * math.ceil(len(y) / config.batch_size)
    schedule, interval = make_scheduler(optimizer, config, lambda: steps) or (None, "epoch")
    balance = config.resolved_from.get("balance")
    weight = Balance.from_dict(balance).class_weights() if balance else None
    best = 0.0
    for _ in range(config.epochs):
        for batch in torch.randperm(len(y), generator=generator).split(config.batch_size):
            optimizer.zero_grad()
            out = head(x[batch])
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(out, y[batch].float()) if y.ndim == 2
                    else torch.nn.functional.cross_entropy(out, y[batch], weight=weight))  # fmt: skip
            loss.backward()
            optimizer.step()
            if schedule is not None and interval == "step":
                schedule.step()
        if schedule is not None and interval == "epoch":
            schedule.step()
        with torch.no_grad():
            best = max(best, _score(head.eval()(holdout.features), holdout.labels, metric))  # the best epoch is kept
        head.train()
    return best


def _key(trial: Trial) -> tuple[Any, ...]:
    return (trial.backbone, trial.strategy, trial.layer, trial.unfreeze, trial.epochs)


def _score(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """Holdout accuracy, or macro-F1 (torchmetrics', as training's) for imbalanced classes and multi-label data."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score, multilabel_f1_score

    n = logits.shape[1]
    if labels.ndim == 2:  # multi-label: each class's yes/no at 0.5, as training's validation scores it
        return float(multilabel_f1_score(logits.sigmoid(), labels, num_labels=n, average="macro"))
    if metric == "macro_f1":
        return float(multiclass_f1_score(logits.argmax(dim=1), labels, num_classes=n, average="macro"))
    return float(multiclass_accuracy(logits.argmax(dim=1), labels, num_classes=n, average="micro"))


def _reason(exc: Exception) -> str:
    # Long enough for transferkit's own errors, whose fix comes last ("connect once ..., or --weights none").
    return f"{type(exc).__name__}: {exc}"[:400]


def measure_candidates(
    data: str | Path, model: str = DEFAULT_BACKBONE, weights: str = "DEFAULT", models: list[str] | str | None = None,
    budget: str | float | None = None, seed: int = 0, val_split: float = 0.2,
    mean: list[float] | None = None, std: list[float] | None = None, data_options: dict[str, Any] | None = None,
    image_size: int | None = None, precision: str | None = None,
) -> Selection:  # fmt: skip
    """The cheap stage alone (candidates on cached features): what ``transferkit advise`` prints.

    ``precision``: the candidates' (``auto``, the machine's best, unless given), as ``train`` resolves it.

    ``data_options``: how ``data``'s labels are read, as for ``train`` (a label file, its columns, an exclude list).
    """
    from .discovery import checked_data_options, discover_for

    config = TrainConfig(data=str(data), model=model, weights=weights, strategy="auto", budget=budget,
                         models=models, seed=seed, val_split=val_split, mean=mean, std=std, image_size=image_size,
                         quiet=True, precision=precision or "auto",
                         **checked_data_options(data_options))  # fmt: skip
    splits = discover_for(config)
    config.resolved_from["balance"] = resolve_balance("auto", splits.train, len(splits.class_names),
                                                      splits.multi_label).to_dict()  # fmt: skip
    return select(config, splits, budget, config.models, quiet=True, trainable=False)
