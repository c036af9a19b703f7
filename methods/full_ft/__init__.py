"""Full fine-tuning: every parameter of the base model is trained (the usual lower bound on forgetting)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.base import Method, MethodConfig, register_method


@dataclass
class FullFTConfig(MethodConfig):
    """Full fine-tuning has no hyper-parameters beyond the shared training settings (``lr`` may override)."""


@register_method("full_ft")
class FullFT(Method):
    """Train all weights; the checkpointed state is the whole model."""

    config_cls = FullFTConfig

    def wrap(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def trainable_state(self, model: nn.Module) -> dict:
        # tied weights appear under two names; safetensors needs each tensor once
        seen, out = set(), {}
        for n, p in model.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[n] = p.detach().cpu().clone()
        return out
