"""Data discovery, splits, decoding of odd image modes, and transforms."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_colour_folder, requires_shared
from PIL import Image

from transferkit import Preprocessing, TransferkitError
from transferkit.cli import main
from transferkit.data import BadImage, ImageDataset, build_transform, discover, load_image, stratified_split


def test_train_val_layout(tiny_dataset: Path) -> None:
    splits = discover(tiny_dataset)
    assert splits.class_names == ["blue", "red"]
    assert (len(splits.train), len(splits.val)) == (20, 8)
    assert splits.layout == "train/val"


def test_plain_class_folders_get_a_stratified_seeded_split(tmp_path: Path) -> None:
    make_colour_folder(tmp_path, 10, classes=("red", "green", "blue"))
    a = discover(tmp_path, val_split=0.2, seed=3)
    b = discover(tmp_path, val_split=0.2, seed=3)
    c = discover(tmp_path, val_split=0.2, seed=4)
    assert a.val == b.val and a.val != c.val
    per_class = [sum(1 for _, label in a.val if label == i) for i in range(3)]
    assert per_class == [2, 2, 2] and len(a.train) == 24


def test_split_keeps_at_least_one_training_image_per_class() -> None:
    train, val = stratified_split([("a", 0), ("b", 0), ("c", 1)], 0.5, 0)
    assert {lbl for _, lbl in train} == {0, 1}


def test_optional_test_folder(tiny_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_colour_folder(root / "train", 4)
    make_colour_folder(root / "val", 2)
    make_colour_folder(root / "test", 3)
    assert len(discover(root).test or []) == 6


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_every_image_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    rgb = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.full((20, 30), 50000, np.uint16))
    else:
        image = rgb.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png" if mode != "P" else "x.gif")
    image.save(path)
    tensor = load_image(str(path))
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 20, 30)
    assert 150 < tensor.float().mean() < 256  # not clipped to black nor garbage


def test_deep_images_are_scaled_by_their_format_not_by_their_brightest_pixel(tmp_path: Path) -> None:
    """A dark 16-bit scan (its brightest pixel 200 of 65535) stays as dark as it is beside the others;
    a float image's 0-1 values are not clipped to black."""
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(tmp_path / "dark16.png")
    Image.fromarray(np.full((8, 8), 51400, np.uint16)).save(tmp_path / "bright16.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "half.tif")
    assert load_image(str(tmp_path / "dark16.png")).unique().tolist() == [1]  # 200 / 257, not 200
    assert load_image(str(tmp_path / "bright16.png")).unique().tolist() == [200]
    assert load_image(str(tmp_path / "half.tif")).unique().tolist() == [128]


# EXIF orientation -> where the stored image's left half (red) is once the image is upright.
ORIENTATIONS = {1: "left", 3: "right", 6: "top", 8: "bottom"}


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_a_photo_taken_sideways_is_decoded_upright_as_its_exif_says(
    tmp_path: Path, suffix: str, orientation: int
) -> None:
    """Phones store a portrait photo as landscape pixels plus an EXIF orientation; a viewer (and whoever
    labelled it) sees it turned. JPEGs (libjpeg-turbo's path) and PIL's formats are both turned."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20], stored[:, 20:] = (255, 0, 0), (0, 0, 255)  # 40 wide: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(stored).save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))

    image = load_image(str(path)).float()
    red = image[0] > 128
    where = ORIENTATIONS[orientation]
    assert image.shape == ((3, 40, 20) if where in ("top", "bottom") else (3, 20, 40))
    half = {"left": red[:, :20], "right": red[:, 20:], "top": red[:20], "bottom": red[20:]}[where]
    assert half.all() and red.sum() == half.numel()


def test_runs_and_inspections_written_inside_the_data_folder_are_not_read_as_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`transferkit train .` from within a folder of class folders makes runs/ there; the next run must not
    learn a class "runs" from the first one's report figures (nor a class's images gain a run's PNGs)."""
    from transferkit import train

    data = make_colour_folder(tmp_path / "photos", 4)
    before = discover(data)
    monkeypatch.chdir(data)
    options = {"model": "resnet18", "weights": "none", "image_size": 32, "epochs": 1, "quiet": True}
    train(".", **options)  # into ./runs, the default
    train(".", out="red/my-run", **options)  # a run inside a class folder
    assert list((data / "runs").glob("*/report/*.png")) and list((data / "red/my-run/report").glob("*.png"))
    assert main(["compare", *map(str, (data / "runs").iterdir()), "--out", str(data / "runs" / "compare.html")]) == 0
    (data / "runs" / "auto-search").mkdir()  # --strategy auto, still measuring: its progress alone so far
    (data / "runs" / "auto-search" / "selection.json").write_text("{}")
    (data / "blue" / "inspected").mkdir()
    (data / "blue" / "inspected" / "inspection.json").write_text("{}")
    Image.new("RGB", (40, 48)).save(data / "blue" / "inspected" / "thumb.png")
    with pytest.warns(UserWarning, match=r"photos: runs not read as a class: transferkit's own output"):
        after = discover(data)
    assert after.class_names == before.class_names == ["blue", "red"]
    assert sorted(after.train + after.val) == sorted(before.train + before.val)
    from transferkit.prediction_inputs import collect_images  # predict's: the same images, no report figures

    assert sorted(collect_images([data])) == sorted(path for path, _ in before.train + before.val)


def test_hymenoptera_gif_decodes() -> None:
    gif = requires_shared("datasets", "hymenoptera", "train", "ants", "imageNotFound.gif")
    assert load_image(str(gif)).shape[0] == 3


def test_eval_transform_resizes_and_crops_to_the_weights_size() -> None:
    prep = Preprocessing(image_size=56, resize_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)
    out = build_transform(prep, "none")(image)
    assert out.shape == (3, 56, 56) and out.dtype == torch.float32
    assert -1.0 <= out.min() and out.max() <= 1.0
    for preset in ("light", "strong"):
        assert build_transform(prep, preset)(image).shape == (3, 56, 56)
    with pytest.raises(TransferkitError, match="augment"):
        build_transform(prep, "heavy")


def test_bad_layouts_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(TransferkitError, match="does not exist"):
        discover(tmp_path / "missing")
    make_colour_folder(tmp_path / "one", 3, classes=("red",))
    with pytest.raises(TransferkitError, match="at least 2"):
        discover(tmp_path / "one")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    make_colour_folder(tmp_path / "empty", 2, classes=("red",))
    with pytest.raises(TransferkitError, match="no usable images"):
        discover(tmp_path / "empty")
    make_colour_folder(tmp_path / "mismatch" / "train", 2, classes=("red", "blue"))
    make_colour_folder(tmp_path / "mismatch" / "val", 2, classes=("red", "green"))
    with pytest.raises(TransferkitError, match="differ"):
        discover(tmp_path / "mismatch")
    # Images straight in DATA, not in class folders: said so (not "0 class folders"), with the layout to use.
    flat = tmp_path / "flat"
    for path in make_colour_folder(tmp_path / "sorted", 2).rglob("*.*"):
        flat.mkdir(exist_ok=True)
        shutil.copy(path, flat / f"{path.parent.name}-{path.name}")
    with pytest.raises(TransferkitError, match=rf"^{flat} holds images but no class folders; put each "
                                               rf"class's images in a sub-folder named after it \({flat}/<class>/\)"):
        discover(flat)


def test_an_unlabelled_test_folder_of_loose_images_is_no_test_split_as_before(tmp_path: Path) -> None:
    """Kaggle's layout: train/<class>/, val/<class>/ and test/ of unlabelled images to submit answers for."""
    make_colour_folder(tmp_path / "train", 3)
    make_colour_folder(tmp_path / "val", 2)
    make_colour_folder(tmp_path / "unsorted", 2)
    (tmp_path / "test").mkdir()
    for path in sorted((tmp_path / "unsorted").rglob("*.*")):
        shutil.copy(path, tmp_path / "test" / f"{path.parent.name}-{path.name}")
    shutil.rmtree(tmp_path / "unsorted")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not in a class folder")
        splits = discover(tmp_path)
    assert not splits.test and len(splits.train) == 6 and len(splits.val) == 4


def test_an_image_beside_the_class_folders_is_skipped_with_a_warning(tmp_path: Path) -> None:
    data = make_colour_folder(tmp_path / "data", 3)
    stray = data / "stray.png"
    shutil.copy(next(data.glob("red/*.png")), stray)
    with pytest.warns(UserWarning, match=rf"skipping {stray}: not in a class folder"):
        splits = discover(data)
    assert (str(stray), "not in a class folder") in splits.skipped
    assert str(stray) not in [path for path, _ in splits.train + splits.val]


def test_unreadable_files_are_skipped_with_their_names(tmp_path: Path) -> None:
    make_colour_folder(tmp_path, 3)
    (tmp_path / "red" / "empty.jpg").write_bytes(b"")
    (tmp_path / "red" / "notes.jpg").write_text("not an image")
    (tmp_path / "red" / ".DS_Store").write_bytes(b"\0\1")
    with pytest.warns(UserWarning, match="empty.jpg"):
        splits = discover(tmp_path)
    assert sorted(Path(p).name for p, _ in splits.skipped) == ["empty.jpg", "notes.jpg"]


def test_batches_decoded_on_threads_equal_one_by_one(tmp_path: Path) -> None:
    """The in-process loader decodes a batch on all threads; augmented crops still follow their seeds."""
    make_colour_folder(tmp_path, 6, size=(60, 80))
    splits = discover(tmp_path)
    samples = [*splits.train, *splits.val, (str(tmp_path / "missing.jpg"), 0)]
    prep = Preprocessing(image_size=32, resize_size=40, mean=(0.5,) * 3, std=(0.5,) * 3)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seeded = [(i, 1000 + i) for i in range(len(samples))]
        for augment, keys in (("none", list(range(len(samples)))), ("strong", seeded)):
            dataset = ImageDataset(samples, build_transform(prep, augment))
            batch = dataset.__getitems__(keys)
            one_by_one = [dataset[k] for k in keys]
            assert isinstance(batch[-1], BadImage) and batch[-1].path.endswith("missing.jpg")
            assert batch[-1].reason == one_by_one[-1].reason == "no such file"
            for got, want in zip(batch[:-1], one_by_one[:-1]):
                assert got[1] == want[1] and torch.equal(got[0], want[0])
    finally:
        torch.set_num_threads(before)


def test_augmentation_seeds_leave_the_global_rng_alone(tmp_path: Path) -> None:
    """Dropout draws from torch's global generator: an image's crop seed must not reseed it."""
    make_colour_folder(tmp_path, 2, size=(60, 80))
    prep = Preprocessing(image_size=32, resize_size=40, mean=(0.5,) * 3, std=(0.5,) * 3)
    dataset = ImageDataset(discover(tmp_path).train, build_transform(prep, "strong"))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = dataset[(0, 7)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)  # another global state: the same seed still gives the same crop
    assert torch.equal(dataset[(0, 7)][0], first[0])


def test_the_demo_digits_are_written_whole_or_not_at_all(tmp_path: Path) -> None:
    from transferkit.demo import write_digits_folder

    with pytest.raises(ValueError):  # PIL refuses a 0-pixel size after the first folders were made
        write_digits_folder(tmp_path / "digits", per_class=2, size=0)
    assert list(tmp_path.iterdir()) == []  # nothing a later demo would mistake for its data
    root = write_digits_folder(tmp_path / "digits", per_class=2, size=8)
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    assert len(list(root.rglob("*.png"))) == 30 and [p.name for p in tmp_path.iterdir()] == ["digits"]


def test_the_demo_checks_its_options_before_writing_the_digits(tmp_path: Path) -> None:
    from transferkit.demo import run_demo

    with pytest.raises(TransferkitError, match="--epochs must be at least 1, got 0"):
        run_demo(tmp_path / "a", epochs=0)
    with pytest.raises(TransferkitError, match="bad --budget 'soon'"):
        run_demo(tmp_path / "b", budget="soon")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("mine")
    with pytest.raises(TransferkitError, match="--workdir .*file is a file; give a folder"):
        run_demo(tmp_path / "file")
    (tmp_path / "used" / "digits" / "notes").mkdir(parents=True)  # not the demo's: left as it is
    with pytest.raises(TransferkitError, match="digits exists but holds no demo digits .no train/.; remove it"):
        run_demo(tmp_path / "used")
    assert [p.name for p in (tmp_path / "used").rglob("*")] == ["digits", "notes"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be a whole number of at least 1, got 0"),
        ({"batch_size": "8"}, "--batch-size must be a whole number of at least 1, got '8'"),
        ({"num_workers": -1}, "--num-workers must be a whole number of at least 0, got -1"),
    ],
)
def test_loaders_refuse_what_dataloader_would_with_a_traceback(
    tiny_dataset: Path, options: dict[str, object], message: str
) -> None:
    from transferkit.data import make_loader

    view = build_transform(Preprocessing(32, 32, (0.5,) * 3, (0.5,) * 3), "none")
    with pytest.raises(TransferkitError, match=re.escape(message)):
        make_loader([(str(tiny_dataset / "val" / "red" / "0.png"), 0)], view, **options)
