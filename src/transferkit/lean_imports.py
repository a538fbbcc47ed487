"""Third-party imports without the parts of their start-up that transferkit never uses.

Measured here, four packages cost a run seconds of start-up for code it never calls:

torchvision 0.29 imports ``torch._dynamo`` (1.2-1.7 s) for two names: ``is_compile_supported``,
which ``roi_align`` calls only on accelerators, and ``disable``, which marks one helper of
``tv_tensors`` as never compiled. :func:`import_torchvision` imports torchvision (and its v2
transforms) with dynamo deferred (:mod:`transferkit.deferred_dynamo`); the stand-ins are removed
once it is imported, unless the whole process defers dynamo (the ``transferkit`` command).

torchmetrics 1.9 imports ``scipy.signal`` (0.8 s, with ``scipy.stats``) only to give it back a
``hamming`` function for an audio metric's dependency, and Lightning imports torchmetrics at
start-up to read its version; grad-cam 1.5 imports ``sklearn.decomposition`` (0.8 s) for two CAM
methods transferkit does not use, and ``scipy.sparse`` for a metric; torch's FLOP counter, which
Lightning's model summary imports, imports triton (0.3 s where torch's CUDA wheel installs it) to
recognise triton kernels. Both torchmetrics and grad-cam import matplotlib's ``pyplot`` (with
``axes`` and mplot3d, 0.3 s) for plotting helpers transferkit never calls; the report draws its charts
in a second process, which imports what it draws with. :func:`defer_unused_imports` (installed when transferkit is
imported; it imports nothing itself) lets each package's first import see stand-ins for those
modules (:data:`DEFERRED`): their names, which fetch the real ones when called (or, for a class
only tested against, match its instances once it exists; any other name of a stand-in kept by its
importer fetches the real module's). The stand-ins are
removed once the package is imported, so the real modules import as usual when something uses them,
and what the package set on a stand-in (torchmetrics' ``hamming``) is set on the real module then.

Where a stand-in does not suffice (a version that needs more), the package is imported the
ordinary way.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

from .deferred_dynamo import dynamo_deferred, stand_in_class


def _forget(prefix: str) -> None:
    sys.modules.pop(prefix, None)
    _forget_submodules(prefix)


def import_torchvision() -> None:
    """Import torchvision, with dynamo's import deferred to its first real use."""
    if "torchvision" in sys.modules:
        return
    with dynamo_deferred():
        try:
            import torchvision.transforms.v2  # noqa: F401
        except (ImportError, AttributeError):
            _forget("torchvision")
    import torchvision  # noqa: F401, F811  (a no-op when the first import succeeded)


class TypeCheckedOnly(str):
    """A class its importer only tests objects against (``isinstance``), never calls."""


class LazyContext(str):
    """A context manager factory (``"style.context"``) whose importer builds a decorator with it at
    import time: entering the context (the decorated function's call) imports the real module."""


# What a package's first import is given instead of a module it imports but (for transferkit)
# never uses: {package: {module: (names its importer binds at import time)}}. Each name is a
# function that imports the real module and calls the real name when it is called; a
# TypeCheckedOnly name is a class that no object is an instance of until the real module is
# imported (none can be before), and then exactly the real class's instances.
DEFERRED = {
    # 0.8 s: torchmetrics gives scipy.signal back the ``hamming`` of windows for an audio metric's dependency;
    # what it sets on the stand-in is set on the real module once that is imported (_SetOnImport).
    "torchmetrics": {"scipy.signal": ("windows.hamming",),
                     # 0.3 s: the types and style of metrics' .plot()
                     "matplotlib.axes": (TypeCheckedOnly("Axes"),),
                     "matplotlib.pyplot": (TypeCheckedOnly("Figure"), LazyContext("style.context"))},
    "pytorch_grad_cam": {"sklearn.decomposition": ("KernelPCA", "NMF"),  # 0.8 s: KPCA-CAM and factorisation
                         "scipy.ndimage": ("zoom",),  # 0.15 s: 3-D volumes
                         "scipy.sparse": ("lil_matrix", "csc_matrix"),  # 0.15 s with the next: the ROAD metric
                         "scipy.sparse.linalg": ("spsolve",),
                         "matplotlib.pyplot": ()},  # 0.3 s: factorisation plots
    # 0.3 s where triton is installed (torch's CUDA wheels): FLOP counts of triton kernels, for
    # Lightning's model summary, which a run turns off.
    "torch.utils.flop_counter": {"triton.runtime.jit": (TypeCheckedOnly("JITFunction"),)},
}


def _forwarder(module: str, name: str) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = name
    return forward


def _lazy_context(module: str, path: str) -> Callable[..., contextlib.ContextDecorator]:
    class Entered(contextlib.ContextDecorator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.args, self.kwargs, self.real = args, kwargs, None

        def __enter__(self) -> Any:
            self.real = functools.reduce(getattr, path.split("."), importlib.import_module(module))(*self.args,
                                                                                                  **self.kwargs)
            return self.real.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            return self.real.__exit__(*exc)

    return Entered


class _StandInModule(types.ModuleType):
    """Its own names are the stand-ins; once the real module may be imported, any other is the real one's."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or sys.modules.get(self.__name__) is self:  # still standing in: not given
            raise AttributeError(f"module {self.__name__!r} stands in without {name!r}")
        return getattr(importlib.import_module(self.__name__), name)


def _stand_ins(deferred: dict[str, tuple[str, ...]]) -> dict[str, types.ModuleType]:
    modules = {}
    for module, names in deferred.items():
        stand_in = _StandInModule(module)
        for name in names:
            owner, _, last = name.rpartition(".")
            if isinstance(name, LazyContext):
                setattr(stand_in, owner, types.SimpleNamespace(**{last: _lazy_context(module, name)}))
            elif owner:  # a submodule's name ("windows.hamming")
                setattr(stand_in, owner, types.SimpleNamespace(**{last: _forwarder(f"{module}.{owner}", last)}))
            else:
                make = stand_in_class if isinstance(name, TypeCheckedOnly) else _forwarder
                setattr(stand_in, name, make(module, name))
        stand_in.__given__ = frozenset(vars(stand_in))
        modules[module] = stand_in
    return modules


class _StandInWhileImporting(importlib.abc.Loader):
    """Runs a module's real loader with ``stand_ins`` in ``sys.modules``, then removes them."""

    def __init__(self, loader: importlib.abc.Loader, stand_ins: dict[str, types.ModuleType]) -> None:
        self.loader, self.stand_ins = loader, stand_ins

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        added = {name: m for name, m in self.stand_ins.items() if name not in sys.modules}
        sys.modules.update(added)
        for name, stand_in in added.items():  # `import a.b` then `a.b.x`: the name must be on its package too
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and child not in vars(sys.modules[parent]):
                setattr(sys.modules[parent], child, stand_in)
        try:
            self.loader.exec_module(module)
        except (ImportError, AttributeError):  # a version that needs more than the stand-ins give
            self._remove(added)
            _forget_submodules(module.__name__)
            self.loader.exec_module(module)  # the ordinary import, now with the real modules
        finally:
            self._remove(added)

    @staticmethod
    def _remove(added: dict[str, types.ModuleType]) -> None:
        for name, stand_in in added.items():
            if sys.modules.get(name) is stand_in:  # once: the fallback's import runs between two calls
                # What the package set on it (not another stand-in, which exec_module hangs on its parent).
                set_by_importer = {k: v for k, v in vars(stand_in).items() if k not in stand_in.__given__
                                   and not k.startswith("__") and not isinstance(v, _StandInModule)}  # fmt: skip
                if set_by_importer:
                    sys.meta_path.insert(0, _SetOnImport(name, set_by_importer))
                del sys.modules[name]
            parent, _, child = name.rpartition(".")
            if vars(sys.modules.get(parent, types)).get(child) is stand_in:  # not getattr: scipy's
                delattr(sys.modules[parent], child)  # __getattr__ would import the real one now


class _SetOnImport(importlib.abc.MetaPathFinder):
    """Sets on module ``name``, once it is imported, what a package's import set on its stand-in (if the
    real module lacks it): the package patched the module it imported, and the real one must be patched too."""

    def __init__(self, name: str, attributes: dict[str, Any]) -> None:
        self.name, self.attributes, self.searching = name, attributes, False

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> Any:
        if fullname != self.name or self.searching:
            return None
        self.searching = True  # the search below passes this finder by
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenSet(spec.loader, self)  # a find_spec alone (a probe) leaves this finder waiting
        return spec

    def set_on(self, module: types.ModuleType) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for name, value in self.attributes.items():
            if not hasattr(module, name):
                setattr(module, name, value)


class _ThenSet(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, finder: _SetOnImport) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # its resources are found by its own loader
        self.finder.set_on(module)


def _forget_submodules(package: str) -> None:
    for name in [n for n in sys.modules if n.startswith(package + ".")]:
        del sys.modules[name]


# Packages imported for real before a package's stand-ins go in, so that those of their submodules
# can be attached to them (matplotlib itself is cheap and the report's titles need its fonts).
IMPORTED_FIRST = {"torchmetrics": ("matplotlib",), "pytorch_grad_cam": ("matplotlib",)}


class _FirstImportOf(importlib.abc.MetaPathFinder):
    """Finds each package of :data:`DEFERRED` the usual way, once, and has it loaded with its stand-ins."""

    def __init__(self) -> None:
        self.waiting = {name for name in DEFERRED if name not in sys.modules}

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> Any:
        if fullname not in self.waiting:
            return None
        self.waiting.discard(fullname)  # also makes the search below pass this finder by
        if not self.waiting:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        for package in IMPORTED_FIRST.get(fullname, ()):
            if importlib.util.find_spec(package) is not None:
                importlib.import_module(package)
        spec.loader = _StandInWhileImporting(spec.loader, _stand_ins(DEFERRED[fullname]))
        return spec


def defer_unused_imports() -> None:
    """Have the first import of each package in :data:`DEFERRED` (whoever makes it) skip what it never needs."""
    if not any(isinstance(f, _FirstImportOf) for f in sys.meta_path):
        finder = _FirstImportOf()
        if finder.waiting:
            sys.meta_path.insert(0, finder)
