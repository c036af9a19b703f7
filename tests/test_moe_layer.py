"""Tests of the shared MoE-LoRA layer (methods/moe_lora) on a tiny random Llama. Fast (< 20 s), no network."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402  (repo root, if not installed)

from methods.moe_lora import (  # noqa: E402
    MoELoRALinear,
    collect_aux,
    get_routing_context,
    inject_moe_lora,
    load_trainable_state,
    loramoe_balance,
    loramoe_balance_term,
    model_routing_stats,
    moe_layers,
    param_count,
    routing_context,
    set_track_stats,
    switch_balance_term,
    switch_load_balance,
    total_param_count,
    trainable_state,
)

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )
    return LlamaForCausalLM(cfg).eval()


def maker(**kw):
    def make(name: str, lin: nn.Linear) -> MoELoRALinear:
        return MoELoRALinear(lin, **kw)

    return make


def wrapped(seed: int = 0, **kw) -> tuple[nn.Module, list[str]]:
    model = tiny_llama(seed)
    kw = {"n_experts": 4, "rank": 2, "alpha": 4.0, **kw}
    names = inject_moe_lora(model, TARGETS, maker(**kw))
    return model, names


def ids(b: int = 2, t: int = 5) -> torch.Tensor:
    return torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, layer in moe_layers(model):
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))


CONFIGS = [
    pytest.param({}, id="dense"),
    pytest.param({"top_k": 2}, id="top2"),
    pytest.param({"n_identity": 2, "top_k": 2}, id="top2-identity"),
    pytest.param({"n_identity": 1}, id="dense-identity"),
]


# -- equivalence with the base ------------------------------------------------------------------------
@pytest.mark.parametrize("kw", CONFIGS)
def test_init_equals_base_exactly_and_perturbed_B_differs(kw):
    x = ids()
    with torch.no_grad():
        ref = tiny_llama()(x).logits
        model, names = wrapped(**kw)
        assert len(names) == 6 and all(n.rsplit(".", 1)[-1] in TARGETS for n in names)
        assert torch.equal(model(x).logits, ref)
        randomise(model)
        assert not torch.allclose(model(x).logits, ref)


def test_only_adapters_trainable_and_missing_target_error():
    model, _ = wrapped()
    trainable = {n.split(".mlp.", 1)[1].split(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "router.weight"}
    with pytest.raises(ValueError, match=r"\['nope'\].*available Linear suffixes.*gate_proj"):
        inject_moe_lora(tiny_llama(), ["gate_proj", "nope"], maker(n_experts=2, rank=1))


def reference(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Naive per-expert loop, straight from the equations (no shared code with the layer)."""
    y = x @ layer.base.weight.t() + (layer.base.bias if layer.base.bias is not None else 0)
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    if layer.top_k is not None:
        vals, idx = probs.topk(layer.top_k, dim=-1)
        w = torch.zeros_like(probs).scatter(-1, idx, vals / vals.sum(-1, keepdim=True))
    else:
        w = probs
    for i in range(layer.n_total):
        if i >= layer.n_experts:  # identity expert: zero delta
            continue
        delta = x @ layer.lora_A[i].t() @ layer.lora_B[i].t() * (layer.alpha / layer.rank)
        y = y + w[..., i : i + 1] * delta
    return y


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("bias", [False, True])
def test_batched_equals_naive_loop(kw, bias):
    torch.manual_seed(0)
    base = nn.Linear(12, 20, bias=bias).double()
    layer = MoELoRALinear(base, n_experts=3, rank=2, alpha=6.0, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)
    layer.train()  # dropout p=0: the training path is the same computation
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)


def test_gradients_reach_router_and_experts():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(8, 6), n_experts=4, rank=2, top_k=2, dropout=0.1).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(3, 5, 8)).pow(2).sum().backward()
    for p in (layer.lora_A, layer.lora_B, layer.router.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert layer.base.weight.grad is None


def test_topk_weights_sum_to_one_with_exactly_k_nonzeros():
    seen = {}
    layer = MoELoRALinear(nn.Linear(16, 8), n_experts=5, rank=2, n_identity=2, top_k=3)
    layer.aux_terms.append(lambda lay, out, x: seen.setdefault("out", out) and None)
    layer(torch.randn(4, 6, 16))
    out = seen["out"]
    assert out.weights.shape == (4, 6, 7) and out.topk_idx.shape == (4, 6, 3)
    assert out.probs.dtype == torch.float32
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(4, 6))
    assert torch.equal((out.weights != 0).sum(-1), torch.full((4, 6), 3))
    assert layer.last_aux is None  # the term returned None


@pytest.mark.parametrize("kw", [{"n_identity": 2, "top_k": 2}, {"n_identity": 2}])
def test_all_mass_on_identity_experts_reproduces_base(kw):
    x = ids()
    with torch.no_grad():
        ref = tiny_llama()(x).logits
        model, _ = wrapped(**kw)
        randomise(model)
        assert not torch.allclose(model(x).logits, ref)
        for _, layer in moe_layers(model):
            layer.logit_adjust = lambda logits, inp, lay: logits + 1e4 * lay.is_identity.to(logits.dtype)
        assert torch.equal(model(x).logits, ref)


def test_delta_mask_hook_is_applied():
    layer = MoELoRALinear(nn.Linear(8, 6), n_experts=2, rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    assert not torch.allclose(layer(x), layer.base(x))
    layer.delta_mask = lambda a, b, lay: (a, torch.zeros_like(b))
    assert torch.equal(layer(x), layer.base(x))


# -- losses ---------------------------------------------------------------------------------------------
GATES = torch.tensor(
    [
        [[0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.2, 0.2]],  # sample 0 (task_type 1): Q0 = [0.4, 0.5, 0.5, 0.6]
        [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]],  # sample 1 (task_type 0): Q1 = [0.95, 0.35, 0.35, 0.35]
    ]
)
TASKS = torch.tensor([1, 0])


def test_loramoe_balance_hand_computed():
    # delta = 0.5: I0 = [1.5, 1.5, 0.5, 0.5] (task 1 favours experts 0,1), I1 = [0.5, 0.5, 1.5, 1.5].
    # Z = [0.6, 0.75, 0.25, 0.3, 0.475, 0.175, 0.525, 0.525]; sum 3.6, mean 0.45;
    # squared deviations sum = 0.0225+0.09+0.04+0.0225+0.000625+0.075625+0.005625+0.005625 = 0.2625;
    # unbiased var = 0.2625 / 7 = 0.0375.
    var, mean = 0.2625 / 7, 0.45
    assert math.isclose(var, 0.0375)
    got = loramoe_balance(GATES, TASKS, delta=0.5, weight=0.1, form="cv2")
    assert math.isclose(got.item(), var / (mean**2 + 1e-10) * 0.1, rel_tol=1e-5)  # = 0.1 * 5/27
    assert math.isclose(got.item(), 0.1 * 5 / 27, rel_tol=1e-5)
    got = loramoe_balance(GATES, TASKS, delta=0.5, weight=0.1, form="cv")
    assert math.isclose(got.item(), 0.1 * var / mean, rel_tol=1e-5)  # = 0.1 / 12

    # padding mask [[1, 1], [1, 0]] drops sample 1 token 1: Q1 = [0.25]*4, Z1 = [0.125, 0.125, 0.375, 0.375];
    # Z = [0.6, 0.75, 0.25, 0.3, 0.125, 0.125, 0.375, 0.375]; sum 2.9, mean 0.3625;
    # squared deviations: 0.2375^2 + 0.3875^2 + 0.1125^2 + 0.0625^2 + 2*0.2375^2 + 2*0.0125^2 = 0.33625.
    mask = torch.tensor([[1, 1], [1, 0]])
    var, mean = 0.33625 / 7, 0.3625
    got = loramoe_balance(GATES, TASKS, delta=0.5, weight=0.1, form="cv2", attention_mask=mask)
    assert math.isclose(got.item(), 0.1 * var / mean**2, rel_tol=1e-5)
    got = loramoe_balance(GATES, TASKS, delta=0.5, weight=0.1, form="cv", attention_mask=mask)
    assert math.isclose(got.item(), 0.1 * var / mean, rel_tol=1e-5)

    with pytest.raises(ValueError, match="even"):
        loramoe_balance(GATES[..., :3], TASKS, 0.1, 1.0)


def test_loramoe_balance_delta0_is_weighted_cv2_of_importances():
    g = torch.softmax(torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    q = g.sum(dim=1).flatten()  # per-sample expert importances
    expected = 0.3 * q.var() / q.mean() ** 2
    got = loramoe_balance(g, torch.tensor([0, 1, 1]), delta=0.0, weight=0.3)
    torch.testing.assert_close(got, expected)


def test_switch_load_balance_hand_computed():
    # probs rows [0.4,0.3,0.2,0.1] -> top2 {0,1}; [0.1,0.6,0.2,0.1] -> top2 {1,2}.
    # f = [1,2,1,0]/4 = [0.25,0.5,0.25,0]; P = [0.25,0.45,0.2,0.1];
    # sum f*P = 0.0625 + 0.225 + 0.05 + 0 = 0.3375; loss = 4 * 0.3375 = 1.35.
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]])
    idx = probs.topk(2, dim=-1).indices
    assert math.isclose(switch_load_balance(probs, idx, 4).item(), 1.35, rel_tol=1e-6)
    assert math.isclose(switch_load_balance(probs, None, 4).item(), 1.0, rel_tol=1e-6)  # dense: constant
    # masking the second token leaves f = [.5,.5,0,0], P = [.4,.3,.2,.1]: 4 * (0.2 + 0.15) = 1.4
    got = switch_load_balance(probs, idx, 4, mask=torch.tensor([1, 0]))
    assert math.isclose(got.item(), 1.4, rel_tol=1e-6)


# -- context, aux collection, checkpoint recompute --------------------------------------------------------
def test_routing_context_delivers_task_types_and_aux_terms_are_collected():
    model, _ = wrapped(n_experts=4)
    seen = []
    for _, layer in moe_layers(model):
        layer.aux_terms = [lambda lay, out, x: seen.append(get_routing_context().task_types) or None,
                           loramoe_balance_term(delta=0.1, weight=0.1)]
    randomise(model)
    tt = torch.tensor([1, 0])
    assert get_routing_context().task_types is None
    with routing_context(task_types=tt):
        with routing_context(task_types=torch.tensor([0, 0])):
            assert get_routing_context().task_types.tolist() == [0, 0]
        assert get_routing_context().task_types is tt
        model(ids())
    assert get_routing_context().task_types is None
    assert len(seen) == 6 and all(t is tt for t in seen)
    aux = collect_aux(model)
    assert aux is not None and aux.ndim == 0 and aux.requires_grad
    expected = 0.0
    for _, layer in moe_layers(model):
        assert layer.last_aux is not None
        expected += layer.last_aux.item()
    assert math.isclose(aux.item(), expected, rel_tol=1e-6)
    model(ids())  # outside the context: no task types -> no LoRAMoE term
    assert collect_aux(model) is None


def test_checkpoint_recompute_sees_context_keeps_aux_and_does_not_double_count_stats():
    from torch.utils.checkpoint import checkpoint

    layer = MoELoRALinear(nn.Linear(8, 6), n_experts=2, rank=2, track_stats=True)
    calls = []
    layer.aux_terms = [lambda lay, out, x: calls.append(get_routing_context().task_types) or out.probs.sum()]
    x = torch.randn(2, 3, 8, requires_grad=True)
    with routing_context(task_types=torch.tensor([1, 0])):
        # .sin() saves its input, so the recompute runs the layer's whole forward (no early stop inside it)
        y = checkpoint(lambda inp: layer(inp).sin(), x, use_reentrant=False)
        aux = layer.last_aux
        (y.sum() + aux).backward()
    # the term ran in the forward and in the recompute, both times inside the context; last_aux is the forward's
    assert layer.last_aux is aux and len(calls) == 2 and all(c is not None for c in calls)
    assert layer.routing_stats()["tokens"] == 6
    assert layer.router.weight.grad is not None


def test_hf_gradient_checkpointing_with_balance_term():
    """The runner wraps forward + backward in the context; recompute must rebuild the same aux graph."""
    model, _ = wrapped(n_experts=4)
    randomise(model)
    for _, layer in moe_layers(model):
        layer.aux_terms = [loramoe_balance_term(delta=0.1, weight=0.1)]
        layer.track_stats = True
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    x = ids()
    mask = torch.ones_like(x)
    with routing_context(task_types=torch.tensor([1, 0]), attention_mask=mask):
        out = model(x, attention_mask=mask, labels=x)
        aux = collect_aux(model)
        (out.loss + aux).backward()
    assert all(s["tokens"] == x.numel() for s in model_routing_stats(model)["layers"].values())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_switch_term_and_routing_stats_with_padding_mask():
    model, _ = wrapped(n_identity=1, top_k=2)
    randomise(model)
    for _, layer in moe_layers(model):
        layer.aux_terms = [switch_balance_term(coef=1e-3)]
    set_track_stats(model, True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with routing_context(attention_mask=mask):
        model(ids(), attention_mask=mask)
    assert collect_aux(model) is not None
    stats = model_routing_stats(model)
    assert len(stats["layers"]) == 6
    for s in stats["layers"].values():
        assert s["tokens"] == 8
        assert len(s["load"]) == 5 and math.isclose(sum(s["load"]), 1.0, rel_tol=1e-6)
        assert math.isclose(sum(s["selected"]), 2.0, rel_tol=1e-6)
        assert math.isclose(s["identity_share"], s["load"][-1], rel_tol=1e-9)
        assert 0.0 <= s["entropy"] <= math.log(2) + 1e-6  # two experts selected per token
    assert 0.0 <= stats["identity_share"] <= 1.0
    set_track_stats(model, False)
    assert all(layer.routing_stats()["tokens"] == 0 for _, layer in moe_layers(model))


# -- state and counts -------------------------------------------------------------------------------------
def test_trainable_state_roundtrip_through_safetensors():
    from safetensors.torch import load, save

    x = ids()
    model, _ = wrapped(n_identity=1, top_k=2)
    randomise(model)
    with torch.no_grad():
        for _, layer in moe_layers(model):
            layer.lora_A.mul_(1.5)
    first = next(layer for _, layer in moe_layers(model))
    first.register_buffer("centres", torch.randn(3, first.in_features))  # method-owned buffer (SLIM-like)
    state = trainable_state(model)
    suffixes = {k.rsplit(".", 1)[-1] for k in state}
    assert suffixes == {"lora_A", "lora_B", "weight", "centres"}
    assert all(".router.weight" in k for k in state if k.endswith("weight"))
    assert not any(".base." in k for k in state)
    restored_state = load(save(state))

    fresh, _ = wrapped(n_identity=1, top_k=2)
    next(layer for _, layer in moe_layers(fresh)).register_buffer("centres", torch.zeros(3, first.in_features))
    with torch.no_grad():
        assert not torch.equal(fresh(x).logits, model(x).logits)
        load_trainable_state(fresh, restored_state)
        assert torch.equal(fresh(x).logits, model(x).logits)
    with pytest.raises(KeyError):
        load_trainable_state(fresh, {"nope": torch.zeros(1)})
    with pytest.raises(KeyError):
        load_trainable_state(fresh, {k: v for k, v in restored_state.items() if "centres" not in k})


@pytest.mark.parametrize(("top_k", "n_identity", "k_active"), [(None, 0, 4), (2, 0, 2), (3, 2, 3), (6, 2, 4)])
def test_param_count_closed_form(top_k, n_identity, k_active):
    layer = MoELoRALinear(nn.Linear(10, 14), n_experts=4, rank=3, n_identity=n_identity, top_k=top_k)
    e = 4 + n_identity
    c = param_count(layer)
    assert c["trainable"] == 4 * 3 * (10 + 14) + 10 * e
    assert c["trainable"] == sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert c["active"] == k_active * 3 * (10 + 14) + 10 * e
    model, _ = wrapped(n_identity=1, top_k=2)
    total = total_param_count(model)
    assert total["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total["active"] < total["trainable"]
