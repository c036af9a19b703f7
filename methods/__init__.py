"""Built-in method plugins: every sub-package is imported so its ``@register_method`` decorator runs.

Adding a method is one new folder here; nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

from methods.base import METHODS, Method, MethodConfig, Mixture, StageData, TaskInfo, register_method

__all__ = ["METHODS", "Method", "MethodConfig", "Mixture", "StageData", "TaskInfo", "register_method"]

for _info in pkgutil.iter_modules(__path__):
    if _info.ispkg:
        importlib.import_module(f"{__name__}.{_info.name}")
