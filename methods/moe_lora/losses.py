"""Auxiliary routing losses and ready-made per-layer aux terms.

A layer's ``aux_terms`` are callables ``f(layer, router_output, x) -> Tensor | None``; the layer stores the sum of
the non-``None`` results of its latest forward in ``layer.last_aux`` and :func:`~methods.moe_lora.collect_aux`
sums them over a model (docs/methods.md §4.4). The plain functions below are the formulas; the ``*_term`` factories
wrap them into aux terms that read the batch side information from :func:`get_routing_context`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from methods.moe_lora.context import get_routing_context

if TYPE_CHECKING:  # pragma: no cover
    from methods.moe_lora.layer import MoELoRALinear, RouterOutput

AuxTerm = Callable[["MoELoRALinear", "RouterOutput", torch.Tensor], "torch.Tensor | None"]


def switch_load_balance(
    probs: torch.Tensor,
    topk_idx: torch.Tensor | None,
    n_experts: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch / MoLA load-balancing loss ``N * sum_e f_e * P_e`` (docs/methods.md §2.2).

    ``f_e`` is the fraction of all top-k assignments that go to expert ``e`` (sums to 1 over experts, as in
    MoLA's ``load_balancing_loss_func``), ``P_e`` the mean router probability of ``e`` over tokens.

    Args:
        probs: ``(..., n_experts)`` softmax probabilities (fp32 recommended).
        topk_idx: ``(..., k)`` selected expert indices, or ``None`` for dense routing (then every expert is
            "selected", ``f_e = 1/N`` and the loss is the constant 1 -- no gradient).
        n_experts: number of experts ``N`` (the last dim of ``probs``).
        mask: optional ``probs.shape[:-1]`` 0/1 tensor; tokens with 0 (padding) are left out.
    """
    if probs.shape[-1] != n_experts:
        raise ValueError(f"probs has {probs.shape[-1]} experts, n_experts={n_experts}")
    p = probs.reshape(-1, n_experts).float()
    m = None if mask is None else mask.reshape(-1).to(p)
    if topk_idx is None:
        counts = torch.ones_like(p)
    else:
        counts = F.one_hot(topk_idx.reshape(p.shape[0], -1), n_experts).sum(dim=1).to(p)
    if m is not None:
        counts = counts * m[:, None]
        p_mean = (p * m[:, None]).sum(0) / m.sum().clamp_min(1.0)
    else:
        p_mean = p.mean(0)
    frac = counts.sum(0) / counts.sum().clamp_min(1.0)
    return n_experts * (frac * p_mean).sum()


def loramoe_balance(
    gates: torch.Tensor,
    task_types: torch.Tensor,
    delta: float,
    weight: float,
    form: str = "cv2",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRAMoE localized balancing constraint of one layer (docs/methods.md §3.4, official code).

    ``I[b, e] = 1 + delta`` if expert ``e`` is in the group favoured by sample ``b`` (experts ``[0, N/2)`` for
    ``task_type == 1``, experts ``[N/2, N)`` for ``task_type == 0``), else ``1 - delta``;
    ``Q[b, e] = sum_t gates[b, t, e]``; ``Z = (I * Q).flatten()``; the loss is
    ``var(Z) / (mean(Z)**2 + 1e-10) * weight`` (``form="cv2"``, squared coefficient of variation, unbiased
    variance -- the code form) or ``var(Z) / (mean(Z) + 1e-10) * weight`` (``form="cv"``, the paper-derivative
    ``sigma^2 / mu`` form reported by CITI).

    Args:
        gates: ``(B, T, N)`` routing weights of the LoRA experts (N even).
        task_types: ``(B,)`` integers in {0, 1}.
        delta: ``blc_alpha``, the degree of imbalance between the groups.
        weight: ``blc_weight``; each module's term is already scaled by it (the official code sums the terms).
        form: ``"cv2"`` (code) or ``"cv"`` (paper-derivative).
        attention_mask: optional ``(B, T)`` 0/1 mask; multiplies the gates before the sum over tokens. The
            official code sums over padding too -- pass ``None`` to reproduce it.

    The sum runs in fp32 (the code sums in the activation dtype and then casts; this only changes rounding).
    """
    if gates.dim() != 3:
        raise ValueError(f"gates must be (B, T, N), got shape {tuple(gates.shape)}")
    n = gates.shape[-1]
    if n % 2:
        raise ValueError(f"LoRAMoE balancing needs an even number of experts, got {n}")
    if form not in ("cv2", "cv"):
        raise ValueError(f"form must be 'cv2' or 'cv', got {form!r}")
    g = gates.float()
    if attention_mask is not None:
        g = g * attention_mask.to(g)[..., None]
    t = task_types.to(g.device).reshape(-1, 1)
    grp = torch.cat([(t == 1).expand(-1, n // 2), (t == 0).expand(-1, n // 2)], dim=-1)
    coef = torch.where(grp, 1.0 + delta, 1.0 - delta).to(g)
    z = (g.sum(dim=1) * coef).flatten()
    denom = z.mean() ** 2 if form == "cv2" else z.mean()
    return z.var() / (denom + 1e-10) * weight


def loramoe_balance_term(delta: float, weight: float, form: str = "cv2", mask_padding: bool = False) -> AuxTerm:
    """Aux term computing :func:`loramoe_balance` on the layer's LoRA-expert weights.

    Returns ``None`` (no term) when the routing context has no ``task_types`` (e.g. at evaluation) or
    ``weight == 0``, like the official code. ``mask_padding`` uses the context's attention mask (a documented
    deviation from the code, docs/methods.md §3.9).
    """

    def term(layer: MoELoRALinear, out: RouterOutput, x: torch.Tensor) -> torch.Tensor | None:
        ctx = get_routing_context()
        if ctx.task_types is None or weight == 0:
            return None
        gates = out.weights[..., : layer.n_experts]  # (B, T, N) for a (B, T, d_in) input
        mask = ctx.attention_mask if mask_padding else None
        if mask is not None and tuple(mask.shape) != tuple(gates.shape[:-1]):
            mask = None
        return loramoe_balance(gates, ctx.task_types, delta, weight, form=form, attention_mask=mask)

    return term


def switch_balance_term(coef: float = 1e-3, mask_padding: bool = True) -> AuxTerm:
    """Aux term ``coef * switch_load_balance(...)`` over all experts (identity ones included)."""

    def term(layer: MoELoRALinear, out: RouterOutput, x: torch.Tensor) -> torch.Tensor | None:
        if coef == 0:
            return None
        mask = get_routing_context().attention_mask if mask_padding else None
        if mask is not None and tuple(mask.shape) != tuple(out.probs.shape[:-1]):
            mask = None
        return coef * switch_load_balance(out.probs, out.topk_idx, out.probs.shape[-1], mask=mask)

    return term
