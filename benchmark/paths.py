"""Where results live under an output directory, and why no name from a config can escape it.

Run ids are built from method, model, sequence and seed names. Method and sequence names pass the registry's
name check, but a model name is free text (a hub id or a local path), so every name that becomes a path
component goes through :func:`safe_component`, and :func:`under` refuses any path that resolves outside its
root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(name: str) -> str:
    """``name`` as one harmless path component: separators and odd characters become ``_``, no leading dot.

    ``"../../x"`` -> ``"_.._x"``: a single file name, never a parent directory or a hidden file.
    """
    out = _UNSAFE.sub("_", str(name)).lstrip(".")
    return out or "_"


def under(root: str | Path, *parts: str) -> Path:
    """``root/parts...``, raising ``ValueError`` if the result would lie outside ``root``."""
    root_r = Path(root).resolve()
    path = Path(root, *parts)
    if not path.resolve().is_relative_to(root_r):
        raise ValueError(f"path {str(path)!r} escapes the output directory {str(root_r)!r}")
    return path


def record_path(out_dir: str | Path, run_id: str) -> Path:
    """``DIR/runs/<run_id>.json``."""
    return under(out_dir, "runs", f"{safe_component(run_id)}.json")


def checkpoint_dir(out_dir: str | Path, run_id: str) -> Path:
    """``DIR/checkpoints/<run_id>/`` (holds ``stage-<t>/`` folders)."""
    return under(out_dir, "checkpoints", safe_component(run_id))


def weights_dir(out_dir: str | Path, run_id: str) -> Path:
    """``DIR/weights/<run_id>/`` (holds ``stage-<k>/`` folders of kept trainable states, ``--keep-weights``)."""
    return under(out_dir, "weights", safe_component(run_id))


def lock_path(out_dir: str | Path, name: str) -> Path:
    """``DIR/locks/<name>.lock``."""
    return under(out_dir, "locks", f"{safe_component(name)}.lock")


def cache_dir(out_dir: str | Path) -> Path:
    """``DIR/cache/`` (content-keyed evaluation results)."""
    return under(out_dir, "cache")


def cache_root() -> Path:
    """The machine-wide cache (built base models, prepared datasets): ``$FORGETBENCH_CACHE`` or
    ``~/.cache/forgetbench``; unlike the folders above it is shared by every output directory."""
    return Path(os.environ.get("FORGETBENCH_CACHE", Path.home() / ".cache" / "forgetbench"))
