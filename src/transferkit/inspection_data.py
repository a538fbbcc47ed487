"""The data ``inspect`` reads: DATA as ``train`` reads it, or a run's own data split as the run split it;
and DATA written back as ``train`` takes it."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from .data import ImageFolderSplits, discover_for
from .discovery import DATA_OPTIONS, data_flags
from .errors import TransferkitError
from .runs import same_data
from .shards import is_url

LABEL_FILE_OPTIONS = tuple(name for name in DATA_OPTIONS if name not in ("labels", "exclude"))  # its columns


def discover_as_run(
    data: str | Path | None, config: dict[str, Any], options: dict[str, Any], seed: int
) -> ImageFolderSplits:
    """The data as ``train`` reads it: DATA with ``options``, or the run's own data and options."""
    unknown = sorted(set(options) - {"labels", "exclude", "val_split", *LABEL_FILE_OPTIONS})
    if unknown:
        raise TransferkitError(f"unknown data option(s) {', '.join(unknown)}; choose from: "
                               f"{', '.join(LABEL_FILE_OPTIONS)}")  # fmt: skip
    if data is None and not config.get("data"):
        raise TransferkitError("give DATA (an image folder or label file) to inspect, or a --run that names its data")
    if data is not None and not is_url(str(data)):  # not packed shards in an object store
        if not (source := Path(data).expanduser()).exists():
            raise TransferkitError(f"DATA {source} does not exist; give an image folder, a CSV label file or packed "
                                   "shards")  # fmt: skip
        data = str(source.absolute())
    # The run's own data is split as the run split it (its --val-split, seed and label options).
    own = data is None or same_data(str(data), config.get("data"))
    return discover_for({**(config if own else {"seed": seed}), **options, "data": data or config["data"]})


def train_data_argument(data: str | Path | None, config: dict[str, Any], options: dict[str, Any]) -> str:
    """DATA and its label file options (not an exclude list: the suspects are the new one) for `train`."""
    own = data is None or same_data(str(data), config.get("data"))  # the run's label options apply
    given = {**(config if own else {}), **{k: v for k, v in options.items() if v is not None}}
    return shlex.quote(str(data if data is not None else config["data"])) + data_flags(
        {name: given.get(name) for name in DATA_OPTIONS if name != "exclude"})
