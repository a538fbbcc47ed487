"""New classification heads, and the model that carries one: :class:`TransferModel`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, LayerGroup, get_module, set_module
from .errors import TransferkitError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class HeadSpec:
    """``linear`` or an MLP: ``mlp:256`` is in→256→classes, ``mlp:512,256`` two hidden layers."""

    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    activation: str = "relu"

    @classmethod
    def parse(cls, text: str | HeadSpec, dropout: float | None = None, activation: str | None = None) -> HeadSpec:
        if isinstance(text, HeadSpec):
            return text
        kind, _, sizes = text.strip().lower().partition(":")
        if kind == "linear" and not sizes:
            hidden: tuple[int, ...] = ()
        elif kind == "mlp" and sizes:
            try:
                hidden = tuple(int(s) for s in sizes.split(","))
            except ValueError:
                raise TransferkitError(f"bad --head {text!r}: sizes must be integers, e.g. mlp:256 or mlp:512,256") from None
            if any(h <= 0 for h in hidden):
                raise TransferkitError(f"bad --head {text!r}: sizes must be positive")
        else:
            raise TransferkitError(f"bad --head {text!r}: use linear, mlp:256 or mlp:512,256")
        spec = cls(
            hidden=hidden,
            dropout=0.2 if dropout is None and hidden else (dropout or 0.0),
            activation=activation or "relu",
        )
        if spec.activation not in ACTIVATIONS:
            raise TransferkitError(f"bad head activation {spec.activation!r}: choose from {', '.join(ACTIVATIONS)}")
        return spec

    def __str__(self) -> str:
        return "linear" if not self.hidden else "mlp:" + ",".join(map(str, self.hidden))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadSpec:
        return cls(hidden=tuple(d["hidden"]), dropout=float(d["dropout"]), activation=d["activation"])

    def build(self, in_features: int, num_classes: int, conv: bool = False) -> nn.Module:
        """The head; ``conv`` builds 1×1 convolutions for SqueezeNet-style classifiers."""

        def layer(i: int, o: int) -> nn.Module:
            return nn.Conv2d(i, o, kernel_size=1) if conv else nn.Linear(i, o)

        if not self.hidden:
            return layer(in_features, num_classes)
        layers: list[nn.Module] = []
        width = in_features
        for h in self.hidden:
            layers += [layer(width, h), ACTIVATIONS[self.activation]()]
            if self.dropout:
                layers.append(nn.Dropout(self.dropout))
            width = h
        layers.append(layer(width, num_classes))
        return nn.Sequential(*layers)


@dataclass
class ModelInfo:
    """What must be known to rebuild a :class:`TransferModel` without its training script."""

    backbone: str
    weights: str
    model_kwargs: dict[str, Any]
    class_names: list[str]
    head: HeadSpec
    classifier_path: str
    extra_head_paths: tuple[str, ...]
    groups: list[LayerGroup]
    preprocessing: dict[str, Any]
    feature_dim: int
    extra: dict[str, Any] = field(default_factory=dict)


class TransferModel(nn.Module):
    """A pretrained network whose classifier (and Inception's auxiliary one) was replaced.

    In training mode an Inception v3 returns ``(logits, aux_logits)``; in eval mode, logits only.
    BatchNorm layers whose parameters are all frozen stay in inference mode whenever the model is
    put in training mode (see :meth:`train`).
    """

    def __init__(self, backbone: Backbone, class_names: list[str], head: HeadSpec | str = "linear") -> None:
        super().__init__()
        if len(class_names) < 2:
            raise TransferkitError(f"need at least 2 classes, got {len(class_names)}: {class_names}")
        head = HeadSpec.parse(head)
        self.net = backbone.model
        for path in backbone.head_paths:
            old = get_module(self.net, path)
            in_features = old.in_channels if isinstance(old, nn.Conv2d) else old.in_features
            set_module(self.net, path, head.build(in_features, len(class_names), conv=isinstance(old, nn.Conv2d)))
        if hasattr(self.net, "num_classes"):
            self.net.num_classes = len(class_names)
        self.info = ModelInfo(
            backbone=backbone.name,
            weights=backbone.weights,
            model_kwargs=backbone.model_kwargs,
            class_names=list(class_names),
            head=head,
            classifier_path=backbone.classifier_path,
            extra_head_paths=backbone.extra_head_paths,
            groups=backbone.groups,
            preprocessing=backbone.preprocessing.to_dict(),
            feature_dim=backbone.feature_dim,
        )
        self.probe: LinearProbe | None = None
        self.probe_layer: str | None = None
        self.folded_batchnorm = folded_batchnorm_paths(self.net) if backbone.weights != "none" else set()

    def attach_probe(self, probe: LinearProbe, layer: str | None) -> None:
        """Classify with a linear probe on ``layer``'s pooled features instead of the head."""
        self.probe, self.probe_layer = probe, layer

    def features(self, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        """Pooled features of ``layer`` (default: the head's input); the rest of the network is skipped."""
        with capture(self, layer) as out:
            try:
                self.net(x)
            except StopForward:
                pass
        return out["features"]

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def groups(self) -> list[LayerGroup]:
        return self.info.groups

    @property
    def head_module(self) -> nn.Module:
        return get_module(self.net, self.info.classifier_path)

    def forward(self, x: torch.Tensor) -> Any:
        if self.probe is not None:
            return self.probe(self.features(x, self.probe_layer))
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


class LinearProbe(nn.Module):
    """Standardise pooled features, then a linear classifier (fitted by scikit-learn)."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("scale", scale.float())
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> LinearProbe:
        return cls(state["mean"], state["scale"], state["linear.weight"], state["linear.bias"])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.scale)


# --------------------------------------------------------------------------- features of any layer


class StopForward(Exception):
    """Raised by a hook once the wanted layer has run: the rest of the network is skipped."""


def _pool(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:  # N, C, H, W feature maps → global average pool
        return t.float().mean(dim=(2, 3))
    if t.dim() == 3:  # N, tokens, C (transformers) → mean over tokens
        return t.float().mean(dim=1)
    return t.float().flatten(1)


def resolve_layer(model: TransferModel, layer: str | None) -> tuple[str, nn.Module, bool]:
    """(canonical name, module to hook, whether to capture its input) for ``layer``.

    None or ``"head"`` means the classifier's input (the pooled penultimate features); a layer
    group name means the output of that group's last module; anything else is a module path.
    """
    if layer in (None, "", "head"):
        return "head-input", model.head_module, True
    for group in model.groups:
        if group.name == layer and group.name != "head":
            path = _module_of_group(model, group.prefixes)
            return layer, get_module(model.net, path), False
    try:
        return layer, get_module(model.net, layer), False  # type: ignore[arg-type]
    except AttributeError:
        names = ", ".join(g.name for g in model.groups if g.name != "head")
        raise TransferkitError(f"--layer {layer!r} is neither a layer group ({names}) nor a module path") from None


def _module_of_group(model: TransferModel, prefixes: tuple[str, ...]) -> str:
    modules = {name for name, _ in model.net.named_modules()}
    parts = [p.split(".") for p in prefixes]
    common: list[str] = []
    for items in zip(*parts):
        if len(set(items)) > 1:
            break
        common.append(items[0])
    while common and ".".join(common) not in modules:
        common.pop()
    if common:
        return ".".join(common)
    last = prefixes[-1]
    return last if last in modules else last.rpartition(".")[0]


@contextmanager
def capture(model: TransferModel, layer: str | None) -> Iterator[dict[str, torch.Tensor]]:
    """While active, ``model(x)`` fills ``out["features"]`` with the pooled features of ``layer``."""
    _, module, want_input = resolve_layer(model, layer)
    out: dict[str, torch.Tensor] = {}

    def pre_hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        out["features"] = _pool(args[0])
        raise StopForward

    def hook(_m: nn.Module, _args: Any, output: torch.Tensor) -> None:
        out["features"] = _pool(output[0] if isinstance(output, tuple) else output)
        raise StopForward

    handle = module.register_forward_pre_hook(pre_hook) if want_input else module.register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()



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
