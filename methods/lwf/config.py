"""Configuration of Learning without Forgetting (``lwf``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from methods.on_base import OnBaseConfig, finite_number


@dataclass
class LwfConfig(OnBaseConfig):
    """Hyper-parameters of LwF (the table in the ``methods.lwf`` docstring says where each default is from).

    Args:
        base: what trains: ``full_ft`` (every weight; the teacher is a frozen copy of the model) or ``lora`` (the
            default ``lora`` adapter; the teacher is a frozen snapshot of it on the same frozen base).
        lwf_lambda: weight of the distillation term (the paper's lambda_o = 1).
        temperature: softmax temperature T of teacher and student (the paper's T = 2); the term is scaled by T^2.
        lr: None = the base method's default lr (chosen on the tiny-world validation sequence for that method,
            not re-tuned for LwF).
    """

    lwf_lambda: float = field(default=1.0, metadata={"help": "Weight of the distillation loss (paper: 1)."})
    temperature: float = field(default=2.0, metadata={"help": "Distillation temperature T (paper: 2)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not finite_number(self.lwf_lambda) or self.lwf_lambda < 0:
            raise ValueError(f"Invalid lwf_lambda: {self.lwf_lambda!r} (must be a finite number >= 0)")
        if not finite_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"Invalid temperature: {self.temperature!r} (must be a finite number > 0)")
