"""Several processes (``accelerate launch`` / ``torchrun``): data-parallel training, evaluation on rank 0.

Design (chosen because lm-eval's ``HFLM`` on an in-memory model is single-process, and an accelerate-wrapped
model is not supported by it):

- **Training** is data-parallel: every process holds the whole model; at each stage the model is wrapped by
  ``accelerator.prepare_model`` (DDP), each process takes its slice of every global batch
  (:func:`benchmark.train.train_stage`), gradients are averaged, so all replicas stay identical. Method hooks
  always see the unwrapped model (``accelerator.unwrap_model``).
- **Evaluation** runs on rank 0 alone, on the unwrapped replica, while the other processes wait; its result is
  then broadcast, so every process holds the same record. An exception on rank 0 is re-raised everywhere.
- **Files** (records, checkpoints, caches, leaderboard) are written by rank 0 only.

The process group gets a long timeout (:data:`TIMEOUT`): waiting ranks sit in a collective for the whole of
rank 0's evaluation, which on a real model and suite can take far longer than the 30-minute default.

Sharded training is FSDP2 (``train.sharding: fsdp``, or an accelerate config with ``distributed_type: FSDP``
and ``fsdp_version: 2``): :mod:`benchmark.sharding`, where evaluation runs on every process in lockstep instead
of on rank 0. DeepSpeed, XLA and Megatron-LM are refused with a one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn

from benchmark.errors import UserError

logger = logging.getLogger(__name__)
T = TypeVar("T")
TIMEOUT = timedelta(hours=24)
UNSUPPORTED = {"DEEPSPEED", "XLA", "MEGATRON_LM"}


def make_accelerator(**kwargs: Any) -> Any:
    """The run's ``Accelerator``: CPU when no GPU, a long collective timeout, unused parameters tolerated.

    ``kwargs`` go to ``Accelerator`` (the trackers: :func:`benchmark.trackers.tracker_kwargs`).

    ``find_unused_parameters`` is on because mixture-of-experts methods leave some experts unused in a batch.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs


    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=TIMEOUT),
                                       DistributedDataParallelKwargs(find_unused_parameters=True)], **kwargs)
    if DistributedType(acc.distributed_type).name in UNSUPPORTED:
        raise UserError(f"accelerate distributed type {acc.distributed_type.value} is not supported; valid: a DDP "
                        f"config (examples/accelerate/ddp.yaml) or FSDP2 (examples/accelerate/fsdp.yaml)")
    return acc


def _state() -> Any:
    from accelerate import PartialState

    return PartialState()


def is_main() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return _state().is_main_process


def world_size() -> int:
    return _state().num_processes


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every process returns rank 0's result (an exception is re-raised everywhere)."""
    state = _state()
    if state.num_processes == 1:
        return fn()

    box: list[Any] = [None]
    error: BaseException | None = None
    if state.is_main_process:
        try:
            box[0] = ("ok", fn())
        except BaseException as exc:  # hand the failure to the waiting ranks instead of leaving them hanging
            error = exc
            box[0] = ("user-error" if isinstance(exc, UserError) else "error", f"{type(exc).__name__}: {exc}")
    from accelerate.utils import broadcast_object_list

    broadcast_object_list(box)
    status, value = box[0]
    if error is not None:
        raise error
    if status == "user-error":
        raise UserError(value.split(": ", 1)[-1])
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def wrap_for_training(accelerator: Any, model: nn.Module) -> nn.Module:
    """The model to run forward/backward on: DDP-wrapped in a multi-process run, else the model itself."""
    if accelerator.num_processes > 1:
        return accelerator.prepare_model(model)
    return model


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (one entry in a single-process run); a collective: call on all ranks."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
