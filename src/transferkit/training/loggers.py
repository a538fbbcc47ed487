"""Experiment loggers for ``train --logger``: Lightning's own, each writing somewhere that works offline.

- ``tensorboard``: ``RUN/tensorboard/``;
- ``csv``: ``RUN/csv/metrics.csv``;
- ``mlflow``: the store ``MLFLOW_TRACKING_URI`` names, else a SQLite database beside the run
  directories, ``RUNS/mlflow.db`` with artifacts in ``RUNS/mlartifacts/`` (``RUNS`` is the run
  directory's parent, ``runs/`` by default), so that a project's runs meet in one store:
  ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``. Not MLflow's ``file:`` store, which
  MLflow 3 has put in maintenance mode and refuses unless ``MLFLOW_ALLOW_FILE_STORE`` is set; SQLite
  is the local store it recommends. Experiment ``transferkit`` (or ``MLFLOW_EXPERIMENT_NAME``);
- ``wandb``: offline unless ``WANDB_API_KEY`` is set (or ``WANDB_MODE`` says otherwise), files in
  ``RUN/wandb/``; ``wandb sync RUN/wandb/offline-run-*`` uploads them later.

Each logger gets the run's configuration as hyperparameters and every epoch's metrics from
Lightning; after the final evaluation, :func:`log_run_files` adds the final metrics and the run's
``config.json``, ``metrics.json``, ``history.csv`` and report (HTML and figures) as artifacts
(MLflow, W&B; TensorBoard and CSV logs already sit in the run directory beside those files).
The MLflow and W&B run ids are kept in ``RUN/loggers.json``, so ``--resume`` continues the same runs.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TransferkitError
from ..files import write_json

LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "csv": None, "mlflow": "mlflow", "wandb": "wandb"}
IDS_NAME = "loggers.json"
MLFLOW_DB, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"
PROJECT = "transferkit"  # MLflow experiment and W&B project
RUN_FILES = ("config.json", "metrics.json", "history.csv", "report.html")


def check_loggers(names: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--logger`` values (repeated or comma-separated) checked and installed; ``()`` is the default."""
    if names is None:
        return ()
    listed = [n.strip().lower() for item in ([names] if isinstance(names, str) else names) for n in item.split(",")]
    chosen = tuple(dict.fromkeys(n for n in listed if n))
    if chosen == ("none",):
        return chosen
    for name in chosen:
        if name not in LOGGERS:
            raise TransferkitError(f"unknown --logger {name!r}; choose from: {', '.join(LOGGERS)} (several allowed), "
                                   "or none")  # fmt: skip
        package = PACKAGES[name]
        if package and not _installed(package):
            raise TransferkitError(f'--logger {name} needs the {package} package: pip install "transferkit[loggers]"'
                                   + (" wandb" if name == "wandb" else ""))  # fmt: skip
    if "mlflow" in chosen:
        _check_mlflow_store(os.environ.get("MLFLOW_TRACKING_URI"))
    return chosen


def _check_mlflow_store(uri: str | None) -> None:
    """MLflow 3 refuses a ``file:`` store (a plain path is one) unless ``MLFLOW_ALLOW_FILE_STORE`` is set:
    said before the run, not as MLflow's traceback once it has begun."""
    if not uri or os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true") or _mlflow_major() < 3:
        return
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):", uri)  # two letters or more: C:\mlruns is a path
    is_path = scheme is None and uri not in ("databricks", "databricks-uc")  # those name a workspace
    if is_path or (scheme is not None and scheme.group(1).lower() == "file"):
        raise TransferkitError(f"MLFLOW_TRACKING_URI={uri} is a file store, which MLflow 3 refuses: give "
                               f"sqlite:///PATH/mlflow.db (or a server's http:// address), or set "
                               f"MLFLOW_ALLOW_FILE_STORE=true")  # fmt: skip


def _mlflow_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    for package in ("mlflow", "mlflow-skinny"):
        try:
            return int(version(package).split(".")[0])
        except (PackageNotFoundError, ValueError):
            continue
    return 0


def build_loggers(names: Sequence[str], run_dir: Path, config: dict[str, Any], global_zero: bool = True) -> list[Any]:
    """Lightning loggers for ``names``; none unless asked for (history.csv and the report hold every epoch)."""
    if not names or tuple(names) == ("none",):
        return []
    ids_path = run_dir / IDS_NAME
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    loggers = [_MAKERS[name](run_dir, ids.get(name)) for name in names]
    if not global_zero:  # Lightning's loggers write from rank 0 only; the other ranks create no runs
        return loggers
    if not ids:  # a resumed run's configuration was logged when it started (MLflow refuses changed params)
        params = {k: v for k, v in config.items() if k != "resolved_from"}  # that one is in config.json
        for logger in loggers:
            logger.log_hyperparams(params)
    kept = {name: _run_id(logger) for name, logger in zip(names, loggers) if name in ("mlflow", "wandb")}
    if kept:
        write_json(ids_path, {**ids, **kept})
    return loggers


def log_run_files(loggers: Sequence[Any], run_dir: Path, metrics: dict[str, Any]) -> None:
    """The final metrics (numbers of ``metrics.json``) to every logger; the run's files to MLflow and W&B."""
    if not loggers:
        return
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final = {f"final/{k}": float(v) for k, v in numbers.items()}
    step = int(metrics.get("epochs_run") or 0)
    for logger in loggers:
        logger.log_metrics(final, step=step)
        logger.finalize("success")  # written out again (Lightning finalized them when training ended)
        kind = type(logger).__name__
        if kind == "MLFlowLogger":
            for name in RUN_FILES:
                if (run_dir / name).is_file():
                    logger.experiment.log_artifact(logger.run_id, str(run_dir / name))
            if (run_dir / "report").is_dir():
                logger.experiment.log_artifacts(logger.run_id, str(run_dir / "report"), "report")
        elif kind == "WandbLogger":
            _wandb_files(logger.experiment, run_dir)


# --------------------------------------------------------------------------- one maker per logger


def _tensorboard(run_dir: Path, _: Any) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(str(run_dir), name="tensorboard", version="")


def _csv(run_dir: Path, _: Any) -> Any:
    from lightning.pytorch.loggers import CSVLogger

    metrics = run_dir / "csv" / "metrics.csv"
    earlier = metrics.read_bytes() if metrics.is_file() else None
    logger = CSVLogger(str(run_dir), name="csv", version="")
    if earlier is not None:  # a resumed run: Lightning's writer deletes the file it finds, with the epochs before
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            writer = logger.experiment
        metrics.write_bytes(earlier)
        writer.metrics_keys = next(csv.reader(io.StringIO(earlier.decode())), [])  # appended under its header
    return logger


def _mlflow(run_dir: Path, run_id: str | None) -> Any:
    from lightning.pytorch.loggers import MLFlowLogger

    # Its one-time "Creating initial MLflow database tables..." lines would break --quiet.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    artifacts = None
    if not uri:
        root = run_dir.resolve().parent
        uri, artifacts = f"sqlite:///{root / MLFLOW_DB}", (root / MLFLOW_ARTIFACTS).as_uri()
    return MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT), run_name=run_dir.name,
                        tracking_uri=uri, artifact_location=artifacts, run_id=run_id,
                        tags={"transferkit.run_dir": str(run_dir.resolve())})  # fmt: skip


def _wandb(run_dir: Path, run_id: str | None) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    # Offline without a key: the run is kept under RUN/wandb and `wandb sync` uploads it later.
    offline = not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE")
    return WandbLogger(name=run_dir.name, project=os.environ.get("WANDB_PROJECT", PROJECT), save_dir=str(run_dir),
                       offline=offline, id=run_id, resume="allow" if run_id else None)  # fmt: skip


_MAKERS = {"tensorboard": _tensorboard, "csv": _csv, "mlflow": _mlflow, "wandb": _wandb}


def _run_id(logger: Any) -> str:
    return str(logger.run_id if type(logger).__name__ == "MLFlowLogger" else logger.experiment.id)


def _wandb_files(run: Any, run_dir: Path) -> None:
    import wandb

    artifact = wandb.Artifact(f"run-{run.id}", type="transferkit-run", description=f"transferkit run {run_dir.name}")
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            artifact.add_file(str(run_dir / name))
    if (run_dir / "report").is_dir():
        artifact.add_dir(str(run_dir / "report"), name="report")
    run.log_artifact(artifact)
    run.finish()  # the run is complete: its summary and files are written (offline: ready for wandb sync)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module set to None in sys.modules: as good as absent
        return False
