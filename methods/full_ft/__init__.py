"""Full fine-tuning: every parameter of the base model is trained (the usual lower bound on forgetting)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from methods.base import Method, MethodConfig, register_method


@dataclass
class FullFTConfig(MethodConfig):
    """Full fine-tuning has no hyper-parameters beyond the shared training settings.

    Args:
        lr: 3e-4, chosen on the tiny-world validation sequence (``scripts/tune_defaults.py``: the lr of the grid with the best validation plasticity; results/tuning/README.md), from {1e-4, 3e-4, 1e-3}.
    """

    lr: float | None = field(default=3e-4, metadata={"help": "Learning rate (tiny-world validation choice)."})


@register_method("full_ft")
class FullFT(Method):
    """Train all weights; the checkpointed state is the whole model."""

    config_cls = FullFTConfig
    shardable = True  # tests/test_fsdp.py

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
