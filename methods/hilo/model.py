"""HiLo on the shared MoE-LoRA layer: the allocation plan, AdaMoE routing, the balance term, diagnostics."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.hilo.allocation import (
    allocate_experts,
    closed_form_counts,
    default_total,
    parse_schedule,
    pl_alpha_hill,
    resolve_schedule,
)
from methods.hilo.config import HiloConfig
from methods.moe_lora import MoELoRALinear, RouterOutput, get_routing_context, inject_moe_lora, model_routing_stats

logger = logging.getLogger(__name__)
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The decoder-layer number of a module: the first all-digit component of its name (``model.layers.<l>.…``)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def target_names(names: Iterable[str], targets: list[str]) -> list[str]:
    """Module names matching a target suffix (whole components, as :func:`inject_moe_lora` matches)."""
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def decoder_layers(names: Iterable[str], targets: list[str]) -> list[int]:
    """Sorted decoder-layer numbers holding target modules; ``ValueError`` if a target sits outside one."""
    hits = target_names(names, targets)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in hits)]
    if missing:
        raise ValueError(f"Invalid target_modules: {missing} not in the model")
    outside = [n for n in hits if layer_index(n) is None]
    if outside:
        raise ValueError(f"Invalid target_modules: {outside[:3]} are not inside numbered decoder layers "
                         "(HiLo allocates per layer)")
    return sorted({layer_index(n) for n in hits})  # type: ignore[misc]


@dataclass
class HiloPlan:
    """The per-layer allocation (lists indexed by depth position ``0..L-1``; ``layers`` maps to layer numbers)."""

    layers: list[int]
    experts: list[int]
    ranks: list[int]
    top_k: list[int]  # experts selected per token, null experts included
    n_null: int
    alpha_hill: list[float] | None = None  # per-layer PL_Alpha_Hill when the allocation used it

    def position(self, name: str) -> int:
        return self.layers.index(layer_index(name))  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        out = {"layers": self.layers, "experts": self.experts, "ranks": self.ranks, "top_k": self.top_k,
               "n_null": self.n_null, "total_experts": sum(self.experts)}
        if self.alpha_hill is not None:
            out["alpha_hill"] = [round(a, 4) for a in self.alpha_hill]
        return out


def alpha_hill_scores(model: nn.Module, layers: list[int], cfg: HiloConfig) -> list[float]:
    """AlphaLoRA layer scores: mean PL_Alpha_Hill over every ``nn.Linear`` of each decoder layer (not only the
    targets, as the AlphaLoRA code), on the frozen weights (SVD on the weights' device, fp32)."""
    per_layer: dict[int, list[float]] = {i: [] for i in layers}
    logger.info("hilo: PL_Alpha_Hill of the frozen weights of %d decoder layers (one SVD per linear)", len(layers))
    for name, mod in model.named_modules():
        idx = layer_index(name)
        if isinstance(mod, nn.Linear) and idx in per_layer:
            per_layer[idx].append(pl_alpha_hill(mod.weight, window=cfg.alpha_hill_window))
    return [sum(v) / len(v) for v in (per_layer[i] for i in layers)]


def make_plan(cfg: HiloConfig, model: nn.Module) -> HiloPlan:
    """Resolve the configured schedules on ``model`` (AlphaLoRA scores are computed here, once)."""
    layers = decoder_layers([n for n, m in model.named_modules() if isinstance(m, nn.Linear)], cfg.target_modules)
    num = len(layers)
    ranks = resolve_schedule(parse_schedule(cfg.ranks, "ranks"), num, "ranks")
    scores = None
    if cfg.uses_alpha_hill:
        total = cfg.alpha_hill_total if cfg.alpha_hill_total is not None else default_total(num)
        scores = alpha_hill_scores(model, layers, cfg)
        experts = allocate_experts(scores, total, cfg.alpha_hill_beta, fixup=cfg.alpha_hill_fixup)
    else:
        experts = resolve_schedule(parse_schedule(cfg.experts, "experts", allow_alpha_hill=True), num, "experts")
    top_k = [min(cfg.top_k, n) for n in experts]
    if cfg.n_null:
        top_k = [min(cfg.null_top_k or 2 * k, n + cfg.n_null) for k, n in zip(top_k, experts)]
    return HiloPlan(layers=layers, experts=experts, ranks=ranks, top_k=top_k, n_null=cfg.n_null, alpha_hill=scores)


class AdaMoELinear(MoELoRALinear):
    """AdaMoE routing (code of CengZihao/AdaMoE, exp_1 on MoLA): top-k over LoRA + null experts, then the weights
    of the selected LoRA experts are renormalised among themselves -- null experts take slots (compute), not
    output mass; a token that picks only null experts gets no delta. ``weights`` are the applied ones (0 on null
    experts), so the routing statistics' ``selected`` counts LoRA experts per token; ``topk_idx`` keeps the
    null picks for the balance loss."""

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        vals, idx = probs.topk(self.top_k, dim=-1)  # type: ignore[arg-type]
        kept = vals * (idx < self.n_experts)
        norm = kept.sum(-1, keepdim=True)
        kept = kept / torch.where(norm > 0, norm, torch.ones_like(norm))
        return probs, torch.zeros_like(probs).scatter(-1, idx, kept), idx


def null_aware_switch_loss(probs: torch.Tensor, topk_idx: torch.Tensor, n_true: int,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch loss ``E * sum_e f_e P_e`` over all ``E`` router outputs, with AdaMoE's change: the assignment
    counts of the null experts (indices ``>= n_true``) are replaced by their mean, so null experts are balanced
    as one pool. With no null expert this is :func:`methods.moe_lora.switch_load_balance`."""
    e = probs.shape[-1]
    p = probs.reshape(-1, e).float()
    counts = F.one_hot(topk_idx.reshape(p.shape[0], -1), e).sum(dim=1).to(p)
    if mask is not None:
        m = mask.reshape(-1).to(p)
        counts, p_mean = counts * m[:, None], (p * m[:, None]).sum(0) / m.sum().clamp_min(1.0)
    else:
        p_mean = p.mean(0)
    totals = counts.sum(0)
    if e > n_true:
        totals = torch.cat([totals[:n_true], totals[n_true:].mean().expand(e - n_true)])
    return e * (totals / totals.sum().clamp_min(1.0) * p_mean).sum()


def balance_term(coef: float):
    """Aux term ``coef * null_aware_switch_loss`` of one module (padding excluded via the routing context).

    ``coef`` is already divided by the number of adapted modules of the decoder layer, so the layer's terms
    average to one MoLA-scale per-layer loss (MoLA computes one loss per layer on the concatenated logits of
    its modules; the mean over modules equals it when the modules route alike and keeps 1e-3 meaningful)."""

    def term(layer: MoELoRALinear, out: RouterOutput, x: torch.Tensor) -> torch.Tensor | None:
        mask = get_routing_context().attention_mask
        if mask is not None and tuple(mask.shape) != tuple(out.probs.shape[:-1]):
            mask = None
        return coef * null_aware_switch_loss(out.probs, out.topk_idx, layer.n_experts, mask)  # type: ignore

    return term


def inject(model: nn.Module, cfg: HiloConfig, plan: HiloPlan) -> list[tuple[int, int, int]]:
    """Replace the targets by (AdaMoE-routed when ``n_null``) MoE-LoRA layers; returns ``(position, d_in, d_out)``
    of every adapted module, for the closed-form counts."""
    names = target_names([n for n, m in model.named_modules() if isinstance(m, nn.Linear)], cfg.target_modules)
    per_layer: dict[int, int] = {}
    for n in names:
        per_layer[plan.position(n)] = per_layer.get(plan.position(n), 0) + 1
    cls = AdaMoELinear if plan.n_null else MoELoRALinear
    shapes: list[tuple[int, int, int]] = []

    def make(name: str, lin: nn.Linear) -> MoELoRALinear:
        pos = plan.position(name)
        shapes.append((pos, lin.in_features, lin.out_features))
        terms = [balance_term(cfg.balance_coef / per_layer[pos])] if cfg.balance_coef > 0 else []
        return cls(lin, n_experts=plan.experts[pos], rank=plan.ranks[pos], alpha=cfg.alpha, n_identity=plan.n_null,
                   top_k=plan.top_k[pos], dropout=cfg.dropout, aux_terms=terms)

    inject_moe_lora(model, cfg.target_modules, make)
    return shapes


def param_counts(plan: HiloPlan, shapes: list[tuple[int, int, int]]) -> dict[str, int]:
    """Closed-form trainable / active counts of the plan (docs/methods.md §2.4)."""
    return closed_form_counts(shapes, plan.experts, plan.ranks, plan.top_k, plan.n_null)


def routing_summary(model: nn.Module, plan: HiloPlan) -> dict | None:
    """Per decoder layer: mean load of each LoRA expert over the layer's modules (mean applied weight), mean
    routing entropy (nats), LoRA experts selected per token (and null slots per token with null experts);
    overall: token-weighted entropy and the measured active parameters per token."""
    stats = model_routing_stats(model)
    seen = {n: s for n, s in stats["layers"].items() if s["tokens"]}
    if not seen:
        return None
    layers: list[dict] = []
    active = 0.0
    modules = dict(model.named_modules())
    for pos in range(len(plan.layers)):
        mods = [(n, s) for n, s in seen.items() if plan.position(n) == pos]
        if not mods:
            layers.append({})
            continue
        n_true = plan.experts[pos]
        load = torch.tensor([s["load"] for _, s in mods], dtype=torch.float64).mean(0)
        sel = [sum(s["selected"][:n_true]) for _, s in mods]
        for (name, _), k in zip(mods, sel):
            lay = modules[name]
            active += k * lay.rank * (lay.in_features + lay.out_features) + lay.in_features * lay.n_total
        entry = {"load": [round(float(v), 4) for v in load[:n_true]],
                 "entropy": round(sum(s["entropy"] for _, s in mods) / len(mods), 4),
                 "experts_per_token": round(sum(sel) / len(sel), 4)}
        if plan.n_null:  # slots the null experts took = compute saved
            entry["null_per_token"] = round(plan.top_k[pos] - entry["experts_per_token"], 4)
        layers.append(entry)
    return {"entropy": round(float(stats["entropy"]), 4), "active_params_measured": int(round(active)),
            "layers": layers}
