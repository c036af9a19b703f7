"""Which ``peft`` types the ``peft`` method accepts, and how a type and its options become a ``peft`` config.

The list is read from ``peft`` itself (``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``): every type whose config
selects modules by name (a ``target_modules`` field) and is not prompt learning, minus :data:`REFUSED` (types that
do not adapt linear layers or need a training-step schedule the training loop cannot drive), plus the alias
``DORA`` (``LORA`` with ``use_dora=True``). ``peft`` is imported only when a config is checked or built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any

DORA = "DORA"

# why each of these peft types is not offered (one line each: it ends up in a ValueError)
REFUSED = {
    "ADALORA": "AdaLoRA re-allocates ranks in update_and_allocate, which reads the gradients between backward and "
               "zero_grad; the training loop's on_step runs after zero_grad, and the rank allocator's importance "
               "state would not be in the checkpoint",
    "ADAPTION_PROMPT": "adaption prompts are learned prompt tokens inside attention (LLaMA-Adapter), not adapters "
                       "on linear layers",
    "LN_TUNING": "LN tuning trains the norm layers, not linear layers",
    "POLY": "Polytropon routes by task_ids passed to every forward, which the training loop does not pass",
    "SHADOW": "ShadowPEFT wraps whole decoder blocks with a parallel shadow network, not linear layers",
    "TRAINABLE_TOKENS": "trainable tokens train rows of the embedding, not linear layers",
    "XLORA": "X-LoRA mixes LoRA adapters trained beforehand, which it must be given",
}
ASA_REFUSED = ("ADAMSS with use_asa=True prunes subspaces in update_and_allocate, which reads the gradients between "
               "backward and zero_grad; the training loop's on_step runs after zero_grad")
# fields of every peft config that the method sets itself or that describe a saved adapter, not the adapter
RESERVED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "target_modules"}


def config_classes() -> dict[str, type]:
    """Every ``peft`` type name -> its config class."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(t.value): c for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


@cache
def valid_types() -> tuple[str, ...]:
    """The type names the ``peft`` method accepts, sorted."""
    from peft.config import PromptLearningConfig

    out = [DORA]
    for name, cls in config_classes().items():
        if name not in REFUSED and not issubclass(cls, PromptLearningConfig) and "target_modules" in init_fields(cls):
            out.append(name)
    return tuple(sorted(out))


def refusal(name: str) -> str | None:
    """Why the peft type ``name`` is not offered, or None if it is (or is no peft type at all)."""
    if name in REFUSED:
        return REFUSED[name]
    cls = config_classes().get(name)
    if cls is None or name in valid_types():
        return None
    from peft.config import PromptLearningConfig

    if issubclass(cls, PromptLearningConfig):
        return f"{name} is prompt learning (virtual tokens or prefixes), not adapters on linear layers"
    return f"{cls.__name__} has no target_modules: it does not adapt linear layers by name"


def init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def option_fields(name: str) -> list[str]:
    """The config fields of type ``name`` that ``options`` may set, sorted."""
    fixed = RESERVED | ({"use_dora"} if name == DORA else set())
    return sorted(set(init_fields(config_class(name))) - fixed)


def config_class(name: str) -> type:
    return config_classes()["LORA" if name == DORA else name]


def value_error(value: Any, hint: Any) -> str | None:
    """What is wrong with ``value`` for a field annotated ``hint`` (simple annotations only), or None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = [value_error(value, a) for a in args]
        return None if any(e is None for e in errors) else errors[0]
    if origin is typing.Literal:
        return None if value in args else f"one of {list(args)}"
    if hint is type(None):
        return None if value is None else "null"
    if hint in (int, float):  # peft annotates lora_alpha as int but takes any number
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint in (bool, str):
        return None if isinstance(value, hint) else hint.__name__
    if origin in (list, tuple):
        return None if isinstance(value, (list, tuple)) else "a list"
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "a mapping"
    return None  # richer annotations (nested configs, enums): left to peft


def build_config(name: str, options: dict[str, Any], target_modules: list[str]) -> Any:
    """The ``peft`` config of type ``name`` with ``options``; ``ValueError`` (one line) on a bad option."""
    cls = config_class(name)
    valid = option_fields(name)

    def bad(what: str) -> ValueError:
        return ValueError(f"Invalid options for {name}: {what} (valid fields: {', '.join(valid)})")

    if not all(isinstance(k, str) for k in options):
        raise bad(f"field names must be strings, got {sorted(map(repr, options))}")
    reserved = sorted(set(options) & RESERVED)
    if reserved:
        raise bad(f"{reserved} are set by the method (target_modules is a field of its own)")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise bad(f"unknown field(s) {unknown}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference peft does not export: no type check, peft's own checks still run
        hints = {}
    for key, value in options.items():
        want = value_error(value, hints[key]) if key in hints else None
        if want is not None:
            raise bad(f"{key}={value!r} (expected {want})")
    kwargs = dict(options, task_type="CAUSAL_LM", target_modules=list(target_modules))
    if name == DORA:
        kwargs["use_dora"] = True
    try:
        cfg = cls(**kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise bad(" ".join(str(exc).split()) or type(exc).__name__) from exc
    if name == "ADAMSS" and getattr(cfg, "use_asa", False):
        raise ValueError(f"Invalid options for {name}: use_asa=True is refused ({ASA_REFUSED})")
    return cfg
