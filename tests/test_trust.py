"""Predictions a person can trust: calibrated probabilities, test-time augmentation, k-fold estimates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transferkit.calibration import (
    MIN_TEMPERATURE,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_curve,
)

TINY = {"model": "resnet18", "weights": "none", "image_size": 32, "epochs": 3, "batch_size": 4, "quiet": True}


def test_temperature_scaling_lowers_the_nll_of_an_over_confident_model() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=g)
    # A fair classifier (right ~70 % of the time, scores to match) made ten times too sure of itself.
    logits = torch.randn(400, 4, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    over_confident = 10 * logits
    temperature = fit_temperature(over_confident, labels)
    before = over_confident.softmax(dim=1)
    after = (over_confident / temperature).softmax(dim=1)
    assert temperature > 3  # it finds (about) the factor that was put in
    assert negative_log_likelihood(after, labels) < 0.5 * negative_log_likelihood(before, labels)
    assert expected_calibration_error(after, labels) < expected_calibration_error(before, labels)
    assert torch.equal(after.argmax(dim=1), before.argmax(dim=1))  # no answer changes, only how sure it is
    curve = reliability_curve(after, labels)
    assert len(curve["confidence"]) == len(curve["accuracy"]) > 2
    from sklearn.calibration import calibration_curve  # what the curve must equal

    confidence, predicted = after.max(dim=1)
    accuracy, mean_confidence = calibration_curve((predicted == labels).int().numpy(), confidence.numpy(), n_bins=10)
    assert curve == {"confidence": [round(float(c), 4) for c in mean_confidence],
                     "accuracy": [round(float(a), 4) for a in accuracy]}  # fmt: skip
    # Every held-out answer right: the NLL falls as T shrinks, and the fit stops at its bound, not at 0.
    separable = 5 * torch.nn.functional.one_hot(labels, 4).double()
    assert fit_temperature(separable, labels) == pytest.approx(MIN_TEMPERATURE, rel=1e-3)


@pytest.mark.parametrize("scale", [0.05, 0.7, 3.0, 40.0])
def test_the_temperature_is_the_one_scipys_bounded_search_finds(scale: float) -> None:
    """Newton's method in a bracket against scipy's bounded Brent search, from too-soft to too-sure models."""
    from scipy.optimize import minimize_scalar

    from transferkit.calibration import MAX_TEMPERATURE

    g = torch.Generator().manual_seed(int(scale * 100))
    labels = torch.randint(0, 5, (300,), generator=g)
    logits = scale * (torch.randn(300, 5, generator=g) + 2 * torch.nn.functional.one_hot(labels, 5)).double()

    def nll(inverse_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits * inverse_t, labels))

    found = minimize_scalar(nll, bounds=(1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE), method="bounded",
                            options={"xatol": 1e-9})  # fmt: skip
    assert fit_temperature(logits, labels) == pytest.approx(1 / found.x, rel=1e-4)


def test_a_run_is_calibrated_on_validation_and_evaluate_uses_the_temperature(tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import TransferkitError, evaluate, load_checkpoint, train

    result = train(tiny_dataset, **TINY, out=str(tmp_path / "run"))
    calibration = result.metrics["calibration"]
    assert calibration["fitted_on"] == "validation" and calibration["temperature"] > 0
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9  # fitted to minimise it there
    assert load_checkpoint(result.run_dir).temperature == calibration["temperature"]
    calibrated = evaluate(result.run_dir, tiny_dataset / "val")
    assert calibrated.loss == result.metrics["val_loss"]
    raw = evaluate(result.run_dir, tiny_dataset / "val", calibrated=False)
    assert raw.loss == pytest.approx(calibration["nll_before"], rel=1e-5)
    assert raw.accuracy == calibrated.accuracy
    page = (result.run_dir / "report.html").read_text(encoding="utf-8")
    assert "Calibration (temperature" in page and "report/reliability.png" in page
    assert (result.run_dir / "report" / "reliability.png").is_file()

    from transferkit.runtimes import runner_for

    # An export has the temperature inside: the uncalibrated network needs the run, and the error says so.
    with pytest.raises(TransferkitError, match=r"--calibration none needs the run directory, not its export"):
        runner_for(result.run_dir / "model.onnx", calibrated=False)

    off = train(tiny_dataset, **TINY, calibration="none", out=str(tmp_path / "off"))
    assert "calibration" not in off.metrics and load_checkpoint(off.run_dir).temperature == 1.0


def test_a_linear_probe_is_calibrated_out_of_fold(tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import train

    result = train(tiny_dataset, **{**TINY, "strategy": "linear-probe"}, out=str(tmp_path / "probe"))
    assert result.metrics["calibration"]["fitted_on"].startswith("out-of-fold")


def test_tta_of_the_identity_view_is_plain_prediction(tiny_dataset: Path) -> None:
    from transferkit import TransferModel, load_backbone
    from transferkit.data import scan_class_folder
    from transferkit.prediction import AugmentedRunner, EagerRunner, predict_samples, tta_view

    model = TransferModel(load_backbone("resnet18", "none"), ["blue", "red"]).eval()
    _, samples, _ = scan_class_folder(tiny_dataset / "val")
    runner = EagerRunner(model, precision="32")
    plain = predict_samples(runner, samples, batch_size=4).probabilities
    assert torch.equal(predict_samples(AugmentedRunner(runner, ("identity",)), samples, 4).probabilities, plain)
    both = predict_samples(AugmentedRunner(runner, ("identity", "hflip")), samples, 4).probabilities
    flipped = predict_samples(AugmentedRunner(runner, ("hflip",)), samples, 4).probabilities
    assert torch.allclose(both, (plain + flipped) / 2, atol=1e-6)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(tta_view(x, "hflip"), x.flip(-1)) and tta_view(x, "crop-top-left").shape == x.shape


def test_evaluate_with_tta_reports_its_gain_and_cost(tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import evaluate, predict, train

    run = train(tiny_dataset, **TINY, out=str(tmp_path / "run")).run_dir
    result = evaluate(run, tiny_dataset / "val", tta=True)
    t = result.tta
    assert t is not None and len(t["views"]) == 6 and t["cost"] > 0
    assert t["accuracy_gain"] == pytest.approx(result.accuracy - t["accuracy_without"])
    assert t["accuracy_without"] == evaluate(run, tiny_dataset / "val").accuracy
    out = predict(run, [tiny_dataset / "val"], tta=True, runtime="torch")
    assert all(abs(sum(p["probability"] for p in r["predictions"]) - 1) < 1e-4 for r in out)


def test_folds_validate_every_image_once_and_never_train_on_it() -> None:
    from transferkit.folds import stratified_folds

    samples = [(f"{c}{i}.png", c) for c in range(3) for i in range(10)]
    folds = stratified_folds(samples, 5, seed=1)
    assert len(folds) == 5
    for train, val in folds:
        assert not set(train) & set(val) and len(train) + len(val) == 30
        assert sorted(label for _, label in val) == [0, 0, 1, 1, 2, 2]  # stratified
    assert sorted(s for _, val in folds for s in val) == sorted(samples)
    with pytest.raises(Exception, match="--folds 11: the smallest class has 10 image.*lower --folds to 10 "):
        stratified_folds(samples, 11)
    with pytest.raises(Exception, match="--folds 5: the smallest class has 1 image, and k-fold needs at least 2"):
        stratified_folds([*samples, ("lone.png", 3)], 5)  # it said "lower --folds to 2", which fails the same


def test_k_fold_training_reports_mean_and_std_and_predicts_with_the_ensemble(tiny_dataset: Path, tmp_path: Path) -> None:
    import json

    from transferkit import TransferkitError, evaluate, predict, train

    result = train(tiny_dataset, **TINY, folds=3, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "folds"))
    m = result.metrics
    assert m["folds"] == 3 and 0 <= m["val_accuracy"] <= 1 and m["val_accuracy_std"] >= 0
    assert m["val_accuracy"] == pytest.approx(sum(f["val_accuracy"] for f in m["fold_metrics"]) / 3)
    runs = [result.run_dir / name for name in m["fold_runs"]]
    fold_metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    # 28 images pooled from train/ and val/: each fold validates on its third, and trains on the rest.
    assert sum(sum(f["data"]["val_counts"].values()) for f in fold_metrics) == 28
    assert all(sum(f["data"]["train_counts"].values()) + sum(f["data"]["val_counts"].values()) == 28
               for f in fold_metrics)  # fmt: skip
    # Frozen features: computed by the first fold, read from the cache by the others.
    assert [f["feature_cache"]["misses"] for f in fold_metrics] == [28, 0, 0]
    assert (result.run_dir / "compare.html").is_file()
    from transferkit.reports import comparison_rows, load_run

    row = comparison_rows([load_run(result.run_dir)])[0]  # the folds' figures, not zero epochs
    assert row["run"] == "folds (3-fold mean)" and row["epochs"] == TINY["epochs"]
    assert row["trainable_params"] == fold_metrics[0]["trainable_params"] > 0
    from transferkit.reports import write_report  # the root has no model or history: its folds do

    with pytest.raises(TransferkitError, match=r"is a k-fold run: .*compare\.html; report one fold's run, e.g. .*"):
        write_report(result.run_dir)

    ensemble = predict(result.run_dir, [tiny_dataset / "val"], top_k=2)
    with pytest.raises(TransferkitError, match=r"--runtime onnx runs one model, and .* is a k-fold run of 3: give "
                                               r"--runtime torch \(their average\), or one fold's run, e\.g\. "):
        predict(result.run_dir, [tiny_dataset / "val"], runtime="onnx")  # it ran the eager average, silently
    members = [predict(r, [tiny_dataset / "val"], top_k=2, runtime="torch") for r in runs]
    for i, answer in enumerate(ensemble):
        for p in answer["predictions"]:
            mean = sum(next(q["probability"] for q in m_[i]["predictions"] if q["label"] == p["label"])
                       for m_ in members) / 3  # fmt: skip
            assert p["probability"] == pytest.approx(mean, abs=1e-5)
    assert evaluate(result.run_dir, tiny_dataset / "val").num_images == 8
    from transferkit import TransferkitError, export

    with pytest.raises(TransferkitError, match=r"is a k-fold run \(an ensemble of 3 models, no model.pt of its own\); "
                                               r"give one of its folds, e.g. .*fold-1"):  # fmt: skip
        export(result.run_dir)  # said 'holds no model.pt; is it a finished transferkit run directory?'
    pytest.importorskip("fastapi", reason='serve needs FastAPI: pip install -e ".[serve]"')
    from transferkit.runtimes import runner_for
    from transferkit.serving.service import describe

    assert describe(runner_for(result.run_dir, "torch"))["model"]["ensemble_of_folds"] == 3  # serve's GET /info


def test_an_interrupted_k_fold_run_resumes_its_unfinished_fold_and_keeps_its_finished_ones(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    import shutil

    from lightning.pytorch.callbacks import Callback

    from transferkit import TransferkitError, resume_training, train

    class StopInTheSecondFold(Callback):
        fits = 0

        def on_fit_start(self, trainer, pl_module) -> None:
            self.fits += 1

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if self.fits == 2 and trainer.current_epoch == 2:
                raise RuntimeError("interrupted")

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    options = {**TINY, "folds": 3, "strategy": "feature-extract", "cache_dir": str(tmp_path / "cache")}
    whole = train(data, **options, out=str(tmp_path / "whole"))
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="interrupted"):
        train(data, **options, out=str(cut), callbacks=[StopInTheSecondFold()])
    assert (cut / "fold-2" / "checkpoints" / "last.ckpt").is_file() and not (cut / "fold-2" / "metrics.json").exists()
    assert not (cut / "fold-3").exists() and not (cut / "metrics.json").exists()
    first_fold = (cut / "fold-1" / "metrics.json").read_bytes()

    with pytest.raises(TransferkitError, match=f"fold of the k-fold run {cut}: resume the whole run"):
        resume_training(cut / "fold-2")
    extra = data / "train" / "red" / "extra.png"
    shutil.copy(next((data / "train" / "red").iterdir()), extra)  # other folds now: refused, not mixed
    with pytest.raises(TransferkitError, match="data changed since the k-fold run started"):
        resume_training(cut)
    extra.unlink()

    resumed = resume_training(cut)
    assert (cut / "fold-1" / "metrics.json").read_bytes() == first_fold  # kept, not trained again
    assert [f["val_accuracy"] for f in resumed.metrics["fold_metrics"]] == [
        f["val_accuracy"] for f in whole.metrics["fold_metrics"]
    ]
    assert resumed.metrics["val_loss"] == pytest.approx(whole.metrics["val_loss"], rel=1e-4)
    assert resumed.metrics["fold_runs"] == ["fold-1", "fold-2", "fold-3"] and (cut / "compare.html").is_file()


def test_folds_are_refused_with_several_processes(tiny_dataset: Path, tmp_path: Path) -> None:
    from transferkit import TransferkitError, train

    with pytest.raises(TransferkitError, match="--folds trains its folds one after another.*--devices 1"):
        train(tiny_dataset, **TINY, folds=2, accelerator="cpu", devices=2, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
