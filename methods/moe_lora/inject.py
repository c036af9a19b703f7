"""Model-level helpers: inject MoE-LoRA layers, walk them, save/load their state, count, collect aux/stats."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from methods.moe_lora.layer import MoELoRALinear, param_count


def inject_moe_lora(
    model: nn.Module,
    target_modules: list[str],
    make_layer: Callable[[str, nn.Linear], MoELoRALinear],
) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name ends with a target suffix by ``make_layer(name, linear)``.

    A suffix matches whole name components (``"gate_proj"`` matches ``model.layers.0.mlp.gate_proj``, and
    ``"mlp.gate_proj"`` works too). Every parameter of the model is frozen first, so afterwards only the
    parameters created by ``make_layer`` are trainable. Linears inside existing MoE-LoRA layers are skipped.
    ``make_layer`` receives the qualified name, so per-layer configurations (HiLo rank/expert schedules) can
    be derived from it.

    Returns:
        The qualified names of the replaced modules, in ``named_modules`` order.

    Raises:
        ValueError: if ``target_modules`` is empty or a target matches no ``nn.Linear`` (the message names
            the missing targets and the available Linear suffixes).
    """
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty")
    inside = [n for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]
    linears = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n and not any(n.startswith(p + ".") for p in inside)
    ]
    matched: dict[str, list[str]] = {t: [] for t in targets}
    chosen: list[tuple[str, nn.Linear]] = []
    for name, mod in linears:
        hits = [t for t in targets if name == t or name.endswith("." + t)]
        for t in hits:
            matched[t].append(name)
        if hits:
            chosen.append((name, mod))
    missing = [t for t, names in matched.items() if not names]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"target modules {missing} match no nn.Linear; available Linear suffixes: {available}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in chosen:
        layer = make_layer(name, lin)
        if not isinstance(layer, MoELoRALinear):
            raise TypeError(f"make_layer({name!r}) returned {type(layer).__name__}, expected MoELoRALinear")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return [n for n, _ in chosen]


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoELoRALinear]]:
    """``(qualified_name, layer)`` for every :class:`MoELoRALinear` in ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, MoELoRALinear):
            yield name, mod


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Flat, safetensors-compatible state of the adapters (detached, contiguous CPU copies).

    Holds every MoE-LoRA layer's ``state_dict`` except its frozen ``base`` -- ``lora_A``, ``lora_B``,
    ``router.weight`` and any *persistent* buffer a method registers on the layer (e.g. SLIM's clusters) --
    plus any other parameter of the model that requires grad. Keys are qualified parameter/buffer names.
    """
    state: dict[str, torch.Tensor] = {}
    for name, layer in moe_layers(model):
        for key, t in layer.state_dict(keep_vars=True).items():
            if not key.startswith("base."):
                state[f"{name}.{key}" if name else key] = t
    for key, p in model.named_parameters():
        if p.requires_grad:
            state.setdefault(key, p)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy a :func:`trainable_state` dict into ``model`` (same injected structure) in place.

    Raises:
        KeyError: on keys the model lacks, or (``strict``) on adapter tensors the state lacks.
        ValueError: on a shape mismatch.
    """
    own = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    own.update(dict(model.named_parameters()))
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"state keys not in model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if strict:
        expected = set(trainable_state_keys(model))
        absent = sorted(expected - set(state))
        if absent:
            raise KeyError(f"state lacks adapter tensors: {absent[:5]}{' ...' if len(absent) > 5 else ''}")
    with torch.no_grad():
        for key, value in state.items():
            target = own[key]
            if target.shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} != model {tuple(target.shape)}")
            target.copy_(value)


def trainable_state_keys(model: nn.Module) -> list[str]:
    """The keys :func:`trainable_state` would produce (without copying tensors)."""
    keys: dict[str, None] = {}
    for name, layer in moe_layers(model):
        for key in layer.state_dict(keep_vars=True):
            if not key.startswith("base."):
                keys[f"{name}.{key}" if name else key] = None
    for key, p in model.named_parameters():
        if p.requires_grad:
            keys.setdefault(key, None)
    return list(keys)


def total_param_count(model: nn.Module) -> dict[str, int]:
    """Sum of :func:`param_count` over MoE layers plus every other trainable parameter (counted as active)."""
    trainable = active = 0
    inside: set[int] = set()
    for _, layer in moe_layers(model):
        c = param_count(layer)
        trainable, active = trainable + c["trainable"], active + c["active"]
        inside.update(id(p) for p in layer.parameters())
    for p in model.parameters():
        if p.requires_grad and id(p) not in inside:
            trainable, active = trainable + p.numel(), active + p.numel()
    return {"trainable": trainable, "active": active}


def collect_aux(model: nn.Module) -> torch.Tensor | None:
    """Sum of ``last_aux`` over all MoE layers (``None`` if no layer produced a term), for ``Method.aux_loss``."""
    terms = [layer.last_aux for _, layer in moe_layers(model) if layer.last_aux is not None]
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = total + t.to(total.device)
    return total


def set_track_stats(model: nn.Module, enabled: bool = True, reset: bool = True) -> None:
    """Switch routing statistics on/off for every MoE layer (and clear them when ``reset``)."""
    for _, layer in moe_layers(model):
        layer.track_stats = enabled
        if reset:
            layer.reset_stats()


def reset_routing_stats(model: nn.Module) -> None:
    for _, layer in moe_layers(model):
        layer.reset_stats()


def model_routing_stats(model: nn.Module) -> dict:
    """Per-layer :meth:`MoELoRALinear.routing_stats` plus token-weighted means of entropy / identity share."""
    layers = {name: layer.routing_stats() for name, layer in moe_layers(model)}
    seen = [s for s in layers.values() if s["tokens"]]
    tot = sum(s["tokens"] for s in seen)
    mean = lambda key: (sum(s[key] * s["tokens"] for s in seen) / tot) if tot else None  # noqa: E731
    return {"layers": layers, "entropy": mean("entropy"), "identity_share": mean("identity_share")}
