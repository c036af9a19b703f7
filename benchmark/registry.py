"""A small generic registry: decorator registration, entry-point plugins, did-you-mean errors.

Built-in methods and tasks register themselves with a decorator when their package is imported. Outside
packages declare entry points (groups ``forgetbench.methods`` and ``forgetbench.tasks``); these are loaded
lazily on first use, each inside its own try/except so one broken plugin cannot take the others down.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

from benchmark.errors import UserError, unknown_name

logger = logging.getLogger(__name__)
T = TypeVar("T")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-.]*[a-z0-9]$|^[a-z]$")


@dataclass
class _Entry:
    origin: str
    obj: Any = None
    entry_point: metadata.EntryPoint | None = None


class Registry(Generic[T]):
    """Name -> object mapping with an origin per name (``builtin:<module>`` or ``plugin:<dist>``)."""

    def __init__(self, kind: str, group: str, builtin_package: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self.builtin_package = builtin_package
        self._entries: dict[str, _Entry] = {}
        self._builtins_loaded = False
        self._plugins_loaded = False

    # -- registration ---------------------------------------------------------------------------
    def register(self, name: str, obj: T | None = None, origin: str | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid {self.kind} name {name!r}: use lower-case letters, digits, '_', '-', '.'")

        def deco(o: T) -> T:
            src = origin or f"builtin:{getattr(o, '__module__', '?')}"
            old = self._entries.get(name)
            if old is not None and old.obj is not o and old.origin != src:
                raise UserError(f"{self.kind} name clash: {name!r} from {src} is already registered by {old.origin}")
            self._entries[name] = _Entry(origin=src, obj=o)
            return o

        return deco if obj is None else deco(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` if registered (e.g. a task or sequence a test registered for itself)."""
        self._entries.pop(name, None)

    @contextlib.contextmanager
    def registered(self, name: str, obj: T, origin: str = "test") -> Iterator[T]:
        """Register ``obj`` under ``name`` for the duration of a ``with`` block (a test's own plugin)."""
        self.register(name, obj, origin=origin)
        try:
            yield obj
        finally:
            self.unregister(name)

    # -- discovery ------------------------------------------------------------------------------
    def _load_builtins(self) -> None:
        if self._builtins_loaded or self.builtin_package is None:
            return
        self._builtins_loaded = True
        importlib.import_module(self.builtin_package)

    def _load_plugins(self) -> None:
        """Register each entry point of ``self.group`` lazily; ``FORGETBENCH_PLUGINS=a,b`` is an allow-list."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        allow = os.environ.get("FORGETBENCH_PLUGINS")
        allowed = {a.strip() for a in allow.split(",")} if allow else None
        for ep in metadata.entry_points(group=self.group):
            if allowed is not None and ep.name not in allowed:
                continue
            dist = getattr(ep, "dist", None)
            origin = f"plugin:{dist.name if dist else '?'} ({ep.value})"
            if ep.name in self._entries and self._entries[ep.name].entry_point is None:
                raise UserError(
                    f"{self.kind} name clash: plugin {origin} uses {ep.name!r}, "
                    f"already registered by {self._entries[ep.name].origin}"
                )
            logger.debug("found %s plugin %s -> %s", self.kind, ep.name, ep.value)
            self._entries[ep.name] = _Entry(origin=origin, entry_point=ep)

    def _ensure(self) -> None:
        self._load_builtins()
        self._load_plugins()

    # -- lookup ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """All registered names (built-ins and discovered plugins), sorted."""
        self._ensure()
        return sorted(self._entries)

    def origin(self, name: str) -> str:
        self._ensure()
        return self._entries[name].origin

    def get(self, name: str) -> T:
        """Return the object for ``name``; unknown names raise a one-line :class:`UserError`."""
        self._ensure()
        entry = self._entries.get(name)
        if entry is None:
            raise unknown_name(self.kind, name, self._entries)
        if entry.obj is None and entry.entry_point is not None:
            try:
                entry.obj = entry.entry_point.load()
            except Exception as exc:  # isolate a broken plugin: report it, keep the rest usable
                logger.exception("failed to load %s plugin %r", self.kind, name)
                raise UserError(f"{self.kind} plugin {name!r} ({entry.origin}) failed to load: {exc}") from exc
        return entry.obj

    def __contains__(self, name: str) -> bool:
        self._ensure()
        return name in self._entries
