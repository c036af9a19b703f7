"""Evaluation results cached by content: reused only when everything that could change a score is equal.

The key hashes (1) the model: the bytes, dtypes and shapes of its weights -- for a stage, the base model's hash
plus the method's name, config, code and :meth:`~methods.base.Method.trainable_state`; (2) every task's spec and
data bytes (:meth:`tasks.base.TaskSpec.content_hash`) and the names of lm-eval's own tasks; (3) the evaluation
settings (batch size, limit, few-shot count, device); (4) the versions of lm-eval, torch, transformers, peft
and this harness, plus the source of the evaluation code itself. A different value anywhere is a different key,
so a stale result cannot be served. Each entry also stores the un-hashed key parts and is checked against them
on read. Entries are JSON files under ``DIR/cache/``, written atomically.

lm-eval's own tasks (``lm_eval:<name>``) are keyed by name and lm-eval version: their data come from the hub
through ``datasets`` and are not re-hashed here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import benchmark.evaluate
import tasks.base
import tasks.templates
from benchmark.records import read_json, write_json

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1


def tensor_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of a dict of tensors (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def model_hash(model: torch.nn.Module) -> str:
    """:func:`tensor_hash` of a model's full ``state_dict`` (parameters and persistent buffers)."""
    return tensor_hash(model.state_dict())


def is_model_hash(value: Any) -> bool:
    """Whether ``value`` looks like a :func:`model_hash` (64 lowercase hex digits), i.e. a trusted content key."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def code_hash(package: str) -> str:
    """Hash of the source files of every loaded module of ``package`` (e.g. ``methods``, or a plugin's)."""
    h = hashlib.sha256()
    for name in sorted(m for m in list(sys.modules) if m == package or m.startswith(package + ".")):
        f = getattr(sys.modules.get(name), "__file__", None)
        if f and Path(f).is_file():
            h.update(name.encode() + Path(f).read_bytes())
    return h.hexdigest()


def stage_model_key(base_hash: str, method_cls: type, method_config: dict[str, Any],
                    trainable: dict[str, torch.Tensor]) -> str:
    """Model key after a stage: base weights + the method (name, config, code) + its trainable state."""
    parts = {"base": base_hash, "method": getattr(method_cls, "name", method_cls.__name__),
             "method_config": method_config, "method_code": code_hash(method_cls.__module__.split(".")[0]),
             "trainable": tensor_hash(trainable)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=1)
def harness_versions() -> dict[str, Any]:
    """Library versions and the evaluation code's hash (a changed scorer or template renderer invalidates)."""
    versions: dict[str, Any] = {}
    for pkg in ("lm_eval", "torch", "transformers", "peft", "datasets", "forgetbench"):
        try:
            versions[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    h = hashlib.sha256()
    for mod in (benchmark.evaluate, tasks.base, tasks.templates):  # the scorer and the template renderer
        h.update(Path(mod.__file__).read_bytes())
    versions["eval_code"] = h.hexdigest()
    versions["cache_format"] = CACHE_FORMAT
    return versions


def eval_key(model_key: str, specs: list[Any], lm_eval_tasks: list[str],
             settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(hex key, the parts it hashes) of one evaluation."""
    parts = {"model": model_key, "tasks": [[s.name, s.content_hash()] for s in specs],
             "lm_eval_tasks": list(lm_eval_tasks), "settings": settings, "harness": harness_versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest(), parts


class EvalCache:
    """JSON files ``<label>-<key>.json`` in ``directory``; a damaged or mismatching entry is a miss."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, key: str, label: str) -> Path:
        return self.directory / f"{label}-{key}.json"

    def get(self, key: str, parts: dict[str, Any], label: str = "eval") -> dict[str, Any] | None:
        path = self._path(key, label)
        if not path.is_file():
            return None
        try:
            entry = read_json(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            logger.warning("evaluation cache: ignoring unreadable entry %s", path.name)
            return None
        stored = json.dumps(entry.get("parts"), sort_keys=True, default=str) if isinstance(entry, dict) else None
        if stored != json.dumps(parts, sort_keys=True, default=str) or "result" not in entry:
            logger.warning("evaluation cache: entry %s does not match its key; recomputing", path.name)
            return None
        return entry["result"]

    def put(self, key: str, parts: dict[str, Any], result: dict[str, Any], label: str = "eval") -> None:
        write_json(self._path(key, label), {"key": key, "parts": parts, "result": result})

    def get_or_compute(self, key: str, parts: dict[str, Any], compute: Callable[[], dict[str, Any]],
                       label: str = "eval", what: str = "evaluation") -> tuple[dict[str, Any], bool]:
        """(result, whether it came from the cache); a miss runs ``compute`` and stores its result."""
        hit = self.get(key, parts, label)
        if hit is not None:
            logger.info("%s: cache hit %s-%s", what, label, key[:12])
            return hit, True
        result = compute()
        self.put(key, parts, result, label)
        return result, False
