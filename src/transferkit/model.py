"""The model: one description of it (:class:`ModelRecord`) and the network with its new head (:class:`TransferModel`).

The record is what a checkpoint's metadata, an export's sidecar and a report read and write; it
is built from a :class:`~transferkit.backbones.Backbone` once (:meth:`ModelRecord.of`) and turned
back into a network once (:meth:`TransferModel.from_record`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, LayerGroup, Preprocessing, build_architecture, get_module
from .errors import TransferkitError
from .heads import HeadSpec, LinearProbe
from .layers import StopForward, capture, layer_path

# The keys a checkpoint's metadata holds for the record; anything else in it is an extra.
_RECORD_KEYS = ("backbone", "weights", "model_kwargs", "class_names", "head", "classifier_path", "extra_head_paths",
                "groups", "preprocessing", "feature_dim", "strategy")  # fmt: skip


@dataclass(frozen=True)
class ModelRecord:
    """What must be known to rebuild and use a :class:`TransferModel` without its training script."""

    backbone: str
    weights: str
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    head: HeadSpec
    classifier_path: str
    groups: tuple[LayerGroup, ...]
    feature_dim: int
    extra_head_paths: tuple[str, ...] = ()
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    strategy: dict[str, Any] | None = None  # StrategySpec.to_dict() of the run that trained it
    # What the run adds: inference_precision, train_config, epoch, linear_probe, advice, ... (JSON values)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, backbone: Backbone, class_names: list[str] | tuple[str, ...], head: HeadSpec) -> ModelRecord:
        return cls(
            backbone=backbone.name,
            weights=backbone.weights,
            class_names=tuple(class_names),
            preprocessing=backbone.preprocessing,
            head=head,
            classifier_path=backbone.classifier_path,
            groups=tuple(backbone.groups),
            feature_dim=backbone.feature_dim,
            extra_head_paths=tuple(backbone.extra_head_paths),
            model_kwargs=dict(backbone.model_kwargs),
        )

    @property
    def head_paths(self) -> tuple[str, ...]:
        return (self.classifier_path, *self.extra_head_paths)

    def is_head_key(self, name: str) -> bool:
        """Whether ``name`` (a key of the network's state_dict) belongs to a head."""
        return any(name.startswith(p + ".") for p in self.head_paths)

    def with_extra(self, **extra: Any) -> ModelRecord:
        """A copy with ``extra`` merged in (``strategy`` fills its own field)."""
        strategy = extra.pop("strategy", self.strategy)
        return dataclasses.replace(self, strategy=strategy, extra={**self.extra, **extra})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able and flat: the layout of checkpoint format 1, extras beside the record's keys."""
        record = {
            "backbone": self.backbone,
            "weights": self.weights,
            "model_kwargs": self.model_kwargs,
            "class_names": list(self.class_names),
            "head": self.head.to_dict(),
            "classifier_path": self.classifier_path,
            "extra_head_paths": list(self.extra_head_paths),
            "groups": [[g.name, list(g.prefixes)] for g in self.groups],
            "preprocessing": self.preprocessing.to_dict(),
            "feature_dim": self.feature_dim,
        }
        if self.strategy is not None:
            record["strategy"] = self.strategy
        return {**self.extra, **record}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecord:
        try:
            return cls(
                backbone=d["backbone"],
                weights=d["weights"],
                class_names=tuple(d["class_names"]),
                preprocessing=Preprocessing.from_dict(d["preprocessing"]),
                head=HeadSpec.from_dict(d["head"]),
                classifier_path=d["classifier_path"],
                groups=tuple(LayerGroup(name, tuple(prefixes)) for name, prefixes in d["groups"]),
                feature_dim=int(d["feature_dim"]),
                extra_head_paths=tuple(d.get("extra_head_paths", ())),
                model_kwargs=dict(d.get("model_kwargs") or {}),
                strategy=d.get("strategy"),
                extra={k: v for k, v in d.items() if k not in _RECORD_KEYS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferkitError(f"model metadata is incomplete ({type(exc).__name__}: {exc}); the file is damaged") from None


class TransferModel(nn.Module):
    """A pretrained network whose classifier (and Inception's auxiliary one) was replaced.

    In training mode an Inception v3 returns ``(logits, aux_logits)``; in eval mode, logits only.
    BatchNorm layers whose parameters are all frozen stay in inference mode whenever the model is
    put in training mode (see :meth:`train`). The backbone given is not changed: the new network
    shares its layers (and so its weights) but has its own head.
    """

    def __init__(self, backbone: Backbone, class_names: list[str] | tuple[str, ...], head: HeadSpec | str = "linear") -> None:
        super().__init__()
        if len(class_names) < 2:
            raise TransferkitError(f"need at least 2 classes, got {len(class_names)}: {list(class_names)}")
        spec = HeadSpec.parse(head)
        self.net = _with_new_heads(backbone.model, backbone.head_paths, spec, len(class_names), backbone.feature_dim)
        self.record = ModelRecord.of(backbone, class_names, spec)
        self.probe: LinearProbe | None = None
        self.probe_layer: str | None = None
        self.probe_module: str | None = None  # the module the probe reads (None: the head's input)
        self.folded_batchnorm: set[str] = set()
        self.find_folded_batchnorm()

    @classmethod
    def from_record(cls, record: ModelRecord) -> TransferModel:
        """The architecture with its new head and random weights: what a checkpoint's state_dict is loaded into."""
        backbone = Backbone(
            name=record.backbone,
            model=build_architecture(record.backbone, record.model_kwargs),
            classifier_path=record.classifier_path,
            feature_dim=record.feature_dim,
            groups=list(record.groups),
            preprocessing=record.preprocessing,
            weights=record.weights,
            model_kwargs=record.model_kwargs,
            extra_head_paths=record.extra_head_paths,
        )
        model = cls(backbone, record.class_names, record.head)
        model.record = record
        return model

    def find_folded_batchnorm(self) -> None:
        """Which BatchNorms keep inference mode in training (see :func:`folded_batchnorm_paths`): none
        for random weights, whose fresh statistics are the identity too."""
        self.folded_batchnorm = folded_batchnorm_paths(self.net) if self.record.weights != "none" else set()

    def attach_probe(self, probe: LinearProbe, layer: str | None, module_path: str | None = None,
                     legacy: bool = False) -> None:  # fmt: skip
        """Classify with a linear probe on ``layer``'s pooled features instead of the head.

        ``module_path``: the module it reads, as its checkpoint recorded it; else ``layer``'s, found as
        this version finds it (or, ``legacy``, as versions that did not record it did)."""
        _, path, head_input = layer_path(self, layer, legacy)
        self.probe, self.probe_layer = probe, layer
        self.probe_module = None if head_input else module_path or path

    def features(self, x: torch.Tensor, layer: str | None = None, module_path: str | None = None) -> torch.Tensor:
        """Pooled features of ``layer`` (default: the head's input), or of the module at ``module_path``;
        the rest of the network is skipped.

        While torch.export traces it (an export of a linear probe), the network runs to its end instead:
        an exception cannot be traced, and the exporters remove the layers whose outputs go unused."""
        with capture(self, layer, stop=not torch.compiler.is_exporting(), module_path=module_path) as out:
            try:
                self.net(x)
            except StopForward:
                pass
        return out["features"]

    @property
    def class_names(self) -> list[str]:
        return list(self.record.class_names)

    @property
    def groups(self) -> list[LayerGroup]:
        return list(self.record.groups)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.record.preprocessing

    @property
    def head_module(self) -> nn.Module:
        return get_module(self.net, self.head_path)

    @property
    def head_path(self) -> str:
        return self.record.classifier_path

    @property
    def multi_label(self) -> bool:
        """One yes/no output per class (sigmoid), not one class among all (softmax)."""
        return bool(self.record.extra.get("multi_label"))

    @property
    def thresholds(self) -> list[float]:
        """Multi-label: each class's decision threshold on its probability (tuned on validation; 0.5 before)."""
        return list(self.record.extra.get("thresholds") or [0.5] * len(self.class_names))

    @property
    def temperature(self) -> float:
        """The calibration temperature fitted after training (calibration.py); 1 when there is none."""
        return float(self.record.extra.get("temperature") or 1.0)

    def probabilities(self, logits: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Class probabilities from this model's logits: softmax (of logits / T when calibrated), or a
        sigmoid per class for multi-label."""
        if self.multi_label:
            return logits.float().sigmoid()
        t = self.temperature if calibrated else 1.0
        return (logits.float() / t).softmax(dim=1) if t != 1.0 else logits.float().softmax(dim=1)

    def forward(self, x: torch.Tensor) -> Any:
        if self.probe is not None:
            return self.probe(self.features(x, self.probe_layer, self.probe_module))
        out = self.net(x)
        if isinstance(out, tuple) and hasattr(out, "logits"):  # torchvision's InceptionOutputs
            return (out.logits, out.aux_logits) if self.training else out.logits
        return out

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if mode:
            keep_frozen_batchnorm_in_eval(self.net, self.folded_batchnorm)
        return self

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total


def _with_new_heads(
    net: nn.Module, paths: tuple[str, ...], head: HeadSpec, num_classes: int, feature_dim: int
) -> nn.Module:
    """``net`` with a new head at each path, leaving ``net`` itself untouched.

    Only the modules on the way from the root to each head are copied (shallowly); every other
    layer, with its weights, is shared, so this costs no memory.
    """
    root = _shallow_copy(net)
    for path in paths:
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            child = _shallow_copy(parent._modules[name])
            parent._modules[name] = child
            parent = child
        old = parent._modules[leaf]
        conv = isinstance(old, nn.Conv2d)
        # A headless backbone's classifier is an Identity: its input is the backbone's feature width.
        width = old.in_channels if conv else old.in_features if isinstance(old, nn.Linear) else feature_dim
        parent._modules[leaf] = head.build(width, num_classes, conv=conv)
    if hasattr(root, "num_classes"):
        root.num_classes = num_classes
    return root


def _shallow_copy(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # type: ignore[assignment]  # its own children table, same children
    return clone


def keep_frozen_batchnorm_in_eval(net: nn.Module, always: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    # A BatchNorm in train mode normalises with the batch's statistics and updates its running
    # ones even when its affine parameters are frozen; frozen means inference mode here.
    for path, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if path in always or (params and not any(p.requires_grad for p in params)):
                module.eval()


def folded_batchnorm_paths(net: nn.Module) -> set[str]:
    """BatchNorms of pretrained weights whose running statistics are exactly the identity.

    Exporters that fold BatchNorm into the preceding convolution (TFLite, quantised models; the
    offline mobilenet_v2 file) leave such layers behind, with the fold in their bias. Normalising
    them with batch statistics would subtract the real mean that the bias already accounts for and
    zero most activations, so they always run in inference mode; their scale and bias still train.
    """
    return {
        path
        for path, m in net.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.running_mean is not None
        and bool(torch.all(m.running_mean == 0))
        # var = 1, or 1 - eps so that sqrt(var + eps) is exactly 1
        and bool(torch.all((m.running_var == 1) | ((m.running_var + m.eps - 1).abs() < 1e-6)))
    }
