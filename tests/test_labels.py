"""Data as users have it: CSV label files, exclude lists, imbalanced classes."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import make_colour_folder

from transferkit import TransferkitError, load_checkpoint
from transferkit.balance import BalancedSampler, resolve_balance
from transferkit.data import discover, read_exclude_list
from transferkit.discovery import every_image
from transferkit.label_tables import LabelColumns

TINY = {"model": "resnet18", "weights": "none", "image_size": 32, "epochs": 2, "batch_size": 4, "quiet": True}


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    """images/red/*.{jpg,png} and images/blue/*: 6 each, listed by a CSV instead of read from folders."""
    return make_colour_folder(tmp_path / "images", 6)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def rows_of(images: Path, relative_to: Path) -> list[list[str]]:
    return [[str(p.relative_to(relative_to)), p.parent.name] for p in sorted(images.rglob("*.*"))]


def test_a_csv_with_paths_and_labels_is_the_same_data_as_the_folders(flat: Path, tmp_path: Path) -> None:
    table = write_csv(tmp_path / "labels.csv", ["filename", "class"], rows_of(flat, tmp_path))
    from_csv, from_folders = discover(table), discover(flat)
    assert from_csv.class_names == from_folders.class_names == ["blue", "red"]
    assert sorted(from_csv.train + from_csv.val) == sorted(from_folders.train + from_folders.val)
    assert from_csv.layout.startswith("label file") and not from_csv.multi_label
    tsv = tmp_path / "labels.tsv"  # tab-separated, given as DATA as a .csv is
    tsv.write_text("".join(f"{path}\t{label}\n" for path, label in [["filename", "class"], *rows_of(flat, tmp_path)]))
    assert discover(tsv).train == from_csv.train and discover(tsv).val == from_csv.val


@pytest.mark.parametrize("delimiter", [";", "\t"], ids=["semicolon", "tab"])
def test_a_table_separated_by_semicolons_or_tabs_is_read(flat: Path, tmp_path: Path, delimiter: str) -> None:
    table = tmp_path / "labels.csv"  # Excel's CSV where the comma is the decimal mark, or a TSV file
    with open(table, "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f, delimiter=delimiter).writerows([["path", "label"], *rows_of(flat, tmp_path)])
    assert sorted(discover(table).train + discover(table).val) == sorted(discover(flat).train + discover(flat).val)


def test_paths_written_on_windows_are_read(flat: Path, tmp_path: Path) -> None:
    rows = [[path.replace("/", "\\"), label] for path, label in rows_of(flat, tmp_path)]
    assert "\\" in rows[0][0]
    table = write_csv(tmp_path / "labels.csv", ["path", "label"], rows)
    assert sorted(discover(table).train + discover(table).val) == sorted(discover(flat).train + discover(flat).val)


def test_a_split_column_decides_the_splits(flat: Path, tmp_path: Path) -> None:
    rows = [[*row, "val" if i % 3 == 0 else "train"] for i, row in enumerate(rows_of(flat, tmp_path))]
    table = write_csv(tmp_path / "labels.csv", ["path", "label", "subset"], rows)
    splits = discover(table)
    val = {str((tmp_path / r[0]).resolve()) for r in rows if r[2] == "val"}
    assert {p for p, _ in splits.val} == val and not val & {p for p, _ in splits.train}


def kaggle_folder(root: Path, per_class: int, pattern: str) -> tuple[Path, Path, list[list[str]]]:
    """root/images/img<i>.<ext> with a CSV of id,label beside it (ids without their extension)."""
    images = root / "images"
    make_colour_folder(root / "by_class", per_class)  # .png and .jpg in turn
    images.mkdir()
    rows = []
    for i, p in enumerate(sorted((root / "by_class").rglob(pattern))):
        p.rename(images / f"img{i}{p.suffix}")
        rows.append([f"img{i}", p.parent.name])
    return images, write_csv(root / "train.csv", ["id", "label"], rows), rows


def test_kaggle_ids_beside_an_image_folder_with_labels(tmp_path: Path) -> None:
    images, table, rows = kaggle_folder(tmp_path, 4, "*.jpg")
    splits = discover(images, labels=table)  # the extension is found by looking
    assert len(splits.train) + len(splits.val) == len(rows)
    assert discover(images, labels=table, image_ext="jpg").train == splits.train
    for image in images.iterdir():  # as a camera names them: IMG_0001.JPG
        image.rename(image.with_suffix(".JPG"))
    found = discover(images, labels=table)
    assert [Path(p).name for p, _ in found.train] == [Path(p).with_suffix(".JPG").name for p, _ in splits.train]
    with pytest.raises(TransferkitError, match="--path-col"):
        discover(images, labels=table, columns=LabelColumns(path="file"))


def test_ids_of_a_folder_mixing_extensions_each_find_their_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transferkit.cli import main

    images, table, _ = kaggle_folder(tmp_path, 6, "*.*")
    splits = discover(images, labels=table)
    assert sorted(p for p, _ in splits.train + splits.val) == sorted(str(p) for p in images.iterdir())
    (images / "img0.png").unlink()  # a missing id is named as written, not with another row's extension
    with pytest.warns(UserWarning, match=f"skipping {images / 'img0'} \\(row 2 of train.csv\\): file not found"):
        discover(images, labels=table)
    with pytest.warns(UserWarning, match="file not found"):  # --image-ext is the user's word: no looking
        given = discover(images, labels=table, image_ext="jpg")
    assert all(p.endswith(".jpg") for p, _ in given.train + given.val) and len(given.skipped) == 6
    # On the command line a warning of transferkit's own is one line, as its errors are.
    assert main(["features", str(images), "--labels", str(table), "--image-ext", "jpg", "--model", "resnet18",
                 "--weights", "none", "--out", str(tmp_path / "f.npz")]) == 0  # fmt: skip
    warned = [line for line in capsys.readouterr().err.splitlines() if "file not found" in line]
    assert len(warned) == 6 and all(line.startswith("transferkit: warning: skipping ") for line in warned)


def test_missing_files_are_skipped_and_counted_and_repeated_rows_read_once(flat: Path, tmp_path: Path) -> None:
    rows = rows_of(flat, tmp_path)
    table = write_csv(tmp_path / "labels.csv", ["path", "label"], [*rows, rows[0], ["images/red/gone.jpg", "red"]])
    with pytest.warns(UserWarning, match="gone.jpg"):
        splits = discover(table)
    assert splits.skipped == [(str((tmp_path / "images/red/gone.jpg").resolve()), "file not found")]
    assert splits.repeated_rows == 1 and splits.summary()["repeated_rows"] == 1
    assert len(splits.train) + len(splits.val) == len(rows)


def test_labels_that_look_space_separated_are_pointed_out(flat: Path, tmp_path: Path) -> None:
    """'red odd' beside 'red': probably two tags (as some Kaggle sets write them); class names with spaces
    alone ('border collie') are left as they are, without a word."""
    rows = rows_of(flat, tmp_path)
    for row in rows[::3]:
        row[1] += " odd"
    table = write_csv(tmp_path / "tags.csv", ["path", "label"], rows)
    with pytest.warns(UserWarning, match=r"tags.csv: labels such as 'blue odd' look like several labels separated "
                                         r"by spaces .*give --label-sep ' '"):  # fmt: skip
        assert discover(table).class_names == ["blue", "blue odd", "red", "red odd"]
    split = discover(table, columns=LabelColumns(separator=" "))
    assert split.multi_label and split.class_names == ["blue", "odd", "red"]
    named = write_csv(tmp_path / "dogs.csv", ["path", "label"], [[p, f"{c} dog"] for p, c in rows_of(flat, tmp_path)])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*separated by spaces")
        assert discover(named).class_names == ["blue dog", "red dog"]


def test_labels_that_differ_only_in_case_are_an_error_naming_their_rows(flat: Path, tmp_path: Path) -> None:
    """'Red' and 'red' would train as two classes, as class folders so named are refused."""
    rows = rows_of(flat, tmp_path)
    rows[7][1] = rows[7][1].capitalize()  # one of the red rows (blue's come first)
    table = write_csv(tmp_path / "labels.csv", ["path", "label"], rows)
    with pytest.raises(TransferkitError, match=rf"^labels of {table} differ only in case: 'red' \(row 8\), 'Red' "
                                               rf"\(row 9\); write each class one way$"):  # fmt: skip
        discover(table)
    rows[7][0] = "images/red/gone.png"  # 'Red' on a missing file alone: named without a row
    with pytest.raises(TransferkitError, match=r"differ only in case: 'Red', 'red' \(row 8\); write each class"):
        discover(write_csv(tmp_path / "gone.csv", ["path", "label"], rows))


@pytest.mark.parametrize(
    "header, extra_row, message",
    [
        (["path", "label"], ["images/red/0.png", ""], "row .* has no label"),
        (["path", "label"], ["../outside.png", "red"], "outside"),
        (["path", "label"], ["images/red/1.jpg", "blue"], "same file with different labels"),
        (["image", "tag"], None, "no label column"),
        (["path", "label", "split"], ["images/red/0.png", "red", "holdout"], "not one of train, val, test"),
        (["path", "label"], ["images/red/0.png", "red", "val"], "row 14 .* has 3 cells but the header names 2 columns"),
    ],
)
def test_bad_tables_are_one_line_errors_naming_the_row_and_the_fix(
    flat: Path, tmp_path: Path, header: list[str], extra_row: list[str] | None, message: str
) -> None:
    rows = [r + (["train"] if len(header) == 3 else []) for r in rows_of(flat, tmp_path)]
    table = write_csv(tmp_path / "labels.csv", header, rows + ([extra_row] if extra_row else []))
    with pytest.raises(TransferkitError, match=message) as error:
        discover(table)
    assert "\n" not in str(error.value) and "labels.csv" in str(error.value)


def test_empty_cells_past_the_header_are_read_as_nothing(flat: Path, tmp_path: Path) -> None:
    table = write_csv(tmp_path / "labels.csv", ["path", "label"], [[*r, ""] for r in rows_of(flat, tmp_path)])
    assert sorted(discover(table).train + discover(table).val) == sorted(discover(flat).train + discover(flat).val)


def test_a_class_with_one_image_or_only_in_val_is_refused(flat: Path, tmp_path: Path) -> None:
    rows = rows_of(flat, tmp_path)
    table = write_csv(tmp_path / "one.csv", ["path", "label"], [*rows, ["images/red/0.png.copy", "green"]])
    (flat / "red" / "0.png.copy").write_bytes((flat / "red" / "0.png").read_bytes())
    with pytest.raises(TransferkitError, match="class 'green' has 1 image"):
        discover(table)
    split_rows = [[*r, "train"] for r in rows] + [["images/red/0.png.copy", "green", "val"]]
    with pytest.raises(TransferkitError, match="label 'green' .* has no training image"):
        discover(write_csv(tmp_path / "val_only.csv", ["path", "label", "split"], split_rows))


def test_a_class_whose_every_row_names_a_missing_file_is_refused_not_trained_unseen(flat: Path, tmp_path: Path) -> None:
    rows = rows_of(flat, tmp_path) + [[f"images/green/{i}.png", "green"] for i in range(3)]
    with pytest.warns(UserWarning, match="file not found"), pytest.raises(
        TransferkitError, match="class 'green' of .*labels.csv has no usable image"
    ):
        discover(write_csv(tmp_path / "labels.csv", ["path", "label"], rows))


def test_a_folder_linked_into_the_data_folder_is_inside_it(flat: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(flat)  # images -> a folder elsewhere, as datasets on other disks are
    table = write_csv(data / "labels.csv", ["path", "label"], rows_of(flat, tmp_path))
    splits = discover(table)
    assert len(splits.train) + len(splits.val) == len(rows_of(flat, tmp_path))


def test_a_table_that_is_not_utf8_or_breaks_its_rows_is_named_with_the_line_and_fix(flat: Path, tmp_path: Path) -> None:
    rows = rows_of(flat, tmp_path)
    excel = tmp_path / "excel.csv"
    excel.write_bytes(("path,label\n" + "\n".join(f"{p},{c}" for p, c in rows) + "\nimages/red/0.png,rouge é\n")
                      .encode("cp1252"))  # fmt: skip
    with pytest.raises(TransferkitError, match="excel.csv is not UTF-8 text .* save it as CSV UTF-8") as error:
        discover(excel)
    assert "\n" not in str(error.value)
    spaced = tmp_path / "spaced.csv"  # blank lines between rows: the error names the file's line
    spaced.write_text("path,label\n\n" + "\n\n".join(f"{p},{c}" for p, c in rows[:3]) + "\n\nimages/red/0.png,\n")
    with pytest.raises(TransferkitError, match="row 9 of .*spaced.csv has no label"):
        discover(spaced)
    # Rows of empty cells below the data, as a spreadsheet saves them: no rows at all, not rows without labels.
    trailing = tmp_path / "trailing.csv"
    trailing.write_text("path,label\n" + "\n".join(f"{p},{c}" for p, c in rows) + "\n,\n , \n   \n")
    assert len(discover(trailing).train) + len(discover(trailing).val) == len(rows)


def test_an_exclude_list_leaves_its_files_out(flat: Path, tmp_path: Path) -> None:
    everything = discover(flat)
    dropped = [everything.train[0][0], everything.val[0][0]]
    listing = tmp_path / "suspects.txt"
    listing.write_text("# confirmed mislabelled\n" + "\n".join(dropped) + "\n\n")
    assert read_exclude_list(listing) == {str(Path(p).resolve()) for p in dropped}
    kept = discover(flat, exclude=listing)
    assert kept.excluded == 2 and not {p for p, _ in kept.train + kept.val} & set(dropped)
    with pytest.raises(TransferkitError, match="--exclude .*missing.txt does not exist"):
        discover(flat, exclude=tmp_path / "missing.txt")
    with pytest.raises(TransferkitError, match="--exclude .* is a folder, not a file"):
        discover(flat, exclude=tmp_path)
    # As Windows Notepad saves it: a byte-order mark before the first path, CRLF line ends.
    listing.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(dropped).encode() + b"\r\n")
    assert discover(flat, exclude=listing).excluded == 2  # the first path was read with the mark, matching nothing
    listing.write_bytes(dropped[0].encode() + b"\n\xe9t\xe9.png\n")  # Latin-1, not UTF-8
    with pytest.raises(TransferkitError, match="--exclude .*suspects.txt is not UTF-8 text \\(byte .*\\); save it"):
        discover(flat, exclude=listing)  # was a UnicodeDecodeError traceback


def test_an_exclude_list_that_empties_a_split_or_a_class_is_an_error_and_one_of_other_data_a_warning(
    flat: Path, tmp_path: Path
) -> None:
    everything = discover(flat)
    lists = {"blue": [p for p, label in everything.train if everything.class_names[label] == "blue"],
             "val": [p for p, _ in everything.val], "other": [str(tmp_path / "elsewhere" / "x.png")]}  # fmt: skip
    for name, paths in lists.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(paths) + "\n")
    with pytest.raises(TransferkitError, match="blue.txt leaves class\\(es\\) blue without training images"):
        discover(flat, exclude=tmp_path / "blue.txt")  # training on it would never predict blue
    with pytest.raises(TransferkitError, match="val.txt leaves no validation images; exclude fewer"):
        discover(flat, exclude=tmp_path / "val.txt")
    with pytest.raises(TransferkitError, match="leaves no images"):
        every_image(flat, {"exclude": _listing_all(flat, tmp_path)})  # what features and inspect read
    with pytest.warns(UserWarning, match="other.txt names none of the 12 images of .*; was it written for other data"):
        assert discover(flat, exclude=tmp_path / "other.txt").excluded == 0


def _listing_all(folder: Path, tmp_path: Path) -> Path:
    listing = tmp_path / "all.txt"
    listing.write_text("\n".join(str(p) for p in sorted(folder.rglob("*.*"))) + "\n")
    return listing


def test_balance_auto_weights_the_loss_only_past_the_ratio() -> None:
    balanced = [("a", 0)] * 10 + [("b", 1)] * 8
    skewed = [("a", 0)] * 40 + [("b", 1)] * 5
    assert resolve_balance("auto", balanced, 2).mode == "none"
    b = resolve_balance("auto", skewed, 2)
    assert (b.mode, b.ratio, b.selection_metric) == ("loss", 8.0, "val_macro_f1")
    weights = b.class_weights()
    assert weights is not None and weights[1] / weights[0] == pytest.approx(8.0)  # each class weighs the same
    assert resolve_balance("none", skewed, 2).class_weights() is None
    with pytest.raises(TransferkitError, match="--balance loss is for single-label"):
        resolve_balance("loss", [("a", (0, 1))], 2, multi_label=True)


def test_the_balanced_sampler_draws_classes_evenly_and_the_same_on_resume() -> None:
    labels = [0] * 90 + [1] * 10
    sampler = BalancedSampler(labels, seed=3, with_aug_seeds=False)
    epochs = [list(sampler) for _ in range(20)]
    share = sum(labels[i] for e in epochs for i in e) / (20 * len(labels))
    assert 0.4 < share < 0.6  # 10 % of the images, half of the draws
    again = BalancedSampler(labels, seed=3, with_aug_seeds=False)
    again.epoch = 5  # as ResumableState restores it
    assert list(again) == epochs[5]


def test_balanced_accuracy_leaves_out_a_class_no_image_has() -> None:
    """Evaluated on images of two of three classes, with the third predicted twice: it has no recall."""
    from sklearn.metrics import balanced_accuracy_score
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    from transferkit.balance import balanced_accuracy
    from transferkit.training.learner import BalancedAccuracy

    truth, predicted = torch.tensor([1, 1, 1, 1, 1, 1, 2, 2]), torch.tensor([1, 1, 1, 0, 0, 2, 2, 0])
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": the case at hand
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(truth, predicted)  # (3/6 + 1/2) / 2, not / 3
    assert balanced_accuracy(multiclass_confusion_matrix(predicted, truth, num_classes=3)) == pytest.approx(expected)
    epoch = BalancedAccuracy(num_classes=3)  # training's, per validation epoch, in two batches
    epoch.update(torch.nn.functional.one_hot(predicted[:5], 3).float(), truth[:5])
    epoch.update(torch.nn.functional.one_hot(predicted[5:], 3).float(), truth[5:])
    assert float(epoch.compute()) == pytest.approx(expected)


def test_an_imbalanced_run_weights_its_loss_and_is_chosen_by_macro_f1(tmp_path: Path) -> None:
    from transferkit import evaluate, train

    make_colour_folder(tmp_path / "data" / "train", 16, classes=("red",), seed=1)
    make_colour_folder(tmp_path / "data" / "train", 4, classes=("blue",), seed=2)
    make_colour_folder(tmp_path / "data" / "val", 4, seed=3)
    result = train(tmp_path / "data", **TINY, out=str(tmp_path / "run"))
    balance = result.metrics["balance"]
    assert (balance["mode"], balance["class_counts"], balance["selection_metric"]) == ("loss", [4, 16], "val_macro_f1")
    history = (result.run_dir / "history.csv").read_text().splitlines()
    assert "val_macro_f1" in history[0] and "val_balanced_accuracy" in history[0]
    evaluation = evaluate(result.run_dir, tmp_path / "data" / "val")
    assert evaluation.macro_f1 == result.metrics["val_macro_f1"]
    assert evaluation.balanced_accuracy == result.metrics["val_balanced_accuracy"]
    assert json.loads((result.run_dir / "config.json").read_text())["resolved_from"]["balance"]["mode"] == "loss"


def test_an_imbalanced_linear_probe_is_weighted_and_chosen_by_macro_f1(tmp_path: Path) -> None:
    from transferkit import train

    make_colour_folder(tmp_path / "data" / "train", 16, classes=("red",), seed=1)
    make_colour_folder(tmp_path / "data" / "train", 4, classes=("blue",), seed=2)
    make_colour_folder(tmp_path / "data" / "val", 4, seed=3)
    options = {**TINY, "strategy": "linear-probe"}
    weighted = train(tmp_path / "data", **options, out=str(tmp_path / "weighted"))
    plain = train(tmp_path / "data", **options, balance="none", out=str(tmp_path / "plain"))
    assert weighted.metrics["balance"]["mode"] == "loss" and plain.metrics["balance"]["mode"] == "none"
    # Both are chosen by macro-F1 (the classes are imbalanced); only --balance loss weighs the classes.
    scored_by = [r.metrics["linear_probe"]["cv_scored_by"] for r in (weighted, plain)]
    assert scored_by == ["macro-F1", "macro-F1"]
    probes = [{k: v for k, v in load_checkpoint(r.run_dir).state_dict().items() if "probe" in k}
              for r in (weighted, plain)]  # fmt: skip
    assert probes[0] and probes[0].keys() == probes[1].keys()
    assert any(not probes[0][k].equal(probes[1][k]) for k in probes[0])


def test_measured_selection_scores_imbalanced_classes_by_macro_f1(tmp_path: Path) -> None:
    from transferkit import measure_candidates

    make_colour_folder(tmp_path / "data", 20, classes=("red",), seed=1)
    make_colour_folder(tmp_path / "data", 5, classes=("blue",), seed=2)
    selection = measure_candidates(tmp_path / "data", model="resnet18", weights="none", models="resnet18", budget=60,
                                   precision="32")  # fmt: skip
    assert selection.precision == selection.to_dict()["precision"] == "32"  # as given, not the machine's best
    assert selection.metric == "macro_f1" and selection.class_counts == {"blue": 4, "red": 16}
    assert "scored by macro-F1" in selection.table() and "holdout F1" in selection.table()
    assert selection.to_dict()["metric"] == "macro_f1"


def _multi_label_images(root: Path, count: int, seed: int) -> list[list[str]]:
    """Images whose red, green and blue channels are each high or not: their labels, "red|blue" and so on."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        on = [c for c in range(3) if rng.random() < 0.5] or [int(rng.integers(0, 3))]
        pixels = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
        pixels[..., on] += 180
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append([f"{root.name}/{i}.png", "|".join(("red", "green", "blue")[c] for c in on)])
    return rows


def test_predict_takes_a_csv_listing_images_and_answers_each_row(flat: Path, tmp_path: Path) -> None:
    """A CSV given to predict is a list of images (its path column, labels or not), answered in its order."""
    from transferkit import predict, train

    table = write_csv(tmp_path / "labels.csv", ["filename", "class"], rows_of(flat, tmp_path))
    run = train(table, **{**TINY, "epochs": 1}, out=str(tmp_path / "run")).run_dir
    images = sorted(flat.rglob("*.*"))[::3]
    listed = write_csv(tmp_path / "todo.csv", ["image"], [[str(p.relative_to(tmp_path))] for p in images]
                       + [["images/red/gone.jpg"]])  # fmt: skip
    answers = predict(run, listed, runtime="torch")
    assert [r["path"] for r in answers] == [str(p) for p in images] + [str(tmp_path / "images/red/gone.jpg")]
    assert answers[:-1] == predict(run, images, runtime="torch")
    assert answers[-1] == {"path": str(tmp_path / "images/red/gone.jpg"), "error": "no such file", "predictions": []}
    # A list to predict may name files outside its own folder (a label file for training may not).
    (tmp_path / "lists").mkdir()
    beside = write_csv(tmp_path / "lists/todo.csv", ["image"], [[f"../{p.relative_to(tmp_path)}"] for p in images])
    assert predict(run, beside, runtime="torch") == answers[:-1]
    with pytest.raises(TransferkitError, match=r"has no path column \(its columns: class\); name the column of "
                                               r"image paths 'path'"):  # fmt: skip
        predict(run, write_csv(tmp_path / "classes.csv", ["class"], [["red"]]))


def test_multi_label_csv_trains_a_sigmoid_head_with_tuned_thresholds(tmp_path: Path) -> None:
    from transferkit import evaluate, predict, train

    rows = [[*r, "train"] for r in _multi_label_images(tmp_path / "train", 48, 1)]
    rows += [[*r, "val"] for r in _multi_label_images(tmp_path / "val", 16, 2)]
    table = write_csv(tmp_path / "labels.csv", ["path", "labels", "split"], rows)
    splits = discover(table)
    assert splits.multi_label and splits.class_names == ["blue", "green", "red"]
    assert all(len(label) == 3 and set(label) <= {0, 1} and any(label) for _, label in splits.train)

    result = train(table, **{**TINY, "epochs": 8, "lr": 0.01}, out=str(tmp_path / "run"))
    m = result.metrics
    assert m["multi_label"] and len(m["thresholds"]) == 3 and all(0 < t < 1 for t in m["thresholds"])
    assert m["balance"]["selection_metric"] == "val_macro_f1" and m["val_confusion_matrix"] == []
    assert set(m["val_per_class"]["red"]) >= {"precision", "recall", "f1", "average_precision", "threshold"}
    assert m["val_mean_average_precision"] > 0.8  # the colours are plain to see
    # The report's data table counts each class's images and, below, the images (not the labels).
    assert m["data"]["images"] == {"train": 48, "val": 16} and sum(m["data"]["train_counts"].values()) > 48
    data_table = (result.run_dir / "report.html").read_text().split('id="data"')[1].split("<section")[0]
    totals = r"<strong>images</strong></td><td class=num><strong>48</strong></td><td class=num><strong>16<"
    assert re.search(totals, data_table)
    evaluation = evaluate(result.run_dir, table)
    assert evaluation.multi_label and evaluation.mean_average_precision == m["val_mean_average_precision"]
    assert evaluation.accuracy == m["val_accuracy"] and evaluation.macro_f1 == m["val_macro_f1"]
    # predict answers every class over its threshold, however many
    out = predict(result.run_dir, [tmp_path / "val"], top_k=1)
    assert len(out) == 16 and any(len(r["predictions"]) > 1 for r in out)
    for r in out:
        assert all(p["probability"] >= p["threshold"] for p in r["predictions"])
    # A linear probe is one-vs-rest: a logistic regression per class on the same cached features.
    probe = train(table, **{**TINY, "strategy": "linear-probe"}, out=str(tmp_path / "probe"))
    assert probe.metrics["multi_label"] and probe.metrics["val_mean_average_precision"] > 0.8
    assert evaluate(probe.run_dir, table).macro_f1 == probe.metrics["val_macro_f1"]
    # Class folders give one label per image: a multi-label model reads each as a set of one.
    singles = [(path, labels) for path, labels, _ in rows[48:] if "|" not in labels]
    for path, label in singles:
        (tmp_path / "folders" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / path, tmp_path / "folders" / label / Path(path).name)
    on_folders = evaluate(result.run_dir, tmp_path / "folders")
    assert on_folders.multi_label and on_folders.num_images == len(singles) > 0
    by_folder = sorted(singles, key=lambda row: (row[1], row[0]))
    assert [p["labels"] for p in on_folders.predictions] == [[label] for _, label in by_folder]
    one_class = load_checkpoint(result.run_dir)
    one_class.record = one_class.record.with_extra(multi_label=False)  # as a model that picks one class reads it
    with pytest.raises(TransferkitError, match="gives images several labels .* this model picks one class per image"):
        evaluate(one_class, table)



def test_a_multi_label_k_fold_run_is_evaluated_by_the_thresholds_it_predicts_with(tmp_path: Path) -> None:
    from transferkit import evaluate, load_checkpoint, predict, train

    rows = [[*r, "train"] for r in _multi_label_images(tmp_path / "train", 24, 1)]
    rows += [[*r, "val"] for r in _multi_label_images(tmp_path / "val", 8, 2)]
    table = write_csv(tmp_path / "labels.csv", ["path", "labels", "split"], rows)
    run = train(table, **TINY, folds=2, out=str(tmp_path / "run")).run_dir
    folds = [load_checkpoint(run / f"fold-{k}").thresholds for k in (1, 2)]
    averaged = [(a + b) / 2 for a, b in zip(*folds)]  # the ensemble's, as its probabilities are averaged
    evaluation = evaluate(run, table)
    assert [evaluation.per_class[c]["threshold"] for c in evaluation.class_names] == pytest.approx(averaged)
    answers = {r["path"]: sorted(p["label"] for p in r["predictions"]) for r in predict(run, [tmp_path / "val"])}
    assert {p["path"]: sorted(p["predicted"]) for p in evaluation.predictions} == answers


@pytest.mark.slow
def test_a_multi_label_export_answers_like_the_checkpoint(tmp_path: Path) -> None:
    from transferkit import export, predict, train

    rows = [[*r, "train"] for r in _multi_label_images(tmp_path / "train", 24, 1)]
    rows += [[*r, "val"] for r in _multi_label_images(tmp_path / "val", 8, 2)]
    table = write_csv(tmp_path / "labels.csv", ["path", "labels", "split"], rows)
    run = train(table, **{**TINY, "precision": "32"}, out=str(tmp_path / "run")).run_dir
    onnx = export(run, out=tmp_path / "model.onnx")  # verified against the checkpoint (sigmoids inside)
    sidecar = json.loads(Path(str(onnx.path) + ".json").read_text())
    assert sidecar["output"]["softmax"] is False and len(sidecar["output"]["thresholds"]) == 3
    eager = predict(run, [tmp_path / "val"], runtime="torch")
    exported = predict(onnx.path, [tmp_path / "val"], runtime="onnx")
    assert [[p["label"] for p in r["predictions"]] for r in eager] == [[p["label"] for p in r["predictions"]] for r in exported]


@pytest.mark.slow
def test_the_command_line_reads_a_label_file_with_named_columns(flat: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    rows = [[r[1], r[0], "val" if i % 3 == 0 else "train"] for i, r in enumerate(rows_of(flat, tmp_path))]
    table = write_csv(tmp_path / "scans.csv", ["finding", "file", "fold"], rows)
    args = ["train", str(table), "--path-col", "file", "--label-col", "finding", "--split-col", "fold",
            "--balance", "none", "--model", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "1",
            "--out", str(tmp_path / "run"), "--quiet"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["balance"]["requested"] == "none" and sum(metrics["data"]["val_counts"].values()) == 4
    bad = subprocess.run([sys.executable, "-m", "transferkit", *args[:2], "--label-col", "diagnosis"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "--label-col diagnosis" in bad.stderr
    # A test file written like the training one is read by the run's column names, where it has them.
    test = write_csv(tmp_path / "test.csv", ["finding", "file"], [r[:2] for r in rows if r[2] == "val"])
    command = [sys.executable, "-m", "transferkit", "evaluate", str(tmp_path / "run"), str(test), "--json"]
    scored = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(scored.stdout)["num_images"] == 4


@pytest.mark.slow
def test_measured_selection_on_multi_label_data_scores_by_macro_f1(tmp_path: Path) -> None:
    from transferkit import train

    rows = [[*r, "train"] for r in _multi_label_images(tmp_path / "train", 32, 1)]
    rows += [[*r, "val"] for r in _multi_label_images(tmp_path / "val", 8, 2)]
    table = write_csv(tmp_path / "labels.csv", ["path", "labels", "split"], rows)
    auto = train(table, **{**TINY, "strategy": "auto", "models": ["resnet18"], "budget": "60s"},
                 out=str(tmp_path / "auto"))  # fmt: skip
    assert auto.metrics["selection"]["metric"] == "macro_f1" and auto.metrics["multi_label"]
    scored = [t for t in auto.metrics["selection"]["leaderboard"] if t["score"] is not None]
    assert scored and all(0 <= t["score"] <= 1 for t in scored)


def test_features_writes_a_label_files_images_with_its_labels_and_splits(flat: Path, tmp_path: Path) -> None:
    import numpy as np

    from transferkit import explicit_preprocessing, write_features
    from transferkit.cli import main

    rows = [[r[1], r[0], "val" if i % 3 == 0 else ""] for i, r in enumerate(rows_of(flat, tmp_path))]
    table = write_csv(tmp_path / "scans.csv", ["finding", "file", "fold"], rows)
    (tmp_path / "exclude.txt").write_text(f"{rows[1][1]}\n")  # relative to the list's folder
    args = ["features", str(tmp_path), "--labels", str(table), "--path-col", "file", "--label-col", "finding",
            "--split-col", "fold", "--exclude", str(tmp_path / "exclude.txt"), "--model", "efficientnet_lite0",
            "--image-size", "32", "--out", str(tmp_path / "f.npz")]  # fmt: skip
    assert main(args) == 0
    saved = np.load(tmp_path / "f.npz")
    expected = {str((tmp_path / file).resolve()): (finding, fold or "all")
                for finding, file, fold in rows[:1] + rows[2:]}  # fmt: skip
    got = {str(Path(p).resolve()): (str(saved["class_names"][label]), str(split))
           for p, label, split in zip(saved["paths"], saved["labels"], saved["splits"])}  # fmt: skip
    assert got == expected and saved["features"].shape == (len(expected), 1280)
    # --image-size reached the preprocessing: the API at 32 px (real weights) finds every vector in the cache.
    options = {"labels": table, "path_col": "file", "label_col": "finding", "split_col": "fold",
               "exclude": tmp_path / "exclude.txt"}  # fmt: skip
    again = write_features(tmp_path, tmp_path / "again.npz", data_options=options,
                           preprocessing=explicit_preprocessing("efficientnet_lite0", image_size=32))  # fmt: skip
    assert again["hits"] == len(expected) and np.array_equal(np.load(tmp_path / "again.npz")["features"],
                                                              saved["features"])  # fmt: skip
    # The same as a CSV file, a row per image, for a spreadsheet: each cell as the .npz holds it (7 digits).
    assert main([*args[:-1], str(tmp_path / "f.csv")]) == 0
    with open(tmp_path / "f.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["path"], r["label"], r["split"]) for r in written] == [
        (str(p), str(saved["class_names"][label]), str(split))
        for p, label, split in zip(saved["paths"], saved["labels"], saved["splits"])]  # fmt: skip
    as_read = np.array([[float(r[f"f{i}"]) for i in range(1280)] for r in written], dtype=np.float32)
    assert np.allclose(as_read, saved["features"], rtol=1e-6, atol=0)
    assert main([*args[:-1], str(tmp_path / "g.npz"), "--label-col", "diagnosis"]) == 2  # named, not guessed
    assert not (tmp_path / "g.npz").exists()


def test_features_of_multi_label_data_are_written_with_one_0_1_column_per_class(tmp_path: Path) -> None:
    import numpy as np

    from transferkit import write_features

    rows = _multi_label_images(tmp_path / "images", 12, 3)
    table = write_csv(tmp_path / "labels.csv", ["path", "labels"], rows)
    info = write_features(table, tmp_path / "f.npz", "resnet18", "none", use_cache=False)
    saved = np.load(tmp_path / "f.npz")
    assert info["multi_label"] and list(saved["class_names"]) == ["blue", "green", "red"]
    names = list(saved["class_names"])
    expected = {str((tmp_path / path).resolve()): {names.index(c) for c in labels.split("|")} for path, labels in rows}
    got = {str(Path(p).resolve()): set(np.flatnonzero(row).tolist()) for p, row in zip(saved["paths"], saved["labels"])}
    assert got == expected and set(saved["splits"]) == {"all"}
    write_features(table, tmp_path / "f.csv", "resnet18", "none")
    with open(tmp_path / "f.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [[int(r[name]) for name in names] for r in written] == saved["labels"].tolist()


def test_advise_reads_a_label_file_and_scores_multi_label_data_by_macro_f1(tmp_path: Path) -> None:
    import torch

    from transferkit import Preprocessing
    from transferkit.advice import _chance, advise

    rows = [[*r, "train"] for r in _multi_label_images(tmp_path / "train", 40, 1)]
    rows += [[*r, "val"] for r in _multi_label_images(tmp_path / "val", 12, 2)]
    table = write_csv(tmp_path / "tags.csv", ["image", "tags", "split"], rows)
    small = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3)
    advice = advise(tmp_path, "resnet18", "none", data_options={"labels": table}, cache_dir=tmp_path / "cache",
                    preprocessing=small)  # fmt: skip
    assert advice.probe_metric == "macro-F1" and "macro-F1" in advice.text()
    assert advice.sampled_images == 40 and "40 images, at most 100 a class" in advice.text()  # all 40 measured
    counts = {name: sum(name in r[1].split("|") for r in rows if r[2] == "train") for name in ("blue", "green", "red")}
    assert advice.images_per_class == counts
    assert advice.command.startswith(f"transferkit train {tmp_path} --labels {table} --model resnet18")
    # chance: answering yes to every class scores 2p / (1 + p) on a class of share p
    assert _chance(torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0]])) == pytest.approx((1 + 2 * 0.25 / 1.25) / 2)
    assert _chance(torch.tensor([0, 1, 1, 1])) == 0.75
    with pytest.raises(TransferkitError, match="unknown data option.*label_column"):
        advise(tmp_path, "resnet18", "none", data_options={"labels": table, "label_column": "tags"})


def test_a_label_file_to_evaluate_on_takes_the_run_s_column_names_where_it_has_them(tmp_path: Path) -> None:
    from transferkit.runs import with_run_columns

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"path_col": "file", "label_col": "finding", "split_col": "fold",
                                                 "label_sep": None}))  # fmt: skip
    test = write_csv(tmp_path / "test.csv", ["finding", "file"], [["cat", "a.png"]])
    assert with_run_columns(run, test, None) == {"path_col": "file", "label_col": "finding"}  # no fold column
    named = {"path_col": "file", "label_col": "finding"}
    assert with_run_columns(run / "model.pt", test, {"label_col": "other"}) == {**named, "label_col": "other"}
    assert with_run_columns(run, tmp_path, {"labels": test}) == {"labels": test, **named}
    assert with_run_columns(tmp_path / "elsewhere", test, None) is None  # not a run directory: options as given
    (run / "config.json").write_text(json.dumps({"label_sep": "|"}))  # a multi-label run: its separator
    assert with_run_columns(run, test, None) == {"label_sep": "|"}
    (run / "config.json").write_text("{")  # damaged: model.pt alone still evaluates, with the options given
    assert with_run_columns(run, test, {"label_col": "finding"}) == {"label_col": "finding"}


def test_evaluate_reads_a_label_file_of_held_out_images(tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import evaluate, train
    from transferkit.cli import main

    run = train(tiny_dataset, **TINY, out=str(tmp_path / "run")).run_dir
    images = sorted((tiny_dataset / "val").rglob("*.*"))  # blue 0-3, red 0-3
    whole = evaluate(run, tiny_dataset / "val")
    # No split column: every row is held out, and a class may have one image (nothing here is trained).
    table = write_csv(tmp_path / "test.csv", ["path", "label"], [[str(p), p.parent.name] for p in images])
    assert evaluate(run, table).accuracy == whole.accuracy and evaluate(run, table).num_images == 8
    few = write_csv(tmp_path / "few.csv", ["path", "label"], [[str(p), p.parent.name] for p in images[:5]])
    assert evaluate(run, few).num_images == 5
    # With splits: the test rows; training rows alone are refused.
    split = [[str(p), p.parent.name, "test" if i % 2 else "train"] for i, p in enumerate(images)]
    assert evaluate(run, write_csv(tmp_path / "split.csv", ["path", "label", "split"], split)).num_images == 4
    trained = write_csv(tmp_path / "train.csv", ["path", "label", "split"], [r[:2] + ["train"] for r in split])
    with pytest.raises(TransferkitError, match="no test or val rows"):
        evaluate(run, trained)
    # The command line takes a label file beside the images, with named columns.
    named = write_csv(tmp_path / "scans.csv", ["finding", "file"],
                      [[p.parent.name, str(p.relative_to(tiny_dataset))] for p in images])  # fmt: skip
    out = tmp_path / "evaluation.json"
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        assert main(["evaluate", str(run), str(tiny_dataset), "--labels", str(named), "--path-col", "file",
                     "--label-col", "finding", "--json"]) == 0  # fmt: skip
    assert json.loads(out.read_text())["accuracy"] == whole.accuracy


def test_inspect_suggests_training_on_the_same_label_file_without_the_suspects(flat: Path, tmp_path: Path) -> None:
    from transferkit import explicit_preprocessing, inspect_data, train

    rows = [[r[1], r[0], "val" if i % 3 == 0 else "train"] for i, r in enumerate(rows_of(flat, tmp_path))]
    table = write_csv(tmp_path / "scans.csv", ["finding", "file", "fold"], rows)
    columns = {"path_col": "file", "label_col": "finding", "split_col": "fold"}
    small = {"model": "resnet18", "weights": "none", "batch_size": 4}
    found = inspect_data(tmp_path, labels=table, data_options=columns, out=tmp_path / "review", **small,
                         preprocessing=explicit_preprocessing("resnet18", image_size=32))  # fmt: skip
    expected = (f"transferkit train {tmp_path} --labels {table} --path-col file --label-col finding --split-col fold "
                f"--exclude {tmp_path / 'review' / 'suspects.txt'}")  # fmt: skip
    assert found.train_command() == expected and f"#   {expected}\n" in found.suspects_text()
    assert expected in (tmp_path / "review" / "inspection.html").read_text()
    # The command works as printed (the suspects left out), and inspecting its run suggests it again.
    run = train(tmp_path, labels=str(table), exclude=str(tmp_path / "review" / "suspects.txt"), epochs=1, quiet=True,
                image_size=32, out=str(tmp_path / "run"), **columns, **small).run_dir  # fmt: skip
    again = inspect_data(run=run, out=tmp_path / "again")
    assert again.train_command() == expected.replace("review", "again")


def test_inspect_names_each_multi_label_images_classes(tmp_path: Path) -> None:
    from transferkit import explicit_preprocessing, inspect_data

    # "photo" is on every image: nothing to get wrong there, so its class sits out of the label checks.
    rows = [[path, f"{labels}|photo"] for path, labels in _multi_label_images(tmp_path / "images", 40, 4)]
    table = write_csv(tmp_path / "tags.csv", ["path", "tags"], rows)
    found = inspect_data(table, model="resnet18", weights="none", batch_size=8,
                         preprocessing=explicit_preprocessing("resnet18", image_size=32))  # fmt: skip
    given = {str((tmp_path / path).resolve()): " + ".join(sorted(tags.split("|"))) for path, tags in rows}
    shown = [(o.path, o.label) for o in found.outliers]
    shown += [(n.path, n.label) for o in found.outliers for n in o.neighbours]
    shown += [(i.path, i.given) for i in found.label_issues]
    assert found.multi_label and found.outliers and all(given[path] == label for path, label in shown)


def test_a_label_file_naming_no_existing_file_is_one_error_and_many_skips_are_summed_up(
    flat: Path, tmp_path: Path
) -> None:
    missing = [[f"elsewhere/{i}.jpg", "red" if i % 2 else "blue"] for i in range(40)]
    table = write_csv(tmp_path / "labels.csv", ["path", "label"], missing)
    message = r"none of the 40 rows of .*labels.csv names a usable image .*not found\); paths are read relative to "
    with pytest.raises(TransferkitError, match=message + rf"{tmp_path}$"):
        discover(table)
    for i in range(15):  # annotations beside the images: named one by one only at first
        (flat / "red" / f"{i}.xml").write_text("<annotation/>")
    with pytest.warns(UserWarning) as record:
        discover(flat)
    skipping = [str(w.message) for w in record if str(w.message).startswith("skipping")]
    assert len(skipping) == 11 and all(".xml: not an image file extension" in m for m in skipping[:10])
    assert skipping[10] == f"skipping 5 more files of {flat} (5 not an image file extension)"


def test_lr_find_reads_a_label_file_beside_its_images(flat: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transferkit.cli import main

    rows = [[r[1], r[0]] for r in rows_of(flat, tmp_path)]
    table = write_csv(tmp_path / "scans.csv", ["finding", "file"], rows)
    assert main(["lr-find", str(tmp_path), "--labels", str(table), "--path-col", "file", "--label-col", "finding",
                 "--model", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4",
                 "--plot", str(tmp_path / "lr.png")]) == 0  # fmt: skip
    assert "suggested learning rate:" in capsys.readouterr().out and (tmp_path / "lr.png").is_file()
    (tmp_path / "mine.png").write_bytes(b"mine")
    assert main(["lr-find", str(table), "--plot", str(tmp_path / "mine.png")]) == 2
    assert f"--plot {tmp_path / 'mine.png'} already exists; choose another --plot" in capsys.readouterr().err
    assert (tmp_path / "mine.png").read_bytes() == b"mine"
    assert main(["lr-find", str(table), "--plot", str(tmp_path / "lr.txt")]) == 2  # a PNG under .txt was written
    assert f"--plot {tmp_path / 'lr.txt'} must end in .png, .pdf, .svg" in capsys.readouterr().err
    from transferkit.training.lr_find import LRFinderResult

    result = LRFinderResult(1e-3, [1e-4, 1e-3, 1e-2], [1.0, 0.5, 2.0])
    assert result.plot(tmp_path / "lr.svg").read_text().lstrip().startswith("<?xml")
    assert result.plot(tmp_path / "lr.pdf").read_bytes().startswith(b"%PDF")
