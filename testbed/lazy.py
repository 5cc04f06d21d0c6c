"""Package attributes imported on first use (PEP 562), so that importing a package stays torch-free."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_attributes(package: str, modules: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package`: each name of `modules` is read from its submodule
    (`package.<modules[name]>`) the first time it is asked for, then kept on the package."""

    def __getattr__(name: str) -> object:
        if name not in modules:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{modules[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
