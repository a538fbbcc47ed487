"""Housekeeping and a first look: ``cache`` (the feature cache) and ``demo`` (an offline end-to-end run)."""

from __future__ import annotations

import argparse

from .common import Command, bounded, cache_dir_option

CACHE_ACTIONS = ("info", "clear", "path")
CACHE_KINDS = {"features": "feature vectors", "exports": "ONNX exports", "shards": "fetched shard chunks"}


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=CACHE_ACTIONS,
                   help="info: what is cached and its size; clear: delete the features, exports and shards "
                        "transferkit cached (nothing else in the folder); path: print it")  # fmt: skip


def _cache(args: argparse.Namespace) -> int:
    from .. import TransferkitError, cache_info, cache_root, clear_cache
    from ..files import CACHE_ENV, is_not

    root = cache_root(args.cache_dir)
    if root.exists() and not root.is_dir():  # --cache-dir was checked by main; $TRANSFERKIT_CACHE_DIR is checked here
        raise TransferkitError(f"{CACHE_ENV} {root} {is_not(root)}; give the cache's folder")
    if args.action == "path":
        print(root)
    elif args.action == "info":
        info = cache_info(root)
        print(root)
        for kind, what in CACHE_KINDS.items():
            print(f"  {kind:<9} {info[kind]['count']:>10,} {what:<21} {_megabytes(info[kind]['bytes'])}")
        print(f"  {'total':<9} {'':>10} {'':<21} {_megabytes(sum(i['bytes'] for i in info.values()))}")
    else:
        removed = clear_cache(root)
        print(f"removed {removed['features']} cached feature vectors, {removed['exports']} ONNX exports and "
              f"{removed['shards']} fetched shard chunks from {root}")
    return 0


def _megabytes(size: int) -> str:
    return f"{size / 1e6:>10,.1f} MB"


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="demo", help="where the demo data and runs go")
    p.add_argument("--epochs", type=bounded(int, 1), default=10, help="training epochs of each demo run")
    p.add_argument("--budget", default="100s", help="time for measuring the candidates and training the winner")


def _demo(args: argparse.Namespace) -> int:
    from .. import run_demo

    run_demo(args.workdir, args.epochs, args.budget)
    return 0


COMMANDS = (
    Command("cache", "Manage the feature cache.", "transferkit cache info\ntransferkit cache clear", _cache_arguments,
            _cache, parents=(cache_dir_option,)),
    Command("demo", "Train and evaluate a real classifier offline (ImageNet weights, real digit images).",
            "transferkit demo --workdir demo", _demo_arguments, _demo),
)  # fmt: skip
