"""Performance choices: the allocator the command runs with, and precision per job and machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transferkit import StrategySpec, TransferModel, apply_strategy, load_backbone
from transferkit.launch import allocator_library, fast_env
from transferkit import TransferkitError
from transferkit.performance import (
    AVX2_CPU_ENV,
    NATIVE_BF16_ENV,
    cpu_kind,
    cpu_model,
    cpuinfo_fields,
    resolve_precision,
    same_cpu_kind,
)
from transferkit.training.fit import training_precision

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


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator_library() is None,
                    reason="needs Linux and cmeel-mimalloc")
def test_the_re_executed_command_never_imports_from_the_working_directory(tmp_path: Path) -> None:
    """The command restarts itself with the allocator preloaded; a user's inspect.py must not stand in for Python's."""
    (tmp_path / "inspect.py").write_text("raise SystemExit('imported from the working directory')\n")
    command = Path(sys.executable).parent / "transferkit"
    proc = subprocess.run([str(command), "cache", "path"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRANSFERKIT_CACHE_DIR": str(tmp_path / "cache")})  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "cache"), proc.stderr


COLLECTOR = """
import gc, importlib.machinery, sys
from transferkit.launch import pause_collector_until_torch_imports
pause_collector_until_torch_imports()
paused = not gc.isenabled()
import torch
waiting = any(type(finder).__module__ == "transferkit.launch" for finder in sys.meta_path)
usual = type(torch.__loader__) is type(torch.__spec__.loader) is importlib.machinery.SourceFileLoader
print(paused, gc.isenabled(), gc.get_freeze_count(), waiting, usual)
"""


def test_the_command_imports_torch_with_the_collector_paused_then_frozen() -> None:
    """Start-up: no full collection walks torch's objects while it imports, and none walks them afterwards."""
    proc = subprocess.run([sys.executable, "-c", COLLECTOR], capture_output=True, text=True, check=True)
    paused, resumed, frozen, waiting, usual = proc.stdout.split()
    assert paused == resumed == "True" and int(frozen) > 50_000  # torch's own lasting objects, frozen
    assert waiting == "False" and usual == "True"  # the finder is gone, and torch's loader is its own
    first_line = "import gc, importlib.machinery, sys"
    already = COLLECTOR.replace(first_line, f"{first_line}, torch")  # torch first: nothing to pause
    assert subprocess.run([sys.executable, "-c", already], capture_output=True, text=True,
                          check=True).stdout.split()[:3] == ["False", "True", "0"]  # fmt: skip


EXITING = """
import atexit, sys, threading, time
from pathlib import Path
from transferkit.launch import exit_now
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(2)  # left open and idle, as torch.compile leaves its compile threads
pool.submit(lambda: (out / "pool").write_text("done")).result()
sys.stdout.write("no newline, still buffered")
exit_now(3)
"""


def test_the_command_skips_module_teardown_but_not_what_teardown_would_finish(tmp_path: Path) -> None:
    """``exit_now`` ends the ``transferkit`` command: threads finish, idle thread pools stop, exit handlers run,
    output is flushed."""
    proc = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and proc.stdout == "no newline, still buffered"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "pool").read_text() == "done"


def test_precision_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) == "bf16"  # an explicit choice always wins
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")  # act as on an AVX2-only CPU, whatever this one has
    assert resolve_precision("auto", cpu) == "32"  # emulated bf16 is ~6x slower than fp32
    assert "emulated" in cpu_kind() and NATIVE_BF16_ENV in cpu_kind()
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")  # and as on a CPU with native bf16
    assert resolve_precision("auto", cpu) == "bf16" and cpu_kind().startswith("native bf16")
    mobilenet = TransferModel(load_backbone("mobilenet_v3_small", weights="none"), ["a", "b"])
    apply_strategy(mobilenet, StrategySpec("fine-tune", unfreeze=3))  # reaches an inverted-residual block
    assert resolve_precision("auto", cpu, mobilenet, training=True) == "32"  # bf16 depthwise backward is slow
    apply_strategy(mobilenet, StrategySpec("feature-extract"))
    assert resolve_precision("auto", cpu, mobilenet, training=True) == "bf16"
    # Gradual unfreezing trains at the precision of every group its schedule unfreezes, not its first epoch's.
    gradual = StrategySpec("gradual", unfreeze=3)
    apply_strategy(mobilenet, gradual)
    assert training_precision("auto", cpu, mobilenet, gradual, epochs=1) == "bf16"  # the head alone
    assert training_precision("auto", cpu, mobilenet, gradual, epochs=4) == "32"
    assert [p.requires_grad for p in mobilenet.parameters()].count(True) == 2  # left at epoch 0: the head's
    with pytest.raises(TransferkitError, match="unknown --precision 'fp8'"):
        resolve_precision("fp8", cpu)
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(TransferkitError, match=f"{NATIVE_BF16_ENV}='yes': set it to 1"):
        resolve_precision("auto", cpu)


CPUINFO = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC
flags		: fpu avx2 avx512f avx512_bf16

processor	: 1
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC
flags		: fpu avx2 avx512f avx512_bf16
"""


def test_a_benchmark_header_names_the_cpu_by_family_and_model() -> None:
    """VMs sold under one name ("AMD EPYC") differ by generation: the header says which one ran."""
    fields = cpuinfo_fields(CPUINFO)
    assert fields["model"] == "17" and "avx512_bf16" in fields["flags"].split()
    assert cpu_model(fields) == f"AMD EPYC (family 25, model 17), {os.cpu_count()} cores"
    assert cpu_model({"model name": "Apple M2"}) == f"Apple M2, {os.cpu_count()} cores"
    if Path("/proc/cpuinfo").is_file():
        here = cpuinfo_fields(Path("/proc/cpuinfo").read_text())
        assert cpu_model().startswith(here.get("model name", "")) and cpu_model() == cpu_model(here)


ONEDNN_CONVOLUTION = """
with torch.no_grad():  # a convolution oneDNN runs, and says on which instruction set
    x = torch.ones(4, 16, 32, 32).to(memory_format=torch.channels_last)
    torch.nn.Conv2d(16, 16, 3).to(memory_format=torch.channels_last)(x)
"""
AS_AVX2 = """
import torch
from transferkit.performance import cpu_kind, resolve_precision, restart_as_avx2_cpu
restart_as_avx2_cpu()
""" + ONEDNN_CONVOLUTION + """
print(cpu_kind())
print(resolve_precision("auto", torch.device("cpu")))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AVX2 is an x86-64 instruction set")
def test_a_benchmark_restarts_as_a_cpu_that_reports_avx2_only(tmp_path: Path) -> None:
    """``--as-avx2``: an AVX-512 CPU runs ATen's and oneDNN's AVX2 kernels and chooses as without native bf16."""
    script = tmp_path / "as_avx2.py"
    script.write_text(AS_AVX2)
    env = {k: v for k, v in os.environ.items() if k not in AVX2_CPU_ENV} | {"ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True).stdout
    kind, precision = out.splitlines()[-2:]
    assert precision == "32" and kind.startswith("no native bf16")
    assert kind.endswith("AVX2 (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2) kernels")
    assert "isa:Intel AVX2" in out and "AVX-512" not in out


def test_make_test_runs_its_second_precision_pass_as_a_cpu_that_reports_avx2_only() -> None:
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    line = next(line for line in makefile.splitlines() if line.startswith("AVX2_CPU :="))
    assignments = line.split(":=", 1)[1].replace("$(BF16_SWITCH)", NATIVE_BF16_ENV).split()
    assert dict(a.split("=", 1) for a in assignments) == AVX2_CPU_ENV
    assert "|| $(AVX2_CPU) $(PY) -m pytest -m precision" in makefile


PROCESS_KIND = """
import torch
from transferkit.performance import cpu_has_native_bf16
""" + ONEDNN_CONVOLUTION + """
print(cpu_has_native_bf16(), torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AVX2 is an x86-64 instruction set")
def test_a_precision_pass_is_left_out_only_where_its_switches_change_nothing(tmp_path: Path) -> None:
    """``make test`` skips a pass as another kind of CPU where this one already is it: then the process
    under the switches must choose bf16 alike and run the same ATen and oneDNN kernels as one without."""
    script = tmp_path / "kind.py"
    script.write_text(PROCESS_KIND)
    plain = {k: v for k, v in os.environ.items() if k not in AVX2_CPU_ENV} | {"ONEDNN_VERBOSE": "1"}

    def kind(switches: dict[str, str]) -> tuple[str, str]:
        out = subprocess.run([sys.executable, str(script)], env=plain | switches, capture_output=True, text=True,
                             check=True).stdout.splitlines()  # fmt: skip
        return out[-1], next(line.split(",isa:")[1] for line in out if ",isa:" in line)

    with pytest.MonkeyPatch.context() as env:
        for name in AVX2_CPU_ENV:
            env.delenv(name, raising=False)
        here = kind({})
        for switches in ({NATIVE_BF16_ENV: "1"}, {NATIVE_BF16_ENV: "0"}, AVX2_CPU_ENV):
            assert same_cpu_kind(switches) == (kind(switches) == here), switches
        assert same_cpu_kind({})


def test_the_switch_reproduces_native_bf16_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated bf16 (AVX2) and native bf16 round alike; the switch must change the path taken, not the maths."""
    from transferkit.performance import autocast

    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(64, 8), torch.randn(4, 64)
    with autocast(torch.device("cpu"), resolve_precision("auto", torch.device("cpu"))):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: the result is the fp32 product of bf16-rounded inputs, rounded once more.
    expected = (x.bfloat16().float() @ layer.weight.bfloat16().float().T + layer.bias.bfloat16().float()).bfloat16()
    assert torch.allclose(out.float(), expected.float(), rtol=2**-7, atol=1e-2)


def test_torchmetrics_and_grad_cam_skip_modules_they_never_need_which_still_work_when_used() -> None:
    script = """
import sys
import numpy as np
from transferkit.deferred_dynamo import defer_dynamo
defer_dynamo()  # as the command does (dynamo would import triton itself)
import transferkit, lightning.pytorch, torchmetrics, pytorch_grad_cam, torch
for unused in ("scipy.signal", "sklearn", "scipy.ndimage", "scipy.sparse", "triton", "matplotlib.pyplot",
               "matplotlib.axes", "matplotlib.figure", "mpl_toolkits"):
    assert unused not in sys.modules, f"{unused} was imported"
assert not any(type(f).__name__ == "_FirstImportOf" for f in sys.meta_path), "the finder outlived its use"
# What torchmetrics set on a stand-in waits for the real module; nothing else does (grad-cam set nothing).
assert [f.name for f in sys.meta_path if type(f).__name__ == "_SetOnImport"] == ["scipy.signal"]
from torchmetrics.functional.classification import multiclass_accuracy
assert multiclass_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), num_classes=2, average="micro") == 2 / 3
# grad-cam's uses of the deferred names reach the real ones.
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel
assert get_2d_projection_kernel(np.random.rand(1, 4, 3, 3).astype(np.float32)).shape == (1, 3, 3)
from pytorch_grad_cam.utils.image import scale_cam_image
assert scale_cam_image(np.random.rand(1, 2, 2, 2).astype(np.float32), target_size=(4, 4, 4)).shape == (1, 4, 4, 4)
# Lightning's model summary counts FLOPs (torch's counter, whose triton check stands in until triton is imported).
from torch.utils.flop_counter import FlopCounterMode
with FlopCounterMode(display=False) as flops:
    torch.ones(2, 3) @ torch.ones(3, 4)
assert flops.get_total_flops() == 2 * 2 * 3 * 4
from torch.utils import flop_counter
assert not isinstance(object(), flop_counter._JITFunction)
try:
    import triton.runtime.jit
except ImportError:
    pass
else:
    real = triton.runtime.jit.JITFunction
    assert isinstance(real.__new__(real), flop_counter._JITFunction) and issubclass(real, flop_counter._JITFunction)
# grad-cam's ROAD metric solves a sparse system with the real scipy.
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
img = torch.rand(3, 6, 6)
mask = torch.zeros(6, 6); mask[2:4, 2:4] = 1
assert NoisyLinearImputer(noise=0.0)(img, mask).shape == (3, 6, 6)
# metrics' .plot() (its pyplot, axes and style stood in for at import) draws with the real matplotlib.
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities import plot as metric_plots
metric = MulticlassAccuracy(num_classes=3)
metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
fig, ax = metric.plot()
import matplotlib.axes, matplotlib.pyplot
assert isinstance(ax, matplotlib.axes.Axes) and isinstance(ax, metric_plots._AX_TYPE)
assert isinstance(fig, matplotlib.pyplot.Figure) and ax.get_ylabel() == "MulticlassAccuracy"
from pytorch_grad_cam.utils import image as cam_images
assert cam_images.plt.get_cmap("jet").name == "jet"
import importlib.util
assert importlib.util.find_spec("scipy.signal") is not None  # a probe before the import: the patch still waits
import scipy, scipy.signal, sklearn.decomposition
assert scipy.signal is sys.modules["scipy.signal"] and scipy.signal.__file__.endswith("__init__.py")
assert scipy.signal.windows.hamming(5).tolist()[2] == 1.0 and sklearn.decomposition.PCA.__module__.startswith("sklearn")
# What torchmetrics set on the stand-in of scipy.signal (hamming, moved to windows in scipy 1.13) is on the real one.
assert scipy.signal.hamming(5).tolist() == scipy.signal.windows.hamming(5).tolist()
assert scipy.signal.__loader__ is scipy.signal.__spec__.loader and "_ThenSet" not in repr(scipy.signal.__loader__)
assert not any(type(f).__module__ == "transferkit.lean_imports" for f in sys.meta_path), "a finder outlived its use"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_package_that_needs_more_than_its_stand_ins_is_imported_the_ordinary_way(tmp_path: Path) -> None:
    (tmp_path / "needs_more").mkdir()
    (tmp_path / "needs_more" / "__init__.py").write_text(
        "import scipy.signal\nscipy.signal.patched = 1\nWINDOW = scipy.signal.windows.hann(3)\n")
    script = f"""
import sys
sys.path.insert(0, {str(tmp_path)!r})
from transferkit import lean_imports
lean_imports.DEFERRED["needs_more"] = {{"scipy.signal": ("hamming",)}}
sys.meta_path.insert(0, lean_imports._FirstImportOf())
import needs_more
assert needs_more.WINDOW.tolist() == [0.0, 1.0, 0.0] and sys.modules["scipy.signal"].__file__.endswith("__init__.py")
assert sys.modules["scipy.signal"].patched == 1  # as its ordinary import set it
assert not [f for f in sys.meta_path if type(f).__name__ == "_SetOnImport"], "a finder outlived its use"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_torchvision_is_imported_without_dynamo_which_still_works_when_used() -> None:
    script = """
import sys
from pathlib import Path
import transferkit.data, transferkit.backbones
assert "torch._dynamo" not in sys.modules, "torchvision's import pulled in torch._dynamo"
import torch
from torchvision import tv_tensors
roi_align = sys.modules["torchvision.ops.roi_align"]
boxes = tv_tensors.wrap(torch.zeros(1, 4), like=tv_tensors.BoundingBoxes(torch.ones(1, 4), format="XYXY", canvas_size=(4, 4)))
assert isinstance(boxes, tv_tensors.BoundingBoxes)
assert roi_align.is_compile_supported("cpu") in (True, False)
import torch._dynamo
assert hasattr(torch._dynamo, "optimize"), "the real torch._dynamo was not imported"
assert torch.compile(lambda x: x * 2, backend="eager")(torch.ones(2)).tolist() == [2.0, 2.0]
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_dynamo_deferred_for_eager_training_and_real_as_soon_as_something_compiles() -> None:
    """The command's stand-ins: eager Lightning training never imports torch._dynamo; compiling gets the real one."""
    script = """
import sys
from transferkit.deferred_dynamo import defer_dynamo, real_dynamo_loaded
assert defer_dynamo()
import torch, lightning as L, torchvision
from lightning.fabric.wrappers import OptimizedModule  # bound at Lightning's import: the stand-in's class
from torch._dynamo.utils import is_compile_supported

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
model = Tiny()
before = model.layer.weight.detach().clone()
L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
          enable_model_summary=False).fit(model, torch.utils.data.DataLoader(data, batch_size=8))
assert not torch.equal(before, model.layer.weight), "the optimizer did not step"
assert not real_dynamo_loaded(), "eager training imported torch._dynamo"
assert not isinstance(model, OptimizedModule) and not real_dynamo_loaded()
assert is_compile_supported("cpu") in (True, False)  # a question only dynamo answers: it is imported now
assert real_dynamo_loaded() and sys.modules["torch._dynamo"] is torch._dynamo
compiled = torch.compile(torch.nn.Linear(4, 2), backend="eager")
assert isinstance(compiled, OptimizedModule) and compiled(torch.ones(1, 4)).shape == (1, 2)
import torch._dynamo.config, torch._dynamo.eval_frame
assert torch._dynamo.config.__spec__.name == "torch._dynamo.config" and hasattr(torch._dynamo.eval_frame, "OptimizedModule")
assert not any(type(f).__module__ == "transferkit.deferred_dynamo" for f in sys.meta_path), "the finder outlived its use"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_submodule_of_deferred_dynamo_imports_the_real_package_once() -> None:
    script = """
import sys
from transferkit.deferred_dynamo import defer_dynamo, real_dynamo_loaded
assert defer_dynamo() and not defer_dynamo()  # once
import torch
runs = []
import importlib.abc
class Count(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        runs.append(name) if name == "torch._dynamo.config" else None
sys.meta_path.append(Count())
import torch._dynamo.config as config  # imported by the real torch._dynamo's own import first
assert real_dynamo_loaded() and config is sys.modules["torch._dynamo.config"] and torch._dynamo.config is config
assert config.__spec__.loader.__class__.__name__ == "SourceFileLoader" and runs == []
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_frozen_backbone_run_of_the_command_never_imports_dynamo(tiny_dataset: Path, tmp_path: Path) -> None:
    """What the command imports, from Python's own import log (no re-exec, so ``-X importtime`` stays on)."""
    env = {**os.environ, "TRANSFERKIT_ALLOCATOR": "default", "TRANSFERKIT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "transferkit", "train", str(tiny_dataset),
                           "--model", "resnet18", "--weights", "none", "--image-size", "32", "--epochs", "2",
                           "--strategy", "feature-extract", "--out", str(tmp_path / "run"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "lightning" in imported and (tmp_path / "run" / "report.html").is_file()
    assert not {m for m in imported if m.startswith("torch._dynamo") or m == "scipy.optimize"}


def _die_unless_in(pid: int) -> int:
    if os.getpid() != pid:
        os._exit(3)  # the second process dies without a word
    return os.getpid()


def _fail_and_count(log: Path) -> None:
    with log.open("a") as f:
        f.write(f"{os.getpid()}\n")
    raise ValueError("the work's own error")


@pytest.mark.skipif(sys.platform != "linux", reason="only Linux forks by default; elsewhere the work runs in this process")
def test_work_in_a_second_process_shares_its_arguments_and_gives_back_result_and_warnings(tmp_path: Path) -> None:
    import threading
    import warnings

    from transferkit.performance import in_second_process

    unpicklable = threading.Lock()  # shared by the fork, never pickled

    def work(lock: threading.Lock) -> tuple[int, int, bool]:
        warnings.warn("drawn in the second process", UserWarning)
        return os.getpid(), torch.get_num_threads(), lock.locked()

    threads = torch.get_num_threads()
    wait = in_second_process(work, unpicklable)
    assert torch.get_num_threads() == max(1, threads - 1)  # the child's core is left to it meanwhile
    with pytest.warns(UserWarning, match="drawn in the second process"):
        pid, child_threads, locked = wait()
    assert pid != os.getpid() and child_threads == 1 and locked is False
    assert torch.get_num_threads() == threads
    # A child that dies: the work is done here instead. One that raises: done again here, so the
    # error is raised with its traceback in this process.
    assert in_second_process(_die_unless_in, os.getpid())() == os.getpid()
    log = tmp_path / "ran_in"
    wait = in_second_process(_fail_and_count, log)
    with pytest.raises(ValueError, match="the work's own error"):
        wait()
    ran_in = log.read_text().split()
    assert len(ran_in) == 2 and ran_in[0] != str(os.getpid()) and ran_in[1] == str(os.getpid())
