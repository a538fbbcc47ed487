"""The ``transferkit`` command's entry point: a fast allocator and OpenMP policy, then the CLI.

With glibc's malloc, every large activation buffer is unmapped after a forward pass and
page-faulted in again on the next: measured here (benchmarks/allocator.py), a preloaded allocator
that keeps freed memory runs efficientnet_lite0 inference 2.3-2.5x and resnet18 1.2-1.3x faster.
An allocator can only be swapped before the process starts, so the command re-executes itself
once with mimalloc (PyPI ``cmeel-mimalloc``, a dependency on Linux) preloaded, before torch loads.
``TRANSFERKIT_ALLOCATOR=default`` opts out.

Importing torch makes some 180,000 lasting objects, and Python's cyclic collector walks all of them
again at each full collection it triggers on the way (four while torch imports, more with
torchvision, Lightning and torchmetrics): 0.3-0.5 s of a command's start-up on a 2-core EPYC
(docs/performance.md). So the command imports torch with the collector paused, then freezes what
exists (``gc.freeze``: later collections pass those objects by, and a forked process does not copy
their pages to update their counts) and resumes it, as Python's documentation advises for a
process that forks.
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ALLOCATOR_NAMES = ("mimalloc", "jemalloc", "tcmalloc")


def allocator_library() -> Path | None:
    """mimalloc's shared library from the ``cmeel-mimalloc`` wheel, where installed."""
    spec = importlib.util.find_spec("cmeel")
    for root in spec.submodule_search_locations or [] if spec else []:
        lib = Path(root).parent / "cmeel.prefix" / "lib" / "libmimalloc.so.3"
        if lib.is_file():
            return lib
    return None


def fast_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing would change."""
    env = dict(os.environ if environ is None else environ)
    if not sys.platform.startswith("linux") or env.get("TRANSFERKIT_ALLOCATOR") == "default":
        return None
    if any(name in env.get("LD_PRELOAD", "") for name in ALLOCATOR_NAMES):
        return None  # already preloaded (by us, or by the user's choice)
    lib = allocator_library()
    if lib is None:
        return None
    env["LD_PRELOAD"] = ":".join(filter(None, [str(lib), env.get("LD_PRELOAD", "")]))
    env.setdefault("MIMALLOC_PURGE_DELAY", "-1")  # never hand freed pages back to the kernel
    env.setdefault("MIMALLOC_ARENA_EAGER_COMMIT", "1")
    # DataLoader workers decode while OpenMP threads compute: spinning threads would steal their cores.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def pause_collector_until_torch_imports() -> None:
    """Pause Python's cyclic collector until torch is imported, then freeze what exists and resume it.

    For a process of transferkit's own (the command's): frozen objects are never collected.
    """
    if "torch" in sys.modules:
        return
    gc.disable()
    sys.meta_path.insert(0, _TorchImport())


def _frozen_and_resumed() -> None:
    gc.freeze()
    gc.enable()


class _TorchImport(importlib.abc.MetaPathFinder):
    """Finds torch the usual way, once, and has :func:`_frozen_and_resumed` run when it is imported (or fails to)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> Any:
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            _frozen_and_resumed()
            return spec
        spec.loader = _ThenResume(spec.loader)
        return spec


class _ThenResume(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        try:
            self.loader.exec_module(module)
        finally:
            module.__loader__ = module.__spec__.loader = self.loader  # torch as if imported the usual way
            _frozen_and_resumed()


def main() -> None:
    env = fast_env()
    if env is not None:
        # -P: python -m would put the working directory first on sys.path, where a user's inspect.py or
        # logging.py would stand in for the standard library's (the command itself never looks there).
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        os.execve(sys.executable, [sys.executable, *safe_path, "-m", "transferkit", *sys.argv[1:]], env)
    pause_collector_until_torch_imports()
    from .deferred_dynamo import defer_dynamo

    defer_dynamo()  # the command's process is ours: torch._dynamo is imported only if something compiles
    from .cli import main as cli_main

    try:
        code = cli_main()
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        code = SIGPIPE_EXIT
    exit_now(code)


# The exit code of a command whose reader went away (| head), as a Unix tool killed by SIGPIPE has.
SIGPIPE_EXIT = 128 + 13


def _stdout_reader_gone() -> bool:
    """Whether nothing reads standard output any more (the other end of its pipe closed): then the
    command stops quietly; the rest of its output goes nowhere."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return gone


def exit_now(code: int) -> None:
    """End the command without Python's module teardown, which takes 0.5-0.7 s once torch is loaded.

    Everything that teardown would still do for us is done first: other threads finish, exit
    handlers run (loggers, multiprocessing's worker clean-up, temporary folders), and stdout and
    stderr are flushed. Files are written and closed before commands return, never left to
    finalizers. Only the normal return takes this way; an uncaught error exits the usual way, and
    so does a command run under a profiler or tracer (``python -m cProfile``, a debugger), which
    write their results after the command returns.
    """
    import atexit
    import threading

    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        # What the interpreter runs first at exit: threading's own exit hooks, which tell idle thread
        # pools (concurrent.futures', as torch.compile's) to stop, then the join of the other threads.
        # Joining them without those hooks waited for ever after --compile.
        shutdown()
    else:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # its reader went away (| head) before the last of the output
            code = code or SIGPIPE_EXIT
        except (OSError, ValueError):  # nothing more can be said
            pass
    os._exit(code or 0)
