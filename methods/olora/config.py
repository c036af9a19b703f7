"""O-LoRA's hyper-parameters: ``lora``'s adapter options plus the two loss weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from methods.lora import LoraMethodConfig

# O-LoRA adapts the attention query and value projections (the peft default for Llama and T5 it was built on)
QV_LINEAR = ["q_proj", "v_proj"]


def _check_weight(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


@dataclass
class OLoraConfig(LoraMethodConfig):
    """Hyper-parameters of O-LoRA (every stage gets a fresh ``peft`` LoRA adapter of these options).

    Args:
        r: rank of each stage's adapter; 8 as the official code (``lora_dim``) and ``lora``.
        alpha: ``lora_alpha`` (scaling alpha / r); 16 as ``lora`` (the official code uses 32, scaling 4), so the lr
            tuned for ``lora`` keeps its meaning.
        dropout: dropout on the adapter input; 0.0 as ``lora`` (the official code uses 0.1).
        target_modules: module-name suffixes to adapt; q_proj and v_proj as the official code.
        orth_lambda: lambda_1, weight of the orthogonality loss; 0.5 as every script of the official code.
        l2_lambda: lambda_2, weight of the L2 term on the current adapter; 0.0 as the official default.
        lr: 3e-3, ``lora``'s lr chosen on the tiny-world validation sequence (``scripts/tune_defaults.py``;
            results/tuning/README.md), the same recipe for every adapter method on our models (the official
            scripts use 1e-3, constant, for T5-large and LLaMA-7B).
    """

    target_modules: list[str] = field(default_factory=lambda: list(QV_LINEAR),
                                      metadata={"help": "Module-name suffixes to adapt (default: q_proj, v_proj)."})
    orth_lambda: float = field(default=0.5, metadata={
        "help": "lambda_1: weight of sum |A_current A_earlier^T| over adapted modules and earlier adapters."})
    l2_lambda: float = field(default=0.0, metadata={
        "help": "lambda_2: weight of the sum of L2 norms of the current adapter's A and B matrices."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_weight("orth_lambda", self.orth_lambda)
        _check_weight("l2_lambda", self.l2_lambda)
