"""Transfer strategies: which parameters train, at which learning rate, and when they unfreeze.

Everything is a statement about the backbone's layer groups (ordered input → head):

>>> from transferkit.backbones import load_backbone
>>> from transferkit.model import TransferModel
>>> model = TransferModel(load_backbone("resnet18", weights="none"), ["ant", "bee"])
>>> spec = StrategySpec("fine-tune", unfreeze=2, lr=1e-3, lr_decay=0.1)
>>> apply_strategy(model, spec)
['layer3', 'layer4', 'head']
>>> [(g["name"], g["lr"]) for g in param_groups(model, spec)]
[('layer3', 1e-05), ('layer4', 0.0001), ('head', 0.001)]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .backbones import group_of
from .errors import TransferkitError
from .model import TransferModel

STRATEGIES = ("feature-extract", "fine-tune", "full", "gradual", "linear-probe")
# Discriminative decay applied by default when pretrained layers train: each group further from the
# head learns 10x slower (seed 003 used head 1e-3, layer4 1e-4).
DEFAULT_LR_DECAY = {"feature-extract": 1.0, "fine-tune": 0.1, "gradual": 0.1, "full": 1.0, "linear-probe": 1.0}


@dataclass
class StrategySpec:
    name: str = "feature-extract"
    unfreeze: int | tuple[str, ...] | None = None
    lr: float = 1e-3
    lr_decay: float | None = None
    group_lrs: dict[str, float] = field(default_factory=dict)
    unfreeze_every: int = 1
    unfreeze_at: tuple[int, ...] = ()
    train_bn: bool = False
    aux_weight: float = 0.4

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise TransferkitError(f"unknown strategy {self.name!r}; choose one of: {', '.join(STRATEGIES)}")
        if isinstance(self.unfreeze, str):
            self.unfreeze = parse_unfreeze(self.unfreeze)
        if self.name == "fine-tune" and self.unfreeze is None:
            self.unfreeze = 1
        if isinstance(self.unfreeze, list):
            self.unfreeze = tuple(self.unfreeze)
        if isinstance(self.unfreeze, int) and self.unfreeze < 0:
            raise TransferkitError("--unfreeze N must be 0 or more")
        if self.name == "gradual" and isinstance(self.unfreeze, tuple):
            raise TransferkitError("--unfreeze with --strategy gradual takes a number: at most N groups, nearest the "
                                   "head first (names choose groups with --strategy fine-tune)")  # fmt: skip
        if self.name == "gradual" and self.unfreeze == 0:
            raise TransferkitError("--unfreeze 0 with --strategy gradual unfreezes nothing: use --strategy "
                                   "feature-extract, or leave --unfreeze out to unfreeze every group in "
                                   "turn")  # fmt: skip
        if self.unfreeze_every < 1:
            raise TransferkitError("--unfreeze-every must be at least 1")
        self.unfreeze_at = tuple(sorted(self.unfreeze_at))

    @property
    def decay(self) -> float:
        return DEFAULT_LR_DECAY[self.name] if self.lr_decay is None else self.lr_decay

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["unfreeze"] = list(self.unfreeze) if isinstance(self.unfreeze, tuple) else self.unfreeze
        d["unfreeze_at"] = list(self.unfreeze_at)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StrategySpec:
        d = dict(d)
        if isinstance(d.get("unfreeze"), list):
            d["unfreeze"] = tuple(d["unfreeze"])
        d["unfreeze_at"] = tuple(d.get("unfreeze_at", ()))
        return cls(**d)


def parse_unfreeze(text: str) -> int | tuple[str, ...]:
    """``"2"`` → the last 2 groups; ``"layer3,layer4"`` → those groups or module paths."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise TransferkitError("--unfreeze needs a number or comma-separated names, e.g. 2 or layer3,layer4")
    return names


def parse_group_lrs(text: str | dict[str, float]) -> dict[str, float]:
    """``"head=1e-3,layer4=1e-4"`` (or that dict, from Python) → {"head": 0.001, "layer4": 0.0001}."""
    items = text.items() if isinstance(text, dict) else (
        (name.strip(), value) for name, _, value in (s.strip().partition("=") for s in text.split(",") if s.strip()))
    out: dict[str, float] = {}
    for name, value in items:
        try:
            lr = out[name] = float(value)
        except (TypeError, ValueError):
            raise TransferkitError(f"bad --group-lr item '{name}={value}': use NAME=LR, e.g. layer4=1e-4") from None
        if not (lr > 0 and math.isfinite(lr)):  # a negative LR ascends the loss
            raise TransferkitError(f"bad --group-lr item '{name}={value}': an LR must be a positive number, "
                                   "e.g. layer4=1e-4")  # fmt: skip
    return out


def _body_groups(model: TransferModel) -> list[str]:
    return [g.name for g in model.groups if g.name != "head"]


def unfreeze_events(spec: StrategySpec, n_groups: int) -> list[int]:
    """Epochs at which gradual unfreezing adds one more group, nearest the head first."""
    limit = n_groups if not isinstance(spec.unfreeze, int) or spec.unfreeze == 0 else min(spec.unfreeze, n_groups)
    if spec.unfreeze_at:
        return list(spec.unfreeze_at[:limit])
    return [spec.unfreeze_every * (i + 1) for i in range(limit)]


def trainable_group_names(model: TransferModel, spec: StrategySpec, epoch: int = 0) -> list[str]:
    """Groups that train at ``epoch``, in input → head order (named modules are handled apart)."""
    body = _body_groups(model)
    if spec.name == "full":
        chosen = body
    elif spec.name in ("feature-extract", "linear-probe"):
        chosen = []
    elif spec.name == "gradual":
        n = sum(1 for e in unfreeze_events(spec, len(body)) if e <= epoch)
        chosen = body[len(body) - n :] if n else []
    elif isinstance(spec.unfreeze, int):
        chosen = body[max(0, len(body) - spec.unfreeze) :] if spec.unfreeze else []  # N past the groups: all
    else:
        chosen = [g for g in body if g in (spec.unfreeze or ())]
    return [*chosen, "head"]


def _named_module_prefixes(model: TransferModel, spec: StrategySpec) -> list[str]:
    """Names given to --unfreeze that are module paths rather than group names (validated)."""
    if spec.name != "fine-tune" or not isinstance(spec.unfreeze, tuple):
        return []
    group_names = {g.name for g in model.groups}
    module_paths = {name for name, _ in model.net.named_modules()}
    unknown = [n for n in spec.unfreeze if n not in group_names and n not in module_paths]
    if unknown:
        raise TransferkitError(
            f"--unfreeze names {', '.join(unknown)} are neither layer groups nor modules of {model.record.backbone}; "
            f"groups are: {', '.join(g.name for g in model.groups)}"
        )
    return [n for n in spec.unfreeze if n not in group_names]


def apply_strategy(model: TransferModel, spec: StrategySpec, epoch: int = 0) -> list[str]:
    """Set ``requires_grad`` for ``epoch`` of the schedule; returns the training group names."""
    groups = trainable_group_names(model, spec, epoch)
    chosen = set(groups)
    modules = _named_module_prefixes(model, spec)
    bn_params = _batchnorm_param_names(model.net) if spec.train_bn else set()
    for name, param in model.net.named_parameters():
        param.requires_grad = (
            group_of(name, model.groups) in chosen
            or any(name.startswith(m + ".") for m in modules)
            or name in bn_params
        )
    keep_mode = model.training
    model.train(keep_mode)  # re-applies the BatchNorm policy to the new frozen set
    return groups


def _batchnorm_param_names(net: nn.Module) -> set[str]:
    return {
        f"{path}.{pname}"
        for path, module in net.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for pname, _ in module.named_parameters(recurse=False)
    }


def group_lr(model: TransferModel, spec: StrategySpec, group: str) -> float:
    if group in spec.group_lrs:
        return spec.group_lrs[group]
    order = [g.name for g in model.groups]
    distance = len(order) - 1 - order.index(group)
    return float(f"{spec.lr * spec.decay**distance:.6g}")  # 1e-05, not 1.0000000000000003e-05


def param_groups(model: TransferModel, spec: StrategySpec) -> list[dict[str, Any]]:
    """Optimizer parameter groups, one per layer group that trains at any point of the schedule.

    Gradual unfreezing lists every group it will ever unfreeze from the start, frozen ones with no
    gradient (optimizers skip them), so the optimizer's groups never change and a checkpoint taken
    mid-schedule resumes cleanly (the failure of Lightning#6891).
    """
    unknown = set(spec.group_lrs) - {g.name for g in model.groups}
    if unknown:
        raise TransferkitError(
            f"--group-lr names unknown groups {', '.join(sorted(unknown))}; groups are: "
            f"{', '.join(g.name for g in model.groups)}"
        )
    if spec.name == "gradual":
        body = _body_groups(model)
        n = len(unfreeze_events(spec, len(body)))
        ever = set(body[len(body) - n :] if n else []) | {"head"}
    else:
        ever = None
    by_group: dict[str, list[nn.Parameter]] = {g.name: [] for g in model.groups}
    for name, param in model.net.named_parameters():
        group = group_of(name, model.groups)
        if param.requires_grad or (ever is not None and group in ever):
            by_group[group].append(param)  # type: ignore[index]
    idle = sorted(set(spec.group_lrs) - {g for g, params in by_group.items() if params})
    if idle:  # an LR for a group that never trains would change nothing
        raise TransferkitError(
            f"--group-lr names {', '.join(idle)}, which {spec.name} never trains here (it trains "
            f"{', '.join(g for g, params in by_group.items() if params)}); leave it out or unfreeze it (--unfreeze)"
        )
    return [
        {"name": g, "params": params, "lr": group_lr(model, spec, g)} for g, params in by_group.items() if params
    ]
