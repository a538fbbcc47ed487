"""Labels from a CSV file: a path column, a label column (or several 0/1 columns), an optional split.

Layouts read (``DATA`` is the CSV, or an image folder with ``--labels FILE``):

- ``path,label[,split]``: one label per image; paths relative to the CSV's folder (with ``--labels``,
  to the image folder) or absolute; ``split`` is train/val/test (valid/validation mean val);
- ``path,labels`` with several labels in one cell (``cat|dog``, ``cat;dog`` or ``cat dog``): multi-label;
- ``path,cat,dog,bird`` with 0/1 cells: multi-label, one column per class;
- Kaggle's ``id,label`` beside a folder of ``<id>.<ext>`` files (``--image-ext``, else found by looking).

Column names are detected from common spellings, or given (``--path-col``, ``--label-col``,
``--split-col``). Every problem in the table is a one-line error naming the row and the fix; rows
whose file is missing or unreadable are skipped with a warning and counted, as for folders.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .errors import TransferkitError

PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "file_name", "image", "image_path", "img",
                "image_id", "id", "name")  # fmt: skip
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "tags", "y")
SPLIT_COLUMNS = ("split", "set", "subset", "partition")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}  # fmt: skip
# Several labels in one cell: the first of these that occurs in the column separates them. Not a
# space (class names have spaces: "golden retriever") nor a comma: give those with --label-sep.
LABEL_SEPARATORS = ("|", ";")
LABEL_FILE_SUFFIXES = (".csv", ".tsv")  # DATA given as a file of these is a label file (the delimiter is sniffed)
SKIPS_NAMED = 10  # skipped files warned one by one; the rest in one line


@dataclass(frozen=True)
class LabelColumns:
    """Which columns hold what; ``None`` means detect it from the header."""

    path: str | None = None
    label: str | None = None
    split: str | None = None
    separator: str | None = None  # between several labels in one cell; None: "|" or ";" where found


@dataclass
class LabelRow:
    path: str
    labels: tuple[str, ...]
    split: str | None
    line: int  # the row's line in the file (the header is line 1), for error messages


@dataclass
class LabelTable:
    """The usable rows of a label file, and what was left out of it."""

    source: Path
    rows: list[LabelRow]
    multi_label: bool
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0


def read_label_table(
    table: str | Path, images: str | Path | None = None, columns: LabelColumns = LabelColumns(),
    image_ext: str | None = None, check_image: object = None, extensions: tuple[str, ...] = (),
    to_train: bool = True,
) -> LabelTable:  # fmt: skip
    """Read ``table``; paths resolve against ``images`` (default: the table's folder).

    ``to_train``: check that the table can train a classifier (two classes, each with a training
    image, and one more to validate on); a table to evaluate or to extract features from need not.

    ``check_image`` (a ``Path -> reason | None`` function) vets each file, as folder scans do;
    ``extensions`` are tried, in order, on paths without one (Kaggle's ids) when ``image_ext`` is not given.
    """
    source = Path(table).expanduser()
    if not source.is_file():
        raise TransferkitError(f"label file {source} does not exist; give a CSV with a path and a label column")
    base = Path(images).expanduser() if images is not None else source.parent
    header, records = _read_csv(source)
    path_col = _column(header, columns.path, PATH_COLUMNS, "path", "--path-col", source)
    split_col = _column(header, columns.split, SPLIT_COLUMNS, "split", "--split-col", source, required=False)
    label_col = _column(header, columns.label, LABEL_COLUMNS, "label", "--label-col", source, required=False)
    one_hot = [] if label_col else [c for c in header if c not in (path_col, split_col)]
    if not label_col and not _all_binary(records, one_hot):
        raise TransferkitError(f"{source} has no label column (its columns: {', '.join(header)}); name it with "
                               f"--label-col, or give one 0/1 column per class")  # fmt: skip
    separator = (columns.separator or _separator([r[label_col] for _, r in records])) if label_col else None
    if label_col and separator is None:
        _warn_space_separated({r[label_col].strip() for _, r in records}, source)
    ext = image_ext if image_ext is None or image_ext.startswith(".") else f".{image_ext}"
    rows: list[LabelRow] = []
    for line, record in records:
        labels = _labels(record, label_col, separator, one_hot, source, line)
        split = _split(record.get(split_col) if split_col else None, source, line)
        path, ext = _resolve(record[path_col], base, ext, () if image_ext else extensions, source, line)
        rows.append(LabelRow(path, labels, split, line))
    rows, duplicates = _without_duplicates(rows, source)
    multi = bool(one_hot) or separator is not None
    table_ = LabelTable(source, [], multi, sorted({label for r in rows for label in r.labels}), duplicates=duplicates)
    unusable = []
    for row in rows:
        reason = _unusable(Path(row.path), check_image)
        if reason:
            unusable.append((f"{row.path} (row {row.line} of {source.name})", reason))
            table_.skipped.append((row.path, reason))
        else:
            table_.rows.append(row)
    if not table_.rows:
        first, reason = unusable[0]
        raise TransferkitError(f"none of the {len(rows)} rows of {source} names a usable image (first: {first}: "
                               f"{reason}); paths are read relative to {base.resolve()}")  # fmt: skip
    warn_skipped(unusable, source.name)
    if to_train:
        _check_classes(table_)
    return table_


def listed_images(table: str | Path, extensions: tuple[str, ...] = ()) -> list[str]:
    """The images a label file names in its path column, resolved as for training (labels, if any, unread):
    what ``predict RUN table.csv`` predicts. Files are not vetted here: the prediction lists each bad one."""
    source = Path(table).expanduser()
    header, records = _read_csv(source)
    path_col = _column(header, None, PATH_COLUMNS, "path", "", source, required=False)
    if path_col is None:
        raise TransferkitError(f"{source} has no path column (its columns: {', '.join(header)}); name the column "
                               f"of image paths 'path' (or give the images or their folder instead)")  # fmt: skip
    paths, ext = [], None
    for line, record in records:
        path, ext = _resolve(record[path_col], source.parent, ext, extensions, source, line, only_inside=False)
        paths.append(path)
    return paths


def label_file_header(source: str | Path) -> list[str]:
    """The column names in a label file's first line (none where it cannot be read: its reader says why)."""
    try:
        with open(Path(source).expanduser(), newline="", encoding="utf-8-sig") as f:
            return [h.strip() for h in next(csv.reader(f, delimiter=_delimiter(f)), [])]
    except (UnicodeDecodeError, csv.Error):
        return []


def warn_skipped(skipped: list[tuple[str, str]], where: str) -> None:
    """A warning for each of the first few files skipped, then one for the rest with their reasons
    counted: a wrong folder, or annotations beside the images, must not print a line per file."""
    for name, reason in skipped[:SKIPS_NAMED]:
        warnings.warn(f"skipping {name}: {reason}", stacklevel=3)
    if len(skipped) > SKIPS_NAMED:
        reasons = Counter(reason for _, reason in skipped[SKIPS_NAMED:]).most_common()
        counted = ", ".join(f"{count:,} {reason}" for reason, count in reasons)
        warnings.warn(f"skipping {len(skipped) - SKIPS_NAMED:,} more files of {where} ({counted})", stacklevel=3)


def _read_csv(source: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        return _read_records(source)
    except UnicodeDecodeError as exc:
        raise TransferkitError(f"{source} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as CSV UTF-8 "
                               f"(Excel: File > Save As > CSV UTF-8)") from None  # fmt: skip
    except csv.Error as exc:
        raise TransferkitError(f"{source} is not a readable CSV ({exc}); check its quoting") from None


def _delimiter(f: TextIO) -> str:
    """Comma, or the semicolon or tab that separates the header's names instead (Excel writes ";" where
    the comma is the decimal mark; TSV files use tabs); ``f`` is left at its start."""
    first = f.readline()
    f.seek(0)
    return max(",;\t", key=first.count) if first.count(",") == 0 else ","


def _read_records(source: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    with open(source, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=_delimiter(f))
        header = [h.strip() for h in reader.fieldnames or []]
        if not header:
            raise TransferkitError(f"{source} is empty; give a CSV whose first line names its columns")
        reader.fieldnames = header
        records = []
        for row in reader:
            line = reader.line_num  # the file's line, blank lines and quoted line breaks counted
            extra = [cell for cell in row.pop(None, []) if cell.strip()]  # csv's key for cells past the header's
            if extra:
                raise TransferkitError(f"row {line} of {source} has {len(header) + len(extra)} cells but the header "
                                       f"names {len(header)} columns; name every column in the first line")  # fmt: skip
            cells = {k: (v or "").strip() for k, v in row.items()}
            if any(cells.values()):  # a row of empty cells (",,", spaces), as spreadsheets leave below the data
                records.append((line, cells))
    if not records:
        raise TransferkitError(f"{source} has a header but no rows; add one row per image")
    return header, records


def _column(
    header: list[str], given: str | None, spellings: tuple[str, ...], what: str, option: str, source: Path,
    required: bool = True,
) -> str | None:  # fmt: skip
    if given is not None:
        if given not in header:
            raise TransferkitError(f"{option} {given}: no such column in {source} (its columns: {', '.join(header)})")
        return given
    lowered = {h.lower(): h for h in header}
    found = next((lowered[s] for s in spellings if s in lowered), None)
    if found is None and required:
        raise TransferkitError(f"{source} has no {what} column (its columns: {', '.join(header)}); name it with {option}")
    return found


def _all_binary(records: list[tuple[int, dict[str, str]]], columns: list[str]) -> bool:
    return len(columns) >= 2 and all(r[c] in ("0", "1") for _, r in records for c in columns)


def _separator(cells: list[str]) -> str | None:
    """The separator of multi-label cells, or None when every cell holds one label."""
    for sep in LABEL_SEPARATORS:
        if any(sep in cell.strip() for cell in cells):
            return sep
    return None


def _warn_space_separated(labels: set[str], source: Path) -> None:
    """Tags separated by spaces (``haze primary``, as some Kaggle sets write them) are not split by default:
    class names may hold spaces. Where a word of such a label is a label of its own, say how to split."""
    combined = sorted(label for label in labels if " " in label and any(w in labels for w in label.split()))
    if combined:
        warnings.warn(f"{source.name}: labels such as {combined[0]!r} look like several labels separated by spaces "
                      f"(a word of it is a label of its own); if they are, give --label-sep ' ' (a multi-label "
                      f"classifier)", stacklevel=4)  # fmt: skip


def _labels(
    record: dict[str, str], label_col: str | None, separator: str | None, one_hot: list[str], source: Path, line: int
) -> tuple[str, ...]:
    if label_col:
        cell = record[label_col]
        labels = tuple(sorted({p.strip() for p in (cell.split(separator) if separator else [cell]) if p.strip()}))
    else:
        labels = tuple(c for c in one_hot if record[c] == "1")
    if not labels:
        what = "no label" if label_col else "no positive label (every class column is 0)"
        raise TransferkitError(f"row {line} of {source} has {what}; label it or remove the row")
    return labels


def _split(value: str | None, source: Path, line: int) -> str | None:
    if not value:
        return None
    split = SPLIT_NAMES.get(value.lower())
    if split is None:
        raise TransferkitError(f"row {line} of {source}: split {value!r} is not one of train, val, test; fix the cell")
    return split


def _resolve(
    cell: str, base: Path, ext: str | None, extensions: tuple[str, ...], source: Path, line: int,
    only_inside: bool = True,
) -> tuple[str, str | None]:  # fmt: skip
    """The row's file as an absolute path, and the image extension learnt from it (Kaggle ids have none).
    ``only_inside``: refuse relative paths that leave ``base`` (a run's data stays in its folder; a list of
    images to predict may name any file)."""
    if not cell:
        raise TransferkitError(f"row {line} of {source} has an empty path; fill it in or remove the row")
    path = Path(cell).expanduser()
    if "\\" in cell and not (base / path).exists():  # written on Windows: images\cat\1.jpg
        path = Path(cell.replace("\\", "/")).expanduser()
    if not path.is_absolute():
        # Inside base as written: a folder linked in from elsewhere (images -> /mnt/images) is inside.
        inside = Path(os.path.normpath(base.absolute() / path)).is_relative_to(os.path.normpath(base.absolute()))
        path = (base / path).resolve()
        if only_inside and not inside:
            raise TransferkitError(f"row {line} of {source}: {cell} lies outside {base}; give paths inside it "
                                   f"(or absolute paths)")  # fmt: skip
    if path.suffix == "" or not re.fullmatch(r"\.[A-Za-z0-9]{2,5}", path.suffix):
        # The extension the last row had first (one look per row), then the others: a folder may mix them.
        # No extensions to try means --image-ext gave one: it is used whether the file is there or not.
        # Upper-case too: a camera's IMG_0001.JPG on a file system that tells cases apart.
        tried = ([ext] if ext else []) + [e for e in (*extensions, *map(str.upper, extensions)) if e != ext]
        found = next((e for e in tried if path.with_name(path.name + e).is_file()), None if extensions else ext)
        if found:
            path, ext = path.with_name(path.name + found), found
    return str(path), ext


def _without_duplicates(rows: list[LabelRow], source: Path) -> tuple[list[LabelRow], int]:
    first: dict[str, LabelRow] = {}
    for row in rows:
        seen = first.get(row.path)
        if seen is None:
            first[row.path] = row
        elif (seen.labels, seen.split) != (row.labels, row.split):
            raise TransferkitError(f"rows {seen.line} and {row.line} of {source} name the same file with different "
                                   f"labels or splits; keep one of them")  # fmt: skip
    duplicates = len(rows) - len(first)
    if duplicates:
        warnings.warn(f"{source.name}: {duplicates} repeated row(s) read once", stacklevel=3)
    return list(first.values()), duplicates


def _unusable(path: Path, check_image: object) -> str | None:
    if not path.is_file():
        return "file not found"
    return check_image(path) if callable(check_image) else None


def _check_classes(table: LabelTable) -> None:
    """Every class needs an image to learn from, and (single-label) one more to be validated on."""
    source = table.source
    if len(table.class_names) < 2 and not table.multi_label:
        raise TransferkitError(f"{source} has {len(table.class_names)} label(s); a classifier needs at least 2")
    lowered = Counter(label.lower() for label in table.class_names)
    if clashes := [label for label in table.class_names if lowered[label.lower()] > 1]:
        # A spelling whose every row was skipped (missing files) has no row among the kept ones.
        first = {label: next((r.line for r in table.rows if label in r.labels), 0) for label in clashes}
        named = [f"{label!r}" + (f" (row {line})" if line else "") for label, line in
                 sorted(first.items(), key=lambda pair: pair[1])]  # fmt: skip
        raise TransferkitError(f"labels of {source} differ only in case: {', '.join(named)}; write each class one way")
    trained = {label for r in table.rows if r.split in (None, "train") for label in r.labels}
    unusable = [label for label in table.class_names if not any(label in r.labels for r in table.rows)]
    if unusable:  # every row of the class was skipped (above): it would be a class never trained on
        raise TransferkitError(f"class {unusable[0]!r} of {source} has no usable image (its rows name missing or "
                               f"unreadable files, listed above); fix those rows or remove them")  # fmt: skip
    for row in table.rows:
        missing = [label for label in row.labels if label not in trained]
        if missing:
            raise TransferkitError(f"label {missing[0]!r} (row {row.line} of {source}) has no training image; add "
                                   f"training rows for it or remove its rows")  # fmt: skip
    if table.multi_label or any(r.split for r in table.rows):
        return
    counts = Counter(r.labels[0] for r in table.rows)
    for label, count in sorted(counts.items()):
        if count < 2:
            line = next(r.line for r in table.rows if r.labels[0] == label)
            raise TransferkitError(f"class {label!r} has 1 image (row {line} of {source}); a class needs at least 2 "
                                   f"(one to train on, one to validate on): add images or remove the row")  # fmt: skip
