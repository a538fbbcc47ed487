"""Strategy advice: the four scenarios, from the pure rule and from measured generated data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import make_colour_folder
from PIL import Image

from transferkit import Preprocessing, TransferModel, load_backbone
from transferkit.advice import advise, recommend, scenario

SMALL = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize(
    ("per_class", "similarity", "confidence", "expected"),
    [
        (100, 0.9, 0.7, ("small", "similar")),
        (100, 0.3, 0.7, ("small", "different")),
        (100, 0.9, 0.1, ("small", "different")),  # separable, but nothing like ImageNet
        (5000, 0.9, None, ("large", "similar")),
        (5000, 0.2, None, ("large", "different")),
    ],
)
def test_scenario_rule(per_class: int, similarity: float, confidence: float | None, expected: tuple) -> None:
    assert scenario(per_class, similarity, confidence) == expected


def test_each_scenario_recommends_its_strategy() -> None:
    model = TransferModel(load_backbone("resnet18", weights="none"), ["a", "b"])
    picks = {(s, d): recommend(s, d, model)[:2] for s in ("small", "large") for d in ("similar", "different")}
    assert picks[("small", "similar")] == ("feature-extract", {})
    assert picks[("small", "different")] == ("linear-probe", {"layer": "layer2"})
    assert picks[("large", "similar")] == ("fine-tune", {"unfreeze": 2})
    assert picks[("large", "different")][0] == "full"


def _random_label_folder(root: Path, per_class: int) -> Path:
    """Same image distribution in both classes: no feature can separate them."""
    rng = np.random.default_rng(5)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("domain", ["similar", "different"])
def test_measured_advice_lands_in_each_scenario(tmp_path: Path, size: str, domain: str) -> None:
    if domain == "similar":
        data = make_colour_folder(tmp_path / "d", 20)
    else:
        data = _random_label_folder(tmp_path / "d", 20)
    # 16 training images per class: "small" under the default threshold, "large" under a threshold of 10.
    advice = advise(data, "resnet18", "none", per_class=20, small_below=1000 if size == "small" else 10,
                    cache_dir=tmp_path / "cache", preprocessing=SMALL)  # fmt: skip
    assert (advice.size, advice.domain) == (size, domain), advice.text()
    assert advice.imagenet_confidence is None  # random weights have no ImageNet classifier
    assert advice.command.startswith(f"transferkit train {data} --model resnet18 --weights none --mean 0.5,0.5,0.5 "
                                     f"--std 0.5,0.5,0.5 --image-size 32 --strategy {advice.strategy}")


def test_hymenoptera_is_small_and_similar() -> None:
    from helpers import requires_shared

    data = requires_shared("datasets", "hymenoptera")
    advice = advise(data, per_class=30)
    assert (advice.size, advice.domain, advice.strategy) == ("small", "similar", "feature-extract")
    assert advice.imagenet_confidence is not None and advice.imagenet_confidence > 0.4


def test_the_advise_command_says_each_warning_once_and_quotes_the_commands_it_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """advise reads the data twice (the rule, then the measured candidates); a folder of runs among the
    classes is still one warning, not two."""
    from transferkit.cli import main

    data = make_colour_folder(tmp_path / "my data", 6, size=(32, 32))
    (data / "runs" / "old").mkdir(parents=True)
    for name in ("config.json", "command.txt"):
        (data / "runs" / "old" / name).write_text("{}")
    code = main(["advise", str(data), "--model", "resnet18", "--weights", "none", "--image-size", "32",
                 "--models", "resnet18", "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    assert code == 0
    assert any((tmp_path / "cache" / "features").iterdir())  # advise uses the cache --cache-dir names
    shown = capsys.readouterr()
    # The commands it prints paste into a shell: DATA with a space is quoted.
    assert f"command: transferkit train '{data}' --model" in shown.out
    assert f"best: transferkit train '{data}' --model" in shown.out
    warned = [line for line in shown.err.splitlines() if "runs not read as a class" in line]
    expected = f"transferkit: warning: {data}: runs not read as a class: transferkit's own output (runs, an inspection)"
    assert warned == [expected]
