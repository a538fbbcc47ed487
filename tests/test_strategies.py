"""Strategies: learning-rate groups, gradual unfreezing and its resume, BatchNorm policy, Inception aux loss."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from transferkit import StrategySpec, TransferkitError, TransferModel, apply_strategy, load_backbone, param_groups
from transferkit.checkpoint import load_checkpoint, save_checkpoint
from transferkit.heads import HeadSpec
from transferkit.strategies import trainable_group_names, unfreeze_events
from transferkit.training import GradualUnfreezing, TrainConfig, TransferLearner


@pytest.fixture
def resnet() -> TransferModel:
    torch.manual_seed(0)
    return TransferModel(load_backbone("resnet18", weights="none"), ["a", "b", "c"])


def test_discriminative_lrs_decay_away_from_the_head(resnet: TransferModel) -> None:
    spec = StrategySpec("fine-tune", unfreeze=3, lr=1e-3, lr_decay=0.5)
    apply_strategy(resnet, spec)
    lrs = {g["name"]: g["lr"] for g in param_groups(resnet, spec)}
    assert lrs == {"layer2": 1.25e-4, "layer3": 2.5e-4, "layer4": 5e-4, "head": 1e-3}


def test_explicit_group_lrs_as_in_seed_003(resnet: TransferModel) -> None:
    spec = StrategySpec("fine-tune", unfreeze=("layer3", "layer4"), lr=1e-3,
                        group_lrs={"layer4": 1e-4, "layer3": 5e-5})  # fmt: skip
    apply_strategy(resnet, spec)
    lrs = {g["name"]: g["lr"] for g in param_groups(resnet, spec)}
    assert lrs == {"layer3": 5e-5, "layer4": 1e-4, "head": 1e-3}


def test_gradual_unfreeze_is_a_count_of_at_least_one() -> None:
    with pytest.raises(TransferkitError, match="--unfreeze with --strategy gradual takes a number"):
        StrategySpec("gradual", unfreeze=("layer4",))  # it unfroze layer4, then layer3, ... regardless
    with pytest.raises(TransferkitError, match="--unfreeze 0 with --strategy gradual unfreezes nothing"):
        StrategySpec("gradual", unfreeze=0)  # it unfroze every group


def test_an_lr_for_a_group_that_never_trains_is_an_error(resnet: TransferModel) -> None:
    for spec in (StrategySpec("gradual", unfreeze=2, group_lrs={"layer2": 1e-4}),
                 StrategySpec("feature-extract", group_lrs={"layer4": 1e-4})):  # fmt: skip
        apply_strategy(resnet, spec)
        with pytest.raises(TransferkitError, match=f"--group-lr names {next(iter(spec.group_lrs))}, which "):
            param_groups(resnet, spec)
    spec = StrategySpec("gradual", unfreeze=2, group_lrs={"layer3": 1e-4})  # frozen at first, trains later
    apply_strategy(resnet, spec)
    assert {g["name"]: g["lr"] for g in param_groups(resnet, spec)}["layer3"] == 1e-4


def test_unfreezing_more_groups_than_there_are_unfreezes_them_all(resnet: TransferModel) -> None:
    every = trainable_group_names(resnet, StrategySpec("full"))  # stem, layer1-4 and the head
    assert trainable_group_names(resnet, StrategySpec("fine-tune", unfreeze=5)) == every
    for n in (6, 9):  # past the groups: all of them, not a slice wrapped round to the last few
        assert trainable_group_names(resnet, StrategySpec("fine-tune", unfreeze=n)) == every


def test_head_dropout_is_a_probability_for_an_mlp_head() -> None:
    with pytest.raises(TransferkitError, match="--head-dropout 20 is not a probability"):
        TrainConfig(data=".", head="mlp:16", head_dropout=20)
    with pytest.raises(TransferkitError, match="--head-dropout applies to an MLP head"):
        TrainConfig(data=".", head="linear", head_dropout=0.5)
    assert TrainConfig(data=".", head="mlp:16", head_dropout=0.5).head_dropout == 0.5


def test_unknown_group_lr_is_an_error(resnet: TransferModel) -> None:
    spec = StrategySpec("fine-tune", unfreeze=1, group_lrs={"layer9": 1e-4})
    apply_strategy(resnet, spec)
    with pytest.raises(TransferkitError, match="layer9"):
        param_groups(resnet, spec)


def test_unfreeze_named_modules_inside_groups(resnet: TransferModel) -> None:
    spec = StrategySpec("fine-tune", unfreeze=("layer4.1",))
    apply_strategy(resnet, spec)
    trainable = {n for n, p in resnet.net.named_parameters() if p.requires_grad}
    assert any(n.startswith("layer4.1.") for n in trainable)
    assert not any(n.startswith("layer4.0.") for n in trainable)
    with pytest.raises(TransferkitError, match="neither layer groups nor modules"):
        apply_strategy(resnet, StrategySpec("fine-tune", unfreeze=("Mixed_7c",)))


def test_inception_unfreeze_mixed_7c_and_auxlogits() -> None:
    model = TransferModel(load_backbone("inception_v3", weights="none"), ["a", "b"])
    groups = apply_strategy(model, StrategySpec("fine-tune", unfreeze=("Mixed_7c", "AuxLogits")))
    assert groups == ["AuxLogits", "Mixed_7c", "head"]
    assert model.net.AuxLogits.conv0.conv.weight.requires_grad and model.net.AuxLogits.fc.weight.requires_grad
    assert not model.net.Mixed_7b.branch1x1.conv.weight.requires_grad


def test_gradual_schedule_every_k_and_at_epochs(resnet: TransferModel) -> None:
    spec = StrategySpec("gradual", unfreeze_every=2, unfreeze=3)
    assert unfreeze_events(spec, 5) == [2, 4, 6]
    assert [trainable_group_names(resnet, spec, e) for e in (0, 1, 2, 4, 9)] == [
        ["head"], ["head"], ["layer4", "head"], ["layer3", "layer4", "head"], ["layer2", "layer3", "layer4", "head"]
    ]  # fmt: skip
    at = StrategySpec("gradual", unfreeze_at=(1, 3))
    assert trainable_group_names(resnet, at, 3) == ["layer3", "layer4", "head"]


def test_gradual_optimizer_layout_is_stable_for_resume(resnet: TransferModel) -> None:
    spec = StrategySpec("gradual", unfreeze_every=1, unfreeze=2)
    apply_strategy(resnet, spec, epoch=0)
    early = [g["name"] for g in param_groups(resnet, spec)]
    apply_strategy(resnet, spec, epoch=5)
    late = [g["name"] for g in param_groups(resnet, spec)]
    assert early == late == ["layer3", "layer4", "head"]


def test_gradual_unfreezing_resumes_mid_schedule_through_lightning(tmp_path: Path) -> None:
    """Train 2 of 4 epochs, resume from Lightning's checkpoint, and finish: no param-group mismatch."""

    def run(max_epochs: int, ckpt: str | None) -> GradualUnfreezing:
        torch.manual_seed(0)
        model = TransferModel(load_backbone("resnet18", weights="none"), ["a", "b"])
        spec = StrategySpec("gradual", unfreeze_every=1, unfreeze=3, lr=1e-2)
        apply_strategy(model, spec)
        learner = TransferLearner(model, spec, TrainConfig(data=".", epochs=4, scheduler="step"))
        data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,)))
        loader = torch.utils.data.DataLoader(data, batch_size=4)
        callback = GradualUnfreezing(spec)
        trainer = L.Trainer(max_epochs=max_epochs, callbacks=[callback], default_root_dir=tmp_path, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            accelerator="cpu")  # fmt: skip
        trainer.fit(learner, loader, loader, ckpt_path=ckpt)
        trainer.save_checkpoint(tmp_path / "last.ckpt")
        return callback

    first = run(2, None)
    assert first.unfrozen == ["layer4", "head"]
    resumed = run(4, str(tmp_path / "last.ckpt"))
    assert resumed.unfrozen == ["layer2", "layer3", "layer4", "head"]
    assert [e["epoch"] for e in resumed.events] == [1, 2, 3]


def test_frozen_batchnorm_stays_in_eval_mode_unless_asked(resnet: TransferModel) -> None:
    apply_strategy(resnet, StrategySpec("fine-tune", unfreeze=1))
    resnet.train()
    assert not resnet.net.bn1.training and not resnet.net.layer3[0].bn1.training
    assert resnet.net.layer4[0].bn1.training
    apply_strategy(resnet, StrategySpec("fine-tune", unfreeze=1, train_bn=True))
    resnet.train()
    assert resnet.net.bn1.training and resnet.net.bn1.weight.requires_grad
    assert not resnet.net.conv1.weight.requires_grad


def test_inception_aux_loss_in_training_only() -> None:
    torch.manual_seed(0)
    model = TransferModel(load_backbone("inception_v3", weights="none"), ["a", "b"])
    spec = StrategySpec("fine-tune", unfreeze=("Mixed_7c", "AuxLogits"), aux_weight=0.4)
    apply_strategy(model, spec)
    learner = TransferLearner(model, spec, TrainConfig(data="."))
    x, y = torch.randn(2, 3, 299, 299), torch.tensor([0, 1])
    model.train()
    torch.manual_seed(1)
    logits, aux = model(x)
    expected = nn.functional.cross_entropy(logits, y) + 0.4 * nn.functional.cross_entropy(aux, y)
    torch.manual_seed(1)
    loss = learner._step((x, y), "train")
    assert loss is not None and torch.allclose(loss, expected)
    model.eval()
    assert isinstance(model(x), torch.Tensor)


def test_parameter_counts(resnet: TransferModel) -> None:
    apply_strategy(resnet, StrategySpec("feature-extract"))
    trainable, total = resnet.parameter_counts()
    assert trainable == 512 * 3 + 3 and total > 11_000_000


def test_mlp_head_spec_as_in_seed_001() -> None:
    spec = HeadSpec.parse("mlp:256")
    head = spec.build(512, 10)
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [256, 10]
    assert str(spec) == "mlp:256"
    with pytest.raises(TransferkitError, match="mlp:256"):
        HeadSpec.parse("mlp:abc")


def test_folded_batchnorm_of_pretrained_weights_stays_in_inference_mode(tmp_path: Path) -> None:
    """Weights exported with BatchNorm folded into the convolutions (identity running statistics)."""
    source = load_backbone("resnet18", weights="none").model
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_(), m.running_var.fill_(1.0 - m.eps), m.bias.uniform_(-1, 1)
        source.layer4[1].bn2.running_var.fill_(2.0)  # one ordinary BatchNorm among them
    path = tmp_path / "folded.pth"
    torch.save(source.state_dict(), path)
    model = TransferModel(load_backbone("resnet18", weights=str(path)), ["a", "b"])
    apply_strategy(model, StrategySpec("fine-tune", unfreeze=1))
    model.train()
    assert not model.net.layer4[0].bn1.training and model.net.layer4[0].bn1.weight.requires_grad
    assert model.net.layer4[1].bn2.training
    # A checkpoint knows its folded BatchNorms from its weights, not from the architecture it is rebuilt
    # from (whose fresh statistics are all the identity).
    save_checkpoint(model, tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.folded_batchnorm == model.folded_batchnorm and "layer4.1.bn2" not in loaded.folded_batchnorm
    apply_strategy(loaded, StrategySpec("fine-tune", unfreeze=1))
    assert loaded.train().net.layer4[1].bn2.training and not loaded.net.layer4[0].bn1.training
    # Random weights have identity statistics too, but nothing was folded into them.
    assert not TransferModel(load_backbone("resnet18", weights="none"), ["a", "b"]).folded_batchnorm


def test_multi_label_metrics_read_logits_as_logits_even_when_they_all_lie_in_0_1() -> None:
    model = TransferModel(load_backbone("resnet18", weights="none"), ["a", "b"])
    model.record = model.record.with_extra(multi_label=True)
    learner = TransferLearner(model, StrategySpec("feature-extract"), TrainConfig(data="."), head_only=True)
    with torch.no_grad():
        learner.model.head_module.weight.zero_(), learner.model.head_module.bias.fill_(0.3)  # sigmoid(0.3) = 0.57: yes
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer: the metrics update all the same
        learner._step((torch.zeros(4, 512), torch.ones(4, 2, dtype=torch.long)), "val")
    assert learner.val_accuracy.compute() == 1.0 and learner.val_macro_f1.compute() == 1.0


def test_multi_label_accuracy_during_training_is_exact_match_as_in_metrics_json() -> None:
    model = TransferModel(load_backbone("resnet18", weights="none"), ["a", "b"])
    model.record = model.record.with_extra(multi_label=True)
    learner = TransferLearner(model, StrategySpec("feature-extract"), TrainConfig(data="."), head_only=True)
    with torch.no_grad():
        learner.model.head_module.weight.zero_(), learner.model.head_module.bias.fill_(0.3)  # yes to both labels
    with pytest.warns(UserWarning, match="self.log"):
        learner._step((torch.zeros(4, 512), torch.tensor([[1, 0]] * 4)), "val")  # half the yes/no answers right
    assert learner.val_accuracy.compute() == 0.0  # no image has every label right (it read 0.5 per label)
