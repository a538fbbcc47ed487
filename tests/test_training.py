"""Training options: optimizers, schedulers, early stopping, LR finder, strategies end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from transferkit import TransferkitError, train
from transferkit.training import TrainConfig, find_lr

TINY = {"model": "resnet18", "weights": "none", "image_size": 32, "quiet": True, "batch_size": 8}


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "expected_lrs"),
    [
        ("sgd", "step", [0.1, 0.1, 0.01]),  # StepLR(step_size=2, gamma=0.1): seed 004's schedule, shortened
        ("adam", "none", [0.1, 0.1, 0.1]),
        ("adamw", "cosine", [0.1, 0.075, 0.025]),
    ],
)
def test_optimizers_and_epoch_schedulers(tiny_dataset: Path, tmp_path: Path, optimizer: str, scheduler: str,
                                         expected_lrs: list[float]) -> None:  # fmt: skip
    result = train(tiny_dataset, epochs=3, lr=0.1, optimizer=optimizer, scheduler=scheduler, step_size=2,
                   out=str(tmp_path / "run"), **TINY)  # fmt: skip
    assert [float(r["lr"]) for r in _history(result.run_dir)] == pytest.approx(expected_lrs)


def test_onecycle_steps_per_batch(tiny_dataset: Path, tmp_path: Path) -> None:
    result = train(tiny_dataset, strategy="fine-tune", unfreeze=1, epochs=2, lr=0.01, scheduler="onecycle",
                   out=str(tmp_path / "run"), **TINY)  # fmt: skip
    lrs = [float(r["lr"]) for r in _history(result.run_dir)]
    assert lrs[0] < 0.01 and lrs[1] != lrs[0]  # warms up from max_lr/25 and moves every batch


def test_early_stopping_ends_before_max_epochs(tiny_dataset: Path, tmp_path: Path) -> None:
    result = train(tiny_dataset, epochs=30, lr=1e-9, patience=2, out=str(tmp_path / "run"), **TINY)
    # At lr 1e-9 validation accuracy never improves on epoch 0's, so patience 2 stops after epoch 2.
    assert [row["epoch"] for row in result.history] == [0, 1, 2] and result.metrics["epochs_run"] == 3


@pytest.mark.parametrize("strategy", ["full", "gradual"])
def test_image_strategies_train_end_to_end(tiny_dataset: Path, tmp_path: Path, strategy: str) -> None:
    result = train(tiny_dataset, strategy=strategy, epochs=2, lr=0.01, unfreeze_every=1, out=str(tmp_path / "r"), **TINY)
    groups = [r["trainable_groups"] for r in _history(result.run_dir)]
    if strategy == "gradual":
        assert groups == ["head", "layer4 head"]
        assert result.metrics["unfreeze_events"] == [{"epoch": 1, "unfrozen": ["layer4"]}]
    else:
        assert groups[0].split() == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def test_mlp_head_and_bad_group_lr(tiny_dataset: Path, tmp_path: Path) -> None:
    result = train(tiny_dataset, head="mlp:16", epochs=1, out=str(tmp_path / "mlp"), **TINY)
    assert result.metrics["trainable_params"] == 512 * 16 + 16 + 16 * 2 + 2
    with pytest.raises(TransferkitError, match="layer9"):
        train(tiny_dataset, strategy="fine-tune", group_lr="layer9=1e-4", out=str(tmp_path / "bad"), **TINY)
    assert not (tmp_path / "bad").exists()  # validated before the run directory is created


def test_lr_finder_suggests_a_rate_and_lr_auto_uses_it(
    tiny_dataset: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    found = find_lr(TrainConfig(data=str(tiny_dataset), **TINY), num_training=20)
    assert 1e-7 < found.suggestion < 1.0 and len(found.lrs) == len(found.losses) >= 10
    assert "Finding best initial lr" not in capfd.readouterr().err  # quiet: Lightning's own bar is silenced
    result = train(tiny_dataset, lr="auto", epochs=1, out=str(tmp_path / "auto"), **TINY)
    assert result.metrics["lr_finder"]["suggestion"] > 0 and (result.run_dir / "lr_find.png").is_file()
    with pytest.raises(TransferkitError, match=r"num_training must be a whole number of at least 2 .*got 0"):
        find_lr(TrainConfig(data=str(tiny_dataset), **TINY), num_training=0)  # said "division by zero"


def test_the_lr_finder_sweeps_each_group_at_its_own_multiple_of_the_heads_lr(tiny_dataset: Path) -> None:
    """fine-tune --unfreeze 2: layer3 at a hundredth of the head's LR and layer4 at a tenth, as in training;
    Lightning's range test alone sets every group to the one swept LR."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stepped: list[list[float]] = []
    handle = register_optimizer_step_post_hook(lambda opt, *_: stepped.append([g["lr"] for g in opt.param_groups]))
    try:
        find_lr(TrainConfig(data=str(tiny_dataset), strategy="fine-tune", unfreeze=2, **TINY), num_training=12)
    finally:
        handle.remove()
    # Each LR group in two (weights decay, biases and norms do not): layer3, layer3, layer4, layer4, head, head.
    assert len(stepped) >= 10 and {len(lrs) for lrs in stepped} == {6}
    for lrs in stepped:
        assert [lr / lrs[-1] for lr in lrs] == pytest.approx([0.01, 0.01, 0.1, 0.1, 1, 1])
    assert stepped[-1][-1] > 100 * stepped[0][-1]  # and the head's LR is swept
    # An LR --group-lr gives is the group's own, in the range test as in training.
    stepped.clear()
    handle = register_optimizer_step_post_hook(lambda opt, *_: stepped.append([g["lr"] for g in opt.param_groups]))
    try:
        find_lr(TrainConfig(data=str(tiny_dataset), strategy="fine-tune", unfreeze=2, group_lr="layer4=1e-4", **TINY),
                num_training=12)  # fmt: skip
    finally:
        handle.remove()
    assert len(stepped) >= 10 and all(lrs[2:4] == [1e-4, 1e-4] for lrs in stepped)


@pytest.mark.slow
def test_compile_trains_a_compiled_network_and_saves_plain_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    from transferkit import evaluate, load_checkpoint

    counters.clear()
    options = {**TINY, "model": "squeezenet1_1"}
    result = train(tiny_dataset, strategy="fine-tune", unfreeze=1, epochs=1, compile=True, out=str(tmp_path / "c"),
                   **options)  # fmt: skip
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured and compiled the forward
    model = load_checkpoint(result.run_dir)  # strict load: keys without torch.compile's "_orig_mod." prefix
    assert not any("_orig_mod" in key for key in model.state_dict())
    graphs = counters["stats"]["unique_graphs"]
    assert evaluate(model, tiny_dataset / "val", compile=True).accuracy == result.metrics["val_accuracy"]
    assert counters["stats"]["unique_graphs"] > graphs  # the inference forward was compiled too

    # Without a C++ compiler on the PATH, a one-line error names the option instead of an inductor traceback.
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin"), "CXX": ""}
    image = next((tiny_dataset / "val").rglob("*.png"))
    command = [sys.executable, "-m", "transferkit", "predict", str(result.run_dir), str(image), "--compile"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "--compile" in proc.stderr and "C++ compiler" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


class _Trainer:
    """What BestModelCheckpoint reads of a Lightning Trainer, at one validation's end."""

    sanity_checking, is_global_zero = False, True

    def __init__(self, epoch: int, accuracy: float, loss: float) -> None:
        import torch

        self.current_epoch = epoch
        self.callback_metrics = {"val_accuracy": torch.tensor(accuracy), "val_loss": torch.tensor(loss)}


def test_a_frozen_backbone_run_writes_the_best_head_into_model_pt_without_rewriting_it_each_improvement(
    tmp_path: Path,
) -> None:
    """Head only: an improvement soon after a write waits (the backbone in model.pt is the same); the end of
    training writes the best epoch's head, not the last one's; the kept head survives a resume."""
    import types

    import torch

    from transferkit import TransferModel, load_backbone, load_checkpoint
    from transferkit.training import BestModelCheckpoint

    torch.manual_seed(0)
    model = TransferModel(load_backbone("resnet18", "none"), ["a", "b"])
    module = types.SimpleNamespace(model=model)  # the LightningModule's one attribute the callback reads
    path = tmp_path / "model.pt"

    def head() -> torch.Tensor:
        return model.net.fc.weight.detach().clone()

    def written() -> tuple[int, torch.Tensor]:
        saved = load_checkpoint(path)
        return saved.record.extra["epoch"], saved.net.fc.weight.detach()

    callback = BestModelCheckpoint(path, {}, head_only=True)
    callback.on_validation_end(_Trainer(0, 0.5, 1.0), module)  # the first best is written at once
    epoch, weights = written()
    assert epoch == 0 and torch.equal(weights, head())
    with torch.no_grad():
        model.net.fc.weight.add_(1.0)
    best = head()
    callback.on_validation_end(_Trainer(1, 0.6, 0.9), module)  # better, right after a write: kept in memory
    assert written()[0] == 0 and callback.best_epoch == 1
    with torch.no_grad():
        model.net.fc.weight.add_(1.0)
    callback.on_validation_end(_Trainer(2, 0.55, 0.8), module)  # worse: nothing changes
    # A resume (the rolling checkpoint holds the callback's state) ends the run as the first would have.
    resumed = BestModelCheckpoint(path, {}, head_only=True)
    resumed.load_state_dict(callback.state_dict())
    resumed.on_train_end(_Trainer(2, 0.55, 0.8), module)
    epoch, weights = written()
    assert epoch == 1 and torch.equal(weights, best) and not torch.equal(weights, head())
    # Without head_only (the backbone trains), every improvement is written as it comes.
    every = BestModelCheckpoint(path, {})
    trainer = _Trainer(0, 0.5, 1.0)
    trainer.strategy = types.SimpleNamespace(
        lightning_module_state_dict=lambda: {f"model.net.{k}": v for k, v in model.net.state_dict().items()})
    every.on_validation_end(trainer, module)
    assert written()[0] == 0 and torch.equal(written()[1], head())


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"accelerator": "tpu"}, "unknown --accelerator 'tpu'"),
        pytest.param({"accelerator": "cuda"}, "--accelerator cuda: this machine has no such device",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
        ({"devices": 0}, "--devices must be auto, a count of at least 1"),
        # Lightning would train bf16 instead, and the run would say fp16.
        ({"precision": "16", "accelerator": "cpu", "strategy": "fine-tune"}, "--precision 16: fp16 training needs"),
        ({"dist": "foo"}, "unknown --dist 'foo'; choose one of: auto, ddp"),
        ({"optimizer": "sgd", "momentum": -1.0}, "--momentum must be between 0 and 1, got -1.0"),
        ({"weight_decay": -1.0}, "--weight-decay must not be negative"),
        ({"patience": 0}, "--patience must be at least 1, got 0"),
        ({"num_workers": -2}, "--num-workers must not be negative"),
        ({"gamma": 0.0}, "--gamma must be positive"),
        ({"mean": [0.5] * 3, "std": [0.0] * 3}, "--std must be positive"),
        ({"mean": [0.5, 0.5]}, "--mean takes 1 or 3 numbers (one per RGB channel), got 2: 0.5,0.5"),
        ({"devices": -1}, "--devices -1: on a CPU give a count of processes (--devices 2) or auto"),
        ({"devices": "0,1"}, "--devices 0,1: on a CPU give a count of processes"),
        pytest.param({"dist": "deepspeed"}, "--dist deepspeed needs the deepspeed package: pip install deepspeed",
                     marks=pytest.mark.skipif(bool(importlib.util.find_spec("deepspeed")), reason="deepspeed here")),
        ({"image_size": -5}, "--image-size must be at least 1 pixel, got -5"),
        ({"folds": 0}, "--folds 0: give at least 2"),
        ({"seed": -1}, "--seed must be from 0 to 4294967295"),
        ({"batch_size": "8"}, "--batch-size must be a whole number, got '8'"),  # from Python, as a notebook may
        ({"feature_views": 2.0}, "--views must be a whole number, got 2.0"),
        ({"momentum": "0.9"}, "--momentum must be a number, got '0.9'"),
        # Not finite: nan passes every "at least" comparison, inf trains to nan losses.
        ({"weight_decay": float("nan")}, "--weight-decay must be a finite number, got nan"),
        ({"lr": float("inf")}, "--lr must be a positive number, got inf"),
        ({"mean": [float("inf")] * 3, "std": [0.5] * 3}, "--mean must be finite numbers"),
        ({"strategy": "fine-tune", "group_lr": "layer4=-1"}, "bad --group-lr item 'layer4=-1': an LR must be"),
        ({"strategy": "fine-tune", "group_lr": {"layer4": float("nan")}}, "bad --group-lr item 'layer4=nan'"),
        ({"strategy": "auto", "group_lr": "layer4=1e-4"}, "--group-lr sets the LRs of one strategy's groups"),
    ],
)
def test_options_torch_or_lightning_would_refuse_are_errors_before_the_run_directory(
    tiny_dataset: Path, tmp_path: Path, option: dict[str, object], message: str
) -> None:
    options = {**TINY, **option}
    with pytest.raises(TransferkitError, match=re.escape(message)):
        train(tiny_dataset, epochs=1, out=str(tmp_path / "run"), **options)
    assert not (tmp_path / "run").exists()


def test_fp16_on_a_cpu_is_refused_only_where_a_network_trains_at_it(tiny_dataset: Path, tmp_path: Path) -> None:
    cpu16 = {**TINY, "precision": "16", "accelerator": "cpu"}
    with pytest.raises(TransferkitError, match="--precision 16: fp16 training needs a GPU"):
        find_lr(TrainConfig(data=str(tiny_dataset), strategy="gradual", **cpu16))
    # The head trains at fp32 on features extracted, and evaluated, at fp16.
    result = train(tiny_dataset, strategy="feature-extract", epochs=1, out=str(tmp_path / "run"), **cpu16)
    assert (result.metrics["precision"], result.metrics["evaluation_precision"]) == ("32", "16")


class _FailAtEpoch(Callback):
    def __init__(self, epoch: int, error: type[BaseException] = RuntimeError) -> None:
        self.epoch, self.error = epoch, error

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise self.error("failed on purpose")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory_and_a_later_one_is_kept(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    given = tmp_path / "given"
    given.mkdir()  # an empty --out the user made: kept, and empty again
    for out in (tmp_path / "new", given):
        with pytest.raises(RuntimeError, match="on purpose"):
            train(tiny_dataset, epochs=2, out=str(out), callbacks=[_FailAtEpoch(0)], **TINY)
        assert not (tmp_path / "new").exists() and list(given.iterdir()) == []
    assert train(tiny_dataset, epochs=1, out=str(tmp_path / "new"), **TINY).run_dir == tmp_path / "new"
    with pytest.raises(RuntimeError, match="on purpose"):
        train(tiny_dataset, epochs=2, out=str(tmp_path / "later"), callbacks=[_FailAtEpoch(1)], **TINY)
    assert (tmp_path / "later" / "checkpoints" / "last.ckpt").exists()  # epoch 0's: what --resume continues


def test_ctrl_c_is_a_keyboard_interrupt_and_the_run_says_how_to_continue(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from transferkit import resume_training
    from transferkit.workflow import resume_target

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # Lightning's graceful shutdown ends in sys.exit(1)
        train(tiny_dataset, epochs=3, out=str(run), callbacks=[_FailAtEpoch(1, KeyboardInterrupt)], **TINY)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Lightning had left Ctrl+C ignored
    assert resume_target(run) == run and resume_target(tmp_path) is None
    monkeypatch.chdir(tmp_path)
    resumed = resume_training("run")  # a relative path: the run directory it returns is absolute, as a new run's
    assert resumed.metrics["epochs_run"] == 3 and resumed.run_dir == run.resolve()


def test_a_run_saved_with_options_this_version_refuses_says_so_on_resume(tiny_dataset: Path, tmp_path: Path) -> None:
    """gradual --unfreeze 0 unfroze every group in earlier versions and is refused now: resuming such a run
    names the run and its saved configuration, not an option the resuming command never gave."""
    from transferkit import resume_training

    run = tmp_path / "old"
    run.mkdir()
    saved = TrainConfig(data=str(tiny_dataset), strategy="gradual", out=str(run), **TINY).to_dict()
    (run / "config.json").write_text(json.dumps({**saved, "unfreeze": 0}))
    with pytest.raises(TransferkitError, match=f"cannot resume {run}: this version refuses its saved configuration "
                                               r"\(--unfreeze 0 with --strategy gradual .*\); start the run again"):
        resume_training(run)


def test_a_run_resumed_with_quiet_shows_no_progress_and_leaves_nothing_half_written(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quiet is the one option --resume takes with it: it changes what is shown, not what is trained."""
    from transferkit.cli import main

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="on purpose"):
        train(tiny_dataset, epochs=2, out=str(run), callbacks=[_FailAtEpoch(1)], **{**TINY, "quiet": False})
    capsys.readouterr()
    # What a process killed mid-write leaves: atomic_write's temporary files (killed while finishing, too).
    leftovers = [run / ".model.pt.k1ll3d.tmp", run / "checkpoints" / ".last.ckpt.k1ll3d.tmp",
                 run / ".metrics.json.k1ll3d.tmp"]  # fmt: skip
    for path in leftovers:
        path.write_bytes(b"half")
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert not any(path.exists() for path in leftovers)
    shown = capsys.readouterr()  # (the killed run's epoch-0 bar may still be closing: only epoch 1 is resumed)
    assert shown.out.endswith(f"\n{run}\n") or shown.out == f"{run}\n", shown
    assert "Epoch 1" not in shown.out + shown.err and "resuming" not in shown.out + shown.err, shown
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 2
    assert main(["train", "--resume", str(run), "--quiet", "--epochs", "3"]) == 2
    assert "leave out --epochs (to change them, start a new run)" in capsys.readouterr().err


def test_a_run_given_relative_paths_is_found_again_from_any_working_directory(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATA and --out relative to where train ran: the report, drawn from elsewhere, still finds the images."""
    from transferkit import write_report

    monkeypatch.chdir(tmp_path)
    data = os.path.relpath(tiny_dataset, tmp_path)
    run = train(data, epochs=1, out="runs/rel", **TINY).run_dir
    saved = json.loads((tmp_path / "runs/rel/config.json").read_text())
    assert saved["data"] == str(tiny_dataset) and saved["out"] == str(tmp_path / "runs/rel")
    monkeypatch.chdir(tiny_dataset / "train")  # anywhere else
    page = write_report(tmp_path / "runs/rel").read_text(encoding="utf-8")
    assert "image grids not drawn" not in page and "val_predictions.png" in page, run


def test_an_epochs_last_batch_of_one_image_is_skipped_where_batchnorm_trains(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """20 training images in batches of 19: BatchNorm in training mode cannot normalise layer4's 1x1 maps
    (32 px) of a single image, which raised "Expected more than 1 value per channel" mid-run."""
    options = {**TINY, "batch_size": 19, "strategy": "fine-tune", "unfreeze": 1}
    result = train(tiny_dataset, epochs=2, out=str(tmp_path / "run"), **options)
    assert result.metrics["epochs_run"] == 2 and (result.run_dir / "model.pt").is_file()


def test_inception_trained_below_its_auxiliary_classifiers_input_size_is_an_error_before_the_run(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    options = {**TINY, "model": "inception_v3", "image_size": 75, "strategy": "fine-tune", "unfreeze": 1}
    with pytest.raises(TransferkitError, match="--image-size 75: inception_v3's auxiliary classifier trains on "
                                               "inputs of at least 299 pixels"):  # fmt: skip
        train(tiny_dataset, epochs=1, out=str(tmp_path / "run"), **options)  # was a pooling error in the first step
    # feature-extract on images (no feature cache) runs the network in training mode, auxiliary classifier too.
    options = {**TINY, "model": "inception_v3", "image_size": 75, "strategy": "feature-extract", "cache": False}
    with pytest.raises(TransferkitError, match="--image-size 75: .* or more, or leave out --no-cache"):
        train(tiny_dataset, epochs=1, out=str(tmp_path / "run"), **options)  # was the same error, mid-run
    assert not (tmp_path / "run").exists()


def test_a_val_split_for_data_with_its_own_validation_images_is_said_to_do_nothing(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    unused = r"--val-split 0.3 is not used: .* has its own validation images \(train/val\)"
    with pytest.warns(UserWarning, match=unused):
        train(tiny_dataset, epochs=1, val_split=0.3, out=str(tmp_path / "a"), **TINY)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="--val-split")
        train(tiny_dataset / "train", epochs=1, val_split=0.3, out=str(tmp_path / "b"), **TINY)  # split by it


def test_evaluating_a_run_on_the_data_it_split_measures_its_validation_images_only(tmp_path: Path) -> None:
    """A run that drew its validation images from DATA (--val-split), evaluated on DATA, is measured on
    those images as it drew them, not on every image (most of which it trained on): the numbers it saved."""
    from helpers import make_colour_folder

    from transferkit import evaluate

    data = make_colour_folder(tmp_path / "photos", 10)
    run = train(data, epochs=1, val_split=0.25, out=str(tmp_path / "run"), **TINY)
    own = evaluate(run.run_dir, data)
    assert own.num_images == 4 and own.accuracy == run.metrics["val_accuracy"] and own.loss == run.metrics["val_loss"]
    assert own.evaluated_on == f"the run's validation images of {data}, drawn as it drew them (it trained on 16 others)"
    assert evaluate(run.run_dir, tmp_path / "photos" / ".." / "photos").num_images == 4  # the same folder, spelt so
    linked = tmp_path / "linked"
    linked.symlink_to(data, target_is_directory=True)
    assert evaluate(run.run_dir, linked).num_images == 4  # the same folder through a link
    copy = shutil.copytree(data, tmp_path / "copy")
    assert evaluate(run.run_dir, copy).num_images == 20  # a folder the run did not train on: every image in it
    table = tmp_path / "photos.csv"
    table.write_text("path,label\n" + "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n"
                                               for p in sorted(data.rglob("*.*"))))  # fmt: skip
    from_table = train(table, epochs=1, val_split=0.25, out=str(tmp_path / "from-table"), **TINY)
    assert evaluate(from_table.run_dir, table).accuracy == from_table.metrics["val_accuracy"]
    assert evaluate(from_table.run_dir, table).num_images == 4
    # A k-fold run trained on every image (each in all folds but one): measured on all, with a warning.
    folds = train(data, epochs=1, folds=2, out=str(tmp_path / "folds"), **TINY)
    for model in (folds.run_dir, Path(folds.run_dir) / "fold-1"):  # the ensemble, and one fold of it
        with pytest.warns(UserWarning, match=r"photos is the data this k-fold run \(or fold of one\) trained on: "
                                             r"most of its images trained the model, so this accuracy overstates"):
            assert evaluate(model, data).num_images == 20
    # With test-time augmentation, the same images and the same note.
    assert evaluate(run.run_dir, data, tta=True).evaluated_on == own.evaluated_on
    # Images added since: the split cannot be drawn again, and every image is evaluated, with a warning.
    shutil.copy(next(data.glob("red/*.png")), data / "red" / "new.png")
    with pytest.warns(UserWarning, match=r"photos has changed since the run trained on it"):
        assert evaluate(run.run_dir, data).num_images == 21


def test_a_misspelt_option_is_a_one_line_error_naming_the_likely_one(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(TransferkitError, match=r"^train\(\) has no option 'epoch'; did you mean epochs\?$"):
        train(tiny_dataset, epoch=3, out=str(tmp_path / "run"), **TINY)
    with pytest.raises(TransferkitError, match=r"^train\(\) has no option 'colour'; see help\(transferkit"):
        train(tiny_dataset, colour="red", **TINY)
    assert not (tmp_path / "run").exists()


def test_evaluating_a_run_on_its_own_train_val_data_says_nothing_of_its_training_files(tmp_path: Path) -> None:
    """DATA with train/ and val/: evaluate reads val/ alone, and warns of no training file it skipped."""
    from helpers import make_colour_folder

    from transferkit import evaluate

    make_colour_folder(tmp_path / "data" / "train", 4)
    make_colour_folder(tmp_path / "data" / "val", 2)
    (tmp_path / "data" / "train" / "red" / "broken.jpg").write_text("not an image")
    with pytest.warns(UserWarning, match="broken.jpg"):
        run = train(tmp_path / "data", epochs=1, out=str(tmp_path / "run"), **TINY)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*broken.jpg")
        assert evaluate(run.run_dir, tmp_path / "data").num_images == 4
