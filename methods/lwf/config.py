"""Configuration of Learning without Forgetting (``lwf``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from methods.base import MethodConfig
from methods.full_ft import FullFTConfig
from methods.lora import LoraMethodConfig

BASES = {"full_ft": FullFTConfig, "lora": LoraMethodConfig}


def _number(value: object) -> bool:
    """A real int or float (``bool`` excluded), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class LwfConfig(MethodConfig):
    """Hyper-parameters of LwF (the table in the ``methods.lwf`` docstring says where each default is from).

    Args:
        base: what trains: ``full_ft`` (every weight; the teacher is a frozen copy of the model) or ``lora`` (the
            default ``lora`` adapter; the teacher is a frozen snapshot of it on the same frozen base).
        lwf_lambda: weight of the distillation term (the paper's lambda_o = 1).
        temperature: softmax temperature T of teacher and student (the paper's T = 2); the term is scaled by T^2.
        lr: None = the base method's default lr (chosen on the tiny-world validation sequence for that method,
            not re-tuned for LwF).
    """

    lr: float | None = field(default=None, metadata={"help": "Learning rate (None: the base method's default)."})
    base: str = field(default="full_ft", metadata={"help": "full_ft or lora."})
    lwf_lambda: float = field(default=1.0, metadata={"help": "Weight of the distillation loss (paper: 1)."})
    temperature: float = field(default=2.0, metadata={"help": "Distillation temperature T (paper: 2)."})

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"Invalid base: {self.base!r} (valid: {', '.join(BASES)})")
        if self.lr is None:  # resolved here, so the record's method_config states the value used
            self.lr = BASES[self.base]().lr
        super().__post_init__()
        if not _number(self.lwf_lambda) or self.lwf_lambda < 0:
            raise ValueError(f"Invalid lwf_lambda: {self.lwf_lambda!r} (must be a finite number >= 0)")
        if not _number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"Invalid temperature: {self.temperature!r} (must be a finite number > 0)")

    def base_config(self) -> MethodConfig:
        """The base method's config at its defaults, with this config's lr."""
        return BASES[self.base](lr=self.lr)
