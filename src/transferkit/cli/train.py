"""Commands that train: ``train`` (or resume a run) and ``lr-find``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from .common import (
    SEED,
    ApiChoices,
    Command,
    backbone_options,
    batch_size_option,
    cache_dir_option,
    data_options,
    data_options_given,
    epochs,
    image_size_option,
    precision_option,
    val_split,
)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", help="DATA/train/<class>/* and DATA/val/<class>/*, DATA/<class>/* "
                   "(split by --val-split), or a CSV label file")  # fmt: skip
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run with its own configuration")
    p.add_argument("--strategy", default="feature-extract", choices=ApiChoices("STRATEGIES", extra=["auto"]),
                   metavar="STRATEGY", help="%(choices)s (auto: measured on a holdout of the training images "
                   "within --budget; see the README)")  # fmt: skip
    p.add_argument("--budget", help="auto: wall-clock seconds for the search and the final training, e.g. 90s, 5m "
                   "(default: 60 s + 0.15 s per training image)")  # fmt: skip
    p.add_argument("--models", help="auto: candidate backbones, comma-separated (default: the model and every "
                   "backbone whose weights are available offline; the model alone with --weights none or "
                   "--mean/--std)")  # fmt: skip
    p.add_argument("--classifier", default="logreg", choices=ApiChoices("CLASSIFIERS"), metavar="NAME",
                   help="linear-probe: %(choices)s (C chosen by cross-validation)")  # fmt: skip
    p.add_argument("--layer", help="linear-probe: layer group or module path whose pooled features are used")
    p.add_argument("--unfreeze", help="fine-tune: N last layer groups or names (layer3,layer4); gradual: at most N")
    p.add_argument("--unfreeze-every", type=int, default=1, help="gradual: unfreeze one more group every K epochs")
    p.add_argument("--unfreeze-at", type=epochs, default=[], help="gradual: epochs to unfreeze at, e.g. 2,4,6")
    p.add_argument("--train-bn", action="store_true", help="let BatchNorm in frozen groups train (default: inference mode)")
    p.add_argument("--head", default="linear", help="linear, or mlp:SIZES such as mlp:256 or mlp:512,256")
    p.add_argument("--head-dropout", type=float, help="dropout in an MLP head (default 0.2)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training images")
    p.add_argument("--lr", default=1e-3, help="learning rate of the head, or auto (run the LR finder first)")
    p.add_argument("--lr-decay", type=float, help="LR multiplier per group away from the head (default 0.1 for "
                   "fine-tune/gradual, 1 otherwise)")  # fmt: skip
    p.add_argument("--group-lr", default="", help="explicit LRs per group, e.g. head=1e-3,layer4=1e-4,layer3=5e-5")
    p.add_argument("--aux-weight", type=float, default=0.4, help="Inception v3: weight of the auxiliary loss")
    p.add_argument("--optimizer", default="adamw", choices=ApiChoices("OPTIMIZERS"), metavar="NAME", help="%(choices)s")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="optimizer weight decay")
    p.add_argument("--scheduler", default="cosine", choices=ApiChoices("SCHEDULERS"), metavar="NAME",
                   help="LR schedule: %(choices)s")  # fmt: skip
    p.add_argument("--step-size", type=int, default=7, help="step scheduler: epochs between LR drops")
    p.add_argument("--gamma", type=float, default=0.1, help="step scheduler: LR factor at each drop")
    p.add_argument("--augment", default="light", choices=ApiChoices("AUGMENTATIONS"), metavar="NAME",
                   help="%(choices)s (light: random resized crop + flip)")  # fmt: skip
    p.add_argument("--val-split", type=val_split, default=0.2, help="validation share when DATA has no val/ folder")
    p.add_argument("--folds", type=int, metavar="K", help="k-fold estimate: K runs on K stratified splits of the "
                   "train and val images pooled, each metric as mean ± std; predict then averages the K models")
    p.add_argument("--calibration", default="temperature", choices=("temperature", "none"),
                   help="after training, fit a temperature on held-out predictions so probabilities mean what they "
                   "say (out-of-fold for linear probes), or none")  # fmt: skip
    p.add_argument("--balance", default="auto", choices=ApiChoices("BALANCE_MODES"), metavar="MODE",
                   help="imbalanced classes: %(choices)s (auto: class-weighted loss when the largest class has "
                   "over 3x the images of the smallest; best epoch then chosen by macro-F1)")  # fmt: skip
    p.add_argument("--seed", type=SEED, default=0, help="random seed (data split, augmentation, initialisation)")
    p.add_argument("--precision", default="auto", choices=ApiChoices("PRECISIONS"), metavar="PRECISION",
                   help="%(choices)s")  # fmt: skip
    p.add_argument("--accelerator", default="auto", help="auto, cpu, cuda, gpu or mps")
    p.add_argument("--devices", default="auto", help="devices per node (or auto)")
    p.add_argument("--num-nodes", type=int, default=1, help="machines taking part (launched by torchrun or SLURM)")
    p.add_argument("--dist", "--strategy-dist", dest="dist", default="auto",
                   help="Lightning distributed strategy: auto, ddp, ddp_spawn, fsdp, ...")
    p.add_argument("--patience", type=int, help="stop early after N epochs without val accuracy improvement")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes (default: none on a CPU, where a "
                   "batch is decoded on all cores between steps; cores - 1 beside a GPU)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the network: pays on long runs only "
                   "(14-43 s to compile on 2 cores, then 1.05-1.23x; worth it after ~4,000-13,000 images)")  # fmt: skip
    p.add_argument("--no-cache", action="store_true", help="feature-extract: recompute the frozen backbone every epoch")
    p.add_argument("--views", type=int, default=1, help="feature-extract: augmented views cached per training image "
                   "(1 = the plain evaluation view, no augmentation)")  # fmt: skip
    p.add_argument("--out", help="run directory (default runs/<model>-<strategy>-<time>); never overwritten")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages (leaderboard, notices, "
                   "result line): the run directory alone is printed")  # fmt: skip
    p.add_argument("--logger", dest="loggers", action="append", metavar="NAME",
                   help="tensorboard, csv, mlflow or wandb; repeat or comma-separate for several, none for none "
                   "(default: none; mlflow: RUNS/mlflow.db; wandb: offline without a key)")


def _given(args: argparse.Namespace, baseline: list[str]) -> list[str]:
    """The options (by their flags, DATA as DATA) whose values differ from those of ``train BASELINE``."""
    train = COMMANDS[0]
    parser = argparse.ArgumentParser(parents=[make() for make in train.parents], add_help=False)
    train.add_arguments(parser)
    defaults = parser.parse_args(baseline)
    return [action.option_strings[0] if action.option_strings else action.dest.upper()
            for action in parser._actions  # argparse's list of them: the flags of each destination
            if getattr(args, action.dest, None) != getattr(defaults, action.dest, None)]  # fmt: skip


# Options that one setting alone reads: given with another, they would change nothing.
GRADIENT_TRAINED = ("feature-extract", "fine-tune", "full", "gradual", "auto")  # not linear-probe: scikit-learn
READ_ONLY_WITH = {
    **{flag: ("--strategy", GRADIENT_TRAINED) for flag in ("--epochs", "--lr", "--optimizer", "--weight-decay",
                                                            "--scheduler", "--patience", "--augment", "--compile")},
    "--unfreeze": ("--strategy", ("fine-tune", "gradual", "auto")),
    "--unfreeze-every": ("--strategy", ("gradual",)),  # gradual is no candidate of auto's
    "--unfreeze-at": ("--strategy", ("gradual",)),
    "--classifier": ("--strategy", ("linear-probe", "auto")),
    "--views": ("--strategy", ("feature-extract", "auto")),
    "--head": ("--strategy", GRADIENT_TRAINED),
    "--group-lr": ("--strategy", GRADIENT_TRAINED),
    # Only pretrained groups that train have a distance from the head, or BatchNorm to free.
    "--lr-decay": ("--strategy", ("fine-tune", "full", "gradual", "auto")),
    "--train-bn": ("--strategy", ("fine-tune", "gradual", "auto")),
    "--momentum": ("--optimizer", ("sgd",)),
    "--aux-weight": ("--model", ("inception_v3",)),  # the one backbone trained with an auxiliary classifier
    "--step-size": ("--scheduler", ("step",)),
    "--gamma": ("--scheduler", ("step",)),
}


def _check_options_are_read(args: argparse.Namespace) -> None:
    """An option the chosen strategy, optimizer or scheduler would ignore is an error, not a quiet no-op."""
    from .. import TransferkitError

    given = _given(args, [args.data])
    for flag in given:
        if flag in READ_ONLY_WITH:
            setting, values = READ_ONLY_WITH[flag]
            value = getattr(args, setting.removeprefix("--"))
            if value not in values:
                named = ", ".join(values[:-1]) + " or " * (len(values) > 1) + values[-1]
                raise TransferkitError(f"{flag} applies to {setting} {named}; {setting} {value} "
                                       f"would ignore it: leave it out or change {setting}")  # fmt: skip
    if "--unfreeze-every" in given and "--unfreeze-at" in given:
        raise TransferkitError("--unfreeze-every and --unfreeze-at both set gradual's schedule; give one of them")
    one_cached_view = args.strategy == "feature-extract" and args.views == 1 and not args.no_cache
    if "--augment" in given and args.augment != "none" and one_cached_view:
        raise TransferkitError("--augment with --strategy feature-extract needs --views K (K augmented views of "
                               "each training image, their features cached) or --no-cache; with one view the head "
                               "trains on the unaugmented images' features")  # fmt: skip


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .. import TrainConfig, TransferkitError, resume_training, train

    command = " ".join(["transferkit", *sys.argv[1:]])
    if args.resume:
        besides = _given(args, ["--resume", args.resume, *["--quiet"] * args.quiet])  # --quiet changes no result
        if besides:
            raise TransferkitError(f"--resume continues {args.resume} with its own configuration: leave out "
                                   f"{', '.join(besides)} (to change them, start a new run)")  # fmt: skip
        with _resume_hint_on_interrupt(args.resume):
            print(resume_training(args.resume, command=command, quiet=args.quiet or None).run_dir)
        return 0
    if not args.data:
        raise TransferkitError("train needs DATA (an image folder), or --resume RUN_DIR")
    _check_options_are_read(args)
    # Options are named as TrainConfig's fields; the two negative/short flags are translated.
    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "data" and hasattr(args, f.name)}
    options.update(cache=not args.no_cache, feature_views=args.views)
    if str(args.devices).isdigit():
        options["devices"] = int(args.devices)
    with _resume_hint_on_interrupt(None):
        result = train(args.data, **options, _command=command)
    print(result.run_dir)
    return 0


@contextlib.contextmanager
def _resume_hint_on_interrupt(run_dir: str | None) -> Iterator[None]:
    """A Ctrl+C says how to continue the run (``run_dir``, else the one this process was training)."""
    from ..training.fit import RUN_DIR_ENV
    from ..workflow import resume_target

    try:
        yield
    except KeyboardInterrupt:
        target = resume_target(run_dir or os.environ.get(RUN_DIR_ENV))
        if target is None:
            raise
        raise KeyboardInterrupt(f"continue with: transferkit train --resume {target}") from None


def _lr_find_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="an image folder or a label file, as for train")
    p.add_argument("--strategy", default="feature-extract", choices=ApiChoices("STRATEGIES"), metavar="STRATEGY",
                   help="%(choices)s (a linear probe has no learning rate to find)")  # fmt: skip
    p.add_argument("--unfreeze", help="as for train")
    p.add_argument("--head", default="linear", help="as for train")
    p.add_argument("--optimizer", default="adamw", choices=ApiChoices("OPTIMIZERS"), metavar="NAME", help="%(choices)s")
    p.add_argument("--plot", default="lr_find.png", help="where to save the loss-vs-LR plot (.png, .pdf or .svg)")


def _lr_find(args: argparse.Namespace) -> int:
    from .. import TrainConfig, find_lr
    from ..files import new_files
    from ..training.lr_find import plot_format

    plot_format(args.plot)  # both before the search, which takes a while
    (plot_path,) = new_files("--plot", args.plot)
    config = TrainConfig(data=args.data, model=args.model, weights=args.weights, mean=args.mean, std=args.std,
                         image_size=args.image_size, strategy=args.strategy, unfreeze=args.unfreeze, head=args.head,
                         batch_size=args.batch_size, optimizer=args.optimizer, precision=args.precision,
                         quiet=True, **data_options_given(args))  # fmt: skip
    result = find_lr(config)
    plot = result.plot(plot_path)
    print(f"suggested learning rate: {result.suggestion:g} (plot: {plot})")
    return 0


COMMANDS = (
    Command("train", "Train a classifier on an image folder by transfer learning.", """
transferkit train data/hymenoptera --strategy feature-extract --epochs 10
transferkit train data/hymenoptera --strategy auto --budget 3m --models efficientnet_lite0,resnet18
transferkit train data/hymenoptera --model resnet18 --strategy fine-tune --unfreeze 2 --lr-decay 0.1
transferkit train data/x --model mobilenet_v2 --weights mobilenet_v2_imagenet.pth --mean 0.5 --std 0.5
transferkit train --resume runs/resnet18-gradual-20260101-120000
transferkit train labels.csv --label-col diagnosis --split-col fold
""", _train_arguments, _train,
            parents=(data_options, backbone_options, image_size_option, batch_size_option, cache_dir_option)),
    Command("lr-find", "LR range test (Lightning's tuner): saves a plot, prints the suggested LR.", """
transferkit lr-find data/hymenoptera --strategy fine-tune --unfreeze 2 --plot lr.png
transferkit train data/hymenoptera --lr auto
""", _lr_find_arguments, _lr_find,
            parents=(backbone_options, image_size_option, batch_size_option, precision_option, data_options,
                     cache_dir_option)),
)  # fmt: skip
