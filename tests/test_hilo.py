"""Tests of the HiLo plugin (methods/hilo): schedules, AlphaLoRA allocation, routing, parameter counts. Fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from methods import METHODS, TaskInfo
from methods.hilo import Hilo, HiloConfig
from methods.hilo.allocation import (
    allocate_experts,
    closed_form_counts,
    grouped_schedule,
    layer_group,
    parse_schedule,
    pl_alpha_hill,
)
from methods.hilo.model import AdaMoELinear, null_aware_switch_loss
from methods.moe_lora import moe_layers, switch_load_balance, total_param_count

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(layers: int = 4, hidden: int = 64, inter: int = 128, kv: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=kv, vocab_size=100)
    return LlamaForCausalLM(cfg).eval()


def planted(rows: int, cols: int, alpha: float, seed: int = 0) -> torch.Tensor:
    """W = U diag(s) V^T whose eigenvalues s^2 are the quantiles (i - 1/2)/n of a Pareto law with density
    exponent ``alpha`` (p(lambda) ~ lambda^-alpha, lambda >= 1)."""
    n = min(rows, cols)
    g = torch.Generator().manual_seed(seed)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    s = ((1 - u) ** (-1 / (alpha - 1))).sqrt()
    q_u, _ = torch.linalg.qr(torch.randn(rows, n, generator=g, dtype=torch.float64))
    q_v, _ = torch.linalg.qr(torch.randn(cols, n, generator=g, dtype=torch.float64))
    return ((q_u * s) @ q_v.T).float()


# -- grouped schedules ----------------------------------------------------------------------------------
def test_grouped_schedule_32_layers_is_2468_in_blocks_of_8():
    assert grouped_schedule([2, 4, 6, 8], 32) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    for num in (4, 8, 12, 16, 40):  # where G divides L the rule is floor(l * G / L)
        assert [layer_group(i, num, 4) for i in range(num)] == [i * 4 // num for i in range(num)]


@pytest.mark.parametrize("num,expected", [
    (6, [2, 4, 4, 6, 8, 8]),  # mid-depths (l + 1/2)/6 * 4 = 0.33, 1, 1.67, 2.33, 3, 3.67
    (10, [2, 2, 4, 4, 4, 6, 6, 8, 8, 8]),  # group sizes 2, 3, 2, 3
    (5, [2, 4, 6, 6, 8]),
    (3, [2, 6, 8]),  # L < G: each layer takes the value at its mid-depth
    (2, [4, 8]),
    (1, [6]),
])
def test_grouped_schedule_other_depths(num, expected):
    assert grouped_schedule([2, 4, 6, 8], num) == expected


@pytest.mark.parametrize("groups", [2, 3, 4, 5])
def test_grouped_schedule_properties(groups):
    for num in range(1, 41):
        g = [layer_group(i, num, groups) for i in range(num)]
        assert all(b >= a for a, b in zip(g, g[1:]))  # contiguous groups, low to high
        assert g[-1] < groups
        if num >= groups:  # no group skipped or empty, near-equal sizes
            assert g[0] == 0 and all(b - a in (0, 1) for a, b in zip(g, g[1:]))
            sizes = [g.count(k) for k in range(groups)]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_parse_schedule_forms_and_errors():
    assert parse_schedule("2468", "ranks").values == (2, 4, 6, 8)
    assert parse_schedule(2468, "ranks") == parse_schedule("2468", "ranks")  # what YAML makes of 2468
    assert parse_schedule("8-16", "ranks").values == (8, 16)
    assert parse_schedule("2,4", "ranks").values == (2, 4)
    assert parse_schedule("uniform16", "ranks") == parse_schedule("uniform:16", "ranks")
    assert parse_schedule(5, "ranks").kind == "uniform"
    assert parse_schedule([1, 2, 3], "experts").kind == "explicit"
    assert parse_schedule("alpha_hill", "experts", allow_alpha_hill=True).kind == "alpha_hill"
    for bad in ("alpha_hill", "0246", "two", [], [0, 1], True, 2.5, "uniform0"):
        with pytest.raises(ValueError, match="Invalid ranks.*valid forms"):
            parse_schedule(bad, "ranks")
    with pytest.raises(ValueError, match="Invalid top_k"):
        HiloConfig(top_k=0)
    with pytest.raises(ValueError, match="Invalid experts: 'x'"):
        HiloConfig(experts="x")


# -- PL_Alpha_Hill and the AlphaLoRA allocation ----------------------------------------------------------
def hill_reference(w: torch.Tensor, window: str, bins: int = 100) -> float:
    """Straight loop over cutoffs as in AlphaLoRA's ``fix_finger`` (independent of the vectorised code)."""
    eigs = sorted(torch.linalg.svdvals(w.float()).square().double().tolist())  # same eigenvalues as the code
    n_all = len(eigs)
    logs10 = np.log10(eigs)
    counts = torch.histc(torch.tensor(logs10, dtype=torch.float32), bins, min=logs10.min(), max=logs10.max())
    peak = 10 ** np.linspace(logs10.min(), logs10.max(), bins + 1)[int(counts.argmax())]
    lo = {"alphalora": math.log10(0.95 * peak), "peak": 0.95 * peak, "none": -math.inf}[window]
    hi = math.inf if window == "none" else 1.5 * peak
    best = (math.inf, None)
    for i, xmin in enumerate(eigs[:-1]):
        if not lo <= xmin <= hi:
            continue
        tail = eigs[i:]
        n = len(tail)
        alpha = 1 + n / sum(math.log(x / xmin) for x in tail)
        dist = max(abs(1 - (x / xmin) ** (1 - alpha) - j / n) for j, x in enumerate(tail))
        if dist < best[0]:
            best = (dist, alpha)
    assert n_all > 1 and best[1] is not None
    return best[1]


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0, 5.0])
@pytest.mark.parametrize("shape", [(128, 128), (96, 160)])
def test_hill_recovers_planted_exponent(alpha, shape):
    est = pl_alpha_hill(planted(*shape, alpha))
    assert abs(est - alpha) < 0.02 * alpha, est


@pytest.mark.parametrize("window", ["alphalora", "peak", "none"])
def test_hill_matches_loop_reference(window):
    g = torch.Generator().manual_seed(4)
    # a bulk with a heavy tail above it: the window decides which cutoffs are tried
    bulk = 0.3 * torch.exp(0.2 * torch.randn(96, generator=g, dtype=torch.float64))
    lam = torch.cat([bulk, (1 - (torch.arange(32, dtype=torch.float64) + 0.5) / 32) ** -0.5])
    q_u, _ = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))
    q_v, _ = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))
    for w in (((q_u * lam.sqrt()) @ q_v.T).float(), torch.randn(48, 80, generator=g)):
        assert pl_alpha_hill(w, window=window) == pytest.approx(hill_reference(w, window), rel=1e-5)
    # the tail has exponent 3; only the unrestricted scan finds it, the peak windows fit the bulk
    w = ((q_u * lam.sqrt()) @ q_v.T).float()
    assert abs(pl_alpha_hill(w, window="none") - 3.0) < 0.1
    assert pl_alpha_hill(w, window="alphalora") < 2.6


def test_allocation_hand_checked():
    # s^2.5 for s = 2, 3, 4, 5: 5.657, 15.588, 32.000, 55.902 (sum 109.147); x 20 / sum = 1.037, 2.856, 5.864,
    # 10.243 -> rounded 1, 3, 6, 10 (sum 20, no fix-up needed)
    assert allocate_experts([2, 3, 4, 5], 20, 2.5) == [1, 3, 6, 10]
    # s = 2, 2.5, 4, T = 12: s^2.5 = 5.657, 9.882, 32.000 (sum 47.539), shares 1.428, 2.494, 8.078 -> 1, 2, 8 = 11.
    # One short. Largest remainder: 2.494 - 2 = 0.494 is the largest -> [1, 3, 8]. AlphaLoRA's loop adds where
    # s^2.5 - n is smallest: 5.657 - 1 = 4.657 < 7.882 < 24 -> [2, 2, 8].
    assert allocate_experts([2, 2.5, 4], 12, 2.5) == [1, 3, 8]
    assert allocate_experts([2, 2.5, 4], 12, 2.5, fixup="alphalora") == [2, 2, 8]
    # shares 1.636, 2.857, 4.507 for s = 2, 2.5, 3, T = 9 -> 2, 3, 5 = 10: one too many; n - share is largest
    # for the last layer (0.493) -> [2, 3, 4]; AlphaLoRA removes at argmax(s^2.5 - n) = the last one as well.
    assert allocate_experts([2, 2.5, 3], 9, 2.5) == [2, 3, 4]
    assert allocate_experts([2, 2.5, 3], 9, 2.5, fixup="alphalora") == [2, 3, 4]
    # a layer never gets 0 experts: s^2.5 = 1, 2.532, 107.72 -> shares 0.09, 0.23, 9.68 -> 0, 0, 10 -> floored to
    # 1, 1, 10 = 12 -> two too many, only the last layer can give -> [1, 1, 8]
    assert allocate_experts([1.0, 1.45, 6.5], 10, 2.5) == [1, 1, 8]


def test_allocation_sums_to_total_and_is_monotone():
    rng = np.random.default_rng(0)
    for _ in range(300):
        num = int(rng.integers(2, 10))
        scores = np.sort(rng.uniform(1.5, 6.0, num))
        total = int(rng.integers(num, 6 * num))
        beta = float(rng.choice([0.0, 1.0, 2.5, 4.0]))
        n = allocate_experts(scores, total, beta)
        assert sum(n) == total and min(n) >= 1
        assert all(a <= b for a, b in zip(n, n[1:])), (scores, total, beta, n)
        assert sum(allocate_experts(scores, total, beta, fixup="alphalora")) == total
    # the code's own fix-up is not monotone (documented reason for the default)
    assert allocate_experts([1.512, 1.651, 5.171, 5.358, 5.708], 24, 4.0, fixup="alphalora") == [1, 1, 7, 8, 7]


def test_alpha_hill_allocation_on_a_model_with_planted_spectra():
    model = llama(layers=4)
    planted_alpha = [2.0, 3.0, 4.0, 5.0]
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                layer = int(name.split(".layers.")[1].split(".")[0])
                mod.weight.copy_(planted(*mod.weight.shape, planted_alpha[layer], seed=len(name)))
    x = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    method = Hilo(HiloConfig(experts="alpha_hill"))
    model = method.wrap(model)
    plan = method.plan
    assert plan.alpha_hill == pytest.approx(planted_alpha, rel=0.02)
    # T = 5 * 4 = 20 and beta = 2.5: the hand-checked allocation above
    assert plan.experts == [1, 3, 6, 10] and plan.top_k == [1, 2, 2, 2]
    assert plan.ranks == [2, 4, 6, 8]
    layers = dict(moe_layers(model))
    assert layers["model.layers.0.mlp.down_proj"].top_k == 1
    assert layers["model.layers.3.self_attn.q_proj"].n_experts == 10
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


# -- parameter counts -----------------------------------------------------------------------------------
def test_closed_form_reproduces_methods_md_llama2_7b_numbers():
    # Llama-2-7B: d = 4096, d_ff = 11008, 32 layers, all seven projections (methods.md §2.4)
    per_layer = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    shapes = [(layer, d_in, d_out) for layer in range(32) for d_in, d_out in per_layer]
    g = grouped_schedule([2, 4, 6, 8], 32)
    hilo = closed_form_counts(shapes, g, g, [2] * 32)
    mola = closed_form_counts(shapes, g, [8] * 32, [2] * 32)
    router = 160 * (6 * 4096 + 11008)  # 5.69M
    assert hilo["trainable"] == 74_956_800 + router and round(hilo["trainable"] / 1e6, 1) == 80.7
    assert mola["trainable"] == 99_942_400 + router and round(mola["trainable"] / 1e6, 1) == 105.6
    assert hilo["active"] == 2 * sum(g) * 78_080 + router


@pytest.mark.parametrize("kw", [{}, {"ranks": "uniform5"}, {"experts": [1, 3], "top_k": 2}, {"n_null": 2},
                                {"experts": "alpha_hill", "alpha_hill_total": 7}])
def test_param_counts_match_closed_form_and_model(kw):
    model = llama(layers=2, hidden=32, inter=64, kv=2)
    dims = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
            "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
    method = Hilo(HiloConfig(**kw))
    model = method.wrap(model)
    plan = method.plan
    expected_t = expected_a = 0
    for layer in range(2):
        n, r, k, e = plan.experts[layer], plan.ranks[layer], min(plan.top_k[layer], plan.experts[layer]), \
            plan.experts[layer] + plan.n_null
        for d_in, d_out in dims.values():
            expected_t += n * r * (d_in + d_out) + d_in * e
            expected_a += k * r * (d_in + d_out) + d_in * e
    counts = method.param_counts(model)
    assert counts == {"trainable": expected_t, "active": expected_a} == total_param_count(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not kw:  # L = 2: experts and ranks 2468 -> 4, 8
        assert plan.experts == [4, 8] and plan.ranks == [4, 8] and counts["active"] < counts["trainable"]


# -- routing, losses, diagnostics -----------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"n_null": 2}, {"experts": "uniform3", "ranks": "8-16", "dropout": 0.0}])
def test_init_equals_base(kw):
    x = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    model = llama(layers=3)
    with torch.no_grad():
        ref = model(x).logits
        wrapped = Hilo(HiloConfig(**kw)).wrap(model)
        assert torch.equal(wrapped(x).logits, ref)


def test_adamoe_routing_renormalises_over_selected_lora_experts():
    layer = AdaMoELinear(torch.nn.Linear(8, 8), n_experts=2, rank=2, n_identity=2, top_k=3)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0]])
    probs, w, idx = layer.route(logits)
    p = torch.softmax(logits, -1)
    # token 0 picks LoRA 0, LoRA 1, null 2 -> LoRA weights p0/(p0+p1), p1/(p0+p1); nulls weigh nothing
    torch.testing.assert_close(w[0], torch.stack([p[0, 0], p[0, 1], torch.tensor(0.0), torch.tensor(0.0)])
                               / (p[0, 0] + p[0, 1]))
    # token 1 picks null 2, null 3, LoRA 1 -> LoRA 1 gets weight 1
    torch.testing.assert_close(w[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert sorted(idx[1].tolist()) == [1, 2, 3]


def test_null_aware_switch_loss():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(10, 5, generator=g), -1)
    idx = probs.topk(2, -1).indices
    torch.testing.assert_close(null_aware_switch_loss(probs, idx, 5), switch_load_balance(probs, idx, 5))
    # hand example: E = 4 (2 LoRA + 2 null), 2 tokens, top-2
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    idx = torch.tensor([[0, 1], [3, 2]])
    # counts 1, 1, 1, 1 -> null pool mean 1 -> f = 1/4 each; P = 0.25 each -> 4 * 4 * (1/4 * 1/4) = 1
    assert float(null_aware_switch_loss(probs, idx, 2)) == pytest.approx(1.0)
    idx = torch.tensor([[0, 2], [0, 2]])  # counts 2, 0, 2, 0 -> pooled 2, 0, 1, 1 -> f = .5, 0, .25, .25
    # P = .25, .25, .25, .25 -> 4 * (.5 + .25 + .25) * .25 = 1; unpooled Switch: 4 * (.5 + .5) * .25 = 1 as well,
    # so use unequal P: P = (.4+.1)/2, (.3+.2)/2, (.2+.3)/2, (.1+.4)/2 is uniform here; take token 0 twice instead
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 2)
    # pooled: 4 * (.5*.4 + 0*.3 + .25*.2 + .25*.1) = 4 * .275 = 1.1; unpooled: 4 * (.5*.4 + .5*.2) = 1.2
    assert float(null_aware_switch_loss(probs, idx, 2)) == pytest.approx(1.1)
    assert float(switch_load_balance(probs, idx, 4)) == pytest.approx(1.2)


def test_balance_loss_scale_and_routing_diagnostics():
    model = llama(layers=4, hidden=32, inter=64, kv=2)
    method = Hilo(HiloConfig(balance_coef=1e-3))
    model = method.wrap(model)
    assert method.diagnostics(model) == {"allocation": method.plan.to_dict()}  # stage 0: the allocation
    with torch.no_grad():
        for _, layer in moe_layers(model):
            layer.router.weight.zero_()  # uniform router: every module's Switch loss is exactly 1
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    method.on_task_start(model, TaskInfo("t", "skill", 1, 1))
    model.train()
    with method.forward_context(model, {"attention_mask": mask}):
        model(input_ids=ids, attention_mask=mask)
        aux = method.aux_loss(model)
    # the coefficient is split over the 7 modules of a layer: 4 layers x 7 x (1e-3 / 7) x 1 = 4e-3
    assert float(aux.detach()) == pytest.approx(4e-3, rel=1e-5)
    method.on_task_end(model, TaskInfo("t", "skill", 1, 1))
    diag = method.diagnostics(model)["routing"]
    with torch.no_grad():
        model.eval()
        model(input_ids=ids)  # evaluation after the stage does not change the stage's statistics
    assert method.diagnostics(model)["routing"] == diag
    assert [len(d["load"]) for d in diag["layers"]] == [2, 4, 6, 8]
    assert all(d["experts_per_token"] == 2 and sum(d["load"]) == pytest.approx(1, abs=1e-3) for d in diag["layers"])
    assert diag["active_params_measured"] == method.param_counts(model)["active"]


def test_validate_names_bad_values():
    names = {n for n, _ in llama(layers=3).named_modules()}
    Hilo(HiloConfig(experts=[1, 2, 3])).validate(names)
    with pytest.raises(ValueError, match="per-layer list of 4 values for a model with 3 layers"):
        Hilo(HiloConfig(ranks=[1, 2, 3, 4])).validate(names)
    with pytest.raises(ValueError, match=r"\['lm_head'\] are not inside numbered decoder layers"):
        Hilo(HiloConfig(target_modules=["q_proj", "lm_head"])).validate(names)
    with pytest.raises(ValueError, match=r"\['nope'\] not in the model"):
        Hilo(HiloConfig(target_modules=["nope"])).validate(names)
    with pytest.raises(ValueError, match="alpha_hill_total: 2 experts for 3 layers"):
        Hilo(HiloConfig(experts="alpha_hill", alpha_hill_total=2)).validate(names)
    assert METHODS.get("hilo") is Hilo
