"""``train --logger``: Lightning's loggers, read back from where they wrote (MLflow's local store, CSV, W&B offline)."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

import transferkit
from transferkit.runs import read_history
from transferkit.training.loggers import build_loggers

RUN_FILES = {"config.json", "metrics.json", "history.csv", "report.html", "report"}


def test_logger_names_are_checked_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    config = transferkit.TrainConfig(data="x", loggers=["csv,tensorboard", "csv"])
    assert config.loggers == ("csv", "tensorboard")
    assert transferkit.TrainConfig(data="x", loggers=None).loggers == ()
    with pytest.raises(transferkit.TransferkitError, match="unknown --logger 'mlflw'; choose from: tensorboard, csv"):
        transferkit.TrainConfig(data="x", loggers=("mlflw",))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as on a machine without it
    with pytest.raises(transferkit.TransferkitError, match=r"--logger wandb needs the wandb package: pip install"):
        transferkit.TrainConfig(data="x", loggers=("wandb",))


def test_an_mlflow_file_store_is_refused_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """MLflow 3 refuses a file: store (a plain path is one) with its traceback once the run has begun."""
    pytest.importorskip("mlflow", reason='--logger mlflow needs MLflow: pip install -e ".[loggers]"')
    for uri in (str(tmp_path / "mlruns"), (tmp_path / "mlruns").as_uri(), "./mlruns", "mlruns"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(transferkit.TransferkitError, match=r"is a file store, which MLflow 3 refuses: give "
                                                                 r"sqlite:///PATH/mlflow.db"):
            transferkit.TrainConfig(data="x", loggers=("mlflow",))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what MLflow itself asks for
    assert transferkit.TrainConfig(data="x", loggers=("mlflow",)).loggers == ("mlflow",)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    for uri in ("databricks", "http://127.0.0.1:5000", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert transferkit.TrainConfig(data="x", loggers=("mlflow",)).loggers == ("mlflow",)


@pytest.fixture(scope="module")
def mlflow_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> transferkit.TrainResult:
    pytest.importorskip("mlflow", reason='--logger mlflow needs MLflow: pip install -e ".[loggers]"')
    pytest.importorskip("sqlalchemy", reason="MLflow's local SQLite store needs sqlalchemy (the loggers extra)")
    out = tmp_path_factory.mktemp("loggers") / "runs" / "run"
    return transferkit.train(str(tiny_dataset), model="resnet18", weights="none", image_size=32, epochs=2, quiet=True,
                             out=str(out), loggers=("mlflow", "csv"))  # fmt: skip


def mlflow_client(runs_root: Path):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{runs_root / 'mlflow.db'}")


@pytest.mark.slow
def test_mlflow_local_store_holds_every_epoch_the_final_metrics_and_the_run_files(
    mlflow_run: transferkit.TrainResult, tmp_path: Path
) -> None:
    run_dir = mlflow_run.run_dir
    client = mlflow_client(run_dir.parent)
    experiment = client.get_experiment_by_name("transferkit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert json.loads((run_dir / "loggers.json").read_text()) == {"mlflow": run.info.run_id}
    history = read_history(run_dir / "history.csv")
    assert len(history) == 2
    for name in ("val_accuracy", "val_loss", "train_loss"):
        logged = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.value for m in logged] == pytest.approx([row[name] for row in history], abs=1e-6), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.metrics["final/val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert run.data.metrics["final/val_loss"] == pytest.approx(metrics["val_loss"])
    assert run.data.params["model"] == "resnet18" and run.data.params["epochs"] == "2"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == RUN_FILES
    assert any(a.path.endswith(".png") for a in client.list_artifacts(run.info.run_id, "report"))
    copy = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(Path(copy).read_text()) == metrics


@pytest.mark.slow
def test_csv_logger_writes_each_epoch_and_the_final_numbers(mlflow_run: transferkit.TrainResult) -> None:
    with open(mlflow_run.run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val_accuracy"]) for r in rows if r.get("val_accuracy")]
    assert val == pytest.approx([row["val_accuracy"] for row in mlflow_run.history])
    final = [float(r["final/val_accuracy"]) for r in rows if r.get("final/val_accuracy")]
    assert final == pytest.approx([mlflow_run.val_accuracy])


@pytest.mark.slow
def test_a_resumed_run_logs_to_the_same_mlflow_run(mlflow_run: transferkit.TrainResult) -> None:
    run_dir = mlflow_run.run_dir
    saved = json.loads((run_dir / "loggers.json").read_text())["mlflow"]
    (logger,) = build_loggers(("mlflow",), run_dir, {"model": "another value, not logged again"})
    assert logger.run_id == saved
    client = mlflow_client(run_dir.parent)
    assert len(client.search_runs([client.get_experiment_by_name("transferkit").experiment_id])) == 1


@pytest.mark.slow
def test_wandb_runs_offline_without_a_key(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason='--logger wandb needs wandb: pip install "transferkit[loggers]" wandb')
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing of the user's
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    result = transferkit.train(str(tiny_dataset), model="resnet18", weights="none", image_size=32, epochs=1,
                               quiet=True, out=str(tmp_path / "run"), loggers=("wandb",))  # fmt: skip
    run_id = json.loads((result.run_dir / "loggers.json").read_text())["wandb"]
    (offline,) = (result.run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    # W&B's own service process writes the log; on a loaded machine it may still be flushing when
    # finish() has returned (seen once in a full CI run), so wait for it, within a minute.
    deadline, log = time.monotonic() + 60, b""
    while b"report.html" not in log and time.monotonic() < deadline:
        log = (offline / f"run-{run_id}.wandb").read_bytes()
        time.sleep(0.5)
    # The run's own log (protobuf records): every epoch's and the final metrics, and the run's files as an artifact.
    for text in (b"val_accuracy", b"final/val_accuracy", b"metrics.json", b"report.html"):
        assert text in log, text


class _FailAtSecondEpoch(Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("failed on purpose")


def test_a_resumed_run_keeps_the_csv_rows_of_its_first_part(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="on purpose"):
        transferkit.train(str(tiny_dataset), model="resnet18", weights="none", image_size=32, epochs=3, quiet=True,
                          out=str(out), loggers=("csv",), callbacks=[_FailAtSecondEpoch()])  # fmt: skip
    assert _csv_epochs(out) == [(0, read_history(out / "history.csv")[0]["val_accuracy"])]
    result = transferkit.resume_training(out)
    assert _csv_epochs(out) == [(row["epoch"], row["val_accuracy"]) for row in result.history]


def _csv_epochs(run_dir: Path) -> list[tuple[int, float]]:
    """(epoch, val_accuracy) of each epoch's row in RUN/csv/metrics.csv."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["epoch"]), float(r["val_accuracy"])) for r in csv.DictReader(f) if r.get("val_accuracy")]
