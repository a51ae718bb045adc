"""Import hooks that wrap one module's loader (standard library only, so the CLI stays light).

Two parts of factorlm act around the import of another package without importing it
themselves: the transformers integration registers its quantizer the moment transformers'
registry module is executed, and the CLI holds Ctrl-C while torch is imported. Both are a
meta path finder that asks the other finders for the module's spec and wraps its loader.
"""

from __future__ import annotations

import importlib.abc
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any


def spec_from_other_finders(finder: object, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
    """The spec that the finders of ``sys.meta_path`` other than ``finder`` give ``fullname`` (None if none)."""
    for other in sys.meta_path:
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec = other.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


class WrappingLoader(importlib.abc.Loader):
    """Delegates to the real loader ``inner``; subclasses add work around :meth:`exec_module`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)


def wrapped_spec(finder: object, fullname: str, path: Any, target: Any, loader: type[WrappingLoader]
                 ) -> ModuleSpec | None:
    """:func:`spec_from_other_finders` with its loader wrapped in ``loader``."""
    spec = spec_from_other_finders(finder, fullname, path, target)
    if spec is not None and spec.loader is not None:
        spec.loader = loader(spec.loader)
    return spec
