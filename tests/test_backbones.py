"""Backbones: names, weights sources, preprocessing and errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import requires_shared

from transferkit import TransferkitError, load_backbone
from transferkit.backbones import Preprocessing, group_of, list_backbones, read_state_dict

SMALL_HALF = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3)


def test_preprocessing_comes_from_the_weights_metadata() -> None:
    inception = load_backbone("inception_v3", weights="none").preprocessing
    assert (inception.image_size, inception.resize_size) == (299, 342)
    resnet = load_backbone("resnet18", weights="none").preprocessing
    assert resnet.image_size == 224 and resnet.mean == pytest.approx((0.485, 0.456, 0.406))
    lite = load_backbone("efficientnet_lite0", weights="none").preprocessing
    assert lite.mean == pytest.approx((127 / 255,) * 3) and lite.std == pytest.approx((128 / 255,) * 3)


def test_backbone_exposes_classifier_feature_dim_and_groups() -> None:
    bb = load_backbone("resnet18", weights="none")
    assert bb.classifier_path == "fc" and bb.feature_dim == 512
    assert bb.group_names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    # Every parameter belongs to exactly one group.
    assert all(group_of(n, bb.groups) is not None for n, _ in bb.model.named_parameters())
    inception = load_backbone("inception_v3", weights="none")
    assert inception.extra_head_paths == ("AuxLogits.fc",)
    assert inception.group_names[-4:] == ["Mixed_7a", "Mixed_7b", "Mixed_7c", "head"]


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(TransferkitError, match="resnet18"):
        load_backbone("resnet19", weights="none")


def test_unknown_weights_name_lists_the_choices() -> None:
    with pytest.raises(TransferkitError, match="IMAGENET1K_V1"):
        load_backbone("resnet18", weights="IMAGENET_V9")


def test_local_state_dict_file_loads_and_keeps_tensors(tmp_path: Path) -> None:
    source = load_backbone("resnet18", weights="none").model
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    prep = Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    bb = load_backbone("resnet18", weights=str(path), preprocessing=prep)
    assert torch.equal(bb.model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert bb.preprocessing.mean == (0.5, 0.5, 0.5)
    # A pathlib.Path, as a notebook passes one, is the same file (a config stores it as an absolute path).
    from transferkit.training import TrainConfig

    by_path = load_backbone("resnet18", weights=path, preprocessing=prep)
    assert torch.equal(by_path.model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert TrainConfig(data=str(tmp_path), weights=path).to_dict()["weights"] == str(path)


def test_a_googlenet_weights_file_is_built_as_torchvisions_own_weights_unless_its_normalisation_is_given(
    tmp_path: Path,
) -> None:
    """torchvision's Inception v3 and GoogLeNet weights expect inputs in [-1, 1], made by ``transform_input``
    of the ImageNet-normalised ones: a copy of them given as a file reads right with the usual preprocessing."""
    source = load_backbone("googlenet", weights="none").model
    path = tmp_path / "googlenet.pth"
    torch.save(source.state_dict(), path)
    usual = load_backbone("googlenet", weights=str(path))
    assert usual.model.transform_input and usual.model_kwargs["transform_input"]  # kept for the checkpoint
    resized = load_backbone("googlenet", weights=str(path),
                            preprocessing=usual.preprocessing.with_overrides(image_size=64))  # fmt: skip
    assert resized.model.transform_input  # a size alone does not change the normalisation
    own = Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert not load_backbone("googlenet", weights=str(path), preprocessing=own).model.transform_input
    # The same image through both: ImageNet-normalised with transform_input equals [-1, 1] without it.
    image = torch.rand(1, 3, 64, 64)
    imagenet = (image - torch.tensor(usual.preprocessing.mean).view(1, 3, 1, 1)) / torch.tensor(
        usual.preprocessing.std).view(1, 3, 1, 1)  # fmt: skip
    plain = load_backbone("googlenet", weights=str(path), preprocessing=own).model.eval()
    with torch.no_grad():
        assert torch.allclose(usual.model.eval()(imagenet), plain((image - 0.5) / 0.5), atol=1e-4)


def test_safetensors_file_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = load_backbone("mobilenet_v3_small", weights="none").model
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    bb = load_backbone("mobilenet_v3_small", weights=str(path), preprocessing=Preprocessing(224, 256, (0.5,) * 3, (0.5,) * 3))
    assert torch.equal(bb.model.features[3].block[0][0].weight, source.features[3].block[0][0].weight)


def test_weights_file_for_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(load_backbone("resnet18", weights="none").model.state_dict(), path)
    with pytest.raises(TransferkitError, match=r"does not fit mobilenet_v2.*--model"):
        load_backbone("mobilenet_v2", weights=str(path))


def test_weights_files_as_other_tools_save_them_load(tmp_path: Path) -> None:
    source = load_backbone("resnet18", weights="none").model
    weights = source.state_dict()
    saved = {  # a LightningModule with self.model and a class-weighted loss; transferkit's own last.ckpt
        "lightning.ckpt": {"state_dict": {**{f"model.{k}": v for k, v in weights.items()},
                                          "criterion.weight": torch.ones(5)}},  # fmt: skip
        "transferkit-last.ckpt": {"state_dict": {f"model.net.{k}": v for k, v in weights.items()}},
        # Saved before PyTorch 0.4.1 (as the widely shared ResNet files were): no BatchNorm step counters.
        "old.pth": {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")},
    }
    for name, content in saved.items():
        torch.save(content, tmp_path / name)
        loaded = load_backbone("resnet18", weights=str(tmp_path / name), preprocessing=SMALL_HALF).model
        assert torch.equal(loaded.layer4[1].conv2.weight, source.layer4[1].conv2.weight), name
    with pytest.raises(TransferkitError, match=r"--weights .* is a folder: give the weights file in it"):
        load_backbone("resnet18", weights=tmp_path)  # a Hugging Face snapshot's folder, say


def test_a_timm_vit_weights_file_loads_at_another_image_size(tmp_path: Path) -> None:
    """timm resamples a ViT's position embeddings to the patch grid of the size it builds the model for."""
    from timm.layers import resample_abs_pos_embed

    saved = load_backbone("timm/vit_tiny_patch16_224", weights="none").model.state_dict()
    torch.save(saved, tmp_path / "vit.pth")
    prep = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3)
    small = load_backbone("timm/vit_tiny_patch16_224", weights=str(tmp_path / "vit.pth"), preprocessing=prep).model
    assert torch.equal(small.pos_embed, resample_abs_pos_embed(saved["pos_embed"], [2, 2], num_prefix_tokens=1))
    assert torch.equal(small.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TransferkitError, match="does not exist"):
        load_backbone("resnet18", weights=str(tmp_path / "nope.pth"))


def test_pickled_code_in_weights_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(TransferkitError, match="not a safe state_dict"):
        read_state_dict(path)
    assert not marker.exists()


def test_hub_download_failure_names_the_ways_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An empty torch cache; the suite refuses every connection off the loopback (conftest._offline),
    # so the download fails here as on an offline machine, whatever this machine's network.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(TransferkitError, match=r"--weights FILE"):
        load_backbone("squeezenet1_1", weights="DEFAULT")


def test_list_backbones_filters_by_pattern() -> None:
    names = list_backbones("resnet*")
    assert "resnet18" in names and all(n.startswith("resnet") for n in names)
    assert "efficientnet_lite0" in list_backbones("efficientnet_lite*")


def test_timm_models_by_prefix() -> None:
    bb = load_backbone("timm/resnet10t", weights="none")
    assert bb.source == "timm" and bb.feature_dim == 512 and bb.group_names[-1] == "head"


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("vit_small_patch14_dinov2", "timm/vit_small_patch14_dinov2"),  # as timm.create_model takes it
        ("hf-hub:timm/vit_small_patch14_dinov2.lvd142m", "timm/vit_small_patch14_dinov2.lvd142m"),  # a model card's
        ("timm:resnet10t", "timm/resnet10t"),
    ],
)
def test_a_timm_model_named_as_timm_spells_it_is_answered_with_transferkits_spelling(given: str, meant: str) -> None:
    with pytest.raises(TransferkitError, match=re.escape(f"unknown model {given!r}; did you mean {meant}?")):
        load_backbone(given, weights="none")


def test_timm_weights_tags_bring_their_own_preprocessing_and_an_unknown_tag_lists_the_known() -> None:
    from transferkit.backbones import resolve_weights, source_for

    source = source_for("timm/resnet50")
    tagged = source.preprocessing("timm/resnet50", resolve_weights("timm/resnet50", "tv_in1k"))
    default = source.preprocessing("timm/resnet50", resolve_weights("timm/resnet50", "DEFAULT"))
    assert (tagged.resize_size, tagged.interpolation) == (256, "bilinear")  # torchvision's: crop 0.875
    assert (default.resize_size, default.interpolation) == (235, "bicubic")  # timm's a1_in1k: crop 0.95
    with pytest.raises(TransferkitError, match="no weights 'IMAGENET1K_V1' for timm/resnet18; its tags: .*tv_in1k"):
        resolve_weights("timm/resnet18", "IMAGENET1K_V1")


def test_shared_mobilenet_v2_file_loads_with_explicit_preprocessing() -> None:
    path = requires_shared("weights", "mobilenet_v2_imagenet.pth")
    prep = Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    bb = load_backbone("mobilenet_v2", weights=str(path), preprocessing=prep)
    assert bb.weights == str(path.resolve()) and bb.feature_dim == 1280
