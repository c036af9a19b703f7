"""``lora_mlp``: LoRA on the MoE methods' modules with their budget, and the ``adapted_modules`` hook behind the
leaderboard's ``modules`` column.

The model has the default tiny-world shape (``PretrainConfig``: 4 layers, hidden 128, FFN 512) with random
weights: parameter counts depend on the shape only, so nothing is pretrained or downloaded.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmark.config import PretrainConfig, build_dataclass
from methods import METHODS
from methods.base import adapted_module_names

MLP = ["down_proj", "gate_proj", "up_proj"]


def tinyworld_shape() -> LlamaForCausalLM:
    """A random Llama of the default tiny-world recipe's shape (as benchmark.models builds it)."""
    p = PretrainConfig()
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads,
        max_position_embeddings=256, tie_word_embeddings=True))


def wrapped(name: str, **options) -> tuple[object, torch.nn.Module]:
    cls = METHODS.get(name)
    method = cls(build_dataclass(cls.config_cls, options))
    return method, method.wrap(tinyworld_shape())


def test_lora_mlp_matches_the_moe_budget_on_mlp_modules_only():
    lm, lm_model = wrapped("lora_mlp")
    slim, slim_model = wrapped("slim")
    moe, moe_model = wrapped("loramoe")
    n = lm.param_counts(lm_model)["trainable"]
    n_slim, n_moe = slim.param_counts(slim_model)["trainable"], moe.param_counts(moe_model)["trainable"]
    assert n == 7_680 * 36 == 276_480  # r (128 + 512) * 3 projections * 4 layers, r = 36
    assert abs(n - n_slim) <= 0.03 * n_slim and abs(n - n_moe) <= 0.03 * n_moe
    assert lm.adapted_modules(lm_model) == MLP == slim.adapted_modules(slim_model) == moe.adapted_modules(moe_model)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, p in lm_model.named_parameters()
               if p.requires_grad}
    assert adapted == set(MLP)  # no attention projection carries a trainable parameter


def test_lora_mlp_keeps_lora_scaling_at_any_rank():
    lora = METHODS.get("lora").config_cls()
    cfg = METHODS.get("lora_mlp").config_cls()
    assert (cfg.r, cfg.alpha / cfg.r) == (36, lora.alpha / lora.r) == (36, 2.0)
    assert build_dataclass(type(cfg), {"r": 16}).alpha == 32.0  # alpha follows r unless set
    assert build_dataclass(type(cfg), {"r": 16, "alpha": 8.0}).alpha == 8.0


def test_adapted_modules_of_the_builtin_methods():
    ft, model = wrapped("full_ft")
    assert ft.adapted_modules(model) == ["all"]
    lora, model = wrapped("lora")
    assert lora.adapted_modules(model) == sorted(METHODS.get("lora").config_cls().target_modules)
    lora, model = wrapped("lora", target_modules=["q_proj", "v_proj"])
    assert lora.adapted_modules(model) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("trained, expected", [
    ("norm", ["input_layernorm", "norm", "post_attention_layernorm"]),  # weights trained in place
    ("layers.3.mlp.", MLP),
])
def test_adapted_module_names_without_a_wrapper(trained, expected):
    model = tinyworld_shape()
    for name, p in model.named_parameters():
        p.requires_grad_(trained in name)
    assert adapted_module_names(model) == expected


def test_adapted_module_names_with_frozen_embeddings_lists_modules_not_the_model():
    model = tinyworld_shape()
    for name, p in model.named_parameters():
        p.requires_grad_("embed_tokens" not in name)
    got = adapted_module_names(model)
    assert "model" not in got and {"q_proj", "down_proj", "norm"} <= set(got)
