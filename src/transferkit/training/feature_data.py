"""Loaders over stored backbone features, for training a head alone: every rank extracts its share.

In a run of W processes (``--devices N``, ``--num-nodes M``; torchrun and SLURM alike), rank r
computes the features of the images r, r + W, r + 2W, ... and appends them to the feature store in
shards of its own; after a barrier every rank reads all of them from the memory-mapped shards, a
batch at a time. This happens in Lightning's ``setup`` hook, where every rank exists and the
process group is up (before it, a launch by Lightning has only rank 0).

The store must be on storage every rank sees (on several machines, ``--cache-dir`` on a shared
filesystem); a rank computes anything it cannot find itself, so a node-local store stays correct,
only not faster.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import TransferkitError
from ..features import StoredFeatures, store_features
from ..model import TransferModel
from ..performance import resolve_precision
from .config import TrainConfig


class FeatureData(L.LightningDataModule):
    """The training and validation features of ``splits``, in the store, as loaders."""

    def __init__(
        self,
        model: TransferModel,
        splits: Any,
        config: TrainConfig,
        device: torch.device,
        make_sampler: Callable[[list[Any]], Sampler],
    ) -> None:
        super().__init__()
        self.model, self.splits, self.config, self.device = model, splits, config, device
        self.make_sampler = make_sampler
        self.sampler: Any = None
        self._epoch = 0
        self.train: StoredFeatures | None = None
        self.val: StoredFeatures | None = None
        self.info: dict[str, Any] = {}
        self.skipped: list[tuple[str, str]] = []

    # ResumableState saves and restores the training order's epoch through these, before or after setup.
    @property
    def epoch(self) -> int:
        return self.sampler.epoch if self.sampler is not None else self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = value
        if self.sampler is not None:
            self.sampler.epoch = value

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is None:
            self.prepare()
        else:
            self.prepare(trainer.global_rank, trainer.world_size, trainer.strategy.root_device)

    def prepare(self, rank: int = 0, world: int = 1, device: torch.device | None = None) -> None:
        """Extract this rank's share (all of it when alone), wait for the others, then open everything."""
        if self.train is not None:
            return
        started = time.perf_counter()
        config, device = self.config, device or self.device
        precision = resolve_precision(config.precision, device)
        augment = config.augment if config.feature_views > 1 else "none"
        common = {"cache_dir": config.cache_dir, "batch_size": config.batch_size, "num_workers": config.num_workers,
                  "device": device, "precision": precision, "writer_tag": f"rank{rank}" if world > 1 else ""}  # fmt: skip
        train_options = {**common, "augment": augment, "views": config.feature_views}
        computed = [0] * world
        if world > 1:
            computed[rank] = _extract_share(self.model, self.splits.train[rank::world], train_options) + \
                _extract_share(self.model, self.splits.val[rank::world], common)  # fmt: skip
            computed = _gathered(computed[rank], world)
        self.train = store_features(self.model, self.splits.train, **train_options)
        self.val = store_features(self.model, self.splits.val, **common)
        # Alone, everything computed was computed here; with others, what a rank missed after the
        # barrier is what no rank could decode (each retried it): count it once.
        misses = sum(computed) + self.train.misses + self.val.misses
        total = self.train.hits + self.train.misses + self.val.hits + self.val.misses
        self.skipped = [(p, "cannot decode") for p in self.train.skipped + self.val.skipped]
        self.sampler = self.make_sampler(list(zip(self.train.paths, self.train.labels.tolist())))
        self.sampler.epoch = self._epoch
        self.info = {
            "feature_cache": {"hits": total - misses, "misses": misses, "views": config.feature_views,
                              "augment": augment, "precision": precision, "store": str(self.train.store.root),
                              **({"computed_by_rank": computed} if world > 1 else {})},
            "feature_seconds": round(time.perf_counter() - started, 2),
        }  # fmt: skip
        if not config.quiet and rank == 0:
            ranks = f" by {world} ranks ({', '.join(map(str, computed))})" if world > 1 else ""
            print(f"features: {misses} computed{ranks}, {total - misses} from the store in "
                  f"{self.info['feature_seconds']} s", file=sys.stderr, flush=True)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None, "setup() first"
        return DataLoader(self.train.dataset(), batch_size=self.config.batch_size, sampler=self.sampler)

    def val_dataloader(self) -> DataLoader:
        assert self.val is not None, "setup() first"
        return DataLoader(self.val.dataset(), batch_size=max(256, self.config.batch_size))


def _extract_share(model: TransferModel, share: list[Any], options: dict[str, Any]) -> int:
    """Features of this rank's images into the store; how many were computed."""
    if not share:
        return 0
    try:
        return store_features(model, share, **options).misses
    except TransferkitError:  # none of this share decodes: the pass over all images reports it
        return len(share) * max(1, options.get("views", 1))


def _gathered(value: int, world: int) -> list[int]:
    """Every rank's ``value``, once all ranks have got here (the barrier)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise TransferkitError(f"{world} ranks but no process group: start the run through Lightning "
                               f"(--devices/--num-nodes), torchrun or srun")  # fmt: skip
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return [int(v) for v in values]
