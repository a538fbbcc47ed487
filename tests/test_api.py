"""The top-level API: every name the package lists is the object its module defines."""

from __future__ import annotations

import importlib

import transferkit


def test_every_top_level_name_is_its_modules_object_even_after_the_module_is_imported() -> None:
    for name, module_name in transferkit._EXPORTS.items():
        module = importlib.import_module(f"transferkit.{module_name}")
        # Importing a submodule sets an attribute of the same name on the package: a function named
        # like a module (export/export.py) would then resolve to the module instead.
        assert getattr(transferkit, name) is getattr(module, name), name
    assert sorted(transferkit.__all__) == sorted(transferkit._EXPORTS)
