"""Commands that look at backbones and data before training: ``models``, ``features``, ``advise``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from .common import (
    Command,
    backbone_options,
    batch_size_option,
    bounded,
    cache_dir_option,
    data_options,
    data_options_given,
    image_size_option,
    precision_option,
)


def _models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*' or 'timm/vit*'")
    p.add_argument("--offline", action="store_true", help="only backbones whose weights load without a network")
    p.add_argument("--json", action="store_true", help='print [{"name", "offline"}] instead of a list')


def _wider_pattern(pattern: str) -> str:
    """A pattern to try instead: with wildcards, then among timm's models (listed only under ``timm/``)."""
    from .. import list_backbones

    core = f"*{pattern.removeprefix('timm/').strip('*')}*"
    tries = [f"timm/{core}"] if pattern.startswith("timm/") else [core, f"timm/{core}"]
    found = next((t for t in tries if t != pattern and list_backbones(t)), None)
    return f"try transferkit models '{found}'" if found else "try a shorter pattern, or none"


def _models(args: argparse.Namespace) -> int:
    from .. import TransferkitError, list_backbones, offline_weights_available

    rows = [(name, offline_weights_available(name)) for name in list_backbones(args.pattern)]
    if args.offline and rows and not any(offline for _, offline in rows):
        raise TransferkitError(f"none of the {len(rows)} backbones matching {args.pattern!r} has its weights here "
                               f"(they download on first use); leave out --offline to list them")  # fmt: skip
    if args.offline:
        rows = [row for row in rows if row[1]]
    if not rows:
        raise TransferkitError(f"no backbone matches {args.pattern!r} (a pattern matches whole names); "
                               f"{_wider_pattern(args.pattern)}")  # fmt: skip
    if args.json:
        print(json.dumps([{"name": name, "offline": offline} for name, offline in rows], indent=2))
    else:
        for name, offline in rows:
            print(f"{'*' if offline else ' '} {name}")
        print(f"\n{len(rows)} backbones; * = pretrained weights available offline now", file=sys.stderr)
    return 0


def _explicit_preprocessing(args: argparse.Namespace) -> Any:
    """The --mean/--std given for a weights file, and --image-size, as the library's preprocessing."""
    from .. import explicit_preprocessing

    return explicit_preprocessing(args.model, args.mean, args.std, args.image_size)


def _features_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="an image folder (all of train/val/test, or DATA/<class>/*), a label file or "
                   "packed shards")  # fmt: skip
    p.add_argument("--layer", help="layer group (see the model's groups) or module path; default: the penultimate features")
    p.add_argument("--out", required=True, help="output file, .npz, .pt or .csv (a row per image)")
    p.add_argument("--no-cache", action="store_true", help="recompute features that are in the feature cache")


def _features(args: argparse.Namespace) -> int:
    from .. import write_features

    info = write_features(args.data, args.out, args.model, args.weights, args.layer, args.batch_size,
                          use_cache=not args.no_cache, preprocessing=_explicit_preprocessing(args),
                          precision=args.precision, data_options=data_options_given(args))  # fmt: skip
    print(f"wrote {info['count']} × {info['dim']} features of {info['layer']} to {info['path']} "
          f"({info['misses']} computed at {info['precision']}, {info['hits']} from cache)")  # fmt: skip
    return 0


def _advise_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="an image folder, a label file or packed shards, as for train")
    p.add_argument("--per-class", type=bounded(int, 1), default=100, help="images per class used to measure similarity")
    p.add_argument("--models", help="candidate backbones to measure, comma-separated (default: the model and "
                   "every backbone whose weights are available offline)")  # fmt: skip
    p.add_argument("--budget", help="seconds for the measurement, e.g. 60s, 2m (default: 60 s + 0.15 s per image)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")


def _advise(args: argparse.Namespace) -> int:
    from .. import advise, measure_candidates
    from ..discovery import data_flags

    options = data_options_given(args)
    advice = advise(args.data, args.model, args.weights, per_class=args.per_class, precision=args.precision,
                    preprocessing=_explicit_preprocessing(args), data_options=options)  # fmt: skip
    # The fast first stage of --strategy auto's measurement: candidates on cached features.
    measured = measure_candidates(args.data, args.model, args.weights, models=args.models, budget=args.budget,
                                  mean=args.mean, std=args.std, data_options=options,
                                  image_size=args.image_size, precision=args.precision)  # fmt: skip
    command = measured.command(shlex.quote(args.data) + data_flags(options))
    if args.json:
        print(json.dumps({**advice.to_dict(), "measured": {**measured.to_dict(), "command": command}}, indent=2))
    else:
        print(f"{advice.text()}\n\nmeasured on {measured.holdout_images} held-out training images "
              f"(the fast first stage of --strategy auto):\n{measured.table()}\nbest: {command}")
    return 0


COMMANDS = (
    Command("models", "List available backbones; * marks weights available offline now.", """
transferkit models
transferkit models 'resnet*'
transferkit models 'timm/convnext*'
""", _models_arguments, _models),
    Command("features", "Write pooled CNN features (with labels and paths) for your own tools.", """
transferkit features data/hymenoptera --model resnet50 --out feats.npz
transferkit features data/hymenoptera --layer layer3 --out layer3.pt
transferkit features images/ --labels labels.csv --out feats.npz
transferkit features data/fashion --image-size 64 --out small.npz
""", _features_arguments, _features,
            parents=(backbone_options, image_size_option, batch_size_option, precision_option, data_options,
                     cache_dir_option)),
    Command("advise", "Measure a dataset and recommend a strategy (size x similarity to ImageNet).", """
transferkit advise data/hymenoptera
transferkit advise data/xrays --model resnet50 --json
transferkit advise images/ --labels labels.csv --label-col diagnosis
""", _advise_arguments, _advise,
            parents=(backbone_options, image_size_option, precision_option, data_options, cache_dir_option)),
)  # fmt: skip
