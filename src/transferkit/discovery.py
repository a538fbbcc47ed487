"""Where the images are and what they are labelled: class folders or a label file, split train/val/test.

Layouts: ``DATA/train/<class>/*`` + ``DATA/val/<class>/*`` (+ optional ``DATA/test``), plain
``DATA/<class>/*`` split into train/val by a stratified, seeded split, or a CSV label file
(:mod:`transferkit.label_tables`). An exclude list leaves confirmed bad files out of any of them.
A folder or URL written by ``transferkit pack`` (:mod:`transferkit.shards`) reads as the data it was
packed from.
"""

from __future__ import annotations

import os
import shlex
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .lean_imports import import_torchvision

import_torchvision()  # first: torchvision without dynamo's start-up cost
from torchvision.datasets.folder import IMG_EXTENSIONS  # noqa: E402

from .errors import TransferkitError  # noqa: E402
from .exclusion import exclude_key, read_exclude_list, warn_names_none  # noqa: E402,F401  (re-exported)
from .files import is_not  # noqa: E402
from .image_files import MAX_IMAGE_PIXELS, image_file_problem, unread_format  # noqa: E402,F401  (re-exported)
from .label_tables import (  # noqa: E402
    LABEL_FILE_SUFFIXES,
    LabelColumns,
    LabelRow,
    LabelTable,
    read_label_table,
    warn_skipped,
)
from .runs import folders_to_walk, is_transferkit_output  # noqa: E402
from .samples import Sample, class_counts, label_indices, relabelled, stratified_split  # noqa: E402
from .shards import is_packed_source, packed_samples, packed_split  # noqa: E402

# torchvision's ImageFolder extensions, and GIF (its first frame), which PIL reads and torchvision does not list.
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif")
VAL_DIR_NAMES = ("val", "valid", "validation")
NOT_IN_A_CLASS_FOLDER = "not in a class folder"  # an image beside the class folders: no label, not a bad file
DEFAULT_VAL_SPLIT = 0.2  # of each class, where the data has no validation images of its own
# train's options for reading a data source's labels: a label file, its columns, an exclude list.
DATA_OPTIONS = ("labels", "exclude", "path_col", "label_col", "split_col", "label_sep", "image_ext")


@dataclass
class ImageFolderSplits:
    root: Path
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    layout: str = "train/val"
    multi_label: bool = False  # then a sample's label is a 0/1 tuple, one entry per class
    excluded: int = 0  # images left out by --exclude
    repeated_rows: int = 0  # a label file's repeated rows, read once

    def summary(self) -> dict[str, Any]:
        def counts(samples: list[Sample] | None) -> dict[str, int] | None:
            if samples is None:
                return None
            return dict(zip(self.class_names, class_counts(samples, len(self.class_names))))

        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": self.class_names,
            "train_counts": counts(self.train),
            "val_counts": counts(self.val),
            "test_counts": counts(self.test),
            # Per split: with several labels an image counts once per label above.
            "images": {name: len(samples) for name, samples in
                       (("train", self.train), ("val", self.val), ("test", self.test)) if samples is not None},
            "multi_label": self.multi_label,
            "skipped_files": len(self.skipped),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "excluded_files": self.excluded,
            "repeated_rows": self.repeated_rows,
        }


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_dirs(folder: Path) -> list[Path]:
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if outputs := [d.name for d in dirs if is_transferkit_output(d)]:
        warnings.warn(f"{folder.absolute()}: {', '.join(outputs)} not read as a class: transferkit's own output "
                      f"(runs, an inspection)", stacklevel=4)  # fmt: skip
    return [d for d in dirs if d.name not in outputs]


def scan_class_folder(
    folder: Path, class_names: list[str] | None = None, check: bool = True
) -> tuple[list[str], list[Sample], list[tuple[str, str]]]:
    """(class names, samples, skipped files) of a ``<class>/*`` folder; nested folders are walked (not
    transferkit's own output). One split of a packed folder (``SHARDS/val``) reads as the folder it was
    packed from."""
    packed = packed_split(folder)
    if packed is not None:
        return _packed_split(*packed, class_names)
    folder = Path(folder)
    if not folder.is_dir():
        raise TransferkitError(f"data folder {folder} {is_not(folder)}; give a folder holding one sub-folder per class")
    dirs = _class_dirs(folder)
    names = [d.name for d in dirs]
    if class_names is not None:
        extra = sorted(set(names) - set(class_names))
        if extra:
            raise TransferkitError(
                f"{folder} has classes the model does not know: {', '.join(extra)}; expected a subset of: "
                f"{', '.join(class_names)}"
            )
    _check_case_clashes(names, folder)
    known = class_names or names
    samples: list[Sample] = []
    loose = _loose_images(folder)
    if loose and not dirs and class_names is None:
        raise TransferkitError(f"{folder} holds images but no class folders; put each class's images in a "
                               f"sub-folder named after it ({folder}/<class>/), or give a CSV label file")  # fmt: skip
    # An image beside the class folders has no class: said, not passed over in silence. A split with no
    # class folders at all (Kaggle's unlabelled test/) is no labelled split, as before.
    skipped: list[tuple[str, str]] = [(str(p), NOT_IN_A_CLASS_FOLDER) for p in loose] if dirs else []
    for d in dirs:
        found = 0
        for dirpath, subdirs, files in os.walk(d):
            subdirs[:] = folders_to_walk(dirpath, subdirs)
            for f in sorted(files):
                path = Path(dirpath) / f
                if f.startswith(".") or _is_hidden(path, folder):
                    continue
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    skipped.append((str(path), unread_format(path) or "not an image file extension"))
                    continue
                reason = image_file_problem(path) if check else None
                if reason:
                    skipped.append((str(path), reason))
                    continue
                samples.append((str(path), known.index(d.name)))
                found += 1
        if found == 0 and class_names is None:
            raise TransferkitError(f"class folder {d} has no usable images; add images or remove the folder")
    warn_skipped(skipped, str(folder))
    return known, samples, skipped


def _check_case_clashes(names: list[str], folder: Path) -> None:
    lowered = Counter(n.lower() for n in names)
    clashes = sorted(n for n in names if lowered[n.lower()] > 1)
    if clashes:
        raise TransferkitError(
            f"class folders in {folder} differ only in case: {', '.join(clashes)}; merge or rename them"
        )


def discover(
    data_dir: str | Path, val_split: float = DEFAULT_VAL_SPLIT, seed: int = 0, labels: str | Path | None = None,
    columns: LabelColumns = LabelColumns(), image_ext: str | None = None, exclude: str | Path | None = None,
) -> ImageFolderSplits:  # fmt: skip
    """Find classes and samples in ``data_dir``: class folders (see the module docstring), a CSV label
    file, or an image folder with the CSV ``labels`` (:mod:`transferkit.label_tables`); the files
    listed in ``exclude`` (one path a line, ``#`` comments) are left out."""
    root = Path(data_dir).expanduser()
    if labels is None and is_packed_source(data_dir):  # transferkit pack's shards, a folder or a URL
        splits = _discover_packed(str(data_dir))
    elif labels is not None or (root.suffix.lower() in LABEL_FILE_SUFFIXES and root.is_file()):
        splits = _discover_table(root, labels, columns, image_ext, val_split, seed)
    else:
        splits = _discover_folders(root, val_split, seed)
    if exclude is not None:
        _exclude(splits, read_exclude_list(exclude), Path(exclude).expanduser())
    if len(splits.class_names) < 2 and not splits.multi_label:
        raise TransferkitError(
            f"{root} has {len(splits.class_names)} class folder(s); a classifier needs at least 2 (one sub-folder per class)"
        )
    if not splits.val:
        raise TransferkitError(f"no validation images in {root}; add a val/ folder or raise --val-split")
    return splits


def warn_unused_val_split(val_split: float | None, splits: ImageFolderSplits) -> None:
    """Data with validation images of its own is not split: a ``--val-split`` given for it is said to do nothing
    (``val_split`` None or the default: not given)."""
    if val_split is not None and val_split != DEFAULT_VAL_SPLIT and "split" not in splits.layout:
        warnings.warn(f"--val-split {val_split} is not used: {splits.root} has its own validation images "
                      f"({splits.layout}); leave it out", stacklevel=3)  # fmt: skip


def discover_for(config: Any) -> ImageFolderSplits:
    """:func:`discover` with a run's data options (a ``TrainConfig`` or its saved dict)."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    return discover(get("data"), get("val_split", DEFAULT_VAL_SPLIT), get("seed", 0), get("labels"), _columns(get),
                    get("image_ext"), get("exclude"))  # fmt: skip


def checked_data_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` (train's data options, :data:`DATA_OPTIONS`) without the unset ones; an unknown one is an error."""
    unknown = sorted(set(options or {}) - set(DATA_OPTIONS))
    if unknown:
        raise TransferkitError(f"unknown data option(s) {', '.join(unknown)}; choose from: {', '.join(DATA_OPTIONS)}")
    return {name: value for name, value in (options or {}).items() if value is not None}


def command_flags(options: Mapping[str, Any]) -> str:
    """`` --name value`` for each option that is set (a list's values joined by commas), for a printed command."""
    def text(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    return "".join(f" --{name.replace('_', '-')} {shlex.quote(text(value))}"
                   for name, value in options.items() if value is not None)  # fmt: skip


def data_flags(options: Mapping[str, Any] | None) -> str:
    """The command-line flags that give ``options`` (for a printed ``transferkit train`` command)."""
    return command_flags(checked_data_options(options))


def _columns(get: Callable[[str], Any]) -> LabelColumns:
    return LabelColumns(get("path_col"), get("label_col"), get("split_col"), get("label_sep"))


@dataclass
class LabelledImages:
    """Every image of a data source with its label and the split the source gives it ("all" where none)."""

    root: Path
    class_names: list[str]
    samples: list[Sample]
    splits: list[str]
    multi_label: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    excluded: int = 0  # images left out by the exclude option


def every_image(data: str | Path, options: Mapping[str, Any] | None = None) -> LabelledImages:
    """Every image of ``data`` as it is labelled and split there, none held out (what ``features`` writes).

    ``options`` are train's data options (:data:`DATA_OPTIONS`: a label file and its columns, an
    exclude list). Unlike :func:`discover`, no validation split is drawn where the data has none.
    """
    get = checked_data_options(options).get
    root = Path(data).expanduser()
    if get("labels") is None and is_packed_source(data):
        manifest, packed = packed_samples(str(data))
        found = LabelledImages(Path(str(data)), manifest["class_names"], [], [], manifest["multi_label"])
        for split, samples in packed.items():
            found.samples, found.splits = found.samples + samples, found.splits + [split] * len(samples)
    elif get("labels") is not None or (root.suffix.lower() in LABEL_FILE_SUFFIXES and root.is_file()):
        table = _read_table(root, get("labels"), _columns(get), get("image_ext"), to_train=False)
        rows = [(sample, row.split or "all") for sample, row in zip(_table_samples(table), table.rows)]
        found = LabelledImages(table.source, table.class_names, [s for s, _ in rows], [split for _, split in rows],
                               table.multi_label, list(table.skipped))  # fmt: skip
    else:
        found = _every_in_folders(root)
    if get("exclude") is not None:
        source = Path(get("exclude")).expanduser()
        excluded = read_exclude_list(source)
        kept = [i for i, (path, _) in enumerate(found.samples) if exclude_key(path) not in excluded]
        found.excluded = len(found.samples) - len(kept)
        if excluded and not found.excluded:
            warn_names_none(source, len(found.samples), found.root)
        if found.samples and not kept:
            raise TransferkitError(f"--exclude {source} leaves no images; exclude fewer images")
        found.samples, found.splits = [found.samples[i] for i in kept], [found.splits[i] for i in kept]
    if not found.samples:
        raise TransferkitError(f"no usable image in {root}; give a folder of class folders, a label file or "
                               f"packed shards")  # fmt: skip
    return found


def _every_in_folders(root: Path) -> LabelledImages:
    """``root/{train,val,test}/<class>/*`` with their splits, or ``root/<class>/*`` as "all"."""
    val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    folders = [("all", root)]
    if (root / "train").is_dir():
        folders = [("train", root / "train"), *([("val", val_dir)] if val_dir else []),
                   *([("test", root / "test")] if (root / "test").is_dir() else [])]  # fmt: skip
    found = LabelledImages(root, [], [], [])
    for split, folder in folders:
        names, samples, skipped = scan_class_folder(folder, found.class_names or None)
        found.class_names, found.skipped = names, found.skipped + skipped
        found.samples, found.splits = found.samples + samples, found.splits + [split] * len(samples)
    return found


def _loose_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, beside its class folders."""
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries
                      if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())


def _discover_folders(root: Path, val_split: float, seed: int) -> ImageFolderSplits:
    if not root.is_dir():
        raise TransferkitError(f"data folder {root} {is_not(root)}; pass DATA holding train/ and val/ or class "
                               f"folders, or a CSV label file")  # fmt: skip
    train_dir = root / "train"
    val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    if not train_dir.is_dir():
        names, samples, skipped = scan_class_folder(root)
        train, val = stratified_split(samples, val_split, seed)
        return ImageFolderSplits(root, names, train, val, None, skipped, f"split {1 - val_split:.0%}/{val_split:.0%}")
    names, train, skipped = scan_class_folder(train_dir)
    if val_dir is not None:
        val_names = [d.name for d in _class_dirs(val_dir)]
        if set(val_names) != set(names):
            raise TransferkitError(
                f"{val_dir} classes ({', '.join(val_names)}) differ from {train_dir} classes "
                f"({', '.join(names)}); give both the same class folders"
            )
        _, val, more = scan_class_folder(val_dir, names)
        layout = "train/val"
    else:
        train, val = stratified_split(train, val_split, seed)
        more, layout = [], f"train split {1 - val_split:.0%}/{val_split:.0%}"
    test = None
    if (root / "test").is_dir():
        _, test, test_skipped = scan_class_folder(root / "test", names)
        more = more + test_skipped
    return ImageFolderSplits(root, names, train, val, test, skipped + more, layout)


def _discover_packed(source: str) -> ImageFolderSplits:
    """The splits as they were packed (a split made at packing time stays that split)."""
    manifest, samples = packed_samples(source)
    return ImageFolderSplits(Path(source), manifest["class_names"], samples.get("train", []), samples.get("val", []),
                             samples.get("test"), [], "packed shards (litdata)", manifest["multi_label"])  # fmt: skip


def _packed_split(
    source: str, split: str, class_names: list[str] | None
) -> tuple[list[str], list[Sample], list[tuple[str, str]]]:
    manifest, samples = packed_samples(source)
    if split not in samples:
        raise TransferkitError(f"{source} has no packed {split} images; it has: {', '.join(samples)}")
    names: list[str] = manifest["class_names"]
    if class_names is None:
        return names, samples[split], []
    return class_names, relabelled(samples[split], names, class_names, source), []


def _discover_table(
    data: Path, labels: str | Path | None, columns: LabelColumns, image_ext: str | None, val_split: float, seed: int
) -> ImageFolderSplits:
    table = _read_table(data, labels, columns, image_ext)
    by_split: dict[str | None, list[Sample]] = {}
    for sample, row in zip(_table_samples(table), table.rows):
        by_split.setdefault(row.split, []).append(sample)
    unsplit = by_split.pop(None, [])
    train, val = by_split.get("train", []), by_split.get("val", [])
    if unsplit or not val:
        more_train, more_val = stratified_split(unsplit + (train if not val else []), val_split, seed)
        train, val = (train if val else []) + more_train, val + more_val
    layout = "label file" + ("" if by_split.get("val") else f", split {1 - val_split:.0%}/{val_split:.0%}")
    return ImageFolderSplits(table.source, table.class_names, sorted(train), sorted(val), by_split.get("test"),
                             list(table.skipped), layout, table.multi_label, repeated_rows=table.duplicates)  # fmt: skip


def _read_table(
    data: Path, labels: str | Path | None, columns: LabelColumns, image_ext: str | None, to_train: bool = True
) -> LabelTable:
    if labels is not None and not data.is_dir():
        raise TransferkitError(f"--labels {labels}: DATA ({data}) must be the image folder the label file's paths "
                               f"are relative to")  # fmt: skip
    folder = data if labels is not None else None
    return read_label_table(labels or data, folder, columns, image_ext, image_file_problem, IMAGE_EXTENSIONS, to_train)


def _table_samples(table: LabelTable) -> list[Sample]:
    """Each row's sample: its class index, or one 0/1 per class (multi-label)."""
    index = {name: i for i, name in enumerate(table.class_names)}

    def sample(row: LabelRow) -> Sample:
        ids = {index[label] for label in row.labels}
        return (row.path, tuple(int(i in ids) for i in range(len(index))) if table.multi_label else min(ids))

    return [sample(row) for row in table.rows]


def _exclude(splits: ImageFolderSplits, excluded: set[str], source: Path) -> None:
    """Leave out the images of the list at ``source``; an error where that leaves a split, or a class its
    training images, empty (the data itself would have been refused so), a warning where it names none."""

    def kept(samples: list[Sample] | None) -> list[Sample] | None:
        return None if samples is None else [s for s in samples if exclude_key(s[0]) not in excluded]

    trained = {i for _, label in splits.train for i in label_indices(label)}
    before = len(splits.train) + len(splits.val) + len(splits.test or [])
    splits.train, splits.val, splits.test = kept(splits.train), kept(splits.val), kept(splits.test)  # type: ignore[assignment]
    splits.excluded = before - len(splits.train) - len(splits.val) - len(splits.test or [])
    if excluded and not splits.excluded:
        warn_names_none(source, before, splits.root)
    for name, samples in (("training", splits.train), ("validation", splits.val)):
        if before and not samples:
            raise TransferkitError(f"--exclude {source} leaves no {name} images; exclude fewer images")
    lost = sorted(trained - {i for _, label in splits.train for i in label_indices(label)})
    if lost:
        names = ", ".join(splits.class_names[i] for i in lost)
        raise TransferkitError(f"--exclude {source} leaves class(es) {names} without training images; keep some of "
                               f"them, or remove the class from the data")  # fmt: skip
