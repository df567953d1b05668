"""LightningModules: a shared base and one file per method, each registered in its own file
(:mod:`lightning_md4.modules.registry`).

No hand-kept list: ``from lightning_md4.modules import MD4`` finds the method's file through the
registry, which reads the files of this package without importing them. So importing this package
(as ``md4 --help`` does, through the registry) does not import torch; a method's class does.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_md4.modules.registry import method_names, methods

_SHARED = {"DiffusionModule": "lightning_md4.modules.base", "OptimConfig": "lightning_md4.modules.base"}


def __getattr__(name: str) -> Any:
    if name in _SHARED:
        return getattr(importlib.import_module(_SHARED[name]), name)
    for method in methods():
        if method.name == name:
            return method.cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [*_SHARED, *method_names()]
