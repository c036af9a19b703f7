"""SLIM: Soft LoRA and Identity Mixture (Han et al., NAACL 2025, https://aclanthology.org/2025.naacl-long.246/,
arXiv 2410.07739). No official code exists; this follows docs/methods.md §1 and marks every guess.

Per adapted linear (``y = W x + b + sum_i w_i f_i(x)``, docs/methods.md §1.3):

1. **Identity experts** beside LoRA experts, top-k routing renormalised over the selection. An identity expert adds
   a zero delta (``f(x) = x`` does not type-check for non-square projections): it only absorbs routing mass, and a
   token whose top-k are all identity experts gets exactly the base layer's output.
2. **Sliding clustering** of the layer input (``clustering.py``): M centres and per-channel variances, fp32 buffers,
   EMA-updated once per optimiser step from the real tokens of the step (padding excluded; all-reduced under
   ``torch.distributed``; frozen in eval mode; saved with the trainable state).
3. **Weight yielding** (``model.weight_yielding``): ``d = max_c |x - c_idx| / sigma_idx - 1`` to the nearest
   cluster; identity logits ``+ gamma*s``, LoRA logits ``- gamma*s`` with ``s = clamp(d, 0, clip)``.
4. **Dynamic merging** (``merging.py``): random rows of B and columns of A dropped (``q = 1 - sqrt(1-p)`` each,
   so ``p`` of BA's entries), rescaled by ``1/(1-p)``, in training and evaluation; evaluation masks are fixed per
   layer (seeded), so an evaluation repeats exactly.
5. **L1 regularisation**: ``l1_weight * sum_layers sum_experts |B|_1/(r*C_out) + |A|_1/(r*C_in)`` via ``aux_loss``.

| detail               | paper says             | our default              | why                                  |
|----------------------|------------------------|--------------------------|--------------------------------------|
| experts / identity   | 10 experts, 2 identity | n_experts=8,             | as the paper                         |
|                      |                        | n_identity=2             |                                      |
| top-k                | not stated (equation   | top_k=2, renormalised    | the equation's example (Mixtral-     |
|                      | example: 2)            |                          | style)                               |
| expert rank / alpha  | 16 or 128 (ambiguous)  | rank=4, alpha=8          | tiny-world width is 128: 8 x 4 = 32  |
|                      |                        |                          | total rank; scaling 2 as the lora    |
|                      |                        |                          | plugin                               |
| targets              | MLP (+ attention LoRA) | MLP; attention=False     | its ablation: attention LoRA adds    |
|                      |                        |                          | 2.29 points of forgetting            |
| router               | not stated             | linear, no bias, fp32    | docs/methods.md §1.5                 |
|                      |                        | softmax                  |                                      |
| clusters M           | not stated             | n_clusters=8             | docs/methods.md §1.6 [D]             |
| sliding (EMA) rate   | not stated             | momentum=0.05 per step   | tiny-world stages have 50-600 steps: |
|                      |                        |                          | at 0.01 a centre would move only     |
|                      |                        |                          | 39 % of the way in 50 steps (63 % in |
|                      |                        |                          | 100)                                 |
| cluster init         | random                 | data: k-means on the     | random centres make every token      |
|                      |                        | first batch              | 'far' at first; data init is seed-   |
|                      |                        |                          | deterministic; cluster_init=random   |
|                      |                        |                          | kept                                 |
| nearest cluster      | not stated             | diagonal Mahalanobis     | the same sigma-scaling as d          |
| yielding formula     | not recoverable (Eq.   | logit +- gamma *         | docs/methods.md §1.6 [D]             |
|                      | 9/10)                  | clamp(d, 0, clip)        |                                      |
| gamma / clip         | not stated             | gamma=1, yield_clip=5    | a gap of up to 10 logits hands a     |
|                      |                        |                          | token fully to the identity experts  |
| d calibration        | none                   | calibrate=True           | the literal d is > 0 for ~all tokens |
|                      |                        |                          | (below)                              |
| masking ratio p      | not stated (Fig. 4: a  | mask_ratio=0.1           | measured: masks slow learning and do |
|                      | trade-off)             |                          | not cut forgetting here (results/    |
|                      |                        |                          | README.md, "Measurement notes")      |
| DARE 1/(1-p) rescale | not stated             | on                       | the expected delta stays BA          |
| masks train / eval   | not stated             | both (mask_phase)        | its ablation (+5.54 MMLU) implies    |
|                      |                        |                          | eval                                 |
| deterministic eval   | not discussed          | a fixed seeded mask per  | exact repeats; safe for the          |
|                      |                        | layer                    | evaluation cache                     |
| L1 weight            | not stated             | l1_weight=1e-4           | docs/methods.md §1.4 [D]             |
| balancing loss       | none mentioned         | none                     | faithful to the summary              |
| learning rate        | not stated             | lr=3e-3 (tiny-world)     | best validation plasticity of        |
|                      |                        |                          | {1e-3, 3e-3, 1e-2} on tiny-world-val |
|                      |                        |                          | (scripts/tune_defaults.py)           |

Distance calibration: the paper's ratio ``max_c |x - c| / sigma`` is the maximum over C channels, so even the
training tokens themselves sit well above 1 and the literal ``d = r - 1`` yields most of their routing mass to the
identity experts; calibrated, ``d = r / mean_train(r) - 1`` puts a typical training token at ``d = 0`` and only
tokens unlike the training data move toward the identity experts (the measurement: results/README.md,
"Measurement notes", with the probes behind the other defaults).

Parameter counts (``param_counts``, docs/methods.md §1.9): trainable per adapted linear ``N*r*(d_in + d_out) +
d_in*E``; active per token ``min(top_k, N)*r*(d_in + d_out) + d_in*E``, an upper bound (identity experts cost
nothing). Linears that read one tensor (gate_proj/up_proj; q/k/v_proj with ``attention``) are twins: with the data
initialisation their cluster states stay bitwise equal, so the second reuses the first's distances and cluster sums
(exact; tracked by Python-side lineage tokens, so the forward never compares tensors; docs/methods.md §1.6).

The forward and backward read nothing back from the device (no ``bool``/``float``/``.item()``/``torch.equal`` on
a tensor: each would stall the host until an accelerator catches up); see ``clustering.py`` for how, and for the
reads left outside the steady-state forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from methods.base import TaskInfo, check_targets, register_method
from methods.moe_lora import MoELoRAMethod, inject_moe_lora
from methods.slim.clustering import SlidingClusters, update_clusters
from methods.slim.config import SlimConfig
from methods.slim.merging import DynamicMerging, l1_penalty
from methods.slim.model import (layer_seed, link_twins, make_slim_layer, refresh_mirrors, reset_yield_stats,
                                slim_diagnostics, weight_yielding)

__all__ = ["DynamicMerging", "Slim", "SlimConfig", "SlidingClusters", "l1_penalty", "make_slim_layer",
           "update_clusters", "weight_yielding"]


@register_method("slim")
class Slim(MoELoRAMethod):
    """SLIM on the shared MoE-LoRA layer; see the module docstring for the mechanisms and defaults."""

    config_cls = SlimConfig

    def __init__(self, config: SlimConfig | None = None) -> None:
        super().__init__(config)
        self._diagnostics: dict[str, Any] = {}

    def validate(self, module_names: set[str]) -> None:
        check_targets(list(self.config.targets), module_names)

    def wrap(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        base_seed = cfg.mask_seed if cfg.mask_seed is not None else torch.initial_seed()
        counter = iter(range(10**9))

        def make(name: str, lin: nn.Linear):
            return make_slim_layer(lin, cfg, layer_seed(base_seed, next(counter)))

        try:
            names = inject_moe_lora(model, cfg.targets, make)
        except ValueError as exc:
            raise ValueError(f"Invalid target_modules: {exc}") from exc
        link_twins(model, names)
        # DDP need not broadcast the clusters and mask seeds before every forward: update_clusters keeps them equal
        # on every process. Its broadcast writes them in place, which would void the Python-side mirrors the
        # forward branches on (the twins would stop sharing, an uninitialised flag would be read again)
        own = [f"{name}.{key}" for name in names for key, _ in model.get_submodule(name).named_buffers()
               if key.startswith(("slim_clusters.", "slim_merge."))]
        model._ddp_params_and_buffers_to_ignore = [*getattr(model, "_ddp_params_and_buffers_to_ignore", ()), *own]
        # new layers start in train mode; masks and cluster updates depend on the mode, so follow the model's
        return model.train(model.training)

    def on_step(self, model: nn.Module, step: int) -> None:
        update_clusters(model)

    def on_task_start(self, model: nn.Module, task: TaskInfo) -> None:
        self._diagnostics = {}
        super().on_task_start(model, task)
        reset_yield_stats(model)  # the clusters' yielding statistics are this stage's too

    def on_task_end(self, model: nn.Module, task: TaskInfo) -> None:
        # snapshot the stage's training-token statistics before evaluation forwards could add to them
        self._diagnostics = slim_diagnostics(model)
        super().on_task_end(model, task)

    def diagnostics(self, model: nn.Module) -> dict[str, Any]:
        return dict(self._diagnostics)

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(model, state)
        refresh_mirrors(model)  # the loader copies into the buffers past load_state_dict's hooks
