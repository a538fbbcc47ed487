"""Device, precision and memory-layout choices (see ../shared/notes/cpu-performance.md)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import TransferkitError

PRECISIONS = ("auto", "32", "bf16", "16")
PRECISION_NAMES = {"32": "fp32", "bf16": "bf16", "16": "fp16"}
T = TypeVar("T")


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# "1" makes transferkit choose as on a CPU with native bf16, "0" as on one without. An AVX2 CPU
# emulates bf16 slowly but rounds exactly as native bf16 does, so either machine can run both paths.
NATIVE_BF16_ENV = "TRANSFERKIT_NATIVE_BF16"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively instead of being emulated (slower than fp32).

    ``TRANSFERKIT_NATIVE_BF16=1`` (or ``0``) overrides what the CPU reports.
    """
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise TransferkitError(f"{NATIVE_BF16_ENV}={forced!r}: set it to 1 (act as on a native-bf16 CPU), 0, or unset it")
    return _cpuinfo_has_bf16()


def _cpuinfo_has_bf16() -> bool:
    return bool(_cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:  # up to the first blank line: the kernel writes the rest as read
            return cpuinfo_fields("".join(itertools.takewhile(str.strip, f)))
    except OSError:
        return {}


def cpuinfo_fields(text: str) -> dict[str, str]:
    """``name: value`` pairs of the first processor block of a /proc/cpuinfo text."""
    first_block = text.strip().split("\n\n")[0]
    pairs = (line.partition(":") for line in first_block.splitlines())
    return {name.strip(): value.strip() for name, _, value in pairs}


def _cpuinfo_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model(fields: Mapping[str, str] | None = None) -> str:
    """Which CPU this is, for a benchmark's header: VMs of one name differ, so its family and model too."""
    fields = _cpuinfo() if fields is None else fields
    name = fields.get("model name") or platform.processor() or platform.machine()
    numbers = [f"{word} {fields[key]}" for word, key in (("family", "cpu family"), ("model", "model")) if key in fields]
    which = f" ({', '.join(numbers)})" if numbers else ""
    return f"{name}{which}, {os.cpu_count()} cores"


# What makes a process on an AVX-512 CPU run as a CPU that reports AVX2 only: ATen's and oneDNN's
# kernels limited to AVX2 (both read these at their first use), and no native bf16. Benchmarks take
# it as --as-avx2, `make test` for its precision pass as such a CPU.
AVX2_KERNELS_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
AVX2_CPU_ENV = {NATIVE_BF16_ENV: "0", **AVX2_KERNELS_ENV}


def same_cpu_kind(switches: Mapping[str, str]) -> bool:
    """Whether a process with ``switches`` (``NATIVE_BF16_ENV``, ``AVX2_CPU_ENV``'s) set runs as this one does:
    the same bf16 choice and the same kernels. Then a pass of tests under them repeats one without them
    (``make test``)."""
    bf16 = switches.get(NATIVE_BF16_ENV)
    if bf16 is not None and (bf16 == "1") != cpu_has_native_bf16():
        return False
    if not AVX2_KERNELS_ENV.keys() & switches.keys():
        return True
    limited_here = all(os.environ.get(name) == value for name, value in AVX2_KERNELS_ENV.items())
    return limited_here or not _cpuinfo_flags() & {"avx512f", "avx_vnni", "amx_tile"}


def cpu_kind() -> str:
    """What a benchmark or report says of this CPU: its bf16 (forced by the switch or not) and the
    instruction set its kernels use (limited by AVX2_CPU_ENV's variables or not)."""
    source = f" ({NATIVE_BF16_ENV} set)" if os.environ.get(NATIVE_BF16_ENV) else ""
    bf16 = ("native bf16" if cpu_has_native_bf16() else "no native bf16: bf16 emulated") + source
    limited = [f"{name}={os.environ[name]}" for name in AVX2_KERNELS_ENV if name in os.environ]
    kernels = torch.backends.cpu.get_cpu_capability() + (f" ({', '.join(limited)})" if limited else "")
    return f"{bf16}, {kernels} kernels"


def restart_as_avx2_cpu() -> None:
    """Re-executes this script with AVX2_CPU_ENV (unless it already runs so): the variables must be
    set before torch first runs a kernel, and its subprocesses inherit them."""
    if all(os.environ.get(name) == value for name, value in AVX2_CPU_ENV.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_CPU_ENV})


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
        return "bf16" if _cuda_has_native_bf16() else "16"
    if device.type != "cpu" or not cpu_has_native_bf16():
        return "32"
    if training and model is not None and has_depthwise_conv(model, trainable_only=True):
        return "32"
    return "bf16"


def _cuda_has_native_bf16() -> bool:
    """Ampere or later. ``is_bf16_supported()`` alone also says yes on a T4 or V100, which emulate it slowly."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 counted no emulation
        return torch.cuda.is_bf16_supported()


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


def trains_channels_last(device: torch.device, compiled: bool) -> bool:
    """Whether training lays a CNN out channels_last (as :func:`to_fast_layout`): yes, except compiled for a
    GPU. There inductor's stride check of a convolution's backward failed on channels_last weights (an
    H200, torch 2.11; pytorch/pytorch#171622), and inductor chooses convolutions' layout itself."""
    return not (compiled and device.type == "cuda")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: a GPU runs kernels after the call that queues them returns,
    so a clock read without this times the queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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


def compile_in_place(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` the model's forward, in place: its state_dict keys stay as they are.

    Pays only on long jobs: on a 2-core CPU, compiling takes 14-43 s (and again for the first batch
    of another size) for 1.05-1.23x channels_last eager, worth it after ~4,000-13,000 images
    (benchmarks/compile.py); hence off unless asked for (``--compile``).
    """
    if device.type == "cpu" and not _cxx_compiler():
        raise TransferkitError(
            "--compile on a CPU needs a C++ compiler (inductor builds its kernels): install g++ or clang, "
            "or leave out --compile"
        )
    model.compile()
    return model


def _cxx_compiler() -> str | None:
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return next((path for c in candidates if c and (path := shutil.which(c))), None)


def in_second_process(work: Callable[..., T], *args: Any) -> Callable[[], T]:
    """Start ``work(*args)`` in a forked process, on the other core; returns the function that waits for its result.

    For work that holds the GIL (matplotlib's drawing) while this process keeps its cores busy with
    torch: a thread beside torch's calls made a report slower, a second process made it 0.7 s
    faster. The fork shares ``args`` without pickling them (a model included); the result and the
    child's warnings come back pickled. Runs ``work`` here instead where the platform does not fork
    by default (only Linux does) or this process may not have children (a daemon), and again here
    where the child failed, so that its exception is raised with its own traceback in this process.
    """
    import multiprocessing

    if sys.platform != "linux" or multiprocessing.current_process().daemon:
        result = work(*args)
        return lambda: result
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    for stream in (sys.stdout, sys.stderr):  # the child would flush what is buffered here a second time
        if stream is not None:
            stream.flush()
    child = context.Process(target=_work_and_send, args=(send, work, args), daemon=True)
    child.start()
    send.close()
    # Meanwhile torch here leaves the child its core: an OpenMP thread sharing it would hold back
    # every parallel region of the other threads (a Grad-CAM pass took twice as long).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))

    def wait() -> T:
        try:
            done, value, caught = receive.recv()
        except EOFError:  # the child died before it answered
            done, value, caught = False, None, []
        finally:
            receive.close()
            child.join()
            torch.set_num_threads(threads)
        for message, category, filename, lineno in caught:
            warnings.warn_explicit(message, category, filename, lineno)
        return value if done else work(*args)

    return wait


def _work_and_send(send: Any, work: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # as DataLoader's workers: OpenMP's thread pool does not survive a fork
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # this process's filters decide, when they are raised again there
        try:
            result = work(*args)
            send.send((True, result, [(w.message, w.category, w.filename, w.lineno) for w in caught]))
        except Exception:  # raised again where it is done again, with its own traceback
            send.send((False, None, []))
