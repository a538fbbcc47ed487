"""Messy folders, interrupted runs and unsafe files: nothing crashes with a traceback or loses work."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_colour_folder
from PIL import Image

from transferkit import TransferkitError, load_checkpoint, train
from transferkit.data import discover

TINY = {"model": "resnet18", "weights": "none", "image_size": 32, "quiet": True, "batch_size": 4}


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb, in a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    """Half of a JPEG: the header reads fine, the decoder fails midway."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3)).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


UNUSABLE = {"truncated.jpg", "empty.jpg", "notes.jpg", "bomb.png", "needle.png", "postscript.jpg", "IMG_0001.HEIC"}


@pytest.fixture
def messy_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "messy data"
    make_colour_folder(root / "train", 6, seed=1)
    make_colour_folder(root / "val", 3, seed=2)
    red = root / "train" / "red"
    (red / "truncated.jpg").write_bytes(_truncated_jpeg())
    (red / "empty.jpg").write_bytes(b"")
    (red / "notes.jpg").write_text("this is not an image")
    (red / "bomb.png").write_bytes(_png_claiming(60000, 60000))
    Image.new("RGB", (1, 400)).save(red / "needle.png")  # resized to 256 wide: 102,400 pixels tall
    (red / "postscript.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    (red / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")  # an iPhone's photo: a format PIL needs a plug-in for
    Image.new("CMYK", (40, 48), (0, 255, 255, 0)).save(red / "cmyk.jpg")
    Image.fromarray(np.full((48, 40), 60000, np.uint16)).save(red / "grey16.png")
    Image.new("RGBA", (40, 48), (230, 20, 20, 128)).save(red / "alpha.png")
    Image.new("RGB", (40, 48), (230, 20, 20)).convert("P").save(red / "palette.gif")
    frames = [Image.new("RGB", (40, 48), c) for c in ((230, 0, 0), (0, 0, 230))]
    frames[0].save(red / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (40, 48), (240, 30, 30)).save(red / "ünïcode name with spaces.png")
    (red / "nested" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 48), (240, 30, 30)).save(red / "nested" / "deeper" / "inner.png")
    (red / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (red / "._cmyk.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    return root


def test_discovery_uses_the_good_skips_the_bad_by_name(messy_dataset: Path) -> None:
    with pytest.warns(UserWarning) as record:
        splits = discover(messy_dataset)
    skipped = {Path(p).name for p, _ in splits.skipped}
    assert {"empty.jpg", "notes.jpg", "bomb.png", "needle.png", "postscript.jpg"} <= skipped  # by the header check
    heic = next(reason for path, reason in splits.skipped if path.endswith("IMG_0001.HEIC"))
    assert heic == "HEIC images are not read; convert them to JPEG or PNG"  # named, not "not an image file extension"
    used = {Path(p).name for p, _ in splits.train}
    assert {"cmyk.jpg", "grey16.png", "alpha.png", "palette.gif", "animated.gif", "inner.png",
            "ünïcode name with spaces.png"} <= used  # fmt: skip
    assert not any(name.startswith(".") for name in used | skipped)
    assert all(any(n in str(w.message) for n in skipped) for w in record if "skipping" in str(w.message))
    # Files given by name skip that check (predict's): decoding refuses them the same way, as a skipped file.
    from transferkit.data import load_image
    from transferkit.image_files import image_file_problem

    with pytest.raises(ValueError, match="too elongated"):
        load_image(str(messy_dataset / "train" / "red" / "needle.png"))
    with pytest.raises(Exception, match="cannot identify"):
        load_image(str(messy_dataset / "train" / "red" / "postscript.jpg"))
    # A file cut within its header says so (PIL's message), not only "OSError".
    cut = messy_dataset / "cut.jpg"
    cut.write_bytes(_truncated_jpeg()[:300])
    assert image_file_problem(cut) == "not a readable image (OSError: Truncated File Read)"


def test_a_jpeg_claiming_a_huge_size_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """predict reads files given by name without discovery's header check: the decoder must not allocate
    what a 700-byte JPEG claims (20000 x 20000 pixels, 1.2 GB)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    size_at = data.find(b"\xff\xc0") + 5  # the frame header: height, then width
    data[size_at : size_at + 4] = struct.pack(">HH", 20000, 20000)
    (tmp_path / "bomb.jpg").write_bytes(bytes(data))
    measure = ("import resource, sys\nfrom transferkit.data import load_image\n"
               "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nbefore = peak()\n"
               "try:\n    load_image(sys.argv[1])\nexcept Exception as exc:\n    print(exc)\n"
               "print((peak() - before) // 1024)")  # fmt: skip
    refused, grown_mb = subprocess.run([sys.executable, "-c", measure, str(tmp_path / "bomb.jpg")], check=True,
                                       capture_output=True, text=True).stdout.splitlines()  # fmt: skip
    assert refused == "too large (20000x20000 pixels)" and int(grown_mb) < 100  # transferkit's reason, not PIL's


def test_predict_answers_each_image_it_cannot_read_with_the_reason(messy_dataset: Path, tmp_path: Path) -> None:
    from transferkit import predict

    run = train(messy_dataset / "train", epochs=1, out=str(tmp_path / "run"), **TINY).run_dir
    answers = {Path(r["path"]).name: r for r in predict(run, [messy_dataset / "train" / "red"])}
    assert answers["IMG_0001.HEIC"]["error"] == "HEIC images are not read; convert them to JPEG or PNG"
    assert answers["cmyk.jpg"]["predictions"] and answers["truncated.jpg"]["error"].startswith("cannot decode (")
    assert answers["notes.jpg"]["error"] == (
        "cannot decode (UnidentifiedImageError: not an image format transferkit reads)"
    )


@pytest.mark.parametrize("strategy", ["fine-tune", "feature-extract"])
def test_training_survives_bad_images_and_counts_them(messy_dataset: Path, tmp_path: Path, strategy: str) -> None:
    result = train(messy_dataset, strategy=strategy, epochs=2, out=str(tmp_path / "run"),
                   cache_dir=str(tmp_path / "cache"), **TINY)  # fmt: skip
    skipped = {Path(s["path"]).name for s in result.metrics["data"]["skipped"]}
    assert skipped == UNUSABLE  # the truncated JPEG fails only when decoded, during training
    assert result.metrics["skipped_files"] == len(UNUSABLE)
    assert (result.run_dir / "model.pt").is_file()


@pytest.mark.parametrize("strategy", ["fine-tune", "feature-extract"])
def test_a_training_none_of_whose_images_decode_is_an_error_and_leaves_no_run(
    tiny_dataset: Path, tmp_path: Path, strategy: str
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    for image in (data / "train").rglob("*.*"):  # PNGs cut off in their pixels: they fail only when decoded
        image.unlink() if image.suffix == ".jpg" else image.write_bytes(image.read_bytes()[:100])
    message = r"no training image could be decoded in epoch 0 \(10 skipped, e\.g\. \S+/train/blue/0\.png: cannot decode"
    with pytest.raises(TransferkitError, match=message):
        train(data, strategy=strategy, epochs=1, cache=False, out=str(tmp_path / "run"), **TINY)
    assert not (tmp_path / "run").exists()


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "transferkit-checkpoint/1", "metadata": "{}", "state_dict": Payload()}, run / "model.pt")
    with pytest.raises(TransferkitError, match="pickled code"):
        load_checkpoint(run)
    assert not marker.exists()

    class BlockedModule:  # torch words a blocked module's global otherwise ("unsupported GLOBAL os.system")
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "transferkit-checkpoint/1", "metadata": "{}", "state_dict": BlockedModule()},
               run / "model.pt")  # fmt: skip
    with pytest.raises(TransferkitError, match="pickled code"):
        load_checkpoint(run)
    assert not marker.exists()
    # Damaged on disk (bytes zeroed inside its pickle): said to be damaged, not to hold code.
    from transferkit import TransferModel, load_backbone
    from transferkit.checkpoint import save_checkpoint

    save_checkpoint(TransferModel(load_backbone("resnet18", weights="none"), ["a", "b"]), run / "model.pt")
    with (run / "model.pt").open("r+b") as damaged:
        damaged.seek(100)
        damaged.write(bytes(50))
    with pytest.raises(TransferkitError, match=r"model\.pt is damaged \(.+\); train the run again or restore the file"):
        load_checkpoint(run)


def test_checkpoint_as_weights_for_other_classes_and_other_architectures(tiny_dataset: Path, tmp_path: Path) -> None:
    first = train(tiny_dataset, epochs=1, out=str(tmp_path / "a"), **TINY)
    three = tmp_path / "three"
    make_colour_folder(three, 4, classes=("red", "green", "blue"))
    # Another class count: the backbone is reused, the old 2-class head skipped.
    second = train(three, epochs=1, out=str(tmp_path / "b"), **{**TINY, "weights": str(first.run_dir / "model.pt")})
    assert load_checkpoint(second.run_dir).class_names == ["blue", "green", "red"]
    with pytest.raises(TransferkitError, match="does not fit mobilenet_v2"):
        train(three, out=str(tmp_path / "c"), **{**TINY, "model": "mobilenet_v2", "weights": str(first.run_dir / "model.pt")})
    assert not (tmp_path / "c").exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "transferkit", *args]


# `transferkit train ARGS` as a script, with a Lightning callback that SIGKILLs the process at epoch 3.
KILL_AT_EPOCH_3 = """
import os, signal, sys
from lightning.pytorch.callbacks import Callback
from transferkit.cli import build_parser
from transferkit.training import TrainConfig
import transferkit

class KillAtEpoch3(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 3:
            os.kill(os.getpid(), signal.SIGKILL)

args = build_parser().parse_args(["train", *sys.argv[1:]])
options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and k != "data"}
transferkit.train(args.data, callbacks=[KillAtEpoch3()], **options)
"""


@pytest.mark.precision
@pytest.mark.slow
@pytest.mark.parametrize("strategy", [["gradual", "--unfreeze-every", "2"], ["feature-extract"]], ids=lambda s: s[0])
def test_killed_run_resumes_to_the_same_result(tiny_dataset: Path, tmp_path: Path, strategy: list[str]) -> None:
    """SIGKILL a run mid-schedule (gradual: one group unfrozen, one to come), resume it, compare with an uninterrupted run."""
    args = ["train", str(tiny_dataset), "--model", "resnet18", "--weights", "none", "--image-size", "32",
            "--strategy", *strategy, "--epochs", "6", "--lr", "0.01", "--batch-size", "4",
            "--head", "mlp:16", "--quiet", "--seed", "3"]  # fmt: skip
    full = tmp_path / "full"
    subprocess.run(_cli(*args, "--out", str(full)), check=True, capture_output=True, timeout=600)

    # The same run, killed by SIGKILL as epoch 3 starts (3 epochs done, one group unfrozen, one to come):
    # a callback of this test's kills its own process, so no race with a fast machine decides the epoch.
    killed, script = tmp_path / "killed", tmp_path / "train_and_die.py"
    script.write_text(KILL_AT_EPOCH_3)
    proc = subprocess.run([sys.executable, str(script), *args[1:], "--out", str(killed)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len((killed / "history.csv").read_text().strip().splitlines()) == 4  # header + epochs 0-2
    assert not (killed / "metrics.json").exists()
    load_checkpoint(killed)  # the last good model.pt is readable after the kill
    if strategy[0] == "feature-extract":  # only the head trains: the rolling checkpoint holds it alone
        assert (killed / "checkpoints" / "last.ckpt").stat().st_size < (killed / "model.pt").stat().st_size / 20

    resumed = subprocess.run(_cli("train", "--resume", str(killed)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert b["val_accuracy"] == a["val_accuracy"] and b["best_epoch"] == a["best_epoch"]
    assert b["unfreeze_events"] == a["unfreeze_events"]
    rows_a = (full / "history.csv").read_text().splitlines()
    rows_b = (killed / "history.csv").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 7
    losses = [[float(r.split(",")[i]) for i in (1, 3)] for r in rows_a[1:]], [[float(r.split(",")[i]) for i in (1, 3)] for r in rows_b[1:]]
    assert np.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    assert "--resume" in (killed / "command.txt").read_text()


def test_resume_refuses_finished_and_foreign_directories(tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import resume_training

    done = train(tiny_dataset, epochs=1, out=str(tmp_path / "done"), **TINY)
    with pytest.raises(TransferkitError, match="already finished"):
        resume_training(done.run_dir)
    with pytest.raises(TransferkitError, match="not a transferkit run"):
        resume_training(tmp_path)


CONCURRENT_EXTRACT = """
import sys, torch
from transferkit import Preprocessing, TransferModel, load_backbone
from transferkit.data import scan_class_folder
from transferkit.features import extract_features
torch.manual_seed(0)
prep = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3)
model = TransferModel(load_backbone("resnet18", weights="none", preprocessing=prep), ["blue", "red"]).eval()
samples = scan_class_folder(sys.argv[1])[1]
result = extract_features(model, samples, cache_dir=sys.argv[2], batch_size=4, num_workers=0)
torch.save(result.features, sys.argv[3])
"""


@pytest.mark.slow
def test_two_processes_sharing_the_cache_do_not_corrupt_it(tmp_path: Path) -> None:
    images = make_colour_folder(tmp_path / "imgs", 40)
    script = tmp_path / "extract.py"
    script.write_text(CONCURRENT_EXTRACT)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, str(script), str(images), str(cache), str(tmp_path / f"{i}.pt")])
             for i in range(2)]  # fmt: skip
    assert all(p.wait(timeout=300) == 0 for p in procs)
    a, b = (torch.load(tmp_path / f"{i}.pt", weights_only=True) for i in range(2))
    assert torch.equal(a, b)
    # The feature store: each process appended a shard of its own (80 rows: it missed all 80 images, or
    # none if the other had finished first); no temporary file is left, and every vector reads back.
    from transferkit.feature_store import FeatureStore
    from transferkit.features import file_key

    assert not list(cache.rglob("*.tmp"))
    (root,) = [p.parent for p in cache.glob("features/*/spec.json")]
    store = FeatureStore(root)
    assert 1 <= len(store.names) <= 2 and len(store) == 80 * len(store.names)
    paths = [str(p) for p in sorted(images.rglob("*")) if p.is_file()]
    where = store.locate([bytes.fromhex(file_key(p, 0)) for p in paths])
    assert len(paths) == 80 and (where >= 0).all() and torch.equal(torch.from_numpy(store.read(where)), a)


def test_of_two_trainings_given_the_same_out_at_once_the_second_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run directory is claimed when it is made: a second claim of the same --out (another process
    that checked it was empty at the same moment) is refused, never shared."""
    from transferkit.training import TrainConfig
    from transferkit.runs import create_run_dir

    for out in (tmp_path / "new", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        config = TrainConfig(data=str(tmp_path), out=str(out))
        assert create_run_dir(config) == out
        with pytest.raises(TransferkitError, match=f"run directory {out} already exists; choose another --out"):
            create_run_dir(config)
        # The other process looked before this one claimed the folder, so found it empty: the claim still holds.
        with monkeypatch.context() as m:
            m.setattr(Path, "iterdir", lambda self: iter(()))
            with pytest.raises(TransferkitError, match=f"run directory {out} already exists"):
                create_run_dir(config)


def test_evaluation_lists_each_decoded_image_under_its_own_name(tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import evaluate

    run = train(tiny_dataset, epochs=1, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), **TINY).run_dir
    val = tmp_path / "val"
    shutil.copytree(tiny_dataset / "val", val)
    (val / "blue" / "0-truncated.jpg").write_bytes(_truncated_jpeg())  # sorts first; fails only when decoded
    with pytest.warns(UserWarning, match="0-truncated.jpg"):
        result = evaluate(run, val)
    assert result.skipped_files == 1 and result.num_images == 8
    predictions = result.to_dict(with_predictions=True)["predictions"]
    assert len(predictions) == 8 and not any("truncated" in p["path"] for p in predictions)
    assert all(Path(p["path"]).parent.name == p["label"] for p in predictions)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "run", "x.jpg", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["evaluate", "run", "data", "--batch-size", "-3"], "argument --batch-size: must be at least 1, got -3"),
        (["serve", "run", "--port", "99999"], "argument --port: must be from 0 to 65535, got 99999"),
        (["predict", "run", "x.jpg", "--top-k", "two"], "argument --top-k: expected a whole number, got 'two'"),
        (["inspect", "data", "--outlier-fraction", "2"], "argument --outlier-fraction: must be from 0 to 1, got 2"),
        (["export", "run", "--tolerance", "0"], "argument --tolerance: must be above 0, got 0"),
        (["pack", "data", "--out", "shards", "--seed", "-1"], "argument --seed: must be from 0 to 4294967295, got -1"),
        # Several numbers given space-separated: the comma-separated form, not "unrecognized arguments: 0.5 0.5".
        (["train", "data", "--weights", "w.pth", "--mean", "0.5", "0.5", "0.5"],
         "--mean takes its values in one argument, separated by commas: --mean 0.5,0.5,0.5"),
        (["features", "data", "--std", "0.2", ".3", "4e-1", "--out", "f.npz"],
         "--std takes its values in one argument, separated by commas: --std 0.2,.3,4e-1"),
        (["train", "data", "--weights", "w.pth", "--mean=0.5", "0.4", "0.3"],
         "--mean takes its values in one argument, separated by commas: --mean 0.5,0.4,0.3"),
        (["train", "--strategy", "auto", "--models", "resnet18", "mobilenet_v2", "data"],  # DATA after them
         "--models takes its values in one argument, separated by commas: --models resnet18,mobilenet_v2"),
        (["evaluate", "run", "data", "--std", "0.2", "0.3"], "unrecognized arguments: --std 0.2 0.3"),  # none there
        (["train", "data", "--epochs", "3", "4"], "unrecognized arguments: 4"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    from transferkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_size_without_its_unit_is_an_error_before_the_images_are_read(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transferkit.cli import main

    assert main(["pack", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p"), "--chunk-bytes", "10"]) == 2
    assert "--chunk-bytes '10': give a size with its unit, e.g. 64MB" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", ["features", "train"])
def test_an_unwritable_out_is_one_line_naming_it(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    from transferkit.cli import main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    out = a_file / ("x.npz" if command == "features" else "run")  # a path through a file: no user can write it
    code = main([command, str(tiny_dataset), "--model", "resnet18", "--weights", "none", "--image-size", "16",
                 "--out", str(out), *(["--epochs", "1", "--quiet"] if command == "train" else [])])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err  # before the work
    assert err.startswith(f"transferkit: error: --out {out}: {a_file} is a file, not a folder; choose another --out")
    assert a_file.read_text() == "mine"


def test_a_path_of_the_wrong_kind_is_named_as_what_it_is(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transferkit.cli import main

    image = next((tiny_dataset / "train").rglob("*.png"))
    cases = [
        (["train", str(image)], f"data folder {image} is a file, not a folder; pass DATA holding train/"),
        (["compare", str(image)], f"run directory {image} is a file, not a folder; give a folder written by"),
        (["inspect", "/dev/null"], "/dev/null is not a regular file or folder"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
