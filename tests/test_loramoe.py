"""Method-level tests of the ``loramoe`` plugin on a tiny random Llama (fast, no network).

The balancing-loss formula itself is checked on hand-made tensors in tests/test_moe_layer.py; here the expected
values are recomputed independently from each module's captured input, so the tests fail if the stage's task type
(from ``on_task_start``) does not reach every layer, if the router saw dropout, if a module is missed or the sum
over modules is wrong.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from benchmark.config import build_dataclass
from benchmark.errors import UserError
from methods import METHODS, TaskInfo
from methods.loramoe import KIND_TO_TYPE, LoRAMoE, LoRAMoEConfig
from methods.moe_lora import MoELoRALinear, moe_layers

HIDDEN, FFN, LAYERS, VOCAB = 32, 64, 2, 100


def base_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def batch(rows: int = 3, t: int = 6) -> dict[str, torch.Tensor]:
    """A batch as benchmark.data.collate makes it: no task types (LoRAMoE takes them from on_task_start)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (rows, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding, as benchmark.data.collate makes it
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 3) -> None:
    """Non-zero experts and a peaked router, so every term and logit differs from the initial state."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in moe_layers(model):
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))


def wrapped(**cfg) -> tuple[LoRAMoE, torch.nn.Module]:
    method = LoRAMoE(LoRAMoEConfig(**cfg))
    return method, method.wrap(base_model())


def train_forward(method: LoRAMoE, model: torch.nn.Module, b: dict,
                  kind: str | None = "knowledge") -> tuple[torch.Tensor | None, dict]:
    """One training forward as benchmark.train runs it, in a stage of task ``kind`` (``None``: no
    ``on_task_start`` call here); returns the aux loss and every module's input."""
    if kind is not None:
        method.on_task_start(model, TaskInfo(name="t", kind=kind, stage=1, num_stages=1))
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0].detach()))
             for name, layer in moe_layers(model)]
    model.train()
    with method.forward_context(model, b):
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        aux = method.aux_loss(model)
    for h in hooks:
        h.remove()
    return aux, inputs


def hand_lbc(layer: MoELoRALinear, x: torch.Tensor, task_types, delta: float, weight: float, form: str,
             mask: torch.Tensor | None) -> float:
    """The official code's constraint for one module, element by element in float64."""
    g = torch.softmax(x.double() @ layer.router.weight.detach().double().t(), dim=-1)  # on x, no dropout
    n_b, n_t, n = g.shape
    z = []
    for b in range(n_b):
        for e in range(n):
            q = sum(float(g[b, t, e]) * (1.0 if mask is None else float(mask[b, t])) for t in range(n_t))
            own = e < n // 2 if int(task_types[b]) == 1 else e >= n // 2
            z.append(q * ((1 + delta) if own else (1 - delta)))
    mean = sum(z) / len(z)
    var = sum((v - mean) ** 2 for v in z) / (len(z) - 1)
    return weight * var / ((mean**2 if form == "cv2" else mean) + 1e-10)


def logits(model: torch.nn.Module, b: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


# -- tests ----------------------------------------------------------------------------------------------
def test_registered_with_the_official_defaults():
    assert METHODS.get("loramoe") is LoRAMoE
    c = LoRAMoEConfig()
    assert (c.n_experts, c.r, c.alpha, c.dropout) == (8, 4, 32.0, 0.05)
    assert c.target_modules == ["gate_proj", "up_proj", "down_proj"] and c.blc_form == "cv2"
    assert c.blc_weight > 0 and 0 < c.blc_alpha < 1  # the constraint is on by default


def test_wrapped_model_equals_base_exactly_at_init():
    b = batch()
    base = logits(base_model(), b)
    method, model = wrapped()
    names = [n for n, _ in moe_layers(model)]
    assert len(names) == 3 * LAYERS and all(n.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") for n in names)
    assert torch.equal(logits(model, b), base)
    model.train()  # expert dropout is active, but B = 0 still adds exactly nothing
    with torch.no_grad(), method.forward_context(model, b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(out, base)


@pytest.mark.parametrize("form", ["cv2", "cv"])
@pytest.mark.parametrize("mask_padding", [False, True])
@pytest.mark.parametrize("kind", ["knowledge", "skill"])
def test_balance_loss_equals_hand_value_summed_over_modules(form, mask_padding, kind):
    delta, weight = 0.3, 0.07
    method, model = wrapped(blc_alpha=delta, blc_weight=weight, blc_form=form, blc_mask_padding=mask_padding)
    randomise(model)
    b = batch()
    aux, inputs = train_forward(method, model, b, kind)  # train mode: experts see dropout(x), the router must not
    assert aux is not None and aux.dim() == 0 and aux.requires_grad
    types = [KIND_TO_TYPE[kind]] * b["input_ids"].shape[0]  # a stage trains on one task: one type per batch
    mask = b["attention_mask"] if mask_padding else None
    expected = sum(hand_lbc(layer, inputs[name], types, delta, weight, form, mask)
                   for name, layer in moe_layers(model))
    assert len(inputs) == 3 * LAYERS
    assert math.isclose(aux.item(), expected, rel_tol=1e-5)
    # padding matters in this batch, so the masked and the unmasked variants must differ
    other = sum(hand_lbc(layer, inputs[name], types, delta, weight, form,
                         None if mask_padding else b["attention_mask"]) for name, layer in moe_layers(model))
    assert not math.isclose(aux.item(), other, rel_tol=1e-3)


def test_balance_loss_depends_on_task_kind_only_through_delta():
    # no dropout: both forwards must see the same hidden states
    method, model = wrapped(blc_alpha=0.2, blc_weight=0.1, dropout=0.0)
    randomise(model)
    a, _ = train_forward(method, model, batch(), "knowledge")
    b, _ = train_forward(method, model, batch(), "skill")
    assert not math.isclose(a.item(), b.item(), rel_tol=1e-4)  # the stage's task kind reached the layers
    method0, model0 = wrapped(blc_alpha=0.0, blc_weight=0.1, dropout=0.0)
    randomise(model0)
    a0, _ = train_forward(method0, model0, batch(), "knowledge")
    b0, _ = train_forward(method0, model0, batch(), "skill")
    assert math.isclose(a0.item(), b0.item(), rel_tol=1e-6)


def test_task_types_come_from_the_stage_and_match_the_old_batch_tensor():
    method, _ = wrapped()
    b = batch(rows=5)
    assert method.routing_task_types(b) is None  # no stage known
    for kind, value in (("knowledge", 1), ("skill", 0)):
        method.on_task_start(torch.nn.Module(), TaskInfo(name="t", kind=kind, stage=1, num_stages=1))
        t = method.routing_task_types(b)
        # what benchmark.data.collate used to put in the batch: (B,) torch.long, on the batch's device
        assert t.dtype == torch.long and t.device == b["input_ids"].device and t.tolist() == [value] * 5
    method.on_task_end(torch.nn.Module(), TaskInfo(name="t", kind="skill", stage=1, num_stages=1))
    assert method.routing_task_types(b) is None  # the stage is over
    with pytest.raises(ValueError, match="kind"):
        method.on_task_start(torch.nn.Module(), TaskInfo(name="t", kind="chat", stage=1, num_stages=1))


def test_no_stage_known_means_no_constraint_and_one_warning(caplog):
    method, model = wrapped(blc_weight=0.5)
    randomise(model)
    with caplog.at_level("WARNING", logger="methods.loramoe"):
        assert train_forward(method, model, batch(), kind=None)[0] is None
        assert train_forward(method, model, batch(), kind=None)[0] is None
    assert sum("balancing constraint is not applied" in r.getMessage() for r in caplog.records) == 1


def test_delta0_equals_weight_times_cv2_of_per_sample_importances():
    method, model = wrapped(blc_alpha=0.0, blc_weight=0.25)
    randomise(model)
    aux, inputs = train_forward(method, model, batch())
    expected = 0.0
    for name, layer in moe_layers(model):
        g = torch.softmax(inputs[name].double() @ layer.router.weight.detach().double().t(), dim=-1)
        q = g.sum(dim=1).flatten()  # per-sample expert importances
        expected += 0.25 * float(q.var() / q.mean() ** 2)
    assert math.isclose(aux.item(), expected, rel_tol=1e-5)


def test_constraint_acts_through_routing_and_is_absent_at_evaluation():
    method, model = wrapped(blc_weight=0.5)
    randomise(model)
    aux, _ = train_forward(method, model, batch())
    aux.backward()
    layers = [layer for _, layer in moe_layers(model)]
    for layer in layers:
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    # the last down_proj's experts feed no later router, so the constraint alone gives them no gradient
    last = layers[-1]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in (last.lora_A, last.lora_B))
    model.eval()
    with torch.no_grad():  # no routing context at evaluation: no task types, no constraint
        model(input_ids=batch()["input_ids"])
    assert method.aux_loss(model) is None
    off, model_off = wrapped(blc_weight=0.0)
    assert train_forward(off, model_off, batch())[0] is None


def test_trainable_parameters_match_the_closed_form():
    n, r = 6, 3
    method, model = wrapped(n_experts=n, r=r)
    per_block = sum(n * r * (d_in + d_out) + n * d_in for d_in, d_out in [(HIDDEN, FFN), (HIDDEN, FFN), (FFN, HIDDEN)])
    counts = method.param_counts(model)
    assert counts == {"trainable": LAYERS * per_block, "active": LAYERS * per_block}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == LAYERS * per_block


def test_trainable_state_roundtrip_through_safetensors_gives_identical_logits():
    method, model = wrapped(n_experts=4, blc_form="cv", blc_mask_padding=True)
    randomise(model)
    aux, _ = train_forward(method, model, batch())
    assert aux is not None
    b = batch()
    before = logits(model, b)
    state = method.trainable_state(model)
    assert state and all(k.endswith(("lora_A", "lora_B", "router.weight")) for k in state)
    method2, model2 = wrapped(n_experts=4, blc_form="cv", blc_mask_padding=True)
    with tempfile.TemporaryDirectory() as d:
        save_file(state, f"{d}/s.safetensors")
        method2.load_trainable_state(model2, load_file(f"{d}/s.safetensors"))
    assert torch.equal(logits(model2, b), before)


def test_diagnostics_cover_the_stage_training_forwards_only():
    method, model = wrapped()
    randomise(model)
    assert method.diagnostics(model) == {"tokens": 0}  # before any training (stage-0 row)
    info = TaskInfo(name="t", kind="knowledge", stage=1, num_stages=1)
    method.on_task_start(model, info)
    b = batch()
    train_forward(method, model, b, kind=None)  # the stage started above
    method.on_task_end(model, info)
    logits(model, b)  # evaluation forwards after the stage are not counted
    d = method.diagnostics(model)
    assert d["tokens"] == int(b["attention_mask"].sum())  # padding excluded
    assert len(d["load"]) == 8 and math.isclose(sum(d["load"]), 1.0, rel_tol=1e-6)
    assert math.isclose(d["knowledge_group_share"] + d["skill_group_share"], 1.0, rel_tol=1e-6)
    assert 0.0 < d["entropy"] <= math.log(8) + 1e-9 and len(d["layers"]) == 3 * LAYERS
    assert d["balance_loss"] > 0
    method.on_task_start(model, TaskInfo(name="u", kind="skill", stage=2, num_stages=2))
    assert method.diagnostics(model) == {"tokens": 0}  # reset per stage


@pytest.mark.parametrize("bad", [7, 1, 0])
def test_odd_or_too_few_experts_rejected_naming_the_value(bad):
    with pytest.raises(ValueError, match=rf"n_experts: {bad}\b"):
        LoRAMoEConfig(n_experts=bad)
    with pytest.raises(UserError, match=rf"methods\.loramoe.*n_experts: {bad}\b"):  # as the CLI reports it
        build_dataclass(LoRAMoEConfig, {"n_experts": bad}, "methods.loramoe.")


@pytest.mark.parametrize("field,value", [("blc_alpha", 1.0), ("blc_weight", -0.1), ("blc_form", "cv3"),
                                         ("r", 0), ("dropout", 1.0), ("target_modules", [])])
def test_invalid_settings_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LoRAMoEConfig(**{field: value})


def test_missing_target_module_is_a_clear_error():
    method = LoRAMoE(LoRAMoEConfig(target_modules=["gate_proj", "fc_in"]))
    names = {n for n, _ in base_model().named_modules() if n}
    with pytest.raises(ValueError, match=r"fc_in.*up_proj"):  # names the bad target and the valid ones
        method.validate(names)
    LoRAMoE().validate(names)  # the defaults are valid
    with pytest.raises(ValueError, match=r"fc_in.*gate_proj"):
        method.wrap(base_model())
