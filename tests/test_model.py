"""The model record: one description, written and read the same way by checkpoints and exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transferkit import ModelRecord, TransferkitError, TransferModel, load_backbone, load_checkpoint
from transferkit.backbones import get_module, resolve_weights
from transferkit.backbones.weights import FileWeights, NoWeights, PackageWeights, TimmHubWeights, TorchvisionWeights
from transferkit.checkpoint import save_checkpoint
from transferkit.heads import LinearProbe

DATA = Path(__file__).parent / "data"


def test_a_checkpoint_of_format_1_still_loads_and_predicts_the_same() -> None:
    """Written by transferkit before the model record existed (timm test_resnet, mlp head, fine-tuned)."""
    expected = json.loads((DATA / "checkpoint-format-1.json").read_text())
    model = load_checkpoint(DATA / "checkpoint-format-1.pt")
    assert model.class_names == expected["class_names"] and str(model.record.head) == "mlp:8"
    assert model.record.strategy is not None and model.record.strategy["name"] == "fine-tune"
    x = torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        probabilities = model(x).softmax(dim=1)
    assert torch.allclose(probabilities, torch.tensor(expected["probabilities"]), atol=1e-6)


def test_a_probe_reads_the_module_its_checkpoint_recorded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TransferModel(load_backbone("resnet18", weights="none"), ["cat", "dog"]).eval()
    probe = LinearProbe(torch.zeros(64), torch.ones(64), torch.randn(2, 64), torch.zeros(2))
    model.attach_probe(probe, "stem")
    save_checkpoint(model, tmp_path / "new.pt")
    # A checkpoint written before probe_module was saved: its probe was fitted on bn1's output.
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    del payload["probe_module"]
    torch.save(payload, tmp_path / "old.pt")
    x = torch.randn(2, 3, 32, 32)
    new, old = load_checkpoint(tmp_path / "new.pt"), load_checkpoint(tmp_path / "old.pt")
    assert (new.probe_module, old.probe_module) == ("relu", "bn1")
    with torch.no_grad():
        assert torch.allclose(new(x), model(x))
        assert torch.allclose(old(x), probe(model.net.bn1(model.net.conv1(x)).mean(dim=(2, 3))))


def test_the_record_round_trips_and_keeps_extras_apart() -> None:
    model = TransferModel(load_backbone("resnet18", weights="none"), ["cat", "dog", "owl"], "mlp:16")
    record = model.record.with_extra(strategy={"name": "full"}, inference_precision="auto", epoch=3)
    again = ModelRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    assert again.strategy == {"name": "full"} and again.extra == {"inference_precision": "auto", "epoch": 3}
    assert again.class_names == ("cat", "dog", "owl") and again.groups[-1].name == "head"


def test_a_transfer_model_leaves_its_backbone_as_it_was() -> None:
    backbone = load_backbone("resnet18", weights="none")
    imagenet_head = get_module(backbone.model, "fc")
    model = TransferModel(backbone, ["a", "b"])
    assert get_module(backbone.model, "fc") is imagenet_head and imagenet_head.out_features == 1000
    assert model.head_module.out_features == 2
    # The layers themselves are shared, not copied: no memory is spent on a second backbone.
    assert model.net.layer4 is backbone.model.layer4


def test_weights_are_resolved_once_into_a_typed_source(tmp_path: Path) -> None:
    assert resolve_weights("resnet18", "none") == NoWeights()
    assert isinstance(resolve_weights("resnet18", "IMAGENET1K_V1"), TorchvisionWeights)
    assert resolve_weights("timm/resnet10t", "DEFAULT") == TimmHubWeights("")
    assert isinstance(resolve_weights("efficientnet_lite0", "DEFAULT"), PackageWeights)
    assert resolve_weights("resnet18", str(tmp_path / "w.pth")) == FileWeights(tmp_path / "w.pth")


@pytest.mark.parametrize(("name", "size"), [("timm/vit_small_patch14_dinov2", 28), ("timm/deit_tiny_distilled_patch16_224", 32)])
def test_headless_and_distilled_timm_models_round_trip_through_a_checkpoint(name: str, size: int, tmp_path: Path) -> None:
    from transferkit import save_checkpoint

    torch.manual_seed(0)
    model = TransferModel(load_backbone(name, weights="none", model_kwargs={"img_size": size}), ["a", "b"], "mlp:8")
    save_checkpoint(model, tmp_path / "model.pt")
    again = load_checkpoint(tmp_path / "model.pt")
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again(x)) and again(x).shape == (3, 2)
    assert again.record.groups == model.record.groups and "blocks.0-2" in [g.name for g in again.groups]


@pytest.mark.parametrize(("name", "size"), [("timm/vit_small_patch14_dinov2", 28), ("vit_b_16", 32)])
def test_a_vit_is_built_for_the_image_size_asked_for(name: str, size: int, tmp_path: Path) -> None:
    """--image-size for a ViT (DINOv2 is built for 518 pixels) sizes its position embeddings, which the
    checkpoint rebuilds; before, the first forward failed on the size."""
    from transferkit import save_checkpoint
    from transferkit.backbones import explicit_preprocessing

    prep = explicit_preprocessing(name, image_size=size)
    model = TransferModel(load_backbone(name, weights="none", preprocessing=prep), ["a", "b"]).eval()
    x = torch.randn(2, 3, size, size)
    save_checkpoint(model, tmp_path / "model.pt")
    with torch.no_grad():
        assert torch.equal(model(x), load_checkpoint(tmp_path / "model.pt")(x))
    with pytest.raises(TransferkitError, match="--image-size 32: torchvision's vit_b_16 weights are for 224-pixel"):
        load_backbone("vit_b_16", "DEFAULT", preprocessing=explicit_preprocessing("vit_b_16", image_size=32))


@pytest.mark.parametrize("name", ["resnet18", "timm/vit_tiny_patch16_224"])
def test_a_checkpoint_loads_without_drawing_weights_it_replaces(name: str, tmp_path: Path) -> None:
    """The same outputs as the saved model, and torch's global RNG untouched: no random initialisation ran."""
    from transferkit import save_checkpoint

    model = TransferModel(load_backbone(name, weights="none"), ["a", "b", "c"]).eval()
    path = save_checkpoint(model, tmp_path / "model.pt")
    rng = torch.get_rng_state()
    loaded = load_checkpoint(path)
    if name == "resnet18":  # timm's ViT draws its position embeddings with its own trunc_normal_
        assert torch.equal(rng, torch.get_rng_state()), "loading drew random weights it then replaced"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert torch.nn.init.kaiming_uniform_.__name__ == "kaiming_uniform_"  # the initialisers are back


def test_an_image_size_the_architecture_cannot_run_is_a_one_line_error_at_load() -> None:
    from transferkit.backbones import explicit_preprocessing

    prep = explicit_preprocessing("maxvit_t", image_size=32)  # its 7x7 windows tile multiples of 224
    with pytest.raises(TransferkitError, match="--image-size 32: maxvit_t does not run on 32-pixel inputs "
                                               r"\(RuntimeError\); give its own size, 224"):  # fmt: skip
        load_backbone("maxvit_t", "none", preprocessing=prep)  # was a reshape error at the first batch


def test_a_run_without_a_model_yet_and_a_folder_that_is_no_run_are_told_apart(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")  # made, killed in its first epoch
    with pytest.raises(TransferkitError, match=r"run is a run with no model.pt yet \(in its first epoch, or stopped "
                                               r"there: start it again\)"):  # fmt: skip
        load_checkpoint(tmp_path / "run")
    with pytest.raises(TransferkitError, match=r"holds no model.pt; give a run directory written by transferkit train"):
        load_checkpoint(tmp_path)
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "selection.json").write_text("{}")  # a --strategy auto search stopped while measuring
    with pytest.raises(TransferkitError, match=r"search is a --strategy auto search that has not finished; continue "
                                               r"it with transferkit train --resume"):  # fmt: skip
        load_checkpoint(tmp_path / "search")
