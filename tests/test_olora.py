"""O-LoRA: the orthogonality loss, one frozen adapter per finished stage, the sum of every adapter, the resume."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from methods import TaskInfo
from methods.olora import OLora, OLoraConfig, l2_loss, orthogonality_loss
from methods.olora.adapters import CURRENT, lora_layers


def _batch(vocab: int = 100, b: int = 4, t: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _stage(method: OLora, model, stage: int, steps: int = 3, lr: float = 0.5, start: bool = True) -> None:
    """One stage as ``benchmark.train.train_stage`` runs it: a new optimizer over what requires grad now."""
    info = TaskInfo(name=f"t{stage}", kind="skill", stage=stage, num_stages=3)
    if start:
        method.on_task_start(model, info)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = _batch()
    model.train()
    for step in range(steps):
        loss = model(**batch).loss.float()
        aux = method.aux_loss(model)
        (loss + (aux if aux is not None else 0)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step(model, step + 1)
    method.on_task_end(model, info)


def _adapter(model, name: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


def _logits(method: OLora, model) -> torch.Tensor:
    m = method.eval_model(model)
    m.eval()
    with torch.no_grad():
        return m(input_ids=_batch()["input_ids"]).logits


def test_orthogonality_loss_on_hand_built_matrices():
    new = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert orthogonality_loss(new, [torch.tensor([[0.0, 0.0, 1.0]])]) == 0  # orthogonal rows
    new = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    old1 = torch.tensor([[1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])  # new @ old1.T = [[1, 4], [-1, 1]]: 7
    old2 = torch.tensor([[0.0, 0.0, 3.0]])  # new @ old2.T = [[0], [-3]]: 3
    assert orthogonality_loss(new, [old1]) == 7
    assert orthogonality_loss(new, [old1, old2]) == 10
    assert orthogonality_loss(new.bfloat16(), [old1]).dtype == torch.float32
    assert l2_loss([torch.tensor([[3.0, 4.0]]), torch.zeros(2, 2)]) == 5  # norms, not squared


def test_aux_loss_applies_the_orthogonality_term_to_every_adapted_module(tiny_llama):
    method = OLora(OLoraConfig(orth_lambda=0.5))
    model = method.wrap(tiny_llama)
    assert method.aux_loss(model) is None  # stage 1: nothing earlier, no L2 term
    _stage(method, model, 1, steps=1)
    method.on_task_start(model, TaskInfo(name="t2", kind="skill", stage=2, num_stages=2))
    layers = lora_layers(model)
    assert len(layers) == 4  # q_proj and v_proj of 2 layers
    eye = torch.eye(8, 32)
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_A[CURRENT].weight.copy_(eye)
            layer.lora_A["task1"].weight.copy_(torch.roll(eye, 8, dims=1))  # rows e_8..e_15: orthogonal
    assert method.aux_loss(model) == 0
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_A["task1"].weight.copy_(eye)  # the same rows: |I_8|_1 = 8 per module
    assert method.aux_loss(model) == 0.5 * 8 * 4


def test_orthogonality_gradient_moves_only_the_current_a(tiny_llama):
    new = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[1.0, 0.0, 1.0], [2.0, 1.0, 0.0]], requires_grad=True)
    orthogonality_loss(new, [old]).backward()
    # d/dA sum |A O^T| = sign(A O^T) O, with sign([[1, 4], [-1, 1]]) = [[1, 1], [-1, 1]]
    torch.testing.assert_close(new.grad, torch.tensor([[3.0, 1.0, 1.0], [1.0, 1.0, -1.0]]), rtol=0, atol=0)
    assert old.grad is None

    method = OLora(OLoraConfig())
    model = method.wrap(tiny_llama)
    _stage(method, model, 1)
    method.on_task_start(model, TaskInfo(name="t2", kind="skill", stage=2, num_stages=2))
    method.aux_loss(model).backward()
    for _, layer in lora_layers(model):
        assert layer.lora_A[CURRENT].weight.grad.abs().sum() > 0  # a fresh A overlaps the trained one
        assert layer.lora_B[CURRENT].weight.grad is None  # the orthogonality term reads A only
        assert layer.lora_A["task1"].weight.grad is None and layer.lora_B["task1"].weight.grad is None


def test_earlier_adapter_stays_bit_identical_while_the_new_one_trains(tiny_llama):
    method = OLora(OLoraConfig())
    model = method.wrap(tiny_llama)
    _stage(method, model, 1)
    trained = _adapter(model, CURRENT)
    method.on_task_start(model, TaskInfo(name="t2", kind="skill", stage=2, num_stages=2))
    first = _adapter(model, "task1")
    assert all(torch.equal(v, trained[n.replace(".task1.", f".{CURRENT}.")]) for n, v in first.items())
    fresh = _adapter(model, CURRENT)
    assert all(not v.any() for n, v in fresh.items() if ".lora_B." in n)  # a new adapter: B = 0
    _stage(method, model, 2, start=False)
    assert all(torch.equal(v, first[n]) for n, v in _adapter(model, "task1").items())
    assert all(not torch.equal(v, fresh[n]) for n, v in _adapter(model, CURRENT).items())


def test_on_task_start_refuses_a_history_that_does_not_match(tiny_llama):
    method = OLora(OLoraConfig())
    model = method.wrap(tiny_llama)
    with pytest.raises(RuntimeError, match="expected 1"):
        method.on_task_start(model, TaskInfo(name="t3", kind="skill", stage=3, num_stages=3))


def test_output_is_the_base_plus_every_adapter(tiny_llama):
    method = OLora(OLoraConfig())
    model = method.wrap(tiny_llama)
    _stage(method, model, 1)
    _stage(method, model, 2)
    name, layer = lora_layers(model)[0]
    assert layer.active_adapters == ["task1", CURRENT]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    expected = layer.get_base_layer()(x)
    for adapter in ("task1", CURRENT):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        assert b.abs().sum() > 0, f"{name}.{adapter} untrained"
        expected = expected + layer.scaling[adapter] * (x @ a.T @ b.T)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    both = _logits(method, model)
    model.base_model.set_adapter(["task1"])
    assert not torch.allclose(_logits(method, model), both)  # the stage-2 adapter counts


def test_resume_restores_every_adapter_and_the_trainable_one(tiny_llama):
    method = OLora(OLoraConfig(l2_lambda=0.1))
    model = method.wrap(tiny_llama)
    _stage(method, model, 1)
    _stage(method, model, 2)
    state = method.trainable_state(model)
    assert {n.split(".")[-2] for n in state} == {"task1", CURRENT}
    torch.manual_seed(0)
    method2 = OLora(OLoraConfig(l2_lambda=0.1))
    model2 = method2.wrap(LlamaForCausalLM(tiny_llama.config))
    method2.load_trainable_state(model2, state)
    assert torch.equal(_logits(method2, model2), _logits(method, model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in model2.named_parameters() if p.requires_grad] == trainable
    assert all(f".{CURRENT}." in n for n in trainable)
    for m, mod in ((method, model), (method2, model2)):  # the next stage continues alike
        torch.manual_seed(5)
        _stage(m, mod, 3)
    s1, s2 = method.trainable_state(model), method2.trainable_state(model2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_counts_modules_and_diagnostics(tiny_llama):
    method = OLora(OLoraConfig())
    model = method.wrap(tiny_llama)
    # per layer: q_proj 8 * (32 + 32) + v_proj 8 * (32 + 16); 2 layers
    assert method.param_counts(model) == {"trainable": 1792, "active": 1792}
    _stage(method, model, 1)
    _stage(method, model, 2)
    assert method.param_counts(model)["trainable"] == 1792
    assert method.adapted_modules(model) == ["q_proj", "v_proj"]
    diag = method.diagnostics(model)
    assert diag["adapters"] == 2 and diag["stored_adapter_params"] == 2 * 1792 and diag["orth_overlap"] > 0


@pytest.mark.parametrize("field,value", [("orth_lambda", -1.0), ("l2_lambda", float("nan")), ("orth_lambda", "x")])
def test_config_rejects_bad_weights(field, value):
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        OLoraConfig(**{field: value})
