"""Tests of the SLIM plugin (methods/slim): identity routing, sliding clustering, weight yielding, dynamic
merging, L1, state round trip, distributed cluster sync. Tiny models only, no network."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from benchmark.config import make_config
from benchmark.errors import UserError
from methods import METHODS
from methods.moe_lora import collect_aux, moe_layers, routing_context, trainable_state
from methods.slim import DynamicMerging, Slim, SlimConfig, l1_penalty, make_slim_layer, update_clusters
from methods.slim.clustering import SlidingClusters, max_ratio, nearest
from methods.slim.model import set_tracking, slim_diagnostics


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg).eval()


def ids(b: int = 2, t: int = 6) -> torch.Tensor:
    return torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, layer in moe_layers(model):
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))


def train_steps(method: Slim, model: nn.Module, steps: int = 2, lr: float = 0.1) -> None:
    x = ids()
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(1, steps + 1):
        with method.forward_context(model, {"attention_mask": mask}):
            out = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100))
            (out.loss + method.aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        method.on_step(model, step)
    model.eval()


def one_layer(d_in: int = 2, d_out: int = 3, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = SlimConfig(**{"n_experts": 2, "n_identity": 2, "top_k": 2, "rank": 2, "n_clusters": 2, **kw})
    return make_slim_layer(nn.Linear(d_in, d_out), cfg, mask_seed=5)


# -- identity experts and yielding -------------------------------------------------------------------------
def test_all_mass_on_identity_experts_reproduces_base_logits_exactly():
    x = ids()
    with torch.no_grad():
        ref = tiny_llama()(x).logits
    method = Slim(SlimConfig(gamma=1e3, calibrate=False, yield_clip=None))
    model = method.wrap(tiny_llama())
    randomise(model)
    with torch.no_grad():
        for _, layer in moe_layers(model):  # clusters far from every token: d ~ 1e3 for all of them
            st = layer.slim_clusters
            st.centres.fill_(1e3)
            st.initialised.fill_(True)
        set_tracking(model, True)
        assert torch.equal(model(x).logits, ref)
        assert math.isclose(slim_diagnostics(model)["identity_share"], 1.0, rel_tol=1e-6)
        for _, layer in moe_layers(model):
            layer.slim_clusters.gamma = 0.0  # no yielding: the randomised experts do change the output
        assert not torch.allclose(model(x).logits, ref)


def test_far_tokens_get_more_identity_mass_than_near_ones():
    layer = one_layer(d_in=8, d_out=4, n_experts=4, n_clusters=3, momentum=0.5)
    g = torch.Generator().manual_seed(0)
    layer.train()
    for _ in range(4):  # data initialisation, then three EMA updates on N(0, 1) tokens
        layer(torch.randn(64, 8, generator=g))
        update_clusters(layer)
    assert bool(layer.slim_clusters.initialised)
    layer.eval()
    shares = []
    for shift in (0.0, 3.0, 8.0):
        layer.track_stats = True
        layer.reset_stats()
        layer(torch.randn(256, 8, generator=g) + shift)
        shares.append(layer.routing_stats()["identity_share"])
    assert shares[0] < shares[1] < shares[2]
    assert shares[0] < 0.5 and shares[2] > 0.99


# -- sliding clustering --------------------------------------------------------------------------------------
def hand_layer(**kw) -> nn.Module:
    layer = one_layer(momentum=0.5, metric="euclidean", **kw)
    st = layer.slim_clusters
    with torch.no_grad():
        st.centres.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        st.var.fill_(1.0)
        st.ratio.fill_(1.0)
        st.initialised.fill_(True)
    return layer


X = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [10.0, 12.0], [100.0, 100.0]]])  # last token = padding
MASK = torch.tensor([[1, 1, 1, 0]])


def test_cluster_update_hand_computed_padding_excluded():
    # m = 0.5. Cluster 0 gets x1 = (1, 0), x2 = (3, 2): mean = (2, 1) -> c0 = 0.5*(0,0) + 0.5*(2,1) = (1, 0.5);
    #   squared deviations from c0_new: x1 (0, 0.25), x2 (4, 2.25) -> mean (2, 1.25) -> var0 = 0.5*1 + 0.5*(2, 1.25)
    #   = (1.5, 1.125).  Cluster 1 gets x3 = (10, 12): c1 = (10, 11); deviation (0, 1)^2 -> var1 = (0.5, 1.0).
    # Ratio max_c |x - c| / sigma against the OLD clusters (sigma = 1): x1 1, x2 3, x3 2 -> mean 2 -> 0.5 + 1 = 1.5.
    # The padding token (100, 100) would drag cluster 1 to (55, 55) if it were counted.
    layer = hand_layer()
    layer.train()
    with routing_context(attention_mask=MASK):
        layer(X)
    update_clusters(layer)
    st = layer.slim_clusters
    torch.testing.assert_close(st.centres, torch.tensor([[1.0, 0.5], [10.0, 11.0]]))
    torch.testing.assert_close(st.var, torch.tensor([[1.5, 1.125], [0.5, 1.0]]))
    torch.testing.assert_close(st.ratio, torch.tensor(1.5))
    assert st.centres.dtype == st.var.dtype == torch.float32


def test_no_cluster_update_in_eval_mode():
    layer = hand_layer()
    before = {k: v.clone() for k, v in layer.slim_clusters.state_dict().items()}
    layer.eval()
    with routing_context(attention_mask=MASK):
        layer(X)
    update_clusters(layer)
    for k, v in layer.slim_clusters.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_data_initialisation_finds_the_two_blobs():
    layer = one_layer(d_in=2, momentum=0.5)
    blob = torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2], [5.0, 5.0], [5.2, 5.0], [5.0, 5.2]])
    layer.train()
    layer(blob)
    assert not bool(layer.slim_clusters.initialised)  # the candidate waits for the optimiser step
    update_clusters(layer)
    st = layer.slim_clusters
    assert bool(st.initialised)
    got = sorted(st.centres.tolist())
    torch.testing.assert_close(torch.tensor(got), torch.tensor([[0.2 / 3, 0.2 / 3], [5 + 0.2 / 3, 5 + 0.2 / 3]]))
    # variance = mean squared deviation from the centre, per channel (1/3)*((1/15)^2 + (2/15)^2 + (1/15)^2) = 2/225
    torch.testing.assert_close(st.var, torch.full((2, 2), 2 / 225))


def test_nearest_cluster_metrics_differ_and_random_init_is_ready_at_wrap():
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    var = torch.tensor([[100.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([[2.5, 0.0]])
    assert nearest(x, centres, var, "euclidean").item() == 1  # 2.5^2 vs 0.5^2
    assert nearest(x, centres, var, "mahalanobis").item() == 0  # 6.25/100 vs 0.25/1
    method = Slim(SlimConfig(cluster_init="random"))
    model = method.wrap(tiny_llama())
    states = [layer.slim_clusters for _, layer in moe_layers(model)]
    assert all(bool(s.initialised) and s.centres.abs().sum() > 0 for s in states)
    before = [s.centres.clone() for s in states]
    train_steps(method, model, steps=1)
    assert all(not torch.equal(b, s.centres) for b, s in zip(before, states))


def test_cluster_sums_skip_padding_exactly_as_the_real_tokens_alone():
    """Padding tokens are routed to a spare row instead of being copied out: the sums must equal, bit for bit,
    those of the real tokens alone (the clustering update, and thus every SLIM result, depends on them)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=g) * 3
    real = torch.rand(300, generator=g) > 0.4
    a, b = (SlidingClusters(16, 4, 0.05, "mahalanobis", 1e-4, "data", 5, 1.0, True, 5.0) for _ in range(2))
    for s in (a, b):
        s.centres.copy_(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)))
        s.initialised.fill_(True)
    idx, r, delta = a.ratios(x)
    assert torch.equal(r, max_ratio(x, idx, a.centres, a.std())) and torch.equal(delta, x - a.centres[idx])
    a.observe(x, idx, r, delta=delta, real=real)
    b.observe(x[real], idx[real], r[real])  # compacted, delta recomputed
    assert torch.equal(a.pending(), b.pending())
    assert float(a.pending()[-1]) == int(real.sum())  # the token count of the ratio calibration


def test_linears_reading_one_input_share_the_clustering_work_exactly():
    """gate_proj and up_proj read the same tensor: the second reuses the first's distances and cluster sums. The
    result must be bit-identical to computing both (states, losses, logits), and a twin whose state differs
    (random initialisation) must not reuse anything."""
    from methods.slim.clustering import SlidingClusters

    def run(link: bool, **cfg):
        method = Slim(SlimConfig(attention=True, **cfg))
        model = method.wrap(tiny_llama())
        layers = dict(moe_layers(model))
        if not link:
            for layer in layers.values():
                layer.slim_clusters.twins = []
        calls = []
        original = SlidingClusters.ratios
        SlidingClusters.ratios = lambda self, x: calls.append(1) or original(self, x)
        try:
            train_steps(method, model, steps=3)
            with torch.no_grad():
                logits = model(input_ids=ids()).logits
        finally:
            SlidingClusters.ratios = original
        return model, layers, logits, len(calls)

    linked, layers, logits, n_linked = run(True)
    alone, _, logits_alone, n_alone = run(False)
    assert torch.equal(logits, logits_alone)
    state, state_alone = trainable_state(linked), trainable_state(alone)
    assert state.keys() == state_alone.keys() and all(torch.equal(state[k], state_alone[k]) for k in state)
    # per decoder layer: q/k/v share one computation, gate/up one, o and down their own -> 4 of 7
    # 7 linears x 2 decoder layers x 3 forwards (the first step only initialises the clusters; + 1 evaluation)
    assert n_alone == 7 * 2 * 3 and n_linked == 4 * 2 * 3
    g, u = (layers[f"model.layers.0.mlp.{n}"].slim_clusters for n in ("gate_proj", "up_proj"))
    assert g.twins == [u] and u.twins == [g] and g.same_state(u)
    *_, n_random = run(True, cluster_init="random")
    assert n_random == 7 * 2 * 4, "random centres differ between twins: each computes its own (from step 1)"


def test_gradient_checkpoint_recompute_counts_tokens_once():
    method = Slim()
    model = method.wrap(tiny_llama())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_steps(method, model, steps=1)  # initialises the clusters
    model.train()
    x, mask = ids(), torch.ones(2, 6, dtype=torch.long)
    with method.forward_context(model, {"attention_mask": mask}):
        model(input_ids=x, attention_mask=mask, labels=x).loss.backward()
    for _, layer in moe_layers(model):
        assert float(layer.slim_clusters._pending[-1]) == x.numel()


# -- no host-device syncs -------------------------------------------------------------------------------------
SYNC_CALLS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
# outputs sized by the data: on an accelerator these wait for the device to count too
SIZE_CALLS = tuple((owner, name) for owner in (torch, torch.Tensor)
                   for name in ("nonzero", "bincount", "masked_select", "unique"))
METHODS_DIR = os.path.dirname(os.path.abspath(sys.modules["methods"].__file__)) + os.sep


def _called_from_methods() -> bool:
    """Whether the caller of the guarded call runs (directly or further down) in code under methods/."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(METHODS_DIR):
            return True
        frame = frame.f_back
    return False


def _bool_index(self, index, *value) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
               for i in (index if isinstance(index, tuple) else (index,)))


@contextlib.contextmanager
def no_host_sync(sizes: bool = False):
    """Make every tensor-to-Python conversion and ``torch.equal`` called from code under methods/ raise (each
    waits for an accelerator); with ``sizes`` also boolean indexing and the other data-sized ops. transformers'
    own mask code keeps its checks: it is not SLIM's."""

    def guard(name, fn, applies=None):
        def guarded(*args, **kwargs):
            if (applies is None or applies(*args)) and _called_from_methods():
                raise AssertionError(f"host sync in SLIM: {name}")
            return fn(*args, **kwargs)

        return guarded

    with pytest.MonkeyPatch.context() as mp:
        for name in SYNC_CALLS:
            mp.setattr(torch.Tensor, name, guard(f"Tensor.{name}", getattr(torch.Tensor, name)))
        mp.setattr(torch, "equal", guard("torch.equal", torch.equal))
        if sizes:
            for owner, name in SIZE_CALLS:
                mp.setattr(owner, name, guard(name, getattr(owner, name)))
            for name in ("__getitem__", "__setitem__"):
                mp.setattr(torch.Tensor, name, guard(f"boolean index ({name})", getattr(torch.Tensor, name),
                                                     _bool_index))
        yield


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = ids()
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    return x, mask


@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_and_backward_make_no_host_sync(checkpointing):
    """No SLIM training forward + backward (the first, initialising one included, and checkpoint recomputes) and
    no evaluation forward converts a tensor to a Python value, also right after a state is loaded; the
    bookkeeping that replaces those reads keeps every result and the twin reuse exact."""
    x, mask = _padded_batch()

    def make():
        method = Slim(SlimConfig(attention=True, mask_ratio=0.5))
        model = method.wrap(tiny_llama())
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return method, model

    def train(method, model, steps):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        for step in range(1, steps + 1):
            with method.forward_context(model, {"attention_mask": mask}), no_host_sync():
                out = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100))
                (out.loss + method.aux_loss(model)).backward()
            opt.step()
            opt.zero_grad()
            method.on_step(model, step)

    calls = []

    def evaluate(model):
        """Logits with and without padding; ``calls`` counts the cluster searches."""
        model.eval()
        original = SlidingClusters.ratios
        calls.clear()
        SlidingClusters.ratios = lambda self, t: calls.append(1) or original(self, t)
        try:
            with torch.no_grad(), no_host_sync():
                with routing_context(attention_mask=mask):
                    padded = model(input_ids=x, attention_mask=mask).logits
                return padded, model(input_ids=x).logits
        finally:
            SlidingClusters.ratios = original

    method, model = make()
    set_tracking(model, True)
    train(method, model, 3)  # step 1 initialises the clusters
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):  # the guard sees reads under methods/
        next(moe_layers(model))[1].routing_stats()
    assert slim_diagnostics(model)["yield_distance"] is not None
    ref = evaluate(model)
    reuse = 2 * 2 * 4  # 2 forwards x 2 blocks x 4 of 7 linears: q/k/v and gate/up reuse a twin's cluster search
    assert len(calls) == reuse
    state = method.trainable_state(model)
    for load in ("trainable", "state_dict"):
        fresh_method, fresh = make()
        if load == "trainable":
            fresh_method.load_trainable_state(fresh, state)
        else:
            fresh.load_state_dict(model.state_dict())
        got = evaluate(fresh)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and len(calls) == reuse, load
        train(fresh_method, fresh, 1)
    # loading an uninitialised state switches the clustering off again, without reading the flag in the forward
    blank_method, blank = make()
    method.load_trainable_state(model, blank_method.trainable_state(blank))
    got, want = evaluate(model), evaluate(blank)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and not calls


def test_accelerator_path_is_sync_free_and_agrees_with_the_cpu_path(monkeypatch):
    """On an accelerator a boolean index or bincount waits for the device too (to size its output), so sums over
    the real tokens are masked there rather than compacted (forced here on the CPU): after the initialising step
    the training forward + backward, the update after the step and an evaluation forward use none of them, and
    the results equal the CPU path's up to the summation order of those sums."""
    import methods.slim.clustering as clustering

    x, mask = _padded_batch()

    def run(compact: bool):
        monkeypatch.setattr(clustering, "compacts", lambda device: compact)
        method = Slim(SlimConfig(attention=True))
        model = method.wrap(tiny_llama())
        set_tracking(model, True)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        losses = []
        for step in range(1, 4):
            sizes = not compact and step > 1  # step 1: the k-means compacts the first batch on every device
            with method.forward_context(model, {"attention_mask": mask}), no_host_sync(sizes):
                out = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100))
                (out.loss + method.aux_loss(model)).backward()
            opt.step()
            opt.zero_grad()
            with no_host_sync(sizes) if step > 1 else contextlib.nullcontext():  # step 1 compares the twins
                method.on_step(model, step)
            losses.append(out.loss.detach())
        model.eval()
        with torch.no_grad(), routing_context(attention_mask=mask), no_host_sync(not compact):
            logits = model(input_ids=x, attention_mask=mask).logits
        return torch.stack(losses), logits, trainable_state(model), slim_diagnostics(model)

    masked, compacted = run(False), run(True)
    for got, want in zip(masked[:3], compacted[:3]):
        torch.testing.assert_close(got, want)
    for key in ("yield_distance", "far_share", "yield_score", "identity_share"):
        assert math.isclose(masked[3][key], compacted[3][key], rel_tol=1e-5), key


# -- dynamic merging -------------------------------------------------------------------------------------------
def test_masks_keep_the_configured_expected_fraction_of_the_delta():
    p = 0.5
    dm = DynamicMerging(ratio=p, rescale=True, phase="both", eval_mask="fixed", seed=0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 4, 3, generator=g)
    full = b @ a
    torch.manual_seed(0)
    total, kept, n = torch.zeros_like(full), 0.0, 4000
    for _ in range(n):
        a2, b2 = dm(a, b, training=True)
        delta = b2 @ a2
        total += delta
        kept += float((delta != 0).float().mean())
    assert abs(kept / n - (1 - p)) < 0.01
    torch.testing.assert_close(total / n, full, atol=0.06 * float(full.abs().max()), rtol=0)
    assert math.isclose(dm.q, 1 - math.sqrt(1 - p))


def test_deterministic_evaluation_repeats_exactly_and_resample_does_not():
    x = ids()
    outs = {}
    for mode in ("fixed", "resample"):
        method = Slim(SlimConfig(mask_ratio=0.5, eval_mask=mode))
        model = method.wrap(tiny_llama())
        randomise(model)
        with torch.no_grad():
            outs[mode] = [model(x).logits for _ in range(2)]
    assert torch.equal(outs["fixed"][0], outs["fixed"][1])
    assert not torch.equal(outs["resample"][0], outs["resample"][1])
    method = Slim(SlimConfig(mask_ratio=0.5, mask_phase="train"))  # no eval masks: differs from the fixed mask
    model = method.wrap(tiny_llama())
    randomise(model)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, outs["fixed"][0])


# -- L1, state, counts, config ------------------------------------------------------------------------------
def test_l1_term_hand_computed():
    layer = one_layer(d_in=3, d_out=2, n_experts=2, rank=1, l1_weight=0.5)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[[1.0, -2.0, 3.0]], [[0.0, 1.0, -1.0]]]))  # |A|_1 = 6 + 2 = 8
        layer.lora_B.copy_(torch.tensor([[[4.0], [-1.0]], [[2.0], [0.0]]]))  # |B|_1 = 5 + 2 = 7
    # 8 / (r * C_in) + 7 / (r * C_out) = 8/3 + 7/2 = 37/6; times 0.5
    assert math.isclose(l1_penalty(layer).item(), 37 / 6, rel_tol=1e-6)
    layer.train()
    layer(torch.randn(4, 3))
    assert math.isclose(collect_aux(layer).item(), 0.5 * 37 / 6, rel_tol=1e-6)
    layer.eval()
    layer(torch.randn(4, 3))
    assert collect_aux(layer) is None


def test_save_reload_with_clusters_gives_identical_logits():
    x = ids()
    method = Slim(SlimConfig(mask_ratio=0.5))
    model = method.wrap(tiny_llama())
    train_steps(method, model, steps=3)
    state = method.trainable_state(model)
    assert any(k.endswith("slim_clusters.centres") for k in state)
    assert any(k.endswith("slim_merge.seed") for k in state)
    with torch.no_grad():
        ref = model(x).logits
    fresh_method = Slim(SlimConfig(mask_ratio=0.5))
    torch.manual_seed(123)  # another run seed: the fixed eval masks must come from the saved seed buffer
    fresh = fresh_method.wrap(tiny_llama())
    with tempfile.TemporaryDirectory() as d:
        save_file(state, os.path.join(d, "s.safetensors"))
        loaded = load_file(os.path.join(d, "s.safetensors"))
    with torch.no_grad():
        assert not torch.equal(fresh(x).logits, ref)
        fresh_method.load_trainable_state(fresh, loaded)
        assert torch.equal(fresh(x).logits, ref)
        for _, layer in moe_layers(fresh):  # the clusters are part of the state: moving them changes the routing
            layer.slim_clusters.centres.add_(1.0)
        assert not torch.equal(fresh(x).logits, ref)


def test_ddp_does_not_broadcast_the_slim_buffers():
    """update_clusters keeps the SLIM buffers equal on every process; DDP's broadcast before every forward would
    write them in place and void the Python-side mirrors the forward branches on (it would read the flag)."""
    model = Slim().wrap(tiny_llama())
    slim_buffers = {n for n, _ in model.named_buffers() if ".slim_" in n}
    assert set(model._ddp_params_and_buffers_to_ignore) == slim_buffers and len(slim_buffers) == 6 * 5


def test_param_counts_closed_form():
    method = Slim()
    model = method.wrap(tiny_llama())
    c = method.param_counts(model)
    cfg = method.config
    e, n, r, k = cfg.n_experts + cfg.n_identity, cfg.n_experts, cfg.rank, min(cfg.top_k, cfg.n_experts)
    shapes = [(32, 64), (32, 64), (64, 32)] * 2  # gate, up, down of 2 blocks
    assert c["trainable"] == sum(n * r * (i + o) + i * e for i, o in shapes)
    assert c["active"] == sum(k * r * (i + o) + i * e for i, o in shapes)
    assert c["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_config_validation_and_registry():
    assert METHODS.get("slim") is Slim
    for bad in ({"top_k": 11}, {"momentum": 0.0}, {"metric": "cosine"}, {"mask_ratio": 1.0}, {"mask_phase": "x"},
                {"cluster_init": "kmeans"}, {"n_clusters": 0}, {"yield_clip": 0.0}, {"l1_weight": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SlimConfig(**bad)
    with pytest.raises(UserError, match="methods.slim"):
        from benchmark.plan import make_plan

        make_plan(make_config({"methods": ["slim"]}, ["methods.slim.eval_mask=never"]))
    with pytest.raises(ValueError, match="nope"):
        Slim(SlimConfig(target_modules=["nope"])).validate({"model.layers.0.mlp.gate_proj"})
    assert SlimConfig(attention=True).targets[-4:] == ["q_proj", "k_proj", "v_proj", "o_proj"]


# -- distributed -------------------------------------------------------------------------------------------------
def _rank_worker(rank: int, world: int, path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        layer = hand_layer()
        layer.train()
        layer(X[:, :2] if rank == 0 else X[:, 2:3])  # rank 0: x1, x2; rank 1: x3 -- pooled = the hand example
        update_clusters(layer)
        torch.save({k: v.clone() for k, v in layer.slim_clusters.state_dict().items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_cluster_statistics_are_all_reduced_across_processes(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "state")
    # spawn, not fork: forking a parent that already runs OpenMP/tokenizer threads can deadlock the children
    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True,
                       start_method="spawn")
    s0, s1 = torch.load(f"{out}.0", weights_only=True), torch.load(f"{out}.1", weights_only=True)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    torch.testing.assert_close(s0["centres"], torch.tensor([[1.0, 0.5], [10.0, 11.0]]))
    torch.testing.assert_close(s0["var"], torch.tensor([[1.5, 1.125], [0.5, 1.0]]))
    torch.testing.assert_close(s0["ratio"], torch.tensor(1.5))


# -- end to end -----------------------------------------------------------------------------------------------------
def test_run_records_identity_share_per_stage(tmp_path, cache_dir):
    import json

    from benchmark.cli import main
    from tests.conftest import TINY_RUN

    argv = ["-q", "run", "--methods", "slim", "--seeds", "0", "--output", str(tmp_path)]
    for s in TINY_RUN:
        argv += ["--set", s]
    assert main(argv) == 0
    rec = json.loads((tmp_path / "runs" / "slim--tiny-world--tiny-world--seed0.json").read_text())
    assert rec["status"] == "success"
    diags = rec["diagnostics"]
    assert [d["stage"] for d in diags] == [0, 1, 2, 3]
    for d in diags[1:]:
        assert 0.0 <= d["identity_share"] <= 1.0 and d["entropy"] >= 0.0
        assert len(d["load"]) == 10 and math.isclose(sum(d["load"]), 1.0, rel_tol=1e-6)
        assert d["yield_distance"] is not None  # clusters are initialised after the run's first step
    assert "identity_share" in (tmp_path / "routing.csv").read_text()
