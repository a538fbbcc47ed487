"""``transferkit inspect``: likely label errors, near-duplicates, leaks, outliers and bad files of a dataset."""

from __future__ import annotations

import argparse
import json

from .common import (
    SEED,
    ApiChoices,
    Command,
    backbone_options,
    batch_size_option,
    bounded,
    cache_dir_option,
    data_options,
    image_size_option,
    val_split,
)


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", help="an image folder or CSV label file, as for train (default with --run: "
                   "the run's data)")  # fmt: skip
    p.add_argument("--run", metavar="RUN_DIR", help="use this run's backbone, preprocessing and layer, so the "
                   "features it cached are reused (instead of --model/--weights)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="a new or empty folder for inspection.html, inspection.json and "
                   "suspects.txt (default: ./<DATA name>-inspection)")  # fmt: skip
    p.add_argument("--layer", help="layer group or module path whose pooled features are used (default: the "
                   "penultimate features, or the run's layer)")  # fmt: skip
    p.add_argument("--precision", choices=ApiChoices("PRECISIONS"), metavar="PRECISION",
                   help="%(choices)s (default: the run's, else auto: bf16 where native, else fp32)")  # fmt: skip
    p.add_argument("--folds", type=bounded(int, 2), default=5, help="cross-validation folds of the linear probe behind label issues")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the folds (and of the train/val split, as for train)")
    p.add_argument("--val-split", type=val_split, help="validation share when DATA has no val/ folder (default 0.2)")
    p.add_argument("--neighbours", type=bounded(int, 1), default=5, help="nearest images shown beside a suspect, and averaged "
                   "over for the outlier score")  # fmt: skip
    p.add_argument("--duplicate-ratio", type=bounded(float, 0), default=0.25, help="near-duplicates: pairs whose cosine "
                   "distance is under this fraction of the data's median nearest-neighbour distance")  # fmt: skip
    p.add_argument("--duplicate-similarity", type=bounded(float, -1, 1), help="near-duplicates: a fixed cosine-similarity "
                   "threshold instead (e.g. 0.95)")  # fmt: skip
    p.add_argument("--outlier-fraction", type=bounded(float, 0, 1), default=0.01, help="share of images listed as outliers, the "
                   "farthest from their nearest neighbours first (0: none)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print inspection.json's content instead of the summary")


def _inspect(args: argparse.Namespace) -> int:
    from .. import TransferkitError, explicit_preprocessing, inspect_data
    from ..inspection import default_out_dir
    from ..inspection_data import LABEL_FILE_OPTIONS

    if args.run and (args.mean or args.std or args.image_size):
        raise TransferkitError("--run brings its own preprocessing; leave out --mean, --std and --image-size")
    preprocessing = None if args.run else explicit_preprocessing(args.model, args.mean, args.std, args.image_size)
    options = {name: getattr(args, name) for name in LABEL_FILE_OPTIONS if getattr(args, name) is not None}
    result = inspect_data(
        args.data, run=args.run, model=args.model, weights=args.weights, layer=args.layer, precision=args.precision,
        out=args.out or default_out_dir(args.data, args.run), folds=args.folds, seed=args.seed,
        neighbours=args.neighbours, duplicate_ratio=args.duplicate_ratio,
        duplicate_similarity=args.duplicate_similarity, outlier_fraction=args.outlier_fraction, labels=args.labels,
        exclude=args.exclude, val_split=args.val_split, data_options=options, preprocessing=preprocessing,
        batch_size=args.batch_size, cache_dir=args.cache_dir,
    )  # fmt: skip
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0


COMMANDS = (
    Command("inspect", "Find likely label errors, near-duplicates, leaks between splits, outliers and bad files.", """
transferkit inspect data/hymenoptera
transferkit inspect --run runs/my-run --out review/
transferkit train data/hymenoptera --exclude hymenoptera-inspection/suspects.txt
""", _inspect_arguments, _inspect,
            parents=(backbone_options, image_size_option, batch_size_option, cache_dir_option, data_options)),
)  # fmt: skip
