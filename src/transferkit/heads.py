"""New classification heads: a linear layer or an MLP (:class:`HeadSpec`), and fitted linear probes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

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
        if dropout is not None and not 0 <= dropout < 1:
            raise TransferkitError(f"--head-dropout {dropout:g} is not a probability in [0, 1); e.g. 0.2 drops 20 %")
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
