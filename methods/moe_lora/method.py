"""The method hooks that every plugin built on :class:`~methods.moe_lora.layer.MoELoRALinear` shares.

LoRAMoE, SLIM and HiLo subclass :class:`MoELoRAMethod`, implement ``wrap`` (which layers to inject, how each is
configured) and override a hook here only where they differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from methods.base import Method, TaskInfo
from methods.moe_lora import inject
from methods.moe_lora.context import routing_context


class MoELoRAMethod(Method):
    """Base of the MoE-LoRA plugins: routing context, aux loss, routing statistics, state and counts.

    Subclasses implement :meth:`wrap` with :func:`~methods.moe_lora.inject.inject_moe_lora`.
    """

    # -- training hooks -------------------------------------------------------------------------------
    def on_task_start(self, model: nn.Module, task: TaskInfo) -> None:
        inject.set_track_stats(model, enabled=True, reset=True)  # diagnostics describe this stage's training

    def on_task_end(self, model: nn.Module, task: TaskInfo) -> None:
        inject.set_track_stats(model, enabled=False, reset=False)  # keep them; evaluation must not add to them

    def routing_task_types(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``(B,)`` task types the routing context of a training forward carries (default: none)."""
        return None

    @contextlib.contextmanager
    def forward_context(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        # the attention mask keeps padding out of the aux terms and statistics that mask it (docs/methods.md §4.4)
        with routing_context(task_types=self.routing_task_types(batch), attention_mask=batch.get("attention_mask")):
            yield

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        return inject.collect_aux(model)  # the sum of every layer's terms of the latest forward

    # -- state and reporting ----------------------------------------------------------------------------
    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return inject.trainable_state(model)  # adapters, routers and any persistent buffer a layer registers

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        inject.load_trainable_state(model, state)

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        return inject.total_param_count(model)
