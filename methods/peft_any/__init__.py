"""Any ``peft`` adapter by type (``peft``), and DoRA (``dora``; Liu et al., ICML 2024, "DoRA: Weight-Decomposed
Low-Rank Adaptation", https://arxiv.org/abs/2402.09353, official code https://github.com/NVlabs/DoRA).

``peft`` builds the config class of ``type`` (``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``) from ``options`` and
``target_modules`` and wraps the model with ``get_peft_model``, exactly as ``lora`` does for LoRA: one adapter
trained through every stage; a checkpoint holds ``get_peft_model_state_dict`` (VeRA's shared projections
included). The accepted types are listed in :mod:`methods.peft_any.catalogue`: ``peft``'s own types that adapt
modules by name, minus prompt learning (PROMPT_TUNING, MULTITASK_PROMPT_TUNING, P_TUNING, PREFIX_TUNING, CPT,
CARTRIDGE: virtual tokens, no linear layer), types that adapt other things (ADAPTION_PROMPT, LN_TUNING, SHADOW,
TRAINABLE_TOKENS, X-LoRA) or need what the loop does not give (POLY: task ids; ADALORA and ADAMSS's ``use_asa``:
a hook between backward and ``zero_grad``), plus ``DORA`` = ``LORA`` with ``use_dora=True``.

DoRA splits each adapted weight into a magnitude and a direction, ``W' = m * (W + s B A) / ||W + s B A||_c``
(a norm per output row): ``m`` (``lora_magnitude_vector``, initialised to ``||W||_c``) and the LoRA pair B, A
train; peft treats the norm as a constant in backward, as the paper's Sec. 4.3 (official ``dora_simple=True``).

| detail            | paper / official code          | our default                 | why                              |
|-------------------|--------------------------------|-----------------------------|----------------------------------|
| rank / alpha      | r=32, alpha=64 (LLaMA-7B;      | r=8, lora_alpha=16          | ``lora``'s adapter: same budget  |
|                   | also r=16, alpha=32)           |                             | base, the paper's alpha = 2 r    |
| targets           | q, k, v, up, down              | all seven linears           | as ``lora`` (ALL_LINEAR), so     |
|                   |                                | (``lora``'s ALL_LINEAR)     | dora - lora isolates DoRA        |
| dropout           | 0.05 (official finetune.py)    | 0.0 (peft's default)        | as ``lora``                      |
| norm in backward  | detached (Sec. 4.3)            | detached (peft)             | as the paper                     |
| learning rate     | 1e-4 / 2e-4 (LoRA: 3e-4)       | lr=3e-3                     | ``lora``'s tiny-world validation |
|                   |                                |                             | choice, not re-tuned per type    |
| ``peft`` type     | -                              | LORA                        | at its defaults ``peft`` is      |
|                   |                                |                             | ``lora``'s adapter (tested)      |
| other types       | their papers                   | peft's defaults + options   | nothing tuned here               |

``options`` go to the peft config class unchanged, except that LORA and DORA take ``lora_alpha=16`` unless
``options`` set it (peft's default is 8): so that both keep ``lora``'s scaling alpha / r = 2, with which its lr
was chosen. Some limits peft checks only when it wraps the model (e.g. a rank above a layer's width, C3A's block
size or FourierFT's ``n_frequency`` against the layer shapes): those fail the run with peft's message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from methods.base import MethodConfig, register_method
from methods.lora import ALL_LINEAR, Lora, LoraMethodConfig
from methods.peft_any.catalogue import DORA, build_config, refusal, valid_types

logger = logging.getLogger(__name__)

# our defaults under the user's options, per type (see the module docstring)
TYPE_DEFAULTS: dict[str, dict[str, Any]] = {"LORA": {"lora_alpha": 16}, DORA: {"lora_alpha": 16}}


@dataclass
class PeftAnyConfig(MethodConfig):
    """A ``peft`` adapter chosen by type.

    Args:
        type: a peft type name (case-insensitive), or DORA (LORA with use_dora=True); see ``valid_types()``.
        options: fields of that type's peft config class (e.g. ``{"r": 4}`` for LORA); checked by peft here.
        target_modules: module-name suffixes to adapt (``lora``'s default: all linear projections of a Llama block).
        lr: 3e-3, ``lora``'s lr chosen on the tiny-world validation sequence (``scripts/tune_defaults.py``), not
            re-tuned per type.
    """

    lr: float | None = field(default=LoraMethodConfig.lr,
                             metadata={"help": "Learning rate (lora's tiny-world validation choice)."})
    type: str = field(default="LORA", metadata={"help": "peft type name (case-insensitive), or DORA."})
    options: dict[str, Any] = field(default_factory=dict,
                                    metadata={"help": "Fields of the type's peft config class, e.g. {r: 4}."})
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR),
                                      metadata={"help": "Module-name suffixes to adapt."})

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = ", ".join(valid_types())
        if not isinstance(self.type, str):
            raise ValueError(f"Invalid type: {self.type!r} (valid: {choices})")
        self.type = self.type.strip().upper()  # recorded as resolved, so "dora" and "DORA" are one config
        if self.type not in valid_types():
            why = refusal(self.type)
            reason = f"refused: {why}; " if why else ""
            raise ValueError(f"Invalid type: {self.type!r} ({reason}valid: {choices})")
        if not isinstance(self.options, dict):
            raise ValueError(f"Invalid options: {self.options!r} (a mapping of {self.type} config fields)")
        if not self.target_modules:
            raise ValueError("Invalid target_modules: empty list")
        self.options = {**TYPE_DEFAULTS.get(self.type, {}), **self.options}
        self.peft_config()  # peft checks the options now, before any work

    def peft_config(self) -> Any:
        """The ``peft`` config this method wraps the model with."""
        return build_config(self.type, dict(self.options), list(self.target_modules))


@register_method("peft")
class PeftAny(Lora):
    """One ``peft`` adapter of any supported type, trained through every stage; the base weights stay frozen."""

    config_cls = PeftAnyConfig
    shardable = False  # adapter types differ (shared buffers, rank reallocation); none is tested sharded

    def wrap(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model  # deferred: every CLI call imports every method plugin

        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in self.config.target_modules if t not in present]
        if missing:
            raise ValueError(f"Invalid target_modules: {missing} not in the model; linear modules: {sorted(present)}")
        return get_peft_model(model, self.config.peft_config())


@dataclass
class DoraConfig(PeftAnyConfig):
    """``peft`` with DoRA as the type.

    Args:
        type: DORA (LoRA with use_dora=True: a trained magnitude per output row; see the module docstring).
    """

    type: str = field(default=DORA, metadata={"help": "DORA (other types: the peft method)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.type != DORA:
            raise ValueError(f"Invalid type: {self.type!r} (valid: {DORA}; other types are the peft method's)")


@register_method("dora")
class Dora(PeftAny):
    """DoRA: LoRA with the weight split into a trained magnitude and a direction (``lora``'s rank and targets)."""

    config_cls = DoraConfig
