"""A method that adds a continual-learning mechanism to a base learner (``full_ft`` or ``lora``).

Replay, EWC and LwF change what a stage trains on or adds to its loss, not what trains: the base learner wraps the
model, owns the trainable parameters and their checkpoint, and is what evaluation sees. :class:`OnBase` delegates
those hooks to it; :class:`OnBaseConfig` holds the shared ``base`` and ``lr`` fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from methods.base import Method, MethodConfig
from methods.full_ft import FullFT, FullFTConfig
from methods.lora import Lora, LoraMethodConfig

BASES: dict[str, tuple[type[Method], type[MethodConfig]]] = {"full_ft": (FullFT, FullFTConfig),
                                                             "lora": (Lora, LoraMethodConfig)}


def finite_number(value: object) -> bool:
    """A real int or float (``bool`` excluded), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class OnBaseConfig(MethodConfig):
    """The base learner and its lr.

    Args:
        base: what trains: ``full_ft`` (every weight) or ``lora`` (the default ``lora`` adapter).
        lr: None = the base method's default lr (chosen on the tiny-world validation sequence for that method,
            not re-tuned for the mechanism on top); resolved here, so the record's method_config states it.
    """

    lr: float | None = field(default=None, metadata={"help": "Learning rate (None: the base method's default)."})
    base: str = field(default="full_ft", metadata={"help": "full_ft or lora."})

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"Invalid base: {self.base!r} (valid: {', '.join(BASES)})")
        if self.lr is None:
            self.lr = BASES[self.base][1]().lr
        super().__post_init__()

    def base_config(self) -> MethodConfig:
        """The base method's config at its defaults, with this config's lr."""
        return BASES[self.base][1](lr=self.lr)


class OnBase(Method):
    """Delegates wrapping, the trainable state, counts and the evaluated model to ``self.base``."""

    config_cls = OnBaseConfig

    def __init__(self, config: OnBaseConfig | None = None) -> None:
        super().__init__(config)
        self.base = BASES[self.config.base][0](self.config.base_config())

    def validate(self, module_names: set[str]) -> None:
        self.base.validate(module_names)

    def wrap(self, model: nn.Module) -> nn.Module:
        return self.base.wrap(model)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.base.trainable_state(model)

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.base.load_trainable_state(model, state)

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        return self.base.param_counts(model)

    def adapted_modules(self, model: nn.Module) -> list[str]:
        return self.base.adapted_modules(model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.base.eval_model(model)

    def diagnostics(self, model: nn.Module) -> dict[str, Any]:
        return {}
