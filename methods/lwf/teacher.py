"""The frozen teachers of LwF: a deep copy of the model (``full_ft``) or a second LoRA adapter (``lora``).

A ``lora`` teacher is the same ``peft`` model with the adapter ``TEACHER`` holding a frozen snapshot of the
trained adapter: the frozen base is held once, and the teacher pass switches the active adapter and back.
``peft``'s ``set_adapter`` / ``add_adapter`` / ``delete_adapter`` set ``requires_grad`` flags of their own; every
helper here puts the flags of the existing parameters back as they were, so only the trained adapter stays
trainable and the teacher's parameters never are.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

TEACHER = "lwf_teacher"  # must not contain the trained adapter's name: peft selects an adapter's keys by substring


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter frozen (ties between parameters kept)."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def is_teacher_param(name: str) -> bool:
    """Whether a ``named_parameters`` name belongs to the teacher adapter."""
    return TEACHER in name.split(".")


@contextlib.contextmanager
def kept_flags(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` and every module's training mode on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _rng_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def add_teacher_adapter(model: nn.Module) -> None:
    """Add (or replace) the adapter ``TEACHER`` on a ``peft`` model: a frozen copy of the active adapter."""
    remove_teacher_adapter(model)
    active = model.active_adapter
    cfg = copy.deepcopy(model.peft_config[active])
    cfg.inference_mode = True
    # peft initialises the new adapter randomly before we overwrite it: keep the run's RNG streams untouched
    with kept_flags(model), torch.random.fork_rng(devices=_rng_devices(model)):
        model.add_adapter(TEACHER, cfg)
    if model.active_adapter != active:
        raise RuntimeError(f"lwf: adding the teacher adapter changed the active adapter to {model.active_adapter}")
    params = dict(model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in params.items():
            if is_teacher_param(name):
                src = params[".".join(active if part == TEACHER else part for part in name.split("."))]
                p.data = src.detach().clone()  # same values, dtype and device as the trained adapter
                p.requires_grad_(False)
                copied += p.numel()
    trained = sum(p.numel() for n, p in params.items() if active in n.split("."))
    if copied == 0 or copied != trained:
        raise RuntimeError(f"lwf: the teacher adapter holds {copied} parameters, the trained one {trained}")


def remove_teacher_adapter(model: nn.Module) -> None:
    """Delete the adapter ``TEACHER`` if the model has one."""
    if TEACHER in getattr(model, "peft_config", {}):
        with kept_flags(model):
            model.delete_adapter(TEACHER)


@contextlib.contextmanager
def teacher_adapter_active(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with the teacher adapter active; the adapter, flags and modes restored on exit."""
    active = model.active_adapter
    with kept_flags(model):
        model.eval()
        model.set_adapter(TEACHER, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter(active)
