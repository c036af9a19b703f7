"""Kept weights: a run's trainable state after chosen stages, so it can be re-scored later without training.

``keep_weights`` (``run --keep-weights``) says which stages a run keeps: ``none``, ``final`` (the last stage),
``all`` (every stage), or ``auto`` (the default): ``final``, except ``none`` for a method whose trainable state is
the whole model (full fine-tuning and its relatives), whose every kept stage is a full model's worth of bytes. It
never changes a number, so it is not among a run's result inputs (:func:`benchmark.records.result_inputs`).

Layout: ``DIR/weights/<run_id>/stage-<k>/trainable.safetensors`` (the method's
:meth:`~methods.base.Method.trainable_state`: adapters only for PEFT methods) and ``weights.json`` (run id, stage,
model key, base model hash, method, method config, sha256 and size of the tensor file). Each file is written
atomically, the JSON last: a folder without it, or whose tensor file does not match its sha256, is not a kept
stage. Unlike stage checkpoints, kept weights outlive the run's success.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from benchmark.paths import weights_dir
from benchmark.records import atomic_write_bytes, read_json, write_json

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
TENSORS, INFO = "trainable.safetensors", "weights.json"
STAGE_PREFIX = "stage-"


def resolve_keep(setting: str, trainable_params: int, total_params: int) -> str:
    """``none``, ``final`` or ``all`` for a run: ``auto`` is ``none`` when every parameter of the model trains."""
    if setting != "auto":
        return setting
    return "none" if total_params and trainable_params >= total_params else "final"


def keeps_stage(keep: str, stage: int, num_stages: int) -> bool:
    """Whether a run with resolved ``keep`` keeps the weights of ``stage`` (1-based) of ``num_stages``."""
    return keep == "all" or (keep == "final" and stage == num_stages)


@dataclass
class KeptStage:
    """``weights.json`` of one kept stage: whose weights they are and how to check the tensor file."""

    run_id: str
    stage: int
    model_key: str | None = None  # benchmark.evalcache.stage_model_key of the model after this stage
    base_model_hash: str | None = None
    method: str | None = None
    method_config: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""  # of the tensor file's bytes
    bytes: int = 0
    format: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeptStage:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_dir(out_dir: str | Path, run_id: str, stage: int) -> Path:
    """``DIR/weights/<run_id>/stage-<stage>/``."""
    return weights_dir(out_dir, run_id) / f"{STAGE_PREFIX}{stage}"


def save(out_dir: str | Path, info: KeptStage, state: dict[str, torch.Tensor]) -> Path:
    """Write the tensor file, then its ``weights.json`` (each atomically); returns the stage folder."""
    folder = stage_dir(out_dir, info.run_id, info.stage)
    (folder / INFO).unlink(missing_ok=True)  # a stage kept by an earlier attempt is complete again only at the end
    data = save_bytes({k: v.detach().cpu().contiguous() for k, v in state.items()})
    atomic_write_bytes(folder / TENSORS, data)
    info.sha256, info.bytes = hashlib.sha256(data).hexdigest(), len(data)
    write_json(folder / INFO, info.to_dict())
    logger.debug("kept the weights of %s stage %d (%d bytes)", info.run_id, info.stage, info.bytes)
    return folder


def kept_stages(out_dir: str | Path, run_id: str) -> list[int]:
    """Stages of ``run_id`` whose weights are kept (a ``weights.json`` is there; the bytes are checked on load)."""
    root = weights_dir(out_dir, run_id)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        k = p.name[len(STAGE_PREFIX):]
        if p.name.startswith(STAGE_PREFIX) and k.isdigit() and (p / INFO).is_file() and (p / TENSORS).is_file():
            out.append(int(k))
    return sorted(out)


def load(out_dir: str | Path, run_id: str, stage: int) -> tuple[dict[str, torch.Tensor], KeptStage]:
    """(tensors, info) of a kept stage; ``ValueError`` when it is missing, damaged or another run's."""
    folder = stage_dir(out_dir, run_id, stage)
    try:
        info = KeptStage.from_dict(read_json(folder / INFO))
        data = (folder / TENSORS).read_bytes()
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"weights of {run_id} stage {stage} cannot be read: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise ValueError(f"weights of {run_id} stage {stage}: {folder / TENSORS} does not match its sha256")
    if info.run_id != run_id or info.stage != stage:
        raise ValueError(f"{folder / INFO} names {info.run_id} stage {info.stage}, not {run_id} stage {stage}")
    return load_bytes(data), info


def remove(out_dir: str | Path, run_id: str) -> None:
    """Delete a run's kept weights (``--force`` starts the run over)."""
    shutil.rmtree(weights_dir(out_dir, run_id), ignore_errors=True)
