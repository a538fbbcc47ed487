"""Import torchvision without paying for ``torch._dynamo`` (1.2-1.7 s of a command's start-up).

torchvision 0.29 imports ``torch._dynamo`` at start-up for two names: ``is_compile_supported``,
which ``roi_align`` calls only on accelerators, and ``disable``, which marks one helper of
``tv_tensors`` as never compiled. Measured here, that import is most of torchvision's start-up and
of ``transferkit predict``'s fixed cost. Importing this module first imports torchvision (and its
v2 transforms) with a stand-in for those two names, each of which fetches the real one on first
call; the stand-in is removed before anything else can see it, so a later ``torch.compile``,
``torch.export`` or ``import timm`` imports the real ``torch._dynamo`` as usual. Where the
stand-in does not suffice (a torchvision that needs more of dynamo), torchvision is imported the
ordinary way.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any

_DYNAMO = "torch._dynamo"
_DYNAMO_UTILS = "torch._dynamo.utils"


def is_compile_supported(device_type: Any) -> Any:
    from torch._dynamo.utils import is_compile_supported as real

    return real(device_type)


def disable(fn: Callable[..., Any] | None = None, recursive: bool = True, reason: str | None = None) -> Any:
    if fn is None:
        return functools.partial(disable, recursive=recursive, reason=reason)
    disabled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def lazily_disabled(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            import torch._dynamo

            disabled = torch._dynamo.disable(fn, recursive, reason=reason)
        return disabled(*args, **kwargs)

    return lazily_disabled


def _forget(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def import_torchvision() -> None:
    """Import torchvision, with dynamo's import deferred to its first real use."""
    if "torchvision" in sys.modules or _DYNAMO in sys.modules:
        return
    import torch

    dynamo, utils = types.ModuleType(_DYNAMO), types.ModuleType(_DYNAMO_UTILS)
    dynamo.disable = disable  # type: ignore[attr-defined]
    utils.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]
    sys.modules[_DYNAMO], sys.modules[_DYNAMO_UTILS] = dynamo, utils
    try:
        import torchvision.transforms.v2  # noqa: F401
    except (ImportError, AttributeError):
        _forget("torchvision")
    finally:
        del sys.modules[_DYNAMO], sys.modules[_DYNAMO_UTILS]
        torch.__dict__.pop("_dynamo", None)
    import torchvision  # noqa: F401, F811  (a no-op when the first import succeeded)


import_torchvision()
