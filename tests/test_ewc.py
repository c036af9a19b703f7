"""Online EWC: the Fisher against a closed form, the penalty and its gradient, the online combination over two
stages, the LoRA-only Fisher, and the bit-identical trainable_state round trip."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM

from benchmark.data import Example, collate
from methods import METHODS, StageData, TaskInfo
from methods.ewc import ANCHOR, FISHER, Ewc, EwcConfig
from methods.ewc.fisher import diagonal_fisher, evenly_spaced
from methods.full_ft import FullFTConfig
from methods.lora import LoraMethodConfig

V = 5  # vocabulary of the bigram model


class Bigram(nn.Module):
    """``logits[t] = W[:, x_t] + b`` (a dropout in front, inactive in eval mode): the log-likelihood's gradient is
    ``e_y - softmax(z)`` on column ``x_t`` of W and on b."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(torch.randn(V, V, generator=g))
        self.b = nn.Parameter(torch.randn(V, generator=g))
        self.drop = nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.drop(self.W.t()[input_ids] + self.b))


def hand_fisher(model: Bigram, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of each example's summed answer log-likelihood, by hand."""
    W, b = model.W.detach(), model.b.detach()
    fw, fb = torch.zeros(V, V), torch.zeros(V)
    for e in examples:
        gw, gb = torch.zeros(V, V), torch.zeros(V)
        for t in range(1, len(e.labels)):
            if e.labels[t] == -100:
                continue
            x, y = e.input_ids[t - 1], e.labels[t]
            r = -torch.softmax(W[:, x] + b, 0)
            r[y] += 1
            gw[:, x] += r
            gb += r
        fw += gw ** 2
        fb += gb ** 2
    return {"W": fw / len(examples), "b": fb / len(examples)}


EXAMPLES = [Example([0, 1, 2, 3], [-100, -100, 2, 3]), Example([4, 2], [-100, 0]),
            Example([3, 3, 1, 0, 2], [-100, 3, 1, 0, 2]), Example([1, 4, 4], [-100, -100, 1])]


def _data(examples) -> StageData:
    return StageData(examples=list(examples), general=lambda: [], collate=lambda ex: collate(ex, pad_id=0))


def _stage(method, model, stage: int, examples) -> None:
    info = TaskInfo(name=f"t{stage}", kind="skill", stage=stage, num_stages=2)
    method.on_task_start(model, info)
    method.on_stage_data(model, info, _data(examples))
    method.on_task_end(model, info)


def test_config_resolves_the_base_lr_and_validates():
    assert EwcConfig().lr == FullFTConfig().lr and EwcConfig(base="lora").lr == LoraMethodConfig().lr
    assert EwcConfig(lr=1e-5).base_config().lr == 1e-5
    for bad in ({"base": "mlp"}, {"ewc_lambda": -1.0}, {"gamma": 1.5}, {"fisher_samples": 0},
                {"fisher_samples": True}, {"ewc_lambda": float("nan")}):
        with pytest.raises(ValueError, match="Invalid"):
            EwcConfig(**bad)


def test_evenly_spaced_needs_no_rng():
    state = torch.get_rng_state()
    assert evenly_spaced(10, 3) == [1, 5, 8] and evenly_spaced(3, 10) == [0, 1, 2] and evenly_spaced(7, 1) == [3]
    assert torch.equal(torch.get_rng_state(), state)


def test_fisher_is_the_mean_squared_gradient_of_the_summed_answer_loglik():
    model = Bigram()
    model.train()  # the estimate must switch dropout off and give the mode back
    fisher = diagonal_fisher(model, dict(model.named_parameters()), EXAMPLES, lambda ex: collate(ex, pad_id=0))
    expected = hand_fisher(model, EXAMPLES)
    for n in ("W", "b"):
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-5, atol=1e-7)
        assert fisher[n].dtype == torch.float32
    assert model.training and model.drop.training
    assert all(p.grad is None for p in model.parameters())


def test_on_task_end_estimates_on_evenly_spaced_examples_and_anchors_the_weights():
    model = Bigram()
    method = Ewc(EwcConfig(fisher_samples=2))
    model = method.wrap(model)
    assert method.aux_loss(model) is None, "no penalty before the first stage ends"
    _stage(method, model, 1, EXAMPLES)
    expected = hand_fisher(model, [EXAMPLES[i] for i in evenly_spaced(len(EXAMPLES), 2)])  # examples 1 and 3
    for n in ("W", "b"):
        torch.testing.assert_close(method.fisher[n], expected[n], rtol=1e-5, atol=1e-7)
        assert torch.equal(method.anchor[n], getattr(model, n).detach())
    assert method.diagnostics(model)["fisher_examples"] == 2
    assert float(method.aux_loss(model).detach()) == 0.0, "at the anchor the penalty is zero"


def test_penalty_and_its_gradient_on_hand_set_values():
    model = Bigram()
    method = Ewc(EwcConfig(ewc_lambda=3.0))
    model = method.wrap(model)
    with torch.no_grad():
        model.W.copy_(torch.arange(V * V, dtype=torch.float32).reshape(V, V) / 10)
        model.b.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]))
    method.fisher = {"W": torch.linspace(0, 2, V * V).reshape(V, V), "b": torch.tensor([0.5, 1.0, 0.0, 2.0, 4.0])}
    method.anchor = {"W": torch.ones(V, V), "b": torch.tensor([0.0, -1.0, 0.5, 1.0, 2.0])}
    penalty = method.aux_loss(model)
    value = sum(float((method.fisher[n].double() * (getattr(model, n).detach().double()
                                                     - method.anchor[n].double()) ** 2).sum()) for n in ("W", "b"))
    assert penalty.dtype == torch.float32 and penalty.dim() == 0
    assert float(penalty.detach()) == pytest.approx(3.0 / 2 * value, rel=1e-6)
    penalty.backward()
    for n in ("W", "b"):
        want = 3.0 * method.fisher[n] * (getattr(model, n).detach() - method.anchor[n])
        torch.testing.assert_close(getattr(model, n).grad, want, rtol=1e-6, atol=1e-6)


def test_online_combination_over_two_stages():
    model = Bigram()
    method = Ewc(EwcConfig(gamma=0.5, ewc_lambda=2.0))
    model = method.wrap(model)
    first, second = EXAMPLES[:2], EXAMPLES[2:]
    _stage(method, model, 1, first)
    f1, theta1 = hand_fisher(model, first), {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # what training stage 2 would do: move the weights
        model.W.add_(0.3)
        model.b.mul_(-1.0)
    _stage(method, model, 2, second)
    f2 = hand_fisher(model, second)
    for n in ("W", "b"):
        torch.testing.assert_close(method.fisher[n], 0.5 * f1[n] + f2[n], rtol=1e-5, atol=1e-7)
        assert torch.equal(method.anchor[n], getattr(model, n).detach()), "the anchor is the latest weights"
    # the penalty stage 2 ended with was against stage 1's Fisher and anchor
    moved = sum(float((f1[n] * (getattr(model, n).detach() - theta1[n]) ** 2).sum()) for n in ("W", "b"))
    assert method.diagnostics(model)["penalty_at_stage_end"] == pytest.approx(moved, rel=1e-5)


def test_lora_base_fisher_covers_only_the_lora_parameters(tiny_llama):
    method = Ewc(EwcConfig(base="lora", fisher_samples=3))
    model = method.wrap(tiny_llama)
    _stage(method, model, 1, [Example([5, 6, 7, 8], [-100, -100, 7, 8]), Example([9, 10, 11], [-100, 10, 11])])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(method.fisher) == set(method.anchor) == trainable
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(f.numel() for f in method.fisher.values()) == method.param_counts(model)["trainable"]
    assert any(float(f.sum()) > 0 for n, f in method.fisher.items() if ".lora_B." in n)


def _train_two_stages(method, model) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = collate(EXAMPLES, pad_id=0)
    for stage in (1, 2):
        info = TaskInfo(name=f"t{stage}", kind="skill", stage=stage, num_stages=2)
        method.on_task_start(model, info)
        method.on_stage_data(model, info, _data(EXAMPLES))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        aux = method.aux_loss(model)
        (out.loss + (aux if aux is not None else 0)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_task_end(model, info)


@pytest.mark.parametrize("base", ["full_ft", "lora"])
def test_trainable_state_round_trip_is_bit_identical(tiny_llama, base):
    cls = METHODS.get("ewc")
    method = cls(cls.config_cls(base=base))
    model = method.wrap(tiny_llama)
    _train_two_stages(method, model)
    with torch.no_grad():  # off the anchor, so the penalty compared below is not zero
        next(p for p in model.parameters() if p.requires_grad).add_(0.01)
    state = method.trainable_state(model)
    assert any(k.startswith(FISHER) for k in state) and any(k.startswith(ANCHOR) for k in state)
    torch.manual_seed(0)
    method2 = cls(cls.config_cls(base=base))
    model2 = method2.wrap(LlamaForCausalLM(tiny_llama.config))
    with tempfile.TemporaryDirectory() as d:
        save_file({k: v.contiguous() for k, v in state.items()}, f"{d}/state.safetensors")
        method2.load_trainable_state(model2, load_file(f"{d}/state.safetensors"))
    state2 = method2.trainable_state(model2)
    assert state2.keys() == state.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    assert torch.equal(method.aux_loss(model), method2.aux_loss(model2))
