"""Housekeeping and a first look: ``cache`` (the feature cache) and ``demo`` (an offline end-to-end run)."""

from __future__ import annotations

import argparse

from .common import Command, bounded, cache_dir_option

CACHE_ACTIONS = ("clear", "path")


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=CACHE_ACTIONS, help="clear: delete the features, exports and shards transferkit cached (nothing else in the folder); path: print it")


def _cache(args: argparse.Namespace) -> int:
    from .. import cache_root, clear_cache

    root = cache_root(args.cache_dir)
    if args.action == "path":
        print(root)
    else:
        removed = clear_cache(root)
        print(f"removed {removed['features']} cached feature vectors, {removed['exports']} ONNX exports and "
              f"{removed['shards']} fetched shard chunks from {root}")
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="demo", help="where the demo data and runs go")
    p.add_argument("--epochs", type=bounded(int, 1), default=10, help="training epochs of each demo run")
    p.add_argument("--budget", default="100s", help="time for measuring the candidates and training the winner")


def _demo(args: argparse.Namespace) -> int:
    from .. import run_demo

    run_demo(args.workdir, args.epochs, args.budget)
    return 0


COMMANDS = (
    Command("cache", "Manage the feature cache.", "transferkit cache clear", _cache_arguments, _cache,
            parents=(cache_dir_option,)),
    Command("demo", "Train and evaluate a real classifier offline (ImageNet weights, real digit images).",
            "transferkit demo --workdir demo", _demo_arguments, _demo),
)  # fmt: skip
