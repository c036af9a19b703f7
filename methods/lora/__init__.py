"""LoRA through ``peft`` (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

One adapter is trained across the whole sequence (sequential LoRA), so a checkpoint holds the adapter only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from methods.base import Method, MethodConfig, check_targets, register_method

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraMethodConfig(MethodConfig):
    """Hyper-parameters handed to ``peft.LoraConfig``.

    Args:
        r: adapter rank.
        alpha: scaling numerator (``lora_alpha``; the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module-name suffixes to adapt (default: all linear projections of a Llama block).
    """

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: float = field(default=16.0, metadata={"help": "lora_alpha; scaling = alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR),
                                      metadata={"help": "Module-name suffixes to adapt."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"Invalid r: {self.r!r} (must be an integer >= 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Invalid dropout: {self.dropout!r} (must be in [0, 1))")
        if not self.target_modules:
            raise ValueError("Invalid target_modules: empty list")


@register_method("lora")
class Lora(Method):
    """A single ``peft`` LoRA adapter trained through every stage; the base weights stay frozen."""

    config_cls = LoraMethodConfig

    def validate(self, module_names: set[str]) -> None:
        # peft matches a list entry against the end of a module's dotted name
        check_targets(list(self.config.target_modules), module_names)

    def wrap(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in self.config.target_modules if t not in present]
        if missing:
            raise ValueError(f"Invalid target_modules: {missing} not in the model; linear modules: {sorted(present)}")
        cfg = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                         target_modules=list(self.config.target_modules), bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)

    def eval_model(self, model: nn.Module) -> nn.Module:
        # the transformers model with LoRA layers injected: what lm-eval's HFLM accepts
        return model.get_base_model()
