"""HiLo: per-layer number AND rank of LoRA experts (Cong et al., "Rank Also Matters: Hierarchical Configuration
for Mixture of Adapter Experts in LLM Fine-Tuning", arXiv 2502.03884, https://arxiv.org/abs/2502.03884).

What the paper states (only its abstract and TL;DR-level summaries are public; no code):
  * LoRA-MoE methods should set both the number of experts and their rank per layer, to match each layer's
    representational complexity; HiLo reports higher accuracy with fewer trainable and fewer *active*
    parameters than MoLA, AlphaLoRA and AdaMoE, on Llama-2-7B;
  * a "simple rank-setting rule and dynamic allocation/activation strategies"; the best rank configuration
    is "2468 across layers" (low ranks in shallow layers, high ranks in deep layers).
  The exact expert-allocation, rank and activation rules, losses, hyper-parameters and datasets are not public.

What this plugin does -- our defaults, marked [D], are guesses, not the paper's (docs/methods.md §2.3):
  * the layer is MoLA's (Gao et al., arXiv 2402.08562): every target linear gets ``N_l`` LoRA experts of rank
    ``r_l`` and a router; ``y = W0 x + sum_{j in topk(x)} w_j (alpha / r_l) B_j A_j dropout(x)`` with the
    top-k softmax weights renormalised; all experts of a layer share its rank;
  * [D] experts ``"2468"``: MoLA's inverted-triangle layout, four contiguous layer groups with 2/4/6/8 experts
    (the depth grouping rule is in :mod:`methods.hilo.allocation`); alternatives: ``experts: alpha_hill``
    (AlphaLoRA, Qing et al., EMNLP 2024, arXiv 2410.10054: experts proportional to PL_Alpha_Hill^beta of the
    frozen weights, T = 5 experts per layer on average = AlphaLoRA's 160 for 32 layers, beta = 2.5, its code's
    Hill window; [D] a largest-remainder integer fix-up, because the code's can give a lower-alpha layer more
    experts -- ``alpha_hill_fixup: alphalora`` reproduces it) or explicit per-layer lists;
  * [D] ranks ``"2468"`` (the paper's best configuration, grouped like the experts); ``"uniform5"`` is the
    uniform rank with the same experts and the same active parameters;
  * [D] top-2 routing (MoLA, AlphaLoRA), top-1 in one-expert layers; optional AdaMoE "dynamic activation"
    (Zeng et al., EMNLP Findings 2024, arXiv 2406.13233): ``n_null`` null experts per layer (no parameters, no
    FLOPs) and ``k`` raised to ``null_top_k`` (default ``2 k``); the selected LoRA experts' weights are
    renormalised among themselves, so null experts save compute rather than damp the update, and the balance
    loss pools the null experts (both as AdaMoE's code). The ``active`` count is then an upper bound; the
    measured one is in the diagnostics;
  * [D] Switch load-balancing loss, coefficient 1e-3 (MoLA's, which is off by default there): on, because
    without it a top-k router can collapse onto one expert and the per-layer expert counts lose their meaning;
  * [D] alpha 16, dropout 0.05, all seven projections q,k,v,o,gate,up,down (MoLA/AlphaLoRA training setup;
    dropout was not tuned on tiny-world);
  * [D] lr 1e-3, chosen on the tiny-world validation sequence (best validation plasticity of {1e-3, 3e-3,
    1e-2}; ``scripts/tune_defaults.py``, results/tuning/README.md).

Published numbers: the README and results/ (the rank ablation: results/ablations; what ``experts: alpha_hill``
allocates on tiny-world: results/README.md, "Measurement notes").

On a 4-layer model (tiny-world) the defaults give experts 2/4/6/8 and ranks 2/4/6/8 per layer.

Trainable parameters per adapted module of layer ``l``: ``N_l r_l (d_in + d_out) + d_in (N_l + n_null)``;
active per token: ``k_l r_l (d_in + d_out) + d_in (N_l + n_null)`` (docs/methods.md §2.4). Not mergeable: routing
depends on the token.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from methods.base import register_method
from methods.hilo.allocation import default_total, parse_schedule, resolve_schedule
from methods.hilo.config import HiloConfig
from methods.hilo.model import HiloPlan, decoder_layers, inject, make_plan, param_counts, routing_summary
from methods.moe_lora import MoELoRAMethod

logger = logging.getLogger(__name__)

__all__ = ["Hilo", "HiloConfig", "HiloPlan"]


@register_method("hilo")
class Hilo(MoELoRAMethod):
    """MoLA-style top-k mixture of LoRA experts with a per-layer expert count and a per-layer rank."""

    config_cls = HiloConfig

    def __init__(self, config: HiloConfig | None = None) -> None:
        super().__init__(config)
        self.plan: HiloPlan | None = None
        self._shapes: list[tuple[int, int, int]] = []

    def validate(self, module_names: set[str]) -> None:
        cfg: HiloConfig = self.config  # type: ignore[assignment]
        num = len(decoder_layers(sorted(module_names), cfg.target_modules))
        resolve_schedule(parse_schedule(cfg.ranks, "ranks"), num, "ranks")
        if cfg.uses_alpha_hill:
            total = cfg.alpha_hill_total if cfg.alpha_hill_total is not None else default_total(num)
            if total < num:
                raise ValueError(f"Invalid alpha_hill_total: {total} experts for {num} layers (need >= 1 each)")
        else:
            resolve_schedule(parse_schedule(cfg.experts, "experts", allow_alpha_hill=True), num, "experts")

    def wrap(self, model: nn.Module) -> nn.Module:
        cfg: HiloConfig = self.config  # type: ignore[assignment]
        self.plan = make_plan(cfg, model)
        self._shapes = inject(model, cfg, self.plan)
        logger.info("hilo allocation: experts %s, ranks %s, top_k %s%s", self.plan.experts, self.plan.ranks,
                    self.plan.top_k, f", null experts {self.plan.n_null}" if self.plan.n_null else "")
        return model

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        # the closed form from the allocation (docs/methods.md §2.4): with null experts "active" is an upper bound
        if self.plan is None:
            raise RuntimeError("param_counts needs a model wrapped by this method")
        return param_counts(self.plan, self._shapes)

    def diagnostics(self, model: nn.Module) -> dict[str, Any]:
        """The allocation (once: before any routing statistics exist, i.e. at stage 0), then per stage the
        routing of its training tokens: per-layer expert load, entropy, LoRA experts per token."""
        if self.plan is None:
            return {}
        routing = routing_summary(model, self.plan)
        if routing is None:
            return {"allocation": self.plan.to_dict()}
        return {"routing": routing}
