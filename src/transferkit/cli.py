"""``transferkit`` command line: thin commands over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from .errors import TransferkitError

Handler = Callable[[argparse.Namespace], int]


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 1 or 3 numbers, got {text!r}")
    return values


def _epochs_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, got {text!r}") from None


def _parser(sub: Any, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog="example:\n" + textwrap.indent(example.strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --------------------------------------------------------------------------- train


def _add_train(sub: Any) -> None:
    p = _parser(sub, "train", "Train a classifier on an image folder by transfer learning.", """
transferkit train data/hymenoptera --strategy feature-extract --epochs 10
transferkit train data/hymenoptera --model resnet18 --strategy fine-tune --unfreeze 2 --lr-decay 0.1
transferkit train data/x --model mobilenet_v2 --weights mobilenet_v2_imagenet.pth --mean 0.5 --std 0.5
transferkit train --resume runs/resnet18-gradual-20260101-120000
""")
    p.add_argument("data", nargs="?", help="DATA/train/<class>/* and DATA/val/<class>/*, or DATA/<class>/* "
                   "(split by --val-split)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run with its own configuration")
    p.add_argument("--model", default="efficientnet_lite0", help="backbone name (see: transferkit models)")
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT, a torchvision enum name, none, or a weights file")
    p.add_argument("--mean", type=_floats, help="normalisation mean for a weights file, e.g. 0.5 or 0.485,0.456,0.406")
    p.add_argument("--std", type=_floats, help="normalisation std for a weights file")
    p.add_argument("--image-size", type=int, help="input size (crop) instead of the weights' own")
    p.add_argument("--strategy", default="feature-extract",
                   help="feature-extract, fine-tune, full, gradual, linear-probe, or auto (follow transferkit advise)")
    p.add_argument("--classifier", default="logreg", help="linear-probe: logreg or svm (C chosen by cross-validation)")
    p.add_argument("--layer", help="linear-probe: layer group or module path whose pooled features are used")
    p.add_argument("--unfreeze", help="fine-tune: N last layer groups or names (layer3,layer4); gradual: at most N")
    p.add_argument("--unfreeze-every", type=int, default=1, help="gradual: unfreeze one more group every K epochs")
    p.add_argument("--unfreeze-at", type=_epochs_list, default=[], help="gradual: epochs to unfreeze at, e.g. 2,4,6")
    p.add_argument("--train-bn", action="store_true", help="let BatchNorm in frozen groups train (default: inference mode)")
    p.add_argument("--head", default="linear", help="linear, or mlp:SIZES such as mlp:256 or mlp:512,256")
    p.add_argument("--head-dropout", type=float, help="dropout in an MLP head (default 0.2)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", default=1e-3, help="learning rate of the head, or auto (run the LR finder first)")
    p.add_argument("--lr-decay", type=float, help="LR multiplier per group away from the head (default 0.1 for "
                   "fine-tune/gradual, 1 otherwise)")  # fmt: skip
    p.add_argument("--group-lr", default="", help="explicit LRs per group, e.g. head=1e-3,layer4=1e-4,layer3=5e-5")
    p.add_argument("--aux-weight", type=float, default=0.4, help="Inception v3: weight of the auxiliary loss")
    p.add_argument("--optimizer", default="adamw", help="sgd, adam or adamw")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--scheduler", default="cosine", help="none, step, cosine or onecycle")
    p.add_argument("--step-size", type=int, default=7, help="step scheduler: epochs between LR drops")
    p.add_argument("--gamma", type=float, default=0.1, help="step scheduler: LR factor at each drop")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--augment", default="light", help="none, light (random resized crop + flip) or strong")
    p.add_argument("--val-split", type=float, default=0.2, help="validation share when DATA has no val/ folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", help="auto, 32, bf16 or 16")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--devices", default="auto", help="devices per node (or auto)")
    p.add_argument("--num-nodes", type=int, default=1, help="machines taking part (launched by torchrun or SLURM)")
    p.add_argument("--dist", "--strategy-dist", dest="dist", default="auto",
                   help="Lightning distributed strategy: auto, ddp, ddp_spawn, fsdp, ...")
    p.add_argument("--patience", type=int, help="stop early after N epochs without val accuracy improvement")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes (default: none on a CPU, where a "
                   "batch is decoded on all cores between steps; cores - 1 beside a GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network: pays on long runs only "
                   "(14-43 s to compile on 2 cores, then 1.05-1.23x; worth it after ~4,000-13,000 images)")
    p.add_argument("--no-cache", action="store_true", help="feature-extract: recompute the frozen backbone every epoch")
    p.add_argument("--views", type=int, default=1, help="feature-extract: augmented views cached per training image "
                   "(1 = the plain evaluation view, no augmentation)")  # fmt: skip
    p.add_argument("--cache-dir", help="feature cache folder (default ~/.cache/transferkit, or $TRANSFERKIT_CACHE_DIR)")
    p.add_argument("--out", help="run directory (default runs/<model>-<strategy>-<time>); never overwritten")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .training import TrainConfig, resume_training, train

    command = " ".join(["transferkit", *sys.argv[1:]])
    if args.resume:
        print(resume_training(args.resume, command=command).run_dir)
        return 0
    if not args.data:
        raise TransferkitError("train needs DATA (an image folder), or --resume RUN_DIR")
    # Options are named as TrainConfig's fields; the two negative/short flags are translated.
    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "data" and hasattr(args, f.name)}
    options.update(cache=not args.no_cache, feature_views=args.views)
    if str(args.devices).isdigit():
        options["devices"] = int(args.devices)
    result = train(args.data, **options, _command=command)
    print(result.run_dir)
    return 0


# --------------------------------------------------------------------------- evaluate / predict


def _add_evaluate(sub: Any) -> None:
    p = _parser(sub, "evaluate", "Accuracy, per-class precision/recall/F1 and confusion matrix on a folder.", """
transferkit evaluate runs/efficientnet_lite0-feature-extract-20260101-120000 data/hymenoptera/val
transferkit evaluate runs/my-run data/test --json > metrics.json
""")
    p.add_argument("run", help="run directory (or its model.pt)")
    p.add_argument("data", help="folder with one sub-folder per class (a DATA root means its test/ or val/)")
    p.add_argument("--json", action="store_true", help="print a JSON object (with 'accuracy') instead of a table")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", help="32, bf16 or 16 (default: the run's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network first (pays on many images)")
    p.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from .inference import evaluate

    result = evaluate(args.run, args.data, batch_size=args.batch_size, precision=args.precision, compile=args.compile)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def _add_predict(sub: Any) -> None:
    p = _parser(sub, "predict", "Predict labels of image files or folders.", """
transferkit predict runs/my-run photo.jpg more_photos/ --top-k 3
transferkit predict runs/my-run photos/ --json
""")
    p.add_argument("run", help="run directory, its model.pt, or an ONNX export (.onnx)")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--runtime", default="auto", help="auto, torch or onnx. auto: ONNX Runtime (when installed, "
                   "on a CPU) if the run has an export or there are 256+ images (exported once, verified, cached); "
                   "else PyTorch")
    p.add_argument("--json", action="store_true", help='print [{"path", "predictions": [{"label", "probability"}]}]')
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", help="32, bf16 or 16 (default: the run's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network first (pays on many images)")
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from .inference import format_predictions, predict

    results = predict(args.run, args.paths, top_k=args.top_k, batch_size=args.batch_size, precision=args.precision,
                      compile=args.compile, runtime=args.runtime)  # fmt: skip
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0 if all(not r.get("error") for r in results) else 1


# --------------------------------------------------------------------------- models


def _add_models(sub: Any) -> None:
    p = _parser(sub, "models", "List available backbones; * marks weights available offline now.", """
transferkit models
transferkit models 'resnet*'
transferkit models 'timm/convnext*'
""")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*' or 'timm/vit*'")
    p.add_argument("--offline", action="store_true", help="only backbones whose weights load without a network")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_models)


def _models(args: argparse.Namespace) -> int:
    from .backbones import list_backbones, offline_weights_available

    names = list_backbones(args.pattern)
    rows = [(n, offline_weights_available(n)) for n in names]
    if args.offline:
        rows = [r for r in rows if r[1]]
    if not rows:
        raise TransferkitError(f"no backbone matches {args.pattern!r}; try transferkit models without a pattern")
    if args.json:
        print(json.dumps([{"name": n, "offline": o} for n, o in rows], indent=2))
    else:
        for name, offline in rows:
            print(f"{'*' if offline else ' '} {name}")
        print(f"\n{len(rows)} backbones; * = pretrained weights available offline now", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- features / advise / lr-find


def _add_features(sub: Any) -> None:
    p = _parser(sub, "features", "Write pooled CNN features (with labels and paths) for your own tools.", """
transferkit features data/hymenoptera --model resnet50 --out feats.npz
transferkit features data/hymenoptera --layer layer3 --out layer3.pt
""")
    p.add_argument("data", help="an image folder (all of train/val/test, or DATA/<class>/*)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("--mean", type=_floats, help="normalisation mean for a weights file")
    p.add_argument("--std", type=_floats, help="normalisation std for a weights file")
    p.add_argument("--layer", help="layer group (see the model's groups) or module path; default: the penultimate features")
    p.add_argument("--out", required=True, help="output file, .npz or .pt")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-cache", action="store_true")
    p.set_defaults(handler=_features)


def _explicit_prep(model: str, mean: list[float] | None, std: list[float] | None) -> Any:
    from .backbones import explicit_preprocessing

    return explicit_preprocessing(model, mean, std)


def _features(args: argparse.Namespace) -> int:
    from .features import write_features

    info = write_features(args.data, args.out, args.model, args.weights, args.layer, args.batch_size,
                          use_cache=not args.no_cache, preprocessing=_explicit_prep(args.model, args.mean, args.std))
    print(f"wrote {info['count']} × {info['dim']} features of {info['layer']} to {info['path']} "
          f"({info['misses']} computed, {info['hits']} from cache)")  # fmt: skip
    return 0


def _add_advise(sub: Any) -> None:
    p = _parser(sub, "advise", "Measure a dataset and recommend a strategy (size x similarity to ImageNet).", """
transferkit advise data/hymenoptera
transferkit advise data/xrays --model resnet50 --json
""")
    p.add_argument("data")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("--mean", type=_floats, help="normalisation mean for a weights file")
    p.add_argument("--std", type=_floats, help="normalisation std for a weights file")
    p.add_argument("--per-class", type=int, default=100, help="images per class used to measure similarity")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_advise)


def _advise(args: argparse.Namespace) -> int:
    from .advice import advise

    advice = advise(args.data, args.model, args.weights, per_class=args.per_class,
                    preprocessing=_explicit_prep(args.model, args.mean, args.std))  # fmt: skip
    print(json.dumps(advice.to_dict(), indent=2) if args.json else advice.text())
    return 0


def _add_lr_find(sub: Any) -> None:
    p = _parser(sub, "lr-find", "LR range test (Lightning's tuner): saves a plot, prints the suggested LR.", """
transferkit lr-find data/hymenoptera --strategy fine-tune --unfreeze 2 --plot lr.png
transferkit train data/hymenoptera --lr auto
""")
    p.add_argument("data")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="DEFAULT")
    p.add_argument("--strategy", default="feature-extract", help="feature-extract, fine-tune, full or gradual")
    p.add_argument("--unfreeze", help="as for train")
    p.add_argument("--head", default="linear")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--plot", default="lr_find.png", help="where to save the loss-vs-LR plot")
    p.set_defaults(handler=_lr_find)


def _lr_find(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .training import TrainConfig, find_lr

    config = TrainConfig(data=args.data, model=args.model, weights=args.weights, strategy=args.strategy,
                         unfreeze=args.unfreeze, head=args.head, batch_size=args.batch_size, optimizer=args.optimizer,
                         quiet=True)  # fmt: skip
    result = find_lr(config)
    plot = result.plot(Path(args.plot))
    print(f"suggested learning rate: {result.suggestion:g} (plot: {plot})")
    return 0


# --------------------------------------------------------------------------- cache / demo


def _add_cache(sub: Any) -> None:
    p = _parser(sub, "cache", "Manage the feature cache.", "transferkit cache clear")
    p.add_argument("action", choices=["clear", "path"])
    p.add_argument("--cache-dir", help="cache folder (default ~/.cache/transferkit, or $TRANSFERKIT_CACHE_DIR)")
    p.set_defaults(handler=_cache)


def _cache(args: argparse.Namespace) -> int:
    from .files import cache_root, clear_cache

    root = cache_root(args.cache_dir)
    if args.action == "path":
        print(root)
    else:
        removed = clear_cache(root)
        print(f"removed {removed['features']} cached feature vectors and {removed['exports']} ONNX exports from {root}")
    return 0


def _add_demo(sub: Any) -> None:
    p = _parser(sub, "demo", "Train and evaluate a real classifier offline (ImageNet weights, real digit images).",
                "transferkit demo --workdir demo")  # fmt: skip
    p.add_argument("--workdir", default="demo", help="where the demo data and runs go")
    p.add_argument("--epochs", type=int, default=10)
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.workdir, args.epochs)
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferkit",
        description="Turn a folder of labelled images into an evaluated, exportable classifier by transfer learning.",
        epilog="example:\n  transferkit train data/hymenoptera --epochs 10\n  transferkit predict runs/<run> photo.jpg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    from . import cli_export, cli_reports

    cli_reports.register(sub)
    cli_export.register(sub)
    return parser


COMMANDS: list[Callable[[Any], None]] = [
    _add_train, _add_evaluate, _add_predict, _add_models, _add_features, _add_advise, _add_lr_find, _add_cache,
    _add_demo,
]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("TRANSFERKIT_DEBUG") == "1"
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.handler(args)
    except TransferkitError as exc:
        if debug:
            raise
        print(f"transferkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("transferkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
