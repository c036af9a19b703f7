"""``MoELoRALinear``: a frozen ``nn.Linear`` plus a routed mixture of LoRA experts and identity experts.

One layer covers LoRAMoE (dense softmax, N LoRA experts), SLIM (top-k over LoRA + identity experts, logit
adjustment, delta masking) and HiLo / MoLA (top-k, per-layer expert count and rank); see docs/methods.md §4.

Computation (``T`` tokens, ``N`` LoRA experts of rank ``r``, ``E = N + n_identity`` router outputs)::

    y      = base(x)                                               # frozen, (T, d_out)
    logits = x @ W_r^T          h = dropout(x) @ A_cat^T           # (T, E), (T, N*r)
    w      = softmax(logit_adjust(logits)) in fp32 [-> top-k, renormalise] -> activation dtype
    y     += (h * repeat(w[:, :N] * alpha/r, r)) @ B_cat^T         # one matmul for all experts

All experts are evaluated by two matmuls, never a Python loop. When dropout is inactive (p = 0 or eval) the
router and the expert down-projections share ONE matmul over ``cat([W_r, A_cat])``. Top-k routing also evaluates
every expert densely with zero weight for the unselected ones: at LoRA ranks the (T, N*r) intermediate is tiny
compared with the base matmul, so a gather/scatter dispatch would cost more than it saves on CPU and for
moderate N on GPU. Identity (null) experts sit at router indices ``[N, E)``; they own no parameters and add a zero
delta, they only absorb routing mass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.moe_lora.context import get_routing_context, is_recomputing

LogitAdjust = Callable[[torch.Tensor, torch.Tensor, "MoELoRALinear"], torch.Tensor]
DeltaMask = Callable[[torch.Tensor, torch.Tensor, "MoELoRALinear"], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RouterOutput:
    """Routing of one forward pass; every tensor has the input's leading dims, e.g. ``(B, T, ...)``.

    Attributes:
        logits: router logits after ``logit_adjust`` (activation dtype), ``(..., E)``.
        probs: softmax of ``logits`` in fp32 (fp64 for fp64 activations), ``(..., E)``.
        weights: weights actually applied (top-k renormalised, zeros elsewhere; = ``probs`` when dense),
            activation dtype, ``(..., E)``; identity experts are the last ``n_identity`` columns.
        topk_idx: ``(..., k)`` selected experts, or ``None`` for dense routing.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    topk_idx: torch.Tensor | None


class MoELoRALinear(nn.Module):
    """A frozen linear layer with ``n_experts`` routed LoRA experts and ``n_identity`` identity experts.

    Args:
        base: the ``nn.Linear`` to wrap; kept as ``self.base`` with its parameters frozen.
        n_experts: number of LoRA experts ``N`` (>= 1).
        rank: LoRA rank ``r`` shared by all experts of this layer.
        alpha: LoRA alpha; the delta of every expert is scaled by ``alpha / rank`` (default: ``rank``, i.e. 1).
        n_identity: number of identity (null) experts: zero delta, no parameters.
        top_k: ``None`` for dense softmax routing (LoRAMoE); an int for per-token top-k with renormalisation
            over the selected experts (identity experts compete in the top-k).
        dropout: dropout probability on the experts' input (the router always sees ``x`` without dropout).
        logit_adjust: optional ``f(logits (..., E), x, layer) -> logits`` applied before the softmax.
        delta_mask: optional ``f(A (N, r, d_in), B (N, d_out, r), layer) -> (A, B)`` applied before use.
        aux_terms: callables ``f(layer, RouterOutput, x) -> Tensor | None``; their sum is kept in ``last_aux``.
        track_stats: accumulate routing diagnostics (see :meth:`routing_stats`).
        dtype: dtype the adapter parameters are created and initialised in (default: fp32, or the base weight's
            dtype when that is wider). The trainer's precision policy (``benchmark/precision.py``) then sets the
            dtype they train in; initialising in fp32 keeps the initial values the same under every policy.
    """

    def __init__(
        self,
        base: nn.Linear,
        n_experts: int,
        rank: int,
        alpha: float | None = None,
        n_identity: int = 0,
        top_k: int | None = None,
        dropout: float = 0.0,
        logit_adjust: LogitAdjust | None = None,
        delta_mask: DeltaMask | None = None,
        aux_terms: list | None = None,
        track_stats: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not (isinstance(n_experts, int) and n_experts >= 1):
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if not (isinstance(n_identity, int) and n_identity >= 0):
            raise ValueError(f"n_identity must be an int >= 0, got {n_identity!r}")
        n_total = n_experts + n_identity
        if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= n_total):
            raise ValueError(f"top_k must be None or an int in [1, {n_total}], got {top_k!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.n_experts, self.n_identity, self.n_total = n_experts, n_identity, n_total
        self.rank, self.top_k, self.dropout = rank, top_k, float(dropout)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        kw = {"device": base.weight.device, "dtype": dtype or torch.promote_types(base.weight.dtype, torch.float32)}
        self.lora_A = nn.Parameter(torch.empty(n_experts, rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n_experts, self.out_features, rank, **kw))
        self.router = nn.Linear(self.in_features, n_total, bias=False, **kw)
        self.register_buffer("is_identity", torch.arange(n_total, device=kw["device"]) >= n_experts, persistent=False)
        self.logit_adjust = logit_adjust
        self.delta_mask = delta_mask
        self.aux_terms: list = list(aux_terms or [])
        self.last_aux: torch.Tensor | None = None
        self.track_stats = track_stats
        self._stats: dict[str, torch.Tensor] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A: kaiming-uniform(a=sqrt(5)) per expert (as peft/LoRAMoE); B: zeros; router: kaiming-uniform."""
        for i in range(self.n_experts):
            nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
        self.lora_B.zero_()
        nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.n_experts}, identity={self.n_identity}, "
            f"rank={self.rank}, alpha={self.alpha:g}, top_k={self.top_k}, dropout={self.dropout:g}"
        )

    # -- forward ----------------------------------------------------------------------------------------
    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(T, E)`` logits -> fp32 probs, fp32 applied weights, top-k indices (or None).

        The softmax runs in fp32 for half/bf16/fp32 activations (in fp64 for fp64 ones)."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        if self.top_k is None:
            return probs, probs, None
        vals, idx = probs.topk(self.top_k, dim=-1)
        vals = vals / vals.sum(dim=-1, keepdim=True)
        return probs, torch.zeros_like(probs).scatter(-1, idx, vals), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d_in = x.shape[:-1], self.in_features
        n, r, e = self.n_experts, self.rank, self.n_total
        x2 = x.reshape(-1, d_in)
        out = self.base(x2)  # (T, d_out)
        dt = out.dtype  # activation dtype (differs from x.dtype under autocast)
        a, b = self.lora_A, self.lora_B
        if self.delta_mask is not None:
            a, b = self.delta_mask(a, b, self)
        a_flat = a.reshape(n * r, d_in)
        w_r = self.router.weight
        if self.dropout > 0.0 and self.training:
            logits = F.linear(x2, w_r.to(dt))
            h = F.linear(F.dropout(x2, self.dropout, training=True), a_flat.to(dt))
        else:  # router + all expert down-projections in one matmul
            hz = F.linear(x2, torch.cat([w_r.to(dt), a_flat.to(dt)], dim=0))
            logits, h = hz.split([e, n * r], dim=1)  # one SplitBackward (a cat), not two zero-filled slices
        if self.logit_adjust is not None:
            logits = self.logit_adjust(logits.reshape(*lead, e), x, self).reshape(-1, e)
        probs, w32, idx = self.route(logits)
        weights = w32.to(dt)
        gate = weights[:, :n] * self.scaling  # (T, N): scaling folded into the tiny gate tensor
        hg = (h.reshape(-1, n, r) * gate.unsqueeze(-1)).reshape(-1, n * r)
        b_flat = b.permute(1, 0, 2).reshape(self.out_features, n * r).to(dt)
        # In place: a Linear's backward does not save its output, so this saves one (T, d_out) pass (a forward
        # hook on ``base`` that keeps its output would see the adapted value).
        out = out.addmm_(hg, b_flat.t())
        # A checkpoint recompute must save the same tensors as the original forward, so aux terms are
        # recomputed too (with the same routing context), but ``last_aux`` keeps the original forward's value.
        recomputing = is_recomputing()
        if self.aux_terms:
            ro = RouterOutput(
                logits=logits.reshape(*lead, e),
                probs=probs.reshape(*lead, e),
                weights=weights.reshape(*lead, e),
                topk_idx=None if idx is None else idx.reshape(*lead, -1),
            )
            terms = [t for t in (f(self, ro, x) for f in self.aux_terms) if t is not None]
            total = torch.stack([t.float() for t in terms]).sum() if terms else None
            if not recomputing:
                self.last_aux = total
        elif not recomputing:
            self.last_aux = None
        if self.track_stats and not recomputing:
            self._accumulate(w32.detach(), lead)
        return out.reshape(*lead, self.out_features)

    # -- diagnostics --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _accumulate(self, w: torch.Tensor, lead: torch.Size) -> None:
        sdt = torch.float32 if w.device.type == "mps" else torch.float64
        if self._stats is None or self._stats["load"].device != w.device:
            z = lambda *s: torch.zeros(*s, device=w.device, dtype=sdt)  # noqa: E731
            self._stats = {"tokens": z(()), "load": z(self.n_total), "selected": z(self.n_total), "entropy": z(())}
        mask = get_routing_context().attention_mask
        m = None
        if mask is not None and tuple(mask.shape) == tuple(lead):
            m = mask.reshape(-1, 1).to(device=w.device, dtype=w.dtype)
        ent = -torch.special.xlogy(w, w).sum(-1, keepdim=True)
        sel = (w > 0).to(w.dtype)
        if m is not None:
            w, ent, sel = w * m, ent * m, sel * m
        s = self._stats
        s["tokens"] += w.shape[0] if m is None else m.sum().to(sdt)
        s["load"] += w.sum(0).to(sdt)
        s["selected"] += sel.sum(0).to(sdt)
        s["entropy"] += ent.sum().to(sdt)

    def routing_stats(self) -> dict:
        """Diagnostics accumulated since the last :meth:`reset_stats` (padding excluded when the context has
        a matching attention mask).

        Keys: ``tokens``; ``load`` (per-expert mean routing weight, list of E floats, sums to 1, identity
        experts last); ``selected`` (per-expert fraction of tokens with non-zero weight; sums to k for top-k);
        ``entropy`` (mean per-token entropy of the applied weights, nats); ``identity_share`` (share of the
        routing mass on identity experts).
        """
        s = self._stats
        if s is None or float(s["tokens"]) == 0.0:
            return {"tokens": 0, "load": None, "selected": None, "entropy": None, "identity_share": None}
        t = float(s["tokens"])
        load = (s["load"] / t).tolist()
        return {
            "tokens": int(round(t)),
            "load": load,
            "selected": (s["selected"] / t).tolist(),
            "entropy": float(s["entropy"]) / t,
            "identity_share": float(sum(load[self.n_experts :])),
        }

    def reset_stats(self) -> None:
        self._stats = None


def param_count(layer: MoELoRALinear) -> dict[str, int]:
    """Closed-form adapter parameter counts of one layer (the frozen base is not counted).

    ``trainable = N*r*(d_in + d_out) + d_in*E`` (E = N + n_identity router outputs).
    ``active`` (used per token) ``= k_lora*r*(d_in + d_out) + d_in*E`` with ``k_lora = N`` for dense routing and
    ``min(top_k, N)`` for top-k: the upper bound when every selected expert is a LoRA expert (identity experts
    cost nothing, so a token that picks one uses fewer); the whole router is always evaluated.
    """
    n, r, d_in, d_out = layer.n_experts, layer.rank, layer.in_features, layer.out_features
    router = d_in * layer.n_total
    k = n if layer.top_k is None else min(layer.top_k, n)
    return {"trainable": n * r * (d_in + d_out) + router, "active": k * r * (d_in + d_out) + router}
