"""Names of a package that load with their module on first use (PEP 562): what imports the package for
one of its light names does not pay for the heavy ones (the settle path, the price book)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, modules: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, where ``modules`` maps each lazy name to the
    module of the package that defines it (a package lists those names under ``TYPE_CHECKING`` too, for
    the type checker, and assigns the two under ``if not TYPE_CHECKING``: a module ``__getattr__`` the
    type checker sees makes it take any name of the package)."""

    def attribute(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            loaded = importlib.import_module(f"{package}.{module}")
        except AttributeError as exc:
            # Raised while the module loads (a dependency's API changed): as an AttributeError it would
            # read as "no such name" (``from package import name`` drops it); it is a failed import.
            raise ImportError(f"{package}.{module} failed to load: {exc}") from exc
        return getattr(loaded, name)

    def names() -> list[str]:
        return sorted({*vars(sys.modules[package]), *modules})

    return attribute, names
