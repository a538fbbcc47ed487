"""Pooled features of any layer: a group's output, a module's output, or the classifier's input."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from .backbones import LayerGroup, get_module
from .errors import TransferkitError


class HasLayers(Protocol):
    """What a layer is looked up in: a network, its groups and its classifier (a TransferModel)."""

    net: nn.Module

    @property
    def groups(self) -> list[LayerGroup]: ...

    @property
    def head_module(self) -> nn.Module: ...

    @property
    def head_path(self) -> str: ...


class StopForward(Exception):
    """Raised by a hook once the wanted layer has run: the rest of the network is skipped."""


def _pool(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:  # N, C, H, W feature maps → global average pool
        return t.float().mean(dim=(2, 3))
    if t.dim() == 3:  # N, tokens, C (transformers) → mean over tokens
        return t.float().mean(dim=1)
    return t.float().flatten(1)


# A group's output is taken after the activations that follow its last module in the same parent
# (ResNet's stem is conv1, bn1 then relu): its features, not its last normalisation's before them.
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish)


def resolve_layer(model: HasLayers, layer: str | None, legacy: bool = False) -> tuple[str, nn.Module, bool]:
    """(canonical name, module to hook, whether to capture its input) for ``layer``.

    None or ``"head"`` means the classifier's input (the pooled penultimate features); a layer
    group name means the output of that group (see :func:`layer_path`); anything else is a module path.
    """
    name, path, want_input = layer_path(model, layer, legacy)
    return name, get_module(model.net, path), want_input


def layer_path(model: HasLayers, layer: str | None, legacy: bool = False) -> tuple[str, str, bool]:
    """(canonical name, path of the module to hook, whether to capture its input) for ``layer``.

    ``legacy``: a group's module as checkpoints written before ``probe_module`` was saved hooked it
    (its last module before any activation, and bare parameters counted as modules).
    """
    if layer in (None, "", "head", "head-input"):
        return "head-input", model.head_path, True
    for group in model.groups:
        if group.name == layer and group.name != "head":
            return layer, _module_of_group(model, group.prefixes, legacy), False
    try:
        get_module(model.net, layer)  # type: ignore[arg-type]
    except AttributeError:
        names = ", ".join(g.name for g in model.groups if g.name != "head")
        raise TransferkitError(f"--layer {layer!r} is neither a layer group ({names}) nor a module path") from None
    return layer, layer, False  # type: ignore[return-value]


def _module_of_group(model: HasLayers, prefixes: tuple[str, ...], legacy: bool = False) -> str:
    """The module whose output is the group's output: their common module, or the group's last block."""
    modules = dict(model.net.named_modules())
    if not legacy:  # bare parameters (ViT's class token and position embedding) are no module's output
        prefixes = tuple(p for p in prefixes if p in modules) or prefixes
    parts = [p.split(".") for p in prefixes]
    common: list[str] = []
    for items in zip(*parts):
        if len(set(items)) > 1:
            break
        common.append(items[0])
    while common and ".".join(common) not in modules:
        common.pop()
    if common and isinstance(modules[".".join(common)], (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        # Several blocks of one container (a transformer stage, MobileNet's features.3-5): the group ends at
        # its last block (a list never runs itself; a Sequential would run on past the group).
        end = ".".join(parts[-1][: len(common) + 1])
    elif common:
        end = ".".join(common)
    else:
        last = prefixes[-1]
        end = last if last in modules else last.rpartition(".")[0]
    return end if legacy else _after_activations(model.net, end)


def _after_activations(net: nn.Module, path: str) -> str:
    parent_path, _, leaf = path.rpartition(".")
    siblings = list(get_module(net, parent_path).named_children())
    names = [name for name, _ in siblings]
    if leaf in names:
        for name, module in siblings[names.index(leaf) + 1 :]:
            if not isinstance(module, _ACTIVATIONS):
                break
            leaf = name
    return f"{parent_path}.{leaf}" if parent_path else leaf


@contextmanager
def capture(
    model: HasLayers, layer: str | None, stop: bool = True, module_path: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """While active, ``model(x)`` fills ``out["features"]`` with the pooled features of ``layer`` (or of
    the module at ``module_path``: a probe's, as its checkpoint recorded it), and stops there (raises
    :class:`StopForward`) unless not ``stop``."""
    if module_path:
        module, want_input = get_module(model.net, module_path), False
    else:
        _, module, want_input = resolve_layer(model, layer)
    out: dict[str, torch.Tensor] = {}

    def pre_hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        out["features"] = _pool(args[0])
        if stop:
            raise StopForward

    def hook(_m: nn.Module, _args: Any, output: torch.Tensor) -> None:
        out["features"] = _pool(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise StopForward

    handle = module.register_forward_pre_hook(pre_hook) if want_input else module.register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()
