"""The ``peft`` method (any peft adapter by type) and its ``dora`` preset: peft at its defaults is ``lora``'s adapter,
DoRA's weight decomposition computes what the paper says, and a bad type or option is one line with the choices."""

from __future__ import annotations

import pytest
import torch

from benchmark.cli import main
from methods import METHODS
from methods.peft_any import DoraConfig, PeftAny, PeftAnyConfig
from methods.peft_any.catalogue import valid_types
from tests.conftest import make_tiny_llama


def test_peft_at_its_defaults_is_the_lora_adapter():
    lora = METHODS.get("lora")()
    peft = PeftAny()
    a = lora.wrap(make_tiny_llama())
    b = peft.wrap(make_tiny_llama())
    sa, sb = lora.trainable_state(a), peft.trainable_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert peft.param_counts(b) == lora.param_counts(a)
    assert peft.adapted_modules(b) == lora.adapted_modules(a)


def test_dora_splits_each_weight_into_magnitude_and_direction():
    method = METHODS.get("dora")(DoraConfig(target_modules=["q_proj"]))
    model = method.wrap(make_tiny_llama())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.detach()
    m = layer.lora_magnitude_vector["default"].weight
    assert m.requires_grad and torch.allclose(m, w.norm(dim=1))  # initialised to the row norms of W
    with torch.no_grad():  # move away from the identity start: B != 0 and m != ||W||
        layer.lora_B["default"].weight.normal_(0, 0.3)
        m.mul_(torch.linspace(0.5, 1.5, m.numel()))
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = method.config.options["lora_alpha"] / 8
    merged = w + s * b @ a
    want_w = m.detach()[:, None] * merged / merged.norm(dim=1, keepdim=True)
    x = torch.randn(3, w.shape[1])
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ want_w.T, atol=1e-5)
    assert "lora_magnitude_vector" in " ".join(method.trainable_state(model))


def test_options_reach_the_peft_config_and_are_checked():
    cfg = PeftAnyConfig(type="lokr", options={"r": 4}, target_modules=["q_proj"])
    assert cfg.type == "LOKR" and cfg.peft_config().r == 4
    assert PeftAnyConfig(type="dora").options["lora_alpha"] == 16
    assert "DORA" in valid_types() and "IA3" in valid_types() and "LORA" in valid_types()
    for kwargs, words in (({"type": "NOPE"}, ["'NOPE'", "valid:", "DORA"]),
                          ({"type": "ADALORA"}, ["refused", "update_and_allocate"]),
                          ({"type": "PROMPT_TUNING"}, ["prompt learning"]),
                          ({"options": {"rank": 4}}, ["unknown field", "valid fields:", "lora_alpha"]),
                          ({"options": {"r": "big"}}, ["r='big'", "a number"]),
                          ({"options": {"target_modules": ["x"]}}, ["set by the method"])):
        with pytest.raises(ValueError) as exc:
            PeftAnyConfig(**kwargs)
        msg = str(exc.value)
        assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("opt, word", [("methods.peft.type=NOPE", "DORA"),
                                       ("methods.peft.options={rank: 4}", "unknown field"),
                                       ("methods.peft.type=ADALORA", "refused")])
def test_bad_type_or_field_is_one_line_exit_2(tmp_path, capsys, opt, word):
    out = tmp_path / "o"
    assert main(["-q", "run", "--methods", "peft", "--output", str(out), "--dry-run", "--set", opt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err
    assert not out.exists() or not any(out.rglob("*.json"))
