"""One precision policy for every method: what the trainable weights are stored in and what the forward runs in.

``train.precision``:

- ``bf16-mixed`` (``auto`` on a GPU with bf16): trainable parameters -- and so the optimiser state -- are fp32,
  the forward (training and evaluation) runs under bf16 autocast, the frozen base is stored in bf16. Full
  fine-tuning thus keeps fp32 master weights.
- ``bf16``: everything in bf16, no autocast. A memory saver that changes results (bf16 AdamW updates round
  away small steps); comparable only with other ``bf16`` runs.
- ``fp32`` (``auto`` on a CPU): everything fp32, no autocast.

The trainer applies the policy (:func:`apply_policy` at the start of every stage, :func:`autocast` around every
forward); no method chooses its own dtypes, so plugin methods get the same treatment.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

PRECISIONS = ("auto", "bf16-mixed", "bf16", "fp32")
# model.dtype values each resolved policy accepts for the stored base weights ("auto" follows the policy)
COMPATIBLE_DTYPES = {"bf16-mixed": ("auto", "bfloat16", "float32", "float16"), "bf16": ("auto", "bfloat16"),
                     "fp32": ("auto", "float32")}


def default_device_type() -> str:
    """The device a run trains on (the run's ``Accelerator`` uses CUDA whenever it is there)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(name: str, device_type: str | None = None) -> str:
    """``auto`` -> ``bf16-mixed`` on a CUDA device with bf16, else ``fp32``; other names are returned as given."""
    if name != "auto":
        return name
    device_type = device_type or default_device_type()
    return "bf16-mixed" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def check_precision(name: str, model_dtype: str) -> None:
    """Raise ``ValueError`` for an unknown policy or a ``model.dtype`` the resolved policy contradicts."""
    if name not in PRECISIONS:
        raise ValueError(f"invalid train.precision: {name!r}; valid: {', '.join(PRECISIONS)}")
    policy = resolve_precision(name)
    if model_dtype not in COMPATIBLE_DTYPES[policy]:
        raise ValueError(f"model.dtype={model_dtype} contradicts train.precision={name} (resolved: {policy}); "
                         f"valid model.dtype values with it: {', '.join(COMPATIBLE_DTYPES[policy])}")


def load_dtype(policy: str, model_dtype: str = "auto") -> torch.dtype:
    """The dtype the base model is loaded in: ``model.dtype`` when set, else fp32 for ``fp32``, bf16 otherwise."""
    if model_dtype != "auto":
        return getattr(torch, model_dtype)
    return torch.float32 if policy == "fp32" else torch.bfloat16


def trainable_dtype(policy: str) -> torch.dtype:
    """The dtype of every trainable parameter (and so of the optimiser state) under ``policy``."""
    return torch.bfloat16 if policy == "bf16" else torch.float32


@torch.no_grad()
def apply_policy(model: nn.Module, policy: str) -> int:
    """Cast every trainable parameter to :func:`trainable_dtype` in place; returns how many were cast.

    ``param.data`` is replaced, so the parameter objects -- and ties between them (shared embeddings) -- stay.
    """
    dtype, n = trainable_dtype(policy), 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def autocast(policy: str, device_type: str) -> Any:
    """The context every forward of the run runs in: bf16 autocast under ``bf16-mixed``, else nothing."""
    if policy == "bf16-mixed":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
