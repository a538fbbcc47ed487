"""transferkit inspect: planted label errors, duplicates, leaks, outliers and bad files are found and listed.

The planted data are generated shape images (a class is a hue), not helpers' colour noise: noise
images of one colour are all alike in feature space, so near-duplicates could not be told from the
rest. Features come from the offline efficientnet_lite0 weights at 128 px (a second or two here).
"""

from __future__ import annotations

import colorsys
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_colour_folder, requires_shared
from PIL import Image, ImageEnhance

from transferkit import Inspection, TransferkitError, inspect_data
from transferkit.backbones import explicit_preprocessing
from transferkit.data import discover, read_exclude_list
from transferkit.inspection_checks import file_digests, keep_order, label_issues, nearest_neighbours, similar_pairs

HUES = {"red": 0.0, "green": 0.33, "blue": 0.62}
SMALL_LITE = explicit_preprocessing("efficientnet_lite0", image_size=128)


def shapes_image(rng: np.random.Generator, hue: float, size: int = 64) -> Image.Image:
    """Ellipses and rectangles of one hue on a grey of random level: the hue is the class, the layout is unique."""
    from PIL import ImageDraw

    grey = int(rng.integers(70, 190))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 8))):
        r, g, b = colorsys.hsv_to_rgb((hue + rng.normal(0, 0.02)) % 1, rng.uniform(0.7, 1), rng.uniform(0.6, 1))
        x0, y0 = rng.integers(-8, size - 16, 2)
        w, h = rng.integers(12, size // 2 + 8, 2)
        shape = draw.ellipse if rng.integers(0, 2) else draw.rectangle
        shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=(int(r * 255), int(g * 255), int(b * 255)))
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_shapes_folder(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, hue in HUES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shapes_image(rng, hue).save(root / name / f"{i}.png")


def brightened(source: Path, target: Path, factor: float = 1.06) -> Path:
    ImageEnhance.Brightness(Image.open(source)).enhance(factor).save(target)
    return target


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """DATA/train + DATA/val, 3 hue classes, with known problems planted; returns the data and what was planted."""
    root = tmp_path_factory.mktemp("planted") / "shapes"
    make_shapes_folder(root / "train", 24, seed=1)
    make_shapes_folder(root / "val", 8, seed=2)
    rng = np.random.default_rng(3)
    wrong = []  # new images of one class filed under another
    for i, (true, filed, split) in enumerate([("red", "blue", "train"), ("green", "red", "train"),
                                              ("blue", "green", "train"), ("red", "green", "train"),
                                              ("green", "blue", "val")]):  # fmt: skip
        path = root / split / filed / f"mislabelled_{i}.png"
        shapes_image(rng, HUES[true]).save(path)
        wrong.append((path, true))
    copy = root / "train/green/copy_of_red_0.png"  # a mislabelled copy: the same bytes under another class
    shutil.copy(root / "train/red/0.png", copy)
    wrong.append((copy, "red"))
    duplicates = [  # (dropped, kept): the later path goes within a split, the training copy across splits
        (copy, root / "train/red/0.png"),
        (brightened(root / "train/red/7.png", root / "train/red/near_7.png"), root / "train/red/7.png"),
    ]
    shutil.copy(root / "train/blue/3.png", root / "val/blue/leak_3.png")
    brightened(root / "train/green/5.png", root / "val/green/near_5.png")
    leaks = [(root / "train/blue/3.png", root / "val/blue/leak_3.png"),
             (root / "train/green/5.png", root / "val/green/near_5.png")]  # fmt: skip
    odd = root / "train/blue/checkerboard.png"  # nothing like the rest
    Image.fromarray((np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)).convert("RGB").save(odd)
    truncated = root / "train/red/truncated.png"
    truncated.write_bytes((root / "train/red/1.png").read_bytes()[:300])  # a readable header, no image
    (root / "train/red/empty.jpg").write_bytes(b"")
    return {"root": root, "wrong": wrong, "duplicates": duplicates, "leaks": leaks, "odd": odd,
            "undecodable": [truncated, root / "train/red/empty.jpg"]}  # fmt: skip


@pytest.fixture(scope="module")
def inspected(planted: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Inspection, Path]:
    out = tmp_path_factory.mktemp("out") / "shapes-inspection"
    result = inspect_data(planted["root"], preprocessing=SMALL_LITE, out=out, outlier_fraction=0.02, precision="32")
    return result, out


def _recall(found: set[str], planted: list[Path]) -> float:
    return sum(str(p) in found for p in planted) / len(planted)


def test_planted_label_errors_are_found_with_their_true_class(inspected: tuple, planted: dict) -> None:
    result, _ = inspected
    issues = {issue.path: issue for issue in result.label_issues}
    assert _recall(set(issues), [p for p, _ in planted["wrong"]]) >= 0.8
    found = [(issues[str(p)], true) for p, true in planted["wrong"] if str(p) in issues]
    assert all(issue.suggested == true and issue.given != true for issue, true in found)
    assert all(issue.suggested_probability > issue.given_probability for issue, _ in found)
    assert len(issues) <= sum(result.images.values()) // 5  # most images are not suspected
    assert all(len(issue.neighbours) == 5 for issue in result.label_issues)


def test_planted_duplicates_and_leaks_are_found_and_the_right_copy_is_listed(inspected: tuple, planted: dict) -> None:
    result, _ = inspected
    duplicates = {(p.path, p.match) for p in result.duplicates}
    leaks = {(p.path, p.match) for p in result.leaks}
    assert {(str(a), str(b)) for a, b in planted["duplicates"]} <= duplicates
    assert {(str(a), str(b)) for a, b in planted["leaks"]} <= leaks
    assert all(p.split == "train" and p.match_split == "val" for p in result.leaks)
    identical = {p.path: p.identical for p in result.duplicates + result.leaks}
    assert identical[str(planted["leaks"][0][0])] and not identical[str(planted["leaks"][1][0])]
    groups = sorted(sorted(g.paths) for g in result.identical_files)
    assert groups == sorted(sorted([str(a), str(b)]) for a, b in (planted["duplicates"][0], planted["leaks"][0]))
    # The leak's kept copy is the validation one; the mislabelled copy's clash of labels is said.
    assert next(g for g in result.identical_files if "leak_3.png" in g.paths[0]).splits == ["val", "train"]
    assert any("labelled 'green' there 'red'" in why for why in result.suspects()[str(planted["duplicates"][0][0])])


def test_the_pages_thumbnails_show_a_sideways_photo_upright(tmp_path: Path) -> None:
    """As the model saw the image (load_image turns it by its EXIF orientation), and as a viewer shows it."""
    from PIL import Image

    from transferkit.reports.inspection_page import _Thumbnails

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 200 wide, 100 tall; shown turned a quarter, 100 wide, 200 tall
    Image.new("RGB", (200, 100), (200, 30, 30)).save(tmp_path / "portrait.jpg", exif=exif)
    _Thumbnails(tmp_path).img(str(tmp_path / "portrait.jpg"))
    (thumb,) = (tmp_path / "thumbs").iterdir()
    with Image.open(thumb) as im:
        assert im.height > im.width


def test_outlier_and_undecodable_images_are_found(inspected: tuple, planted: dict) -> None:
    result, _ = inspected
    assert str(planted["odd"]) in {o.path for o in result.outliers}
    assert result.outliers[0].score >= result.outliers[-1].score
    bad = {u.path: u.reason for u in result.undecodable}
    assert set(bad) == {str(p) for p in planted["undecodable"]}
    assert bad[str(planted["undecodable"][1])] == "empty file"
    assert re.search(r"\n  undecodable +2  files not usable as images: damaged, empty, a format not read\n",
                     result.summary())  # fmt: skip


def test_outputs_are_a_page_a_json_and_an_exclude_list_train_accepts(inspected: tuple, planted: dict) -> None:
    result, out = inspected
    assert sorted(p.name for p in out.iterdir()) == ["inspection.html", "inspection.json", "suspects.txt", "thumbs"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    assert json.loads((out / "inspection.json").read_text()) == json.loads(json.dumps(result.to_dict()))
    listed = read_exclude_list(out / "suspects.txt")
    assert listed == {str(Path(p).resolve()) for p in result.suspects()}
    planted_paths = [p for p, _ in planted["wrong"]] + [a for a, _ in planted["duplicates"] + planted["leaks"]]
    assert _recall(listed, planted_paths) >= 0.8
    assert not any(str(b) in listed for _, b in planted["leaks"])  # the kept copies stay
    before = discover(planted["root"])
    after = discover(planted["root"], exclude=out / "suspects.txt")
    decodable = {str(Path(p).resolve()) for p, _ in before.train + before.val}
    assert after.excluded == len(listed & decodable) > 0
    page = (out / "inspection.html").read_text()
    for issue in result.label_issues:
        assert Path(issue.path).name in page and f"{issue.suggested}</strong>" in page
    thumbs = list((out / "thumbs").iterdir())
    assert thumbs and all(Image.open(t).size[0] <= 160 for t in thumbs)


def test_a_second_inspection_reads_every_feature_from_the_cache(inspected: tuple, planted: dict) -> None:
    result, _ = inspected
    again = inspect_data(planted["root"], preprocessing=SMALL_LITE, outlier_fraction=0.02, precision="32")
    assert again.feature_cache == {"hits": result.feature_cache["hits"] + result.feature_cache["misses"] - 1,
                                   "misses": 1}  # fmt: skip  (the truncated PNG is tried again: it is not cached)
    assert [i.path for i in again.label_issues] == [i.path for i in result.label_issues]
    assert again.out is None


def test_an_existing_out_folder_is_refused_before_any_work(planted: dict, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TransferkitError, match=r"--out .*taken already exists and is not empty; choose another"):
        inspect_data(planted["root"], model="no_such_backbone", out=out)  # refused before the model is looked up
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_bad_input_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(TransferkitError, match=r"DATA .*missing does not exist"):
        inspect_data(tmp_path / "missing")
    for kwargs, option in [({"folds": 1}, "--folds"), ({"duplicate_ratio": 1.5}, "--duplicate-ratio"),
                           ({"outlier_fraction": 1.0}, "--outlier-fraction"), ({"neighbours": 0}, "--neighbours")]:  # fmt: skip
        with pytest.raises(TransferkitError, match=option):
            inspect_data(tmp_path, **kwargs)
    with pytest.raises(TransferkitError, match="give DATA"):
        inspect_data()


# --------------------------------------------------------------------------- the checks on plain arrays


def test_exact_copies_are_neighbours_not_themselves_and_the_training_copy_goes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8))
    x[4] = x[1]  # an exact copy: ties with the row itself
    neighbours, similarity = nearest_neighbours(x, 3)
    assert all(i not in row for i, row in enumerate(neighbours))
    assert neighbours[1][0] == 4 and neighbours[4][0] == 1 and similarity[1][0] == pytest.approx(1.0)
    rank = keep_order(["a", "b", "c", "d", "e", "f"], ["train", "train", "val", "val", "val", "test"],
                      ("train", "val", "test"))  # fmt: skip
    assert similar_pairs(neighbours, similarity, 0.999, rank) == [(1, 4, pytest.approx(1.0))]


def test_only_files_of_equal_size_are_hashed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"x" * 10), b.write_bytes(b"x" * 10), c.write_bytes(b"y" * 11)
    digests = file_digests([str(a), str(b), str(c)])
    assert set(digests) == {str(a), str(b)} and digests[str(a)] == digests[str(b)]


def test_multi_label_issues_find_flipped_labels() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((300, 3)) < 0.4
    x = truth * 3.0 + rng.normal(size=(300, 3)) * 0.4
    x = np.hstack([x, rng.normal(size=(300, 5))])
    labels = [tuple(np.flatnonzero(row)) for row in truth]
    flipped = [5, 50, 120, 200, 260]
    for i in flipped:
        labels[i] = tuple(sorted(set(labels[i]) ^ {0}))  # class 0 added or removed
    found = label_issues(x, labels, 3, multi_label=True)
    rows = [row for row, *_ in found.issues]
    assert sum(i in rows for i in flipped) >= 4 and len(rows) <= 15
    assert all(set(suggested) == set(np.flatnonzero(truth[row])) for row, suggested, *_ in found.issues if row in flipped)


# --------------------------------------------------------------------------- a run's cache, the command line, real data


@pytest.mark.slow
def test_an_image_beside_the_class_folders_is_not_called_undecodable(tmp_path: Path) -> None:
    """It has no label (the scan says so); its file is fine, so it is not listed among the bad files."""
    data = make_colour_folder(tmp_path / "data", 6)
    shutil.copy(next(data.glob("red/*.png")), data / "stray.png")
    with pytest.warns(UserWarning, match="stray.png: not in a class folder"):
        result = inspect_data(data, model="resnet18", weights="none",
                              preprocessing=explicit_preprocessing("resnet18", image_size=32))
    assert result.undecodable == [] and str(data / "stray.png") not in result.suspects()


def test_a_runs_cached_features_are_reused(tmp_path: Path) -> None:
    from transferkit import train

    make_colour_folder(tmp_path / "data" / "train", 8, seed=1)
    make_colour_folder(tmp_path / "data" / "val", 4, seed=2)
    run = train(tmp_path / "data", model="resnet18", weights="none", image_size=32, epochs=1,
                out=str(tmp_path / "run"), quiet=True).run_dir  # fmt: skip
    result = inspect_data(run=run, out=tmp_path / "review")
    assert result.feature_cache == {"hits": 24, "misses": 0}
    assert result.backbone == "resnet18" and result.images == {"train": 16, "val": 8, "test": 0}
    assert (tmp_path / "review" / "suspects.txt").is_file()
    with pytest.raises(TransferkitError, match="--run brings its own backbone"):
        inspect_data(run=run, model="resnet50")


def test_a_runs_own_data_is_split_as_the_run_split_it(tmp_path: Path) -> None:
    """Class folders alone, split by the run's --val-split 0.5 and seed 3: inspecting that data with the
    run finds leaks between the run's own splits, not between a split of inspect's default 0.2."""
    import shlex

    from transferkit import train

    data = make_colour_folder(tmp_path / "my data", 12, seed=1)
    run = train(data, model="resnet18", weights="none", image_size=32, epochs=1, val_split=0.5, seed=3,
                out=str(tmp_path / "run"), quiet=True).run_dir  # fmt: skip
    counts = json.loads((run / "metrics.json").read_text())["data"]
    split_by_run = {"train": sum(counts["train_counts"].values()), "val": sum(counts["val_counts"].values()),
                    "test": 0}  # fmt: skip
    assert split_by_run == {"train": 12, "val": 12, "test": 0}
    given = inspect_data(data, run=run, out=tmp_path / "my review")
    assert given.images == inspect_data(run=run).images == split_by_run  # DATA given read 20 / 4
    # The command to train without the suspects, pasted into a shell: DATA and the list quoted.
    assert shlex.split(given.train_command()) == ["transferkit", "train", str(data), "--exclude",
                                                  str(tmp_path / "my review" / "suspects.txt")]  # fmt: skip
    page = (tmp_path / "my review" / "inspection.html").read_text(encoding="utf-8")
    assert f"<code>{html.escape(given.train_command())}</code>" in page  # the page shows the same command


@pytest.mark.slow
def test_command_line(tmp_path: Path) -> None:
    make_colour_folder(tmp_path / "colours", 10, seed=1)
    command = [sys.executable, "-m", "transferkit", "inspect", "colours", "--model", "resnet18", "--weights", "none",
               "--image-size", "32", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["out"] == str(tmp_path / "colours-inspection") and found["images"]["train"] == 16
    assert (tmp_path / "colours-inspection" / "inspection.html").is_file()
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.strip().splitlines() == [
        "transferkit: error: --out colours-inspection already exists and is not empty; choose another --out or remove it"]


@pytest.mark.slow
def test_planted_errors_in_hymenoptera_are_found(tmp_path: Path) -> None:
    source = requires_shared("datasets", "hymenoptera")
    root = tmp_path / "hymenoptera"
    for split, per_class in (("train", 40), ("val", 20)):  # a subset: the test reads ~190 real photos
        for name in ("ants", "bees"):
            (root / split / name).mkdir(parents=True)
            for path in sorted((source / split / name).glob("*.jpg"))[:per_class]:
                shutil.copy(path, root / split / name / path.name)
    bees = sorted((source / "train" / "bees").glob("*.jpg"))[60:64]
    wrong = [Path(shutil.copy(p, root / "train" / "ants" / f"bee_{p.name}")) for p in bees]
    leak_source = sorted((root / "train" / "ants").glob("*.jpg"))[3]
    leak = Path(shutil.copy(leak_source, root / "val" / "ants" / "copy.jpg"))
    near_source = sorted((root / "train" / "bees").glob("*.jpg"))[5]
    near = brightened(near_source, root / "train" / "bees" / "brighter.png", 1.08)
    result = inspect_data(root, out=tmp_path / "review", precision="32")
    assert _recall({i.path for i in result.label_issues}, wrong) >= 0.75
    assert (str(leak_source), str(leak)) in {(p.path, p.match) for p in result.leaks}
    assert (str(near), str(near_source)) in {(p.path, p.match) for p in result.duplicates}
    assert len(result.duplicates) == 1 and len(result.leaks) == 1  # distinct photos are not duplicates
    listed = read_exclude_list(tmp_path / "review" / "suspects.txt")
    assert {str(leak_source.resolve()), str(near.resolve())} <= listed
    assert _recall(listed, [p.resolve() for p in wrong]) >= 0.75


def test_inspect_says_a_val_split_for_data_with_validation_images_of_its_own_does_nothing(tiny_dataset: Path) -> None:
    with pytest.warns(UserWarning, match=r"--val-split 0.3 is not used: .* has its own validation images"):
        inspect_data(tiny_dataset, model="resnet18", weights="none", val_split=0.3, neighbours=2, folds=2,
                     preprocessing=explicit_preprocessing("resnet18", image_size=32))  # fmt: skip
