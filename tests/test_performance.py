"""Performance choices: the allocator the command runs with, and precision per job and machine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from transferkit import StrategySpec, TransferModel, apply_strategy, load_backbone
from transferkit.launch import allocator_library, fast_env
from transferkit.performance import resolve_precision

MAPS = "print('mimalloc' in open('/proc/self/maps').read())"


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator_library() is None, reason="needs Linux and cmeel-mimalloc")
def test_command_environment_preloads_a_memory_keeping_allocator() -> None:
    env = fast_env({"PATH": "/usr/bin"})
    assert env is not None and env["LD_PRELOAD"].endswith("libmimalloc.so.3") and env["MIMALLOC_PURGE_DELAY"] == "-1"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", MAPS], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
    # Opting out, or an allocator the user preloaded, leaves the environment alone (and ends the re-exec).
    assert fast_env({"TRANSFERKIT_ALLOCATOR": "default"}) is None
    assert fast_env(env) is None
    assert fast_env({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}) is None


def test_precision_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    import transferkit.performance as perf

    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) == "bf16"  # an explicit choice always wins
    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "32"  # emulated bf16 is ~6x slower than fp32
    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    mobilenet = TransferModel(load_backbone("mobilenet_v3_small", weights="none"), ["a", "b"])
    apply_strategy(mobilenet, StrategySpec("fine-tune", unfreeze=3))  # reaches an inverted-residual block
    assert resolve_precision("auto", cpu, mobilenet, training=True) == "32"  # bf16 depthwise backward is slow
    apply_strategy(mobilenet, StrategySpec("feature-extract"))
    assert resolve_precision("auto", cpu, mobilenet, training=True) == "bf16"
    with pytest.raises(Exception, match="precision"):
        resolve_precision("fp8", cpu)
