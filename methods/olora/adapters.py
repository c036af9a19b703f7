"""The adapters of an O-LoRA model: one trainable ``current`` adapter and the frozen ``task<i>`` ones before it.

Every adapter stays active, so a layer computes ``W x + sum_adapters (alpha / r) B A dropout(x)``, summed in a
fixed order (``task1, task2, ..., current``) so that a resumed run adds them exactly as an uninterrupted one.
The trainable tensors keep their identity from stage to stage: finishing a stage copies ``current`` into a new
frozen adapter and re-initialises ``current`` in place (A Kaiming-uniform, B = 0, from the global RNG), so an
optimizer that holds the adapter's parameters keeps training the new stage's adapter.
"""

from __future__ import annotations

import re

import torch
from torch import nn

CURRENT = "current"
_TASK = re.compile(r"task(\d+)")
# the adapter name inside a peft parameter name: "...q_proj.lora_A.task1.weight"
_ADAPTER_KEY = re.compile(r"\.lora_[AB]\.([^.]+)\.weight$")


def task_name(stage: int) -> str:
    """The name of the frozen adapter trained in ``stage`` (1-based)."""
    return f"task{stage}"


def lora_config(r: int, alpha: float, dropout: float, target_modules: list[str]):
    """The ``peft.LoraConfig`` every adapter of the model is built with."""
    from peft import LoraConfig  # deferred: every CLI call imports every method plugin

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      bias="none", task_type="CAUSAL_LM")


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module name, peft LoRA layer)`` of every adapted module, in model order."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def frozen_names(model: nn.Module) -> list[str]:
    """The frozen adapters' names, in stage order."""
    names = [n for n in model.peft_config if _TASK.fullmatch(n)]
    return sorted(names, key=lambda n: int(_TASK.fullmatch(n).group(1)))


def state_adapter_names(keys: list[str]) -> set[str]:
    """The adapter names that occur in the keys of a :func:`adapter_state`."""
    found = {m.group(1) for m in map(_ADAPTER_KEY.search, keys) if m}
    bad = sorted(n for n in found if n != CURRENT and not _TASK.fullmatch(n))
    if bad:
        raise KeyError(f"unknown O-LoRA adapter names in the state: {bad}")
    return found


def activate(model: nn.Module) -> None:
    """Make every adapter active and only ``current`` trainable."""
    frozen = frozen_names(model)
    model.base_model.set_adapter(frozen + [CURRENT])  # peft makes every listed adapter trainable ...
    for _, layer in lora_layers(model):
        for name in frozen:  # ... so the earlier ones are frozen again here
            layer.lora_A[name].weight.requires_grad_(False)
            layer.lora_B[name].weight.requires_grad_(False)


@torch.no_grad()
def freeze_current(model: nn.Module, name: str, peft_config) -> None:
    """Keep the trained ``current`` as frozen adapter ``name`` and start ``current`` afresh."""
    model.add_adapter(name, peft_config)
    for _, layer in lora_layers(model):
        for weights in (layer.lora_A, layer.lora_B):
            # a clone keeps the trained tensor's dtype and device (the frozen copy peft made may differ)
            weights[name].weight.data = weights[CURRENT].weight.detach().clone()
        layer.reset_lora_parameters(CURRENT, True)
    activate(model)


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter's A and B weights (frozen ones included), by parameter name (the adapter name is in it)."""
    return {n: p for n, p in model.named_parameters() if _ADAPTER_KEY.search(n)}


def adapter_matrices(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of adapter ``name`` in one LoRA layer: shapes ``(r, d_in)`` and ``(d_out, r)``."""
    return layer.lora_A[name].weight, layer.lora_B[name].weight
