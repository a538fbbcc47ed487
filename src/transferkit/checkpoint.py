"""Self-contained, safe checkpoints.

A checkpoint is ``{"format", "metadata" (JSON text), "state_dict"}``: only strings and tensors, so
``torch.load(weights_only=True)`` reads it and no user code is pickled. The state_dict is the plain
network's (no wrapper prefix), so the file is also a valid ``--weights`` file for a new run.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import TransferkitError
from .files import atomic_write
from .heads import LinearProbe
from .model import ModelRecord, TransferModel
from .runs import CHECKPOINT_NAME, SEARCH_PROGRESS

FORMAT = "transferkit-checkpoint/1"


def save_checkpoint(
    model: TransferModel, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **extra: Any
) -> Path:
    """Write ``model`` atomically; ``extra`` (JSON-able) joins the metadata.

    ``state_dict``: the network's weights when they are not all in ``model`` (gathered from FSDP shards).
    """
    metadata = model.record.with_extra(**extra).to_dict()
    weights = model.net.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}
    payload: dict[str, Any] = {"format": FORMAT, "metadata": json.dumps(metadata), "state_dict": state}
    if model.probe is not None:
        payload["probe"] = {k: v.detach().cpu().clone() for k, v in model.probe.state_dict().items()}
        payload["probe_layer"] = model.probe_layer or ""
        payload["probe_module"] = model.probe_module or ""
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))
    return Path(path)


@contextlib.contextmanager
def _initialisers_skipped() -> Iterator[None]:
    """``torch.nn.init``'s initialisers do nothing meanwhile: a model built to be loaded skips drawing random
    weights it would throw away (0.1 s for a ResNet-18, 0.7 s for a ViT-B; transformers' ``no_init_weights``
    does the same). Constructors' other tensors (buffers, running statistics) are made as usual."""
    initialisers = {name: f for name, f in vars(torch.nn.init).items()
                    if name.endswith("_") and not name.startswith("_") and callable(f)}  # fmt: skip
    with _lock:
        try:
            for name in initialisers:
                setattr(torch.nn.init, name, _left_as_is)
            yield
        finally:
            for name, f in initialisers.items():
                setattr(torch.nn.init, name, f)


def _left_as_is(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


_lock = threading.Lock()  # one model built at a time while the initialisers are swapped


def resolve_checkpoint_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CHECKPOINT_NAME
        if not p.is_file():
            from .folds import fold_dirs

            folds = fold_dirs(p.parent)
            if folds:  # what predict, evaluate and serve take whole, as an ensemble
                raise TransferkitError(f"{p.parent} is a k-fold run (an ensemble of {len(folds)} models, no "
                                       f"{CHECKPOINT_NAME} of its own); give one of its folds, "
                                       f"e.g. {folds[0]}")  # fmt: skip
            if (p.parent / SEARCH_PROGRESS).is_file() and not (p.parent / "config.json").is_file():
                raise TransferkitError(f"{p.parent} is a --strategy auto search that has not finished; continue it "
                                       f"with transferkit train --resume {p.parent}")  # fmt: skip
            if (p.parent / "config.json").is_file():  # a run made, with no model yet
                raise TransferkitError(f"{p.parent} is a run with no {CHECKPOINT_NAME} yet (in its first epoch, or "
                                       f"stopped there: start it again); give a run that has trained")  # fmt: skip
            raise TransferkitError(f"{p.parent} holds no {CHECKPOINT_NAME}; give a run directory written by "
                                   f"transferkit train, or its {CHECKPOINT_NAME}")  # fmt: skip
    elif not p.is_file():
        raise TransferkitError(f"{p} does not exist; give a run directory or its {CHECKPOINT_NAME}")
    return p


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, state_dict) of a checkpoint, refusing anything that would need unpickling code.

    A linear probe's tensors come back in the metadata under ``"_probe"`` (with ``"_probe_layer"``, and
    ``"_probe_module"`` where the checkpoint recorded the module the probe reads).
    """
    p = resolve_checkpoint_path(path)
    if not zipfile.is_zipfile(p):  # every torch.save since 1.6 writes a zip archive
        raise TransferkitError(f"{p} is not a transferkit checkpoint; give a run directory or its {CHECKPOINT_NAME}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # bytes no pickle writes: a damaged file, not one naming code
            found = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            raise TransferkitError(f"{p} is damaged ({found.group(1).strip() if found else 'its pickle does not read'})"
                                   "; train the run again or restore the file") from None  # fmt: skip
        raise TransferkitError(
            f"refused to load {p}: it holds pickled code, which a transferkit checkpoint never does; "
            "only load files you trust, with torch.load(weights_only=False) outside transferkit"
        ) from None
    except Exception as exc:
        raise TransferkitError(f"{p} is not a transferkit checkpoint ({type(exc).__name__}); give a run directory") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TransferkitError(f"{p} is not a transferkit checkpoint (no '{FORMAT}' marker); give a run directory")
    meta = json.loads(payload["metadata"])
    if "probe" in payload:
        meta["_probe"], meta["_probe_layer"] = payload["probe"], payload.get("probe_layer") or None
        meta["_probe_module"] = payload.get("probe_module")
    return meta, payload["state_dict"]


def read_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata alone; its tensors are memory-mapped, not read."""
    p = resolve_checkpoint_path(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        return json.loads(payload["metadata"])
    except Exception:  # not a plain zip checkpoint: the full reader gives the precise error
        return read_checkpoint(p)[0]


def load_checkpoint(path: str | Path, class_names: list[str] | None = None) -> TransferModel:
    """Rebuild a trained model in any process, from the checkpoint alone (eval mode).

    ``class_names``, when given, must be the checkpoint's: another class count is an error that
    says so, not a state_dict shape trace.
    """
    meta, state = read_checkpoint(path)
    if class_names is not None and list(class_names) != list(meta["class_names"]):
        raise TransferkitError(
            f"checkpoint {path} was trained on {len(meta['class_names'])} classes "
            f"({', '.join(meta['class_names'])}), not on {len(class_names)} ({', '.join(class_names)})"
        )
    probe, probe_layer = meta.pop("_probe", None), meta.pop("_probe_layer", None)
    probe_module = meta.pop("_probe_module", None)
    with _initialisers_skipped():  # every weight is replaced from the state_dict below (a missing one is an error)
        model = TransferModel.from_record(ModelRecord.from_dict(meta))
    if probe is not None:
        # A checkpoint without "probe_module" reads its layer where versions before it hooked groups.
        model.attach_probe(LinearProbe.from_state_dict(probe), probe_layer, probe_module or None,
                           legacy=probe_module is None)  # fmt: skip
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TransferkitError(
            f"checkpoint {path} does not match its own architecture {meta['backbone']} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors); the file is damaged"
        )
    model.find_folded_batchnorm()  # in the weights loaded, not in the architecture's fresh statistics
    return model.eval()
