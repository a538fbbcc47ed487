"""``pack``: write a dataset's images and labels as litdata shards that ``train``/``features`` read as a folder."""

from __future__ import annotations

import argparse
import json

from .common import SEED, Command, data_options, val_split


def _pack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="DATA as for train: train/val(/test) class folders, DATA/<class>/*, or a CSV label file")
    p.add_argument("--out", required=True, metavar="SHARDS", help="a new local folder for the shards")
    p.add_argument("--val-split", type=val_split, default=0.2, help="validation share when DATA has no val/ split "
                   "(the split is made now and kept in the shards)")  # fmt: skip
    p.add_argument("--seed", type=SEED, default=0, help="seed of that split")
    p.add_argument("--chunk-bytes", default="64MB", help="size of each shard file (litdata's chunk_bytes)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def _pack(args: argparse.Namespace) -> int:
    from ..discovery import discover_for, warn_unused_val_split
    from ..shards import chunk_size, pack

    size = chunk_size(args.chunk_bytes)  # before the images are listed
    splits = discover_for(vars(args))
    warn_unused_val_split(args.val_split, splits)
    written = pack(splits, args.out, chunk_bytes=size)
    if args.json:
        print(json.dumps(written, indent=2))
    else:
        counts = ", ".join(f"{n} {split}" for split, n in written["images"].items())
        print(f"packed {counts} images of {len(written['classes'])} classes into {written['chunks']} shard files "
              f"({written['bytes'] / 1e6:.1f} MB) in {written['path']}")  # fmt: skip
    return 0


COMMANDS = (
    Command("pack", "Write images and labels as litdata shards (a few large files) for train, features, evaluate, "
                    "predict, inspect.", """
transferkit pack data/hymenoptera --out shards/hymenoptera
transferkit train shards/hymenoptera --out runs/from-shards
aws s3 sync shards/hymenoptera s3://bucket/hymenoptera && transferkit train s3://bucket/hymenoptera
""", _pack_arguments, _pack, parents=(data_options,)),
)  # fmt: skip
