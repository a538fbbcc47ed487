"""A run directory and its files, in one place: made for a new run (never reusing one), written by
training, read back by reports.

A finished run directory written by ``transferkit train`` holds ``config.json`` (the
``TrainConfig``), ``metrics.json`` (the final evaluation) and ``history.csv`` (one row per
epoch, columns :data:`HISTORY_FIELDS`), beside the checkpoint.

>>> import tempfile
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> write_history(folder / HISTORY_NAME, [{"epoch": 0, "val_accuracy": 0.5, "trainable_groups": "head"}])
>>> read_history(folder / HISTORY_NAME)[0]["val_accuracy"], read_history(folder / HISTORY_NAME)[0]["lr"]
(0.5, None)

This module imports nothing heavier than the standard library, so that any other may use it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import TransferkitError
from .files import atomic_write, is_not
from .label_tables import label_file_header
from .shards import is_url

if TYPE_CHECKING:
    from .training.config import TrainConfig

CHECKPOINT_NAME = "model.pt"  # the trained model (transferkit.checkpoint writes and reads it)
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.csv"
SEARCH_PROGRESS = "selection.json"  # an unfinished --strategy auto search: what --resume continues
INSPECTION_JSON = "inspection.json"  # what marks an inspection's --out (transferkit.inspection writes it)
# A label file given to evaluate a run is usually written like the one it was trained on: its
# columns are read by the names the run used, where the file has them and the command names none.
RUN_LABEL_COLUMNS = ("path_col", "label_col", "split_col")

# The columns of history.csv, in order: losses, accuracies, learning rate, what trained, time.
HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "trainable_params",
                  "trainable_groups", "seconds", "val_macro_f1", "val_balanced_accuracy")  # fmt: skip
_INTEGER_FIELDS = ("epoch", "trainable_params")
_TEXT_FIELDS = ("trainable_groups",)


@dataclass
class Run:
    """What a finished run directory holds, read back: the config, the metrics and the per-epoch history."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory written by ``transferkit train``; a one-line error says what is missing."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise TransferkitError(f"run directory {path} {is_not(path)}; give a folder written by transferkit train")
    missing = [n for n in (CONFIG_NAME, METRICS_NAME) if not (path / n).is_file()]
    if missing:
        raise TransferkitError(
            f"{path} is not a finished transferkit run (no {' or '.join(missing)}); "
            "give a folder written by transferkit train"
        )
    history = path / HISTORY_NAME
    return Run(path, read_json(path / CONFIG_NAME), read_json(path / METRICS_NAME),
               read_history(history) if history.is_file() else [])  # fmt: skip


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is a one-line error saying the run directory is damaged."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TransferkitError(f"{path} is not valid JSON ({exc}); the run directory is damaged") from None
    if not isinstance(value, dict):
        raise TransferkitError(f"{path} does not hold a JSON object; the run directory is damaged")
    return value


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``history.csv``: numbers as int or float, empty cells as None, trained groups as text."""

    def value(key: str, text: str) -> Any:
        if key in _TEXT_FIELDS:
            return text
        if text == "":
            return None
        return int(float(text)) if key in _INTEGER_FIELDS else float(text)

    with open(path, newline="", encoding="utf-8") as f:
        return [{k: value(k, v or "") for k, v in row.items()} for row in csv.DictReader(f)]


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts keyed by :data:`HISTORY_FIELDS`) as ``path``, atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def run_json(run: Any, name: str) -> dict[str, Any] | None:
    """The JSON object ``name`` (:data:`CONFIG_NAME`, :data:`METRICS_NAME`) of ``run``, a run directory or a
    file in one; None for a model object, and where the file is missing or damaged (the model alone is used)."""
    if not isinstance(run, (str, Path)):
        return None
    path = Path(run).expanduser()
    try:
        return read_json((path if path.is_dir() else path.parent) / name)
    except (TransferkitError, OSError):
        return None


def same_data(given: Any, recorded: Any) -> bool:
    """Whether ``given`` (a path, a URL or an option's value) is what a run recorded, however it is spelt."""
    return given == recorded or (None not in (given, recorded) and not is_url(str(given))
                                 and Path(given).expanduser().resolve() == Path(recorded).expanduser().resolve())


def with_run_columns(run: Any, data: str | Path, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """A label file's data ``options`` completed with the column names (and multi-label separator) of
    ``run`` (a run directory or a file in one), where the options leave them unset and the file has them."""
    table = Path((options or {}).get("labels") or data).expanduser()
    config = run_json(run, CONFIG_NAME) if table.is_file() else None
    if config is None:
        return options
    try:
        given, header = dict(options or {}), set(label_file_header(table))
    except (OSError, UnicodeDecodeError, csv.Error):
        return options  # a file the label reader will refuse with its own error
    for name in RUN_LABEL_COLUMNS:
        if given.get(name) is None and config.get(name) in header:
            given[name] = config[name]
    if given.get("label_sep") is None and config.get("label_sep"):
        given["label_sep"] = config["label_sep"]
    return given


def is_transferkit_output(folder: Path) -> bool:
    """Whether ``folder`` is what transferkit wrote: a run, an inspection's ``--out``, or a folder of runs.

    Data discovery passes over them: a run made inside the data folder (``transferkit train .`` from
    within it, runs/ by default) would otherwise be read as a class of its report's PNGs.
    """
    def is_run(path: Path) -> bool:  # a search still measuring has only its progress yet
        return (path / CONFIG_NAME).is_file() and (path / "command.txt").is_file() or (path / SEARCH_PROGRESS).is_file()

    def is_comparison(path: Path) -> bool:  # compare --out runs/compare.html, with its plot beside it
        if path.suffix == ".html":
            return path.with_name(f"{path.stem}_plot.png").is_file()
        page = path.with_name(path.name.removesuffix("_plot.png") + ".html")
        return path.name.endswith("_plot.png") and page.is_file()

    if is_run(folder) or (folder / INSPECTION_JSON).is_file():
        return True
    # Read lazily: a folder of images stops at its first entry, whatever its size.
    runs = 0
    with os.scandir(folder) as entries:
        for child in (Path(entry.path) for entry in entries if not entry.name.startswith(".")):
            if is_run(child):
                runs += 1
            elif not is_comparison(child):
                return False
    return runs > 0


def folders_to_walk(parent: str, names: list[str]) -> list[str]:
    """Of the folders ``names`` in ``parent`` (an ``os.walk`` step), those that may hold images: not hidden,
    not transferkit's own output, in order."""
    return sorted(name for name in names if not name.startswith(".") and not is_transferkit_output(Path(parent, name)))


def create_run_dir(config: TrainConfig) -> Path:
    """A new run directory; an existing one is never reused (that would overwrite a run).

    An empty ``--out`` folder is claimed by creating its ``command.txt`` exclusively, so that of two
    processes given the same ``--out`` at once one trains and the other is refused.
    """
    if config.out:
        run_dir = Path(config.out).expanduser()
        taken = TransferkitError(f"run directory {run_dir} already exists; choose another --out or remove it "
                                 f"(runs are never overwritten)")  # fmt: skip
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise taken
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            (run_dir / "command.txt").open("x").close()
        except FileExistsError:
            raise taken from None
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.runs_root) / f"{config.model.replace('/', '_')}-{config.strategy}-{stamp}"
    for i in range(1, 1000):
        candidate = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise TransferkitError(f"could not create a new run directory next to {base}")


@contextlib.contextmanager
def removed_unless_trained(run_dir: Path, keep_dir: bool) -> Iterator[None]:
    """A new run that fails before its first checkpoint has nothing to resume or keep: its directory is
    removed, so that the same ``--out`` can be given again once the error is fixed."""
    try:
        yield
    except BaseException:
        if not (run_dir / CHECKPOINT_NAME).exists() and not any((run_dir / "checkpoints").glob("*.ckpt")):
            shutil.rmtree(run_dir, ignore_errors=True)
            if keep_dir:
                run_dir.mkdir(parents=True, exist_ok=True)
        raise
