"""LoRA through ``peft`` (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

One adapter is trained across the whole sequence (sequential LoRA), so a checkpoint holds the adapter only.
``lora`` adapts every linear projection; ``lora_mlp`` is the budget-matched control of the MoE methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from methods.base import Method, MethodConfig, check_targets, register_method

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP_LINEAR = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraMethodConfig(MethodConfig):
    """Hyper-parameters handed to ``peft.LoraConfig``.

    Args:
        r: adapter rank.
        alpha: scaling numerator (``lora_alpha``; the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module-name suffixes to adapt (default: all linear projections of a Llama block).
        lr: 3e-3, chosen on the tiny-world validation sequence (``scripts/tune_defaults.py``: the lr of the grid with the best validation plasticity; results/tuning/README.md), from {1e-3, 3e-3, 1e-2} (the paper tunes it per task and gives no single value).
    """

    lr: float | None = field(default=3e-3, metadata={"help": "Learning rate (tiny-world validation choice)."})

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
    shardable = True  # tests/test_fsdp.py

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


@dataclass
class LoraMLPConfig(LoraMethodConfig):
    """``lora``'s options with the MoE methods' modules and budget as defaults.

    Args:
        r: adapter rank; 36 matches SLIM's trainable budget on the default tiny-world model (see :class:`LoraMLP`).
        alpha: ``lora_alpha``; ``None`` = 2 r, i.e. ``lora``'s default scaling alpha / r = 2 at any rank.
        target_modules: the MLP projections, where SLIM and LoRAMoE put their experts.
        lr: 1e-3, chosen on the tiny-world validation sequence (``scripts/tune_defaults.py``: the lr of the grid with the best validation plasticity; results/tuning/README.md), from {1e-3, 3e-3, 1e-2}.
    """

    lr: float | None = field(default=1e-3, metadata={"help": "Learning rate (tiny-world validation choice)."})

    r: int = field(default=36, metadata={"help": "LoRA rank (36: SLIM's trainable budget on tiny-world)."})
    alpha: float | None = field(default=None, metadata={"help": "lora_alpha; None = 2 * r (scaling 2, as lora)."})
    target_modules: list[str] = field(default_factory=lambda: list(MLP_LINEAR),
                                      metadata={"help": "Module-name suffixes to adapt (default: the MLP)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha is None:  # resolved here, so the record's method_config states the value used
            self.alpha = 2.0 * self.r


@register_method("lora_mlp")
class LoraMLP(Lora):
    """LoRA on ``gate_proj``/``up_proj``/``down_proj`` only, with about the trainable budget of SLIM and LoRAMoE.

    ``lora`` adapts attention and MLP with r = 8 (94,208 trainable parameters on tiny-world), while SLIM and
    LoRAMoE put their experts on the MLP only, with about three times the parameters; comparing them measures
    "MLP vs attention" and "big vs small" as much as "mixture vs single adapter". This variant removes both
    differences: same modules, same budget. On the default tiny-world model (4 layers, hidden 128, FFN 512) a
    rank-r adapter on the three projections costs r * (128 + 512) * 3 * 4 = 7,680 r parameters, so r = 36 gives
    276,480 trainable = SLIM's 276,480 (LoRAMoE: 270,336, 2.2 % fewer). With its defaults SLIM costs
    32 (in + out) + 10 in per projection (8 rank-4 experts, a 10-way router), so the matching rank is
    32 + 10 sum(in) / sum(in + out): 36 for FFN = 4 x hidden, 36.2 for SmolLM2-135M (576/1536); other settings
    need ``r`` re-chosen (the leaderboard's ``trainable_params`` shows the budgets). alpha follows r (2 r), so
    the update scale alpha / r is ``lora``'s.
    """

    config_cls = LoraMLPConfig
