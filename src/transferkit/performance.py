"""Device, precision and memory-layout choices (see ../shared/notes/cpu-performance.md)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator

import torch
from torch import nn

from .errors import TransferkitError

PRECISIONS = ("auto", "32", "bf16", "16")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the kernel after every batch.

    With glibc's defaults each large activation buffer is mmap'ed and unmapped per forward pass, and
    the next pass page-faults it in again: a third of an inference process's time went to the kernel
    here. Serving all allocations from the heap (no mmap) and never trimming it removes that; it is
    what tcmalloc/jemalloc tuned the same way do, without a preloaded library. Linux/glibc only;
    ``TRANSFERKIT_ALLOCATOR=default`` turns it off. Returns whether it is in effect.
    """
    if os.environ.get("TRANSFERKIT_ALLOCATOR", "tuned") == "default" or not sys.platform.startswith("linux"):
        return False
    if "jemalloc" in os.environ.get("LD_PRELOAD", "") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return False  # a preloaded allocator is already in charge
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively instead of being emulated (slower than fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_depthwise_conv(model: nn.Module, trainable_only: bool = False) -> bool:
    return any(
        isinstance(m, nn.Conv2d)
        and m.groups > 1
        and m.groups == m.in_channels
        and (not trainable_only or m.weight.requires_grad)
        for m in model.modules()
    )


def resolve_precision(requested: str, device: torch.device, model: nn.Module | None = None, training: bool = False) -> str:
    """``"32"`` or ``"bf16"``/``"16"`` (autocast). ``auto`` picks what is fast and accurate here.

    bf16 autocast + channels_last runs 2.6-3x faster than fp32 for inference on a CPU with native
    bf16, but depthwise-convolution backward in bf16 is slower than fp32, so training a
    MobileNet/EfficientNet-like network's own layers stays fp32.
    """
    if requested not in PRECISIONS:
        raise TransferkitError(f"unknown --precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "16"
    if device.type != "cpu" or not cpu_has_native_bf16():
        return "32"
    if training and model is not None and has_depthwise_conv(model, trainable_only=True):
        return "32"
    return "bf16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def uses_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_fast_layout(model: nn.Module) -> nn.Module:
    """channels_last for CNNs: 1.3-1.6x faster convolutions on this CPU, same results."""
    if uses_convolutions(model):
        model.to(memory_format=torch.channels_last)
    return model


def batch_to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@contextlib.contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
