"""--strategy auto: candidates measured on held-out training images, within a budget, recorded in the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transferkit import TransferkitError, advise, train
from transferkit.data import discover
from transferkit.leaderboard import Trial
from transferkit.selection import holdout_split, parse_budget

TINY = {"model": "resnet18", "weights": "none", "image_size": 32, "epochs": 2, "batch_size": 8, "quiet": True}


@pytest.fixture(scope="module")
def auto_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("auto") / "run"
    # inception_v3 does not run on 32-pixel inputs (its aux classifier): a candidate that fails.
    train(tiny_dataset, strategy="auto", budget="2m", models=["resnet18", "inception_v3"], out=str(out), **TINY)
    return out


def test_the_holdout_is_part_of_the_training_images_and_never_of_validation(tiny_dataset: Path) -> None:
    splits = discover(tiny_dataset)
    learn, holdout = holdout_split(splits.train, seed=0)
    assert sorted(learn + holdout) == sorted(splits.train) and not set(learn) & set(holdout)
    assert {label for _, label in holdout} == {0, 1} and not set(holdout) & set(splits.val)
    assert holdout_split(splits.train, seed=0) == (learn, holdout)  # seeded


def test_auto_records_a_leaderboard_and_trains_the_winner(auto_run: Path) -> None:
    metrics = json.loads((auto_run / "metrics.json").read_text())
    selection = metrics["selection"]
    board = selection["leaderboard"]
    measured = [t for t in board if t["status"] == "done"]
    assert {t["strategy"] for t in measured} >= {"linear-probe", "feature-extract", "fine-tune", "full"}
    assert [t["score"] for t in measured] == sorted((t["score"] for t in measured), reverse=True)
    assert selection["train_images"] + selection["holdout_images"] == 20  # the 20 training images, not the 8 val
    assert selection["used_seconds"] <= selection["budget_seconds"]
    failed = [t for t in board if t["backbone"] == "inception_v3"]
    assert failed and failed[0]["status"] == "failed" and "does not run on 32-pixel inputs" in failed[0]["note"]
    winner = selection["winner"]
    assert winner == board[0] and metrics["strategy"] == winner["strategy"] and metrics["model"] == "resnet18"
    assert f"--strategy {winner['strategy']}" in selection["command"]
    config = json.loads((auto_run / "config.json").read_text())
    assert config["strategy"] == winner["strategy"] and config["budget"] is None  # --resume trains the winner


def test_the_report_shows_the_leaderboard(auto_run: Path) -> None:
    page = (auto_run / "report.html").read_text()
    assert 'id="selection"' in page and "holdout accuracy" in page and "report/selection.png" in page
    assert (auto_run / "report" / "selection.png").stat().st_size > 1000


def test_budgets_and_bad_choices(tiny_dataset: Path, tmp_path: Path) -> None:
    assert parse_budget("5m", 0) == 300 and parse_budget("90", 0) == 90 and parse_budget("auto", 100) == 75
    with pytest.raises(TransferkitError, match="bad --budget 'soon'"):
        parse_budget("soon", 0)
    with pytest.raises(TransferkitError, match=r"cannot fit even the cheapest candidate.*give --budget \d+s or more"):
        train(tiny_dataset, strategy="auto", budget="0.001s", out=str(tmp_path / "a"), **TINY)
    with pytest.raises(TransferkitError, match="did you mean resnet18"):
        train(tiny_dataset, strategy="auto", models=["resnet181"], out=str(tmp_path / "b"), **TINY)
    with pytest.raises(TransferkitError, match="apply to --strategy auto"):
        train(tiny_dataset, budget="5m", out=str(tmp_path / "c"), **TINY)
    assert not any((tmp_path / n).exists() for n in "abc")  # nothing written for bad input


def test_advise_from_python_refuses_fewer_than_one_image_a_class(tiny_dataset: Path) -> None:
    with pytest.raises(TransferkitError, match="--per-class must be at least 1, got 0"):  # not "no image decoded"
        advise(tiny_dataset, model="resnet18", weights="none", per_class=0)


def test_advise_prints_the_fast_stage_of_the_measurement(tiny_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transferkit.cli import main

    assert main(["advise", str(tiny_dataset), "--model", "resnet18", "--weights", "none", "--budget", "60s",
                 "--image-size", "64"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "recommended strategy:" in out and "measured on 4 held-out training images" in out
    assert "resnet18 linear-probe head-input" in out and "fine-tune" not in out.split("measured on")[1]
    assert f"best: transferkit train {tiny_dataset} --model resnet18 --strategy" in out
    own = "--model resnet18 --weights none --image-size 64"
    assert f"command: transferkit train {tiny_dataset} {own} --strategy" in out
    assert out.rstrip().endswith("--weights none --image-size 64")  # the run's own model, weights and size


def test_a_winning_other_backbone_trains_with_its_own_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    import torchvision

    from transferkit import train

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")  # the run's own model's file
    result = train(tiny_dataset, model="resnet18", weights=str(tmp_path / "resnet18.pth"), strategy="auto",
                   models=["efficientnet_lite0"], budget="60s", image_size=32, epochs=1, batch_size=4, quiet=True,
                   out=str(tmp_path / "run"))  # fmt: skip
    config = json.loads((Path(result.run_dir) / "config.json").read_text())
    assert (config["model"], config["weights"]) == ("efficientnet_lite0", "DEFAULT")  # not resnet18's file


def test_random_weights_asked_for_are_every_candidates(tiny_dataset: Path, tmp_path: Path) -> None:
    """--weights none with --models: each candidate measured and trained from random weights (offline here,
    where their default weights would be downloaded), not the run's default model alone."""
    from transferkit import train

    result = train(tiny_dataset, weights="none", strategy="auto", models=["resnet18", "mobilenet_v3_small"],
                   budget="60s", image_size=32, epochs=1, batch_size=4, quiet=True,
                   out=str(tmp_path / "run"))  # fmt: skip
    trials = result.metrics["selection"]["leaderboard"]
    assert {t["backbone"] for t in trials} == {"resnet18", "mobilenet_v3_small"}
    assert not [t for t in trials if t["status"] == "failed"], trials
    config = json.loads((Path(result.run_dir) / "config.json").read_text())
    assert config["model"] in ("resnet18", "mobilenet_v3_small") and config["weights"] == "none"


def test_the_winner_takes_the_runs_weights_only_where_it_is_the_runs_own_model() -> None:
    from transferkit.leaderboard import Selection, Trial

    own = {"model": "resnet18", "weights": "mine.pth", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    selection = Selection(60, 10, 4, own_model=own, winner=Trial("resnet18", "linear-probe", layer="layer3"))
    assert selection.winner_options() == {"model": "resnet18", "strategy": "linear-probe", "layer": "layer3",
                                          "unfreeze": None, "weights": "mine.pth", "mean": [0.5] * 3,
                                          "std": [0.25] * 3}  # fmt: skip
    assert selection.command("d") == ("transferkit train d --model resnet18 --strategy linear-probe --layer layer3 "
                                      "--weights mine.pth --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25")  # fmt: skip
    selection.winner = Trial("efficientnet_lite0", "feature-extract")  # another backbone: its own default weights
    assert selection.winner_options() == {"model": "efficientnet_lite0", "strategy": "feature-extract",
                                          "layer": None, "unfreeze": None, "weights": "DEFAULT", "mean": None,
                                          "std": None}  # fmt: skip
    assert selection.command("d") == "transferkit train d --model efficientnet_lite0 --strategy feature-extract"
    selection.image_size = 64  # every candidate's: the command keeps it whoever wins
    assert selection.command("d").endswith("--strategy feature-extract --image-size 64")
    selection.own_model = {"model": "resnet18", "weights": "none", "mean": None, "std": None}
    assert selection.winner_options()["weights"] == "none"  # random weights asked for are every candidate's


def test_a_layer_given_to_auto_is_one_more_probe_and_not_the_winners_unless_it_wins(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    # The trainable candidates once inherited --layer (refused for them: the whole search failed), and a
    # winner without a layer of its own kept the one given. A --layer and an --unfreeze given were ignored.
    result = train(tiny_dataset, strategy="auto", layer="layer1", unfreeze=1, budget="60s", models=["resnet18"],
                   out=str(tmp_path / "run"), **TINY)  # fmt: skip
    board = result.metrics["selection"]["leaderboard"]
    assert {t["strategy"] for t in board if t["status"] == "done"} >= {"linear-probe", "fine-tune", "full"}
    probed = {t["layer"] for t in board if t["strategy"] == "linear-probe"}
    assert probed == {"head-input", "layer2", "layer1"}  # the last layer, an earlier one, and the one given
    assert {t["unfreeze"] for t in board if t["strategy"] == "fine-tune"} == {1}
    assert [t["status"] for t in board] == ["done"] * len(board)
    config = json.loads((result.run_dir / "config.json").read_text())
    winner = board[0]
    assert config["layer"] == (winner["layer"] if winner["layer"] != "head-input" else None)
    assert Trial("resnet18", "linear-probe", layer="head-input").options()["layer"] is None


def test_an_interrupted_search_resumes_from_its_measured_trials(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search is killed in its first training trial (as by Ctrl-C); --resume keeps what was measured."""
    from transferkit import resume_training
    from transferkit.selection import Search

    def interrupted(self: Search, trial: object, options: object) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Search, "_train_trial", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_dataset, strategy="auto", budget="2m", out=str(out), **TINY)
    saved = json.loads((out / "selection.json").read_text())
    assert not (out / "config.json").exists() and {t["strategy"] for t in saved["trials"]} == {"linear-probe",
                                                                                               "feature-extract"}
    result = resume_training(out)
    board = result.metrics["selection"]["leaderboard"]
    for before in saved["trials"]:  # measured once, kept as they were
        assert sum(t == before for t in board) == 1
    assert {"fine-tune", "full"} <= {t["strategy"] for t in board if t["status"] == "done"}
    assert (out / "config.json").is_file() and result.metrics["strategy"] == result.metrics["selection"]["winner"]["strategy"]


def test_a_search_whose_every_candidate_fails_says_why_with_the_fix(tiny_dataset: Path, tmp_path: Path) -> None:
    """Offline, resnet18's default weights cannot be had: the error gives the reason whole, fix included."""
    with pytest.raises(TransferkitError, match=r"^no candidate could be measured: resnet18 feature-extract: "
                                               r"TransferkitError: could not get resnet18 weights .*; connect once "
                                               r"to download them, .* or pass a local file with --weights FILE \(or "
                                               r"--weights none\)$"):  # fmt: skip
        train(tiny_dataset, strategy="auto", budget="60s", models=["resnet18"], image_size=32, quiet=True,
              out=str(tmp_path / "run"))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_class_of_one_training_image_is_measured_only_by_candidates_that_can_train_it(tmp_path: Path) -> None:
    """A linear probe's final fit cross-validates C (2 images a class at least): it may not win the search."""
    from helpers import make_colour_folder

    make_colour_folder(tmp_path / "data" / "train", 8, classes=("red",))
    make_colour_folder(tmp_path / "data" / "train", 1, classes=("blue",), seed=3)
    make_colour_folder(tmp_path / "data" / "val", 2, classes=("red", "blue"), seed=1)
    result = train(tmp_path / "data", strategy="auto", budget="60s", models=["resnet18"], out=str(tmp_path / "run"),
                   **{**TINY, "epochs": 1})  # fmt: skip
    board = result.metrics["selection"]["leaderboard"]
    probes = [t for t in board if t["strategy"] == "linear-probe"]
    assert probes and all(t["status"] == "skipped" and "at least 2 training images per class" in t["note"]
                          for t in probes)  # fmt: skip
    assert result.metrics["strategy"] != "linear-probe" and (result.run_dir / "model.pt").is_file()


def test_the_printed_command_reproduces_the_winner_with_the_runs_data_and_options(tmp_path: Path) -> None:
    """It held the winner's options alone: on a label file with its own column names it failed outright."""
    import shlex

    from helpers import make_colour_folder

    from transferkit.cli import main

    images = make_colour_folder(tmp_path / "images", 10, size=(32, 32))
    rows = [f"{path.relative_to(images)},{path.parent.name}" for path in sorted(images.rglob("*.png"))]
    (images / "diag.csv").write_text("file,diagnosis\n" + "\n".join(rows) + "\n")
    options = {**TINY, "epochs": 1, "seed": 3, "lr": 0.01, "head": "mlp:8"}
    result = train(images / "diag.csv", strategy="auto", budget="60s", models=["resnet18"], label_col="diagnosis",
                   out=str(tmp_path / "auto"), **options)  # fmt: skip
    command = result.metrics["selection"]["command"]
    assert "--label-col diagnosis" in command and "--seed 3" in command
    if result.metrics["strategy"] != "linear-probe":  # which read these; a probe's command leaves them out
        assert "--head mlp:8" in command and "--lr 0.01" in command
    args = shlex.split(command)
    assert args[:2] == ["transferkit", "train"]
    assert main([*args[1:], "--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["strategy"] == result.metrics["strategy"] and again["val_accuracy"] == result.metrics["val_accuracy"]


def test_a_run_killed_after_its_search_trains_the_winner_on_resume(auto_run: Path, tmp_path: Path) -> None:
    """Killed once config.json holds the winner but before its first checkpoint (a linear probe writes none):
    --resume trains the winner; it said "start it again", and a new run with that --out was refused."""
    import shutil

    from transferkit import resume_training

    run = Path(shutil.copytree(auto_run, tmp_path / "run"))
    for path in list(run.iterdir()):
        if path.name not in ("config.json", "selection.json", "command.txt"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = resume_training(run)
    winner = json.loads((auto_run / "metrics.json").read_text())
    assert result.metrics["selection"] == winner["selection"] and (run / "model.pt").is_file()
    assert result.metrics["strategy"] == winner["strategy"] and result.metrics["val_accuracy"] == winner["val_accuracy"]


@pytest.mark.parametrize(
    ("given", "winner"),
    [({"train_bn": True}, {"strategy": "full"}),  # full trains BatchNorm anyway: --train-bn is refused with it
     ({"augment": "strong"}, {"strategy": "feature-extract"}),  # one cached view: the run trained unaugmented
     ({"head_dropout": 0.3}, {"strategy": "fine-tune", "unfreeze": 2})],  # a linear head has nothing to drop
)
def test_the_printed_command_holds_only_options_train_accepts_with_the_winner(
    tmp_path: Path, given: dict[str, object], winner: dict[str, object]
) -> None:
    import shlex
    from dataclasses import fields

    from transferkit.cli import build_parser
    from transferkit.cli.train import _check_options_are_read
    from transferkit.leaderboard import reproducing_flags
    from transferkit.training import TrainConfig

    config = TrainConfig(data=str(tmp_path), strategy="auto", **{**TINY, **given})
    for name, value in winner.items():  # as _measured_choice resolves it
        setattr(config, name, value)
    command = f"train {tmp_path} --strategy {config.strategy}{reproducing_flags(config)}"
    args = build_parser().parse_args(shlex.split(command))
    _check_options_are_read(args)
    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "data" and hasattr(args, f.name)}
    TrainConfig(data=args.data, **{**options, "cache": not args.no_cache, "feature_views": args.views})
