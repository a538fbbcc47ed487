"""transferkit pack: images and labels as litdata shards, read by discovery, loaders, features and training as a folder is."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from transferkit import TransferkitError, evaluate, predict, train
from transferkit.cli import main
from transferkit.data import EpochSeededSampler, ImageDataset, build_transform, discover, load_image
from transferkit.features import extract_features
from transferkit.shards import pack

pytest.importorskip("litdata")

TINY = {"model": "resnet18", "weights": "none", "image_size": 32, "batch_size": 4, "quiet": True, "num_workers": 0}


@pytest.fixture(scope="module")
def shards(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "shards"
    written = pack(discover(tiny_dataset), out)
    assert written["images"] == {"train": 20, "val": 8}
    return out


def test_pack_writes_a_few_files_and_refuses_an_existing_folder(shards: Path, tiny_dataset: Path) -> None:
    files = sorted(p.relative_to(shards).as_posix() for p in shards.rglob("*") if p.is_file())
    assert files == ["train/chunk-0-0.bin", "train/index.json", "transferkit-pack.json", "transferkit-pack.version",
                     "val/chunk-0-0.bin", "val/index.json"]  # fmt: skip
    with pytest.raises(TransferkitError, match="already exists"):
        pack(discover(tiny_dataset), shards)
    with pytest.raises(TransferkitError, match="shards is already packed; give the image folder"):
        pack(discover(shards), shards.parent / "again")
    assert not (shards.parent / "again").exists()


def test_a_failed_pack_leaves_nothing(tiny_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    splits = discover(data)
    Path(splits.train[3][0]).unlink()  # gone between discovery and packing
    with pytest.raises(TransferkitError, match="cannot read .*nothing was packed"):
        pack(splits, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_images_of_a_label_file_keep_their_folders_in_their_packed_names(tiny_dataset: Path, tmp_path: Path) -> None:
    """A CSV beside red/0.png and blue/0.png: both were packed as "0.png" (names relative to the CSV
    file itself, which no image lies under), so pages and predictions could not tell them apart."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset / "train", data)
    rows = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.*"))
    (data / "labels.csv").write_text("path,label\n" + "".join(f"{r},{r.split('/')[0]}\n" for r in rows))
    elsewhere = tmp_path / "elsewhere"  # a table listing images outside its folder: named under the common one
    elsewhere.mkdir()
    (elsewhere / "labels.csv").write_text("path,label\n" + "".join(f"{data / r},{r.split('/')[0]}\n" for r in rows))
    for table, prefix in ((data / "labels.csv", ""), (elsewhere / "labels.csv", "data/")):
        out = tmp_path / f"packed-{table.parent.name}"
        pack(discover(table, val_split=0.25), out)
        manifest = json.loads((out / "transferkit-pack.json").read_text())
        names = [name for split in manifest["splits"].values() for name, _, _ in split]
        assert sorted(names) == sorted(prefix + r for r in rows)


def test_grad_cam_overlays_of_packed_images_are_named_as_the_folders_images(shards: Path, tmp_path: Path) -> None:
    from transferkit.backbones import Preprocessing, load_backbone
    from transferkit.gradcam import write_overlays
    from transferkit.model import TransferModel
    from transferkit.shards import packed_images

    small = Preprocessing(image_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = TransferModel(load_backbone("resnet18", "none", preprocessing=small), ["blue", "red"]).eval()
    images = [p for p in packed_images(shards) if p.endswith(("/blue/0.png", "/red/1.jpg"))]
    written = write_overlays(model, images, tmp_path / "overlays")
    assert sorted(p.relative_to(tmp_path / "overlays").as_posix() for p in written) == [
        "train/blue/0_gradcam.png", "train/red/1_gradcam.png", "val/blue/0_gradcam.png", "val/red/1_gradcam.png"]


def test_a_damaged_chunk_is_one_error_naming_it_not_a_missing_file_per_image(shards: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    chunk = damaged / "train" / "chunk-0-0.bin"
    chunk.write_bytes(chunk.read_bytes()[:500])  # litdata waited 2 s per image for the rest, then said "no such file"
    message = r"train/chunk-0-0.bin is damaged \(500 of its [\d,]+ bytes\); pack the data again"
    with pytest.raises(TransferkitError, match=message):
        discover(damaged)
    # Raised in a DataLoader worker (damaged after it was found), it comes back behind the worker's
    # traceback; the command prints its own line alone.
    from torch._utils import ExceptionWrapper

    from transferkit.cli import _own_message

    try:
        raise TransferkitError(f"{chunk} is damaged (500 of its 1,000 bytes); pack the data again")
    except TransferkitError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(TransferkitError) as raised:
        wrapped.reraise()
    assert "Traceback" in str(raised.value)
    assert _own_message(raised.value) == f"{chunk} is damaged (500 of its 1,000 bytes); pack the data again"


def test_packed_data_is_discovered_as_the_folder_was(shards: Path, tiny_dataset: Path) -> None:
    folder, packed = discover(tiny_dataset), discover(shards)
    assert packed.class_names == folder.class_names and packed.layout == "packed shards (litdata)"
    assert [label for _, label in packed.train] == [label for _, label in folder.train]
    assert [label for _, label in packed.val] == [label for _, label in folder.val]
    # Each packed image decodes to the file's pixels, and keeps the file's name under its class.
    for (key, _), (path, _) in zip(packed.train + packed.val, folder.train + folder.val):
        assert Path(key).name == Path(path).name and Path(key).parent.name == Path(path).parent.name
        assert torch.equal(load_image(key), load_image(path))


def test_augmented_batches_from_shards_equal_those_from_the_folder(shards: Path, tiny_dataset: Path) -> None:
    """Same order by (seed, epoch) and same crops per image: what makes resumed runs exact carries over."""
    from transferkit.backbones import Preprocessing

    transform = build_transform(Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3), "strong")
    folder, packed = discover(tiny_dataset).train, discover(shards).train
    for epoch in (0, 3):
        sampler = EpochSeededSampler(len(folder), seed=5)
        sampler.epoch = epoch
        keys = list(sampler)
        a = ImageDataset(folder, transform).__getitems__(keys)
        b = ImageDataset(packed, transform).__getitems__(keys)
        assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))


def test_features_of_packed_images_are_keyed_by_content(shards: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import Preprocessing, TransferModel, load_backbone

    torch.manual_seed(0)
    prep = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3)
    model = TransferModel(load_backbone("resnet18", weights="none", preprocessing=prep), ["blue", "red"]).eval()
    packed = discover(shards).val
    first = extract_features(model, packed, cache_dir=tmp_path, num_workers=0)
    again = extract_features(model, packed, cache_dir=tmp_path, num_workers=0)
    from_files = extract_features(model, discover(tiny_dataset).val, use_cache=False, num_workers=0)
    assert (first.misses, again.hits) == (8, 8)
    assert torch.equal(first.features, from_files.features) and torch.equal(again.features, from_files.features)
    # The same shards elsewhere (copied, or at a URL) are the same images: the store already has them.
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    assert extract_features(model, discover(moved).val, cache_dir=tmp_path, num_workers=0).hits == 8


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["feature-extract", "fine-tune"])
def test_training_from_shards_equals_training_from_the_folder(
    shards: Path, tiny_dataset: Path, tmp_path: Path, strategy: str
) -> None:
    options = {**TINY, "strategy": strategy, "epochs": 2, "cache_dir": str(tmp_path / "cache"), "seed": 3}
    if strategy == "fine-tune":
        options.update(unfreeze=1, augment="strong")
    from_folder = train(tiny_dataset, out=str(tmp_path / "folder"), **options)
    from_shards = train(str(shards), out=str(tmp_path / "shards"), **options)
    losses = [[row["train_loss"], row["val_loss"]] for row in from_folder.history]
    assert [[row["train_loss"], row["val_loss"]] for row in from_shards.history] == losses
    assert from_shards.val_accuracy == from_folder.val_accuracy
    # evaluate reads the shards' val split as it reads DATA/val.
    assert evaluate(from_shards.run_dir, shards).accuracy == evaluate(from_folder.run_dir, tiny_dataset).accuracy
    # predict takes the packed folder as it takes image folders: every packed image, the same answers.
    packed = predict(from_shards.run_dir, [shards], runtime="torch")
    files = predict(from_shards.run_dir, [tiny_dataset / "train", tiny_dataset / "val"], runtime="torch")
    assert len(packed) == len(files) == 28 and all("::" in r["path"] for r in packed)
    assert sorted(r["predictions"][0]["probability"] for r in packed) == pytest.approx(
        sorted(r["predictions"][0]["probability"] for r in files), abs=1e-6)


@pytest.mark.slow
def test_a_url_is_read_through_a_cache_of_whole_chunks(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``local:PATH`` is litdata's stand-in for an object store: chunks are copied into a cache first."""
    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "cache"))
    url = f"local:{shards}"
    result = train(url, **{**TINY, "epochs": 1}, out=str(tmp_path / "run"))
    assert result.metrics["feature_cache"]["misses"] == 28 and result.metrics["skipped_files"] == 0, result.metrics["data"]["skipped"]
    assert list((tmp_path / "cache" / "shards").rglob("chunk-0-0.bin"))  # streamed into the cache
    assert evaluate(result.run_dir, url).accuracy == result.val_accuracy  # its val split, as from a folder
    with pytest.raises(TransferkitError, match="cannot read local:/nowhere/transferkit-pack.json"):
        discover("local:/nowhere")


def test_a_url_read_again_under_another_cache_dir_is_fetched_into_that_one(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process, two cache folders in turn (two --cache-dir commands from a notebook): each gets the chunks."""
    from transferkit.shards import packed_images, read_packed

    url = f"local:{shards}"
    last = packed_images(url)[-1]
    for cache in ("first", "second"):
        monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / cache))
        assert read_packed(last) == read_packed(str(shards) + last.removeprefix(url))
        assert [p.parts[-2:] for p in (tmp_path / cache / "shards").rglob("*.bin")] == [("val", "chunk-0-0.bin")]


# A new process reading every image of packed shards at a URL: how many, and the last one's bytes' length.
READ_ALL = """
import sys
from transferkit.shards import packed_images, read_packed
images = packed_images(sys.argv[1])
print(len(images), len(read_packed(images[-1])))
"""


@pytest.mark.slow
def test_a_url_packed_again_is_fetched_again_not_read_from_the_old_copy(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "cache"))
    store, url = tmp_path / "store", f"local:{tmp_path / 'store'}"
    pack(discover(tiny_dataset), store)

    def read_all() -> list[str]:
        return subprocess.run([sys.executable, "-c", READ_ALL, url], capture_output=True, text=True, check=True,
                              timeout=300).stdout.split()  # fmt: skip

    assert read_all()[0] == "28"
    bigger = tmp_path / "bigger"
    shutil.copytree(tiny_dataset, bigger)
    shutil.copy(bigger / "val/red/0.png", bigger / "val/red/zz-extra.png")  # the last image of the last split
    shutil.rmtree(store)
    pack(discover(bigger), store)  # as `aws s3 sync` would replace it at the same URL
    count, size = read_all()
    assert count == "29" and int(size) == (bigger / "val/red/zz-extra.png").stat().st_size
    assert main(["cache", "clear"]) == 0 and not (tmp_path / "cache" / "shards").exists()


def test_the_pack_and_features_commands(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shards"
    assert main(["pack", str(tiny_dataset), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == {"train": 20, "val": 8}
    assert main(["pack", str(tiny_dataset), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["features", str(out), "--model", "resnet18", "--weights", "none",
                 "--out", str(tmp_path / "f.npz")]) == 0  # fmt: skip
    import numpy as np

    saved = np.load(tmp_path / "f.npz")
    assert saved["features"].shape == (28, 512) and sorted(set(saved["splits"])) == ["train", "val"]


def _read_every_packed_image(url: str, seed: int) -> list[str]:
    """Every image of ``url`` in a shuffled order, as SHA-1s (run in a fresh process)."""
    import hashlib
    import random

    from transferkit.shards import packed_images, read_packed

    paths = packed_images(url)
    random.Random(seed).shuffle(paths)
    return sorted(f"{path} {hashlib.sha1(read_packed(path)).hexdigest()}" for path in paths)


def test_processes_reading_a_url_at_once_each_get_every_image_whole(tiny_dataset: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Ranks and DataLoader workers fetch the same chunks into one cache, in random order, at the same time."""
    import multiprocessing

    out = tmp_path / "shards"
    pack(discover(tiny_dataset), out, chunk_bytes="1KB")  # a chunk every few images
    assert len(list(out.rglob("chunk-*.bin"))) > 6
    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "cache"))
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        seen = pool.starmap(_read_every_packed_image, [(f"local:{out}", seed) for seed in range(3)])
    manifest = json.loads((out / "transferkit-pack.json").read_text())
    expected = sorted(f"local:{out}::{split}/{i}/{name} {digest}"
                      for split, rows in manifest["splits"].items() for i, (name, _, digest) in enumerate(rows))  # fmt: skip
    assert seen == [expected] * 3
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.name.endswith((".part", ".lock"))]
    assert leftovers == []


def test_inspect_reads_shards_and_its_suspects_list_excludes_packed_images(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte-identical leak planted before packing is found in the shards, shown, listed and left out."""
    from transferkit import inspect_data

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    shutil.copy(data / "train/blue/2.png", data / "val/blue/leak_2.png")
    out = pack(discover(data), tmp_path / "shards")["path"]
    result = inspect_data(out, model="resnet18", weights="none", out=tmp_path / "inspected", precision="32")
    leak = next(p for p in result.leaks if "leak_2.png" in p.path + p.match)
    assert leak.identical and {Path(leak.path).name, Path(leak.match).name} == {"2.png", "leak_2.png"}
    page = (tmp_path / "inspected" / "inspection.html").read_text()
    assert page.count("<img ") >= 2 and "no preview" not in page  # thumbnails decoded from the shards
    suspects = tmp_path / "inspected" / "suspects.txt"
    listed = [line for line in suspects.read_text().splitlines() if line and not line.startswith("#")]
    assert leak.path in listed and all("::" in line for line in listed)
    kept = discover(out, exclude=suspects)
    assert kept.excluded == len(listed) and leak.path not in {path for path, _ in kept.train + kept.val}
    # The same shards read as from an object store (litdata's local: stand-in): the images keep their URLs.
    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "cache"))
    streamed = inspect_data(f"local:{out}", model="resnet18", weights="none", out=tmp_path / "url", precision="32")
    as_urls = [(f"local:{p.path}", f"local:{p.match}") for p in result.leaks]
    assert [(p.path, p.match) for p in streamed.leaks] == as_urls


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local S3 API (moto's server on a free port), with credentials and endpoint in the environment."""
    server_module = pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")
    import socket

    import litdata.streaming.downloader as downloader

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    # litdata fetches chunks with obstore where it is installed, and builds obstore's client without
    # allow_http, so only an https endpoint reaches it; a local server is http, so litdata takes
    # its other path (boto3, also its path for every index.json).
    monkeypatch.setattr(downloader, "_OBSTORE_AVAILABLE", False)
    yield endpoint
    server.stop()


@pytest.mark.slow
def test_train_and_predict_read_shards_from_an_s3_bucket(shards: Path, tmp_path: Path, s3_server: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """s3://bucket/prefix through litdata's S3 downloader against a real S3 API: every image, once."""
    import boto3

    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "cache"))
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="photos")
    for f in (p for p in shards.rglob("*") if p.is_file()):
        s3.upload_file(str(f), "photos", f"packed/{f.relative_to(shards).as_posix()}")
    url = "s3://photos/packed"
    result = train(url, **{**TINY, "epochs": 1}, out=str(tmp_path / "run"))
    assert result.metrics["feature_cache"]["misses"] == 28 and result.metrics["skipped_files"] == 0
    fetched = sorted(p.relative_to(tmp_path / "cache").parts[-2:] for p in (tmp_path / "cache").rglob("*.bin"))
    assert fetched == [("train", "chunk-0-0.bin"), ("val", "chunk-0-0.bin")]  # whole chunks, each once
    answers = predict(result.run_dir, [url])
    assert len(answers) == 28 and all(a["path"].startswith(f"{url}::") and a["predictions"] for a in answers)
    with pytest.raises(TransferkitError, match="cannot read s3://photos/nowhere/transferkit-pack.json"):
        discover("s3://photos/nowhere")


@pytest.mark.slow
def test_the_command_lines_cache_dir_holds_a_packed_urls_chunks_too(
    shards: Path, tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--cache-dir is where every cache of the command goes, as the environment variable would put them."""
    import os

    import boto3

    monkeypatch.setenv("TRANSFERKIT_CACHE_DIR", str(tmp_path / "elsewhere"))
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="cli-photos")
    for f in (p for p in shards.rglob("*") if p.is_file()):
        s3.upload_file(str(f), "cli-photos", f"packed/{f.relative_to(shards).as_posix()}")
    assert main(["train", "s3://cli-photos/packed", "--model", "resnet18", "--weights", "none", "--image-size", "32",
                 "--epochs", "1", "--quiet", "--num-workers", "0", "--cache-dir", str(tmp_path / "mine"),
                 "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    fetched = sorted(p.parts[-2:] for p in (tmp_path / "mine" / "shards").rglob("*.bin"))
    assert fetched == [("train", "chunk-0-0.bin"), ("val", "chunk-0-0.bin")]
    assert (tmp_path / "mine" / "features").is_dir()
    assert not (tmp_path / "elsewhere").exists() and os.environ["TRANSFERKIT_CACHE_DIR"] == str(tmp_path / "elsewhere")


def test_pack_says_a_val_split_for_data_with_validation_images_of_its_own_does_nothing(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pack", str(tiny_dataset), "--val-split", "0.5", "--out", str(tmp_path / "a")]) == 0
    assert "warning: --val-split 0.5 is not used: " in capsys.readouterr().err
    assert main(["pack", str(tiny_dataset / "train"), "--val-split", "0.5", "--out", str(tmp_path / "b")]) == 0
    assert "--val-split" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "transferkit-pack.json").read_text())["splits"]["val"]  # split by it
