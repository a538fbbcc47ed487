"""One test over every torchvision classification family (random weights, small inputs).

For each strategy: the head is replaced for 3 classes, forward and backward run, exactly the
intended parameters receive gradients, and frozen BatchNorm statistics do not move.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from transferkit import StrategySpec, TransferModel, apply_strategy, load_backbone
from transferkit.backbones import group_of

# family representative → (input size, architecture kwargs that keep it small)
FAMILIES: dict[str, tuple[int, dict[str, Any]]] = {
    "resnet18": (64, {}),
    "resnext50_32x4d": (32, {}),
    "inception_v3": (299, {}),  # the auxiliary head needs 17x17 maps at Mixed_6e (a slow backward: see SLOW)
    "googlenet": (64, {}),
    "vgg11_bn": (32, {}),
    "alexnet": (64, {}),
    "densenet121": (32, {}),
    "squeezenet1_1": (64, {}),
    "mobilenet_v2": (32, {}),
    "mobilenet_v3_small": (32, {}),
    "efficientnet_b0": (32, {}),
    "efficientnet_v2_s": (32, {}),
    "mnasnet0_5": (32, {}),
    "shufflenet_v2_x0_5": (32, {}),
    "regnet_y_400mf": (32, {}),
    "convnext_tiny": (32, {}),
    "vit_b_16": (32, {"image_size": 32}),
    "swin_t": (64, {}),
    "maxvit_t": (224, {}),
    "efficientnet_lite0": (32, {}),
    # timm, through its own interface; random weights. Headless ones (num_classes=0: DINOv2, SigLIP,
    # EVA02) get a head where timm has an Identity; distilled ones (DeiT, LeViT) have two heads.
    "timm/vit_small_patch14_dinov2": (28, {"img_size": 28}),
    "timm/vit_base_patch16_siglip_224": (32, {"img_size": 32}),
    "timm/eva02_tiny_patch14_224.mim_in22k": (28, {"img_size": 28}),
    "timm/deit_tiny_distilled_patch16_224": (32, {"img_size": 32}),
    "timm/levit_128s": (224, {}),
    "timm/convnext_atto": (32, {}),
}

STRATEGIES = [
    StrategySpec("feature-extract"),
    StrategySpec("fine-tune", unfreeze=2),
    StrategySpec("gradual", unfreeze_every=1),  # at epoch 1: head + last group
    StrategySpec("full"),
]


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{buf}": getattr(m, buf).clone()
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in ("running_mean", "running_var")
    }


def _loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    if isinstance(out, tuple):
        return nn.functional.cross_entropy(out[0], y) + 0.4 * nn.functional.cross_entropy(out[1], y)
    return nn.functional.cross_entropy(out, y)


SLOW = {"inception_v3", "maxvit_t", "vgg11_bn", "timm/vit_base_patch16_siglip_224"}  # seconds each on 2 cores


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FAMILIES])
def test_family_strategies(name: str) -> None:
    size, kwargs = FAMILIES[name]
    torch.manual_seed(0)
    model = TransferModel(load_backbone(name, weights="none", model_kwargs=kwargs or None), ["a", "b", "c"])
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    for spec in STRATEGIES:
        epoch = 1 if spec.name == "gradual" else 0
        groups = apply_strategy(model, spec, epoch=epoch)
        expected_groups = {
            "feature-extract": [],
            "fine-tune": model.groups[-3:-1],
            "gradual": model.groups[-2:-1],
            "full": model.groups[:-1],
        }[spec.name]
        assert groups == [g.name for g in expected_groups] + ["head"], spec.name
        model.train()
        model.zero_grad(set_to_none=True)
        before = _bn_stats(model.net)
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        assert logits.shape == (2, 3)
        _loss(out, y).backward()

        for pname, p in model.net.named_parameters():
            in_training_group = group_of(pname, model.groups) in groups
            assert p.requires_grad == in_training_group, (spec.name, pname)
            if not in_training_group:
                assert p.grad is None, (spec.name, pname)
        head_grads = [p.grad for n, p in model.net.named_parameters() if group_of(n, model.groups) == "head"]
        assert all(g is not None and g.abs().sum() > 0 for g in head_grads), spec.name

        after = _bn_stats(model.net)
        for key, value in before.items():
            module_path = key.rsplit(".", 1)[0]
            frozen = group_of(module_path + ".weight", model.groups) not in groups
            if frozen:
                assert torch.equal(value, after[key]), (spec.name, key)
    # Evaluation returns plain logits, also for Inception.
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3)
