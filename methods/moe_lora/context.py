"""Batch side information for MoE-LoRA layers, without forking ``transformers``.

``transformers`` forwards do not take ``task_types`` (LoRAMoE) and do not hand the ``attention_mask`` to an
``nn.Linear``. The runner (through ``Method.forward_context``) sets them here for the duration of one training
step, and every :class:`~methods.moe_lora.layer.MoELoRALinear` reads them in ``forward``::

    with routing_context(task_types=method_task_types, attention_mask=batch["attention_mask"]):
        loss = model(**batch).loss + method.aux_loss(model)
        loss.backward()          # keep backward INSIDE the context (gradient-checkpoint recompute)

Why a process-wide slot and not a ``ContextVar`` / thread-local: autograd runs the backward pass of CUDA
tensors -- and hence the forward *recompute* of gradient checkpointing -- on its own device threads, where
neither a thread-local nor a ``ContextVar`` set by the training thread is visible. A plain module-level slot is
visible from every thread, so the context stays valid during recompute as long as the runner wraps
forward + backward in it. Training drives one model per process (DDP uses processes), so the slot is not
shared between concurrent steps. Nested contexts restore the outer one on exit.

The context must be valid during recompute: non-reentrant checkpointing checks that the recompute saves
exactly the tensors of the original forward, so aux terms (which read ``task_types``) are recomputed as well --
a term that returned a tensor in the forward but ``None`` in the recompute raises ``CheckpointError``. While
recomputing (see :func:`is_recomputing`) a layer keeps the original forward's ``last_aux`` and does not update
its routing statistics, so nothing is double-counted. Use non-reentrant checkpointing
(``gradient_checkpointing_kwargs={"use_reentrant": False}``): the reentrant variant runs the original forward
under ``no_grad``, so aux terms computed there carry no gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingContext:
    """Side information of the current batch.

    Args:
        task_types: ``(B,)`` integer tensor (LoRAMoE: 1 = world knowledge, 0 = downstream skill) or ``None``.
        attention_mask: ``(B, T)`` 0/1 tensor (1 = real token) or ``None``. Layers only use it when its shape
            equals the leading dims of their input (so it is ignored during cached generation, T = 1).
    """

    task_types: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


_EMPTY = RoutingContext()
_current: RoutingContext = _EMPTY


@contextlib.contextmanager
def routing_context(
    task_types: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
) -> Iterator[RoutingContext]:
    """Make ``task_types`` / ``attention_mask`` visible to every MoE-LoRA layer until the block exits."""
    global _current
    previous = _current
    _current = RoutingContext(task_types=task_types, attention_mask=attention_mask)
    try:
        yield _current
    finally:
        _current = previous


def get_routing_context() -> RoutingContext:
    """The innermost active :class:`RoutingContext` (an empty one outside any ``routing_context``)."""
    return _current


def is_recomputing() -> bool:
    """True while autograd executes a backward pass, i.e. when a forward runs as a checkpoint recompute.

    A normal forward never runs inside a backward graph task; non-reentrant (and reentrant) gradient
    checkpointing re-run the forward from inside one. Stateful side effects (statistics, cluster updates, aux
    terms whose value was already collected) should be skipped then.
    """
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - very old/new torch without the private hook
        return False
