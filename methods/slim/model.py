"""SLIM layers on the shared MoE-LoRA layer: weight yielding (logit hook), construction, diagnostics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from methods.moe_lora import (MoELoRALinear, get_routing_context, is_recomputing, model_routing_stats, moe_layers,
                              set_track_stats)
from methods.slim.clustering import SlidingClusters, new_token, refresh_states
from methods.slim.config import SlimConfig
from methods.slim.merging import DynamicMerging, apply_dynamic_merging, l1_term


def _real_tokens(lead: torch.Size, device: torch.device) -> torch.Tensor | None:
    """(T,) bool mask of non-padding tokens from the routing context, or None (all real)."""
    mask = get_routing_context().attention_mask
    if mask is None or tuple(mask.shape) != tuple(lead):
        return None
    return mask.reshape(-1).to(device=device) != 0


def weight_yielding(logits: torch.Tensor, x: torch.Tensor, layer: MoELoRALinear) -> torch.Tensor:
    """The ``logit_adjust`` hook: move routing mass toward identity experts for tokens far from the clusters.

    ``d = max_c |x - c_idx| / sigma_idx - 1`` (divided by the running typical ratio first when calibrated), on the
    detached input in fp32; ``s = clamp(d, 0, clip)``; identity logits ``+ gamma * s``, LoRA logits
    ``- gamma * s``. In training mode (not during a checkpoint recompute) the real tokens are also handed to the
    clustering for this step's update. Before the clusters are initialised the logits pass unchanged.

    Reads no tensor into Python: it branches on Python-side mirrors of the clustering state (see
    :class:`SlidingClusters`) and leaves the statistics on the device, so on an accelerator nothing here waits for
    the device except the initialising forward's compaction of the first batch (see ``clustering.py``).
    """
    st: SlidingClusters = layer.slim_clusters
    lead = x.shape[:-1]
    xf = x.detach().reshape(-1, x.shape[-1]).float()
    real = _real_tokens(lead, xf.device)
    collect = layer.training and not is_recomputing()
    if not st.ready:
        if collect:
            st.observe(xf, real=real)
        return logits
    shared = st.from_twin(x)
    if shared is not None and shared[0] == collect:  # a twin linear read this same input: reuse its work
        _, d, s, vec, tag = shared
    else:
        idx, r, delta = st.ratios(xf)
        vec = st.sums(xf, idx, r, delta, real) if collect else None
        d = st.distance(r)
        s = d.clamp(min=0.0, max=st.clip)
        tag = new_token()  # names these sums: a twin that reuses them adds the same tag (its lineage follows)
        st.remember(x, (collect, d, s, vec, tag))
    if vec is not None:
        st.add_pending(vec, tag)
    if layer.track_stats and not is_recomputing():
        st.track(d, s, real)
    if st.gamma == 0.0:
        return logits
    sign = torch.where(layer.is_identity, 1.0, -1.0).to(torch.float32)  # (E,)
    shifted = logits.float() + (st.gamma * s).reshape(*lead, 1) * sign
    return shifted.to(logits.dtype)


def make_slim_layer(base: nn.Linear, cfg: SlimConfig, mask_seed: int) -> MoELoRALinear:
    """One SLIM layer: a top-k MoE-LoRA layer with identity experts, the clustering / yielding state
    (``slim_clusters``), the dynamic-merging masks (``slim_merge``) and the L1 aux term."""
    layer = MoELoRALinear(base, n_experts=cfg.n_experts, rank=cfg.rank, alpha=cfg.alpha, n_identity=cfg.n_identity,
                          top_k=cfg.top_k, dropout=cfg.dropout, logit_adjust=weight_yielding,
                          delta_mask=apply_dynamic_merging, aux_terms=[l1_term(cfg.l1_weight)])
    device = base.weight.device
    layer.slim_clusters = SlidingClusters(
        base.in_features, cfg.n_clusters, cfg.momentum, cfg.metric, cfg.min_std, cfg.cluster_init, cfg.init_iters,
        cfg.gamma, cfg.calibrate, cfg.yield_clip, device=device)
    layer.slim_merge = DynamicMerging(cfg.mask_ratio, cfg.mask_rescale, cfg.mask_phase, cfg.eval_mask, mask_seed,
                                      device=device)
    return layer


# linears that read one input tensor in Llama-style blocks (Mistral, Qwen, ... use the same names)
SAME_INPUT = (("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj"))


def link_twins(model: nn.Module, names: list[str]) -> None:
    """Make the clustering states of sibling linears that read the same input twins of each other.

    Only a candidate set: :meth:`SlidingClusters.from_twin` reuses a twin's work only for the very same input
    tensor and a bitwise-equal state (known from the lineage tokens), so a wrong guess costs a comparison after
    the initialisation, never a result.
    """
    groups: dict[tuple[str, int], list[SlidingClusters]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for g, group in enumerate(SAME_INPUT):
            if leaf in group:
                groups.setdefault((parent, g), []).append(model.get_submodule(name).slim_clusters)
    for states in groups.values():
        for st in states:
            st.twins = [t for t in states if t is not st]


def refresh_mirrors(model: nn.Module) -> None:
    """Re-read the Python-side mirrors of every SLIM buffer in ``model`` after the buffers were written in place
    past ``load_state_dict`` (e.g. by ``moe_lora.load_trainable_state``); reads tensors, so call it outside the
    forward."""
    refresh_states([m for m in model.modules() if isinstance(m, SlidingClusters)])
    for m in model.modules():
        if isinstance(m, DynamicMerging):
            m.refresh()


def layer_seed(base_seed: int, index: int) -> int:
    """Seed of layer ``index``'s fixed evaluation mask (distinct per layer, stable across runs of one seed)."""
    return (base_seed * 1_000_003 + 7919 * (index + 1)) % (2**62)


def reset_yield_stats(model: nn.Module) -> None:
    """Clear the yielding statistics of every SLIM layer's clustering state (the routing ones are the layer's)."""
    for _, layer in moe_layers(model):
        if isinstance(getattr(layer, "slim_clusters", None), SlidingClusters):
            layer.slim_clusters.reset_yield_stats()


def set_tracking(model: nn.Module, enabled: bool) -> None:
    """Switch routing and yielding statistics on/off for every SLIM layer (clearing them when switched on)."""
    set_track_stats(model, enabled=enabled, reset=enabled)
    if enabled:
        reset_yield_stats(model)


def _mean(values: list[tuple[float, float]]) -> float | None:
    tot = sum(w for _, w in values)
    return sum(v * w for v, w in values) / tot if tot else None


def slim_diagnostics(model: nn.Module) -> dict[str, Any]:
    """Routing and yielding statistics collected since :func:`set_tracking` was switched on (training tokens).

    ``identity_share``: routing mass on identity experts; ``entropy``: mean per-token entropy of the applied
    weights (nats); ``load``: per-expert mean weight averaged over layers (identity experts last);
    ``yield_distance``: mean ``d``; ``far_share``: share of tokens with ``d > 0``; ``yield_score``: mean ``s``;
    ``layers``: identity share and mean distance per layer. Token-weighted means over layers.
    """
    routing = model_routing_stats(model)
    if routing["identity_share"] is None:
        return {}
    layers, loads, dist, far, score = {}, [], [], [], []
    for name, layer in moe_layers(model):
        rs = routing["layers"][name]
        ys = layer.slim_clusters.yield_stats() if isinstance(getattr(layer, "slim_clusters", None),
                                                              SlidingClusters) else {"tokens": 0}
        if rs["tokens"]:
            loads.append(rs["load"])
        if ys["tokens"]:
            dist.append((ys["distance"], ys["tokens"]))
            far.append((ys["far_share"], ys["tokens"]))
            score.append((ys["score"], ys["tokens"]))
        layers[name] = {"identity_share": rs["identity_share"], "yield_distance": ys.get("distance")}
    load = [sum(col) / len(loads) for col in zip(*loads)] if loads else None
    return {"identity_share": routing["identity_share"], "entropy": routing["entropy"], "load": load,
            "yield_distance": _mean(dist), "far_share": _mean(far), "yield_score": _mean(score), "layers": layers}
