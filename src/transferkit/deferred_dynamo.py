"""``torch._dynamo`` imported when something compiles, not when eager code merely mentions it.

Importing ``torch._dynamo`` costs 1.2-2.1 s on these CPUs (sympy, ``torch.fx``'s symbolic shapes,
``torch.distributed.tensor``), and eager PyTorch code asks it for only a few things that do
nothing outside a trace: every optimizer step calls ``torch._dynamo.graph_break()`` and
``zero_grad`` goes through ``torch._dynamo.disable``; Lightning imports ``OptimizedModule`` for
``isinstance`` checks and decorates two functions with ``torch.compiler.disable``; torchvision
imports ``disable`` and ``is_compile_supported``. Nothing can be traced before ``torch._dynamo``
is imported, so until then those answers are exact:

- ``graph_break()`` does nothing (as dynamo's own does when called outside a trace);
- ``disable(fn)`` calls ``fn``, and wraps it with the real ``disable`` once dynamo is imported;
- an object is an instance of ``OptimizedModule`` only if dynamo is imported and it is one.

:func:`defer_dynamo` puts stand-ins for ``torch._dynamo`` and ``torch._dynamo.utils`` in
``sys.modules`` that give those answers. Anything else asked of them (``torch.compile``,
``torch.export``, an ONNX export, any other name or submodule) imports the real ``torch._dynamo``
first and from then on every stand-in hands on to it, so compiled code behaves as without them.
The ``transferkit`` command defers dynamo for its whole process; the library does so only while
torchvision imports (:func:`transferkit.lean_imports.import_torchvision`), leaving a user's own
process as it was.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

DYNAMO = "torch._dynamo"
_UTILS = "torch._dynamo.utils"
_lock = threading.RLock()


def real_dynamo_loaded() -> bool:
    """Whether the real ``torch._dynamo`` is imported (so something may be compiling)."""
    module = sys.modules.get(DYNAMO)
    return module is not None and not isinstance(module, _StandIn)


def real_dynamo() -> types.ModuleType:
    """The real ``torch._dynamo``, imported now if it was deferred."""
    with _lock:
        if not real_dynamo_loaded():
            _remove_stand_ins()
        return importlib.import_module(DYNAMO)


def graph_break(msg: str = "") -> None:
    if real_dynamo_loaded():
        real_dynamo().graph_break(msg)


def disable(fn: Callable[..., Any] | None = None, recursive: bool = True, **options: Any) -> Any:
    if fn is None:
        return functools.partial(disable, recursive=recursive, **options)
    disabled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def disabled_when_compiling(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            if not real_dynamo_loaded():
                return fn(*args, **kwargs)
            disabled = real_dynamo().disable(fn, recursive, **options)
        return disabled(*args, **kwargs)

    return disabled_when_compiling


class _RealInstancesOnly(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        real = cls._real()
        return real is not None and isinstance(obj, real)

    def __subclasscheck__(cls, sub: type) -> bool:
        real = cls._real()
        return real is not None and issubclass(sub, real)

    def _real(cls) -> type | None:
        """The real class once its module is imported (not while a stand-in module stands in for it)."""
        found = getattr(sys.modules.get(cls.__module__), cls.__name__, None)
        return None if found is None or found is cls else found


def stand_in_class(module: str, name: str) -> type:
    """A class for importers that only test objects against ``module.name`` (``isinstance``): no object
    is an instance of it until ``module`` is really imported (none can be before), and then exactly
    the real class's instances are."""
    return _RealInstancesOnly(name, (), {"__module__": module})


OptimizedModule = stand_in_class(DYNAMO, "OptimizedModule")  # what torch.compile returns


def is_compile_supported(device_type: str) -> bool:
    real_dynamo()
    return importlib.import_module(_UTILS).is_compile_supported(device_type)


# What each stand-in answers by itself; everything else is the real module's.
EAGER_ANSWERS: dict[str, dict[str, Any]] = {
    DYNAMO: {"graph_break": graph_break, "disable": disable, "OptimizedModule": OptimizedModule},
    _UTILS: {"is_compile_supported": is_compile_supported},
}


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if not real_dynamo_loaded() and name in EAGER_ANSWERS[self.__name__]:
            return EAGER_ANSWERS[self.__name__][name]
        if name.startswith("__"):
            raise AttributeError(name)
        real_dynamo()
        return getattr(importlib.import_module(self.__name__), name)


class _AlreadyLoaded(importlib.abc.Loader):
    """Hands the import system a module that importing the real dynamo has just loaded, without running it again."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module, self.own_spec = module, module.__spec__

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.own_spec  # the import system set it to the spec this finder made


class _SubmoduleImports(importlib.abc.MetaPathFinder):
    """``import torch._dynamo.<anything else>`` while deferred: imports the real dynamo first."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if not fullname.startswith(DYNAMO + ".") or fullname in EAGER_ANSWERS:
            return None
        real_dynamo()
        module = sys.modules.get(fullname)
        if module is None:
            return None  # a submodule dynamo does not import itself: found the ordinary way
        spec = importlib.machinery.ModuleSpec(fullname, _AlreadyLoaded(module), origin=module.__spec__.origin)
        spec.submodule_search_locations = module.__spec__.submodule_search_locations
        return spec


def _stand_ins() -> dict[str, _StandIn] | None:
    """Stand-ins that know where the real modules are, found without importing torch (None: not found)."""
    torch_spec = importlib.util.find_spec("torch")
    if torch_spec is None or not torch_spec.submodule_search_locations:
        return None
    dynamo_spec = importlib.machinery.PathFinder.find_spec(DYNAMO, torch_spec.submodule_search_locations)
    if dynamo_spec is None or not dynamo_spec.submodule_search_locations:
        return None
    modules = {}
    for name in EAGER_ANSWERS:
        spec = dynamo_spec if name == DYNAMO else importlib.machinery.PathFinder.find_spec(
            name, dynamo_spec.submodule_search_locations)
        if spec is None:
            return None
        module = _StandIn(name)
        module.__spec__, module.__file__ = spec, spec.origin
        if spec.submodule_search_locations is not None:
            module.__path__ = list(spec.submodule_search_locations)
        modules[name] = module
    return modules


def defer_dynamo() -> bool:
    """Put the stand-ins in place unless dynamo is imported already; returns whether it did.

    Imports nothing: torch, once imported, finds ``torch._dynamo`` in ``sys.modules``.
    """
    with _lock:
        stand_ins = None if DYNAMO in sys.modules else _stand_ins()
        if stand_ins is None:
            return False
        sys.modules.update(stand_ins)
        if "torch" in sys.modules:
            sys.modules["torch"]._dynamo = stand_ins[DYNAMO]  # type: ignore[attr-defined]
        stand_ins[DYNAMO].utils = stand_ins[_UTILS]  # type: ignore[attr-defined]
        sys.meta_path.insert(0, _SubmoduleImports())
        return True


def _remove_stand_ins() -> None:
    for name in EAGER_ANSWERS:
        if isinstance(sys.modules.get(name), _StandIn):
            del sys.modules[name]
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(torch.__dict__.get("_dynamo"), _StandIn):
        del torch._dynamo  # type: ignore[attr-defined]
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _SubmoduleImports)]


@contextmanager
def dynamo_deferred() -> Iterator[None]:
    """Dynamo deferred for the duration (an import), then the stand-ins removed unless they were there before."""
    added = defer_dynamo()
    try:
        yield
    finally:
        if added and not real_dynamo_loaded():
            with _lock:
                _remove_stand_ins()
