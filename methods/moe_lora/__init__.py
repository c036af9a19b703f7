"""The shared MoE-LoRA layer that the LoRAMoE, SLIM and HiLo plugins configure (docs/methods.md §4).

This package registers no method; it only provides building blocks:

- :class:`MoELoRAMethod` -- the method hooks the three plugins share (``method.py``);
- :class:`MoELoRALinear`, :class:`RouterOutput`, :func:`param_count` -- the layer (``layer.py``);
- :func:`inject_moe_lora`, :func:`moe_layers`, :func:`trainable_state`, :func:`load_trainable_state`,
  :func:`total_param_count`, :func:`collect_aux`, routing-statistics helpers -- model level (``inject.py``);
- :func:`routing_context`, :func:`get_routing_context`, :func:`is_recomputing` -- batch side information
  (``context.py``);
- :func:`switch_load_balance`, :func:`loramoe_balance` and aux-term factories (``losses.py``).
"""

from __future__ import annotations

from methods.moe_lora.context import RoutingContext, get_routing_context, is_recomputing, routing_context
from methods.moe_lora.inject import (
    collect_aux,
    inject_moe_lora,
    load_trainable_state,
    model_routing_stats,
    moe_layers,
    reset_routing_stats,
    set_track_stats,
    total_param_count,
    trainable_state,
    trainable_state_keys,
)
from methods.moe_lora.layer import MoELoRALinear, RouterOutput, param_count
from methods.moe_lora.losses import loramoe_balance, loramoe_balance_term, switch_balance_term, switch_load_balance
from methods.moe_lora.method import MoELoRAMethod

__all__ = [
    "MoELoRALinear",
    "MoELoRAMethod",
    "RouterOutput",
    "RoutingContext",
    "collect_aux",
    "get_routing_context",
    "inject_moe_lora",
    "is_recomputing",
    "load_trainable_state",
    "loramoe_balance",
    "loramoe_balance_term",
    "model_routing_stats",
    "moe_layers",
    "param_count",
    "reset_routing_stats",
    "routing_context",
    "set_track_stats",
    "switch_balance_term",
    "switch_load_balance",
    "total_param_count",
    "trainable_state",
    "trainable_state_keys",
]
