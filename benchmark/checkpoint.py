"""Stage checkpoints: what a run needs to continue after a crash exactly as if it had never stopped.

After every finished stage the runner writes ``DIR/checkpoints/<run_id>/stage-<t>/``:

* ``trainable.safetensors``: the method's :meth:`~methods.base.Method.trainable_state` (adapters only for PEFT
  methods, the whole model for full fine-tuning);
* ``rng.safetensors``: the torch CPU (and CUDA) generator states and the data-order generator's state;
* ``state.json``: python/numpy RNG states, the torch thread count, the run's result-determining inputs, the
  base model's hash, and the partial run record (R and G rows so far, stage stats, diagnostics).

The folder is written under a temporary name and renamed into place, so a ``kill -9`` at any moment leaves
either the previous stage's checkpoint or the new one, never half of one. Only the latest stage is kept, and
the runner deletes the folder once the run's success record is written (the record holds every number the
leaderboard needs; the weights a finished run keeps, ``keep_weights``, live in ``DIR/weights/``:
:mod:`benchmark.weights`). No pickle anywhere: tensors are safetensors, the rest is JSON.

There is no optimizer state to save: :func:`benchmark.train.train_stage` builds a fresh optimizer and
scheduler for every stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from benchmark.records import read_json

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
_STAGE_PREFIX = "stage-"


# -- what determines a run's numbers: benchmark.records.result_inputs -------------------------------------
def thread_mismatch(saved_threads: int | None, configured: int | None) -> str | None:
    """A message when an explicit ``num_threads`` differs from the count a checkpoint was made with."""
    if saved_threads is not None and configured is not None and saved_threads != configured:
        return (f"num_threads={configured} but the checkpoint was made with {saved_threads} torch thread(s); "
                f"CPU results depend on the thread count")
    return None


# -- random number generators ---------------------------------------------------------------------------
def capture_rng(generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG stream a run draws from: (tensors for safetensors, JSON-able python/numpy states)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    if generator is not None:
        tensors["data_generator"] = generator.get_state()
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")),
                                       key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if generator is not None and "data_generator" in tensors:
        generator.set_state(tensors["data_generator"])
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving the global RNG streams, e.g. an evaluation that may be served from cache:
    a cache hit and a fresh evaluation must leave the training run in the same state."""
    tensors, meta = capture_rng()
    try:
        yield
    finally:
        restore_rng(tensors, meta)


# -- stage checkpoints ----------------------------------------------------------------------------------
@dataclass
class StageCheckpoint:
    """A loaded stage checkpoint."""

    stage: int
    trainable: dict[str, torch.Tensor]
    rng_tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _stage_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.is_dir() and p.name.startswith(_STAGE_PREFIX) and p.name[len(_STAGE_PREFIX):].isdigit():
                out.append((int(p.name[len(_STAGE_PREFIX):]), p))
    return sorted(out)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_stage(run_dir: str | Path, stage: int, trainable: dict[str, torch.Tensor],
               generator: torch.Generator | None, meta: dict[str, Any]) -> Path:
    """Write ``run_dir/stage-<stage>/`` atomically (temp folder + rename) and drop older stages."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng_tensors, rng_meta = capture_rng(generator)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{_STAGE_PREFIX}{stage}-", dir=run_dir))
    try:
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        files = {n: (tmp / n).stat().st_size for n in ("trainable.safetensors", "rng.safetensors")}
        state = {"format": FORMAT_VERSION, "stage": stage, "rng": rng_meta, "files": files,
                 "torch_threads": torch.get_num_threads(), **meta}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str) + "\n", encoding="utf-8")
        for p in tmp.iterdir():
            _fsync_file(p)
        final = run_dir / f"{_STAGE_PREFIX}{stage}"
        if final.exists():  # left by an attempt that died after this rename; ours replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for s, p in _stage_dirs(run_dir):
        if s != stage:
            shutil.rmtree(p, ignore_errors=True)
    clean_temp(run_dir)
    return final


def clean_temp(run_dir: str | Path) -> None:
    """Remove half-written checkpoint folders left by a process that died while writing one."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for p in run_dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def latest_meta(run_dir: str | Path) -> dict[str, Any] | None:
    """``state.json`` of the newest complete stage checkpoint (no tensors loaded), or None."""
    for stage, p in reversed(_stage_dirs(Path(run_dir))):
        try:
            return read_json(p / "state.json")
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable checkpoint %s", p)
    return None


def load_latest(run_dir: str | Path) -> StageCheckpoint | None:
    """The newest complete, intact stage checkpoint, or None (a damaged one is reported and skipped)."""
    for stage, p in reversed(_stage_dirs(Path(run_dir))):
        try:
            meta = read_json(p / "state.json")
            for name, size in meta["files"].items():
                if (p / name).stat().st_size != size:
                    raise ValueError(f"{name} has {(p / name).stat().st_size} bytes, expected {size}")
            return StageCheckpoint(stage=stage, trainable=load_file(str(p / "trainable.safetensors")),
                                   rng_tensors=load_file(str(p / "rng.safetensors")), meta=meta)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            logger.warning("ignoring damaged checkpoint %s: %s", p, exc)
    return None


def remove(run_dir: str | Path) -> None:
    """Delete a run's checkpoints (after its success record is written, or for ``--force``)."""
    shutil.rmtree(run_dir, ignore_errors=True)
