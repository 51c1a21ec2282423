"""Package attributes imported on first use (PEP 562), so that importing a package does not import torch."""
from __future__ import annotations

import importlib
import sys
import types


def lazy_exports(package: str, exports: dict[str, str]) -> None:
    """Give the package ``package`` the attributes in ``exports`` (name -> the module defining it), each
    imported from its module when first read.

    Where an export shares its name with a submodule (``excite.train.fit`` is a module and the function it
    defines), importing the submodule would bind the package's attribute to the module; the package keeps
    the export instead, as an eager ``from .fit import fit`` would.
    """

    class LazyPackage(types.ModuleType):
        def __getattr__(self, name: str):
            if name not in exports:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            value = getattr(importlib.import_module(exports[name]), name)
            super().__setattr__(name, value)  # later reads find it without this function
            return value

        def __setattr__(self, name: str, value) -> None:
            if name in exports and isinstance(value, types.ModuleType) and value.__name__ == f"{package}.{name}":
                value = getattr(importlib.import_module(exports[name]), name)
            super().__setattr__(name, value)

        def __dir__(self) -> list[str]:
            return sorted({*self.__dict__, *exports})

    sys.modules[package].__class__ = LazyPackage
