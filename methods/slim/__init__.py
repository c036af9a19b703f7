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
| sliding (EMA) rate   | not stated             | momentum=0.05 per step   | the sentiment stage has 100 steps:   |
|                      |                        |                          | 0.01 would move a centre only 63 %   |
|                      |                        |                          | of the way                           |
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
|                      | trade-off)             |                          | not cut forgetting here (see below)  |
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

Distance calibration (measured on tiny-world after 100 add steps): the paper's ratio ``r = max_c |x - c| / sigma``
averages 2.4 on the 128-channel inputs and 4.0-4.5 on the 512-channel ``down_proj`` inputs for the *training*
tokens themselves (the maximum of C roughly Gaussian channels), so the literal ``d = r - 1`` is positive for 99.8 %
of them and yields 63 % of their routing mass to identity experts. Calibrated (``d = r / mean_train(r) - 1``),
training tokens average d = 0.0 (45 % slightly positive, 7 % identity mass), general-fact tokens d = 3.7 (97 %
identity mass), other tasks' tokens d = 2.4-2.7 (86-94 %).

Published tiny-world results (``results/tiny-world``, 3 seeds, mean +- std, points): slim final_avg 16.2 +- 0.8,
general_delta -15.5 +- 2.1 -- the least general forgetting of the five methods (loramoe 20.4 / -18.3 +- 0.8, hilo
18.4 / -20.9 +- 5.8, lora 17.1 / -35.0 +- 5.5, full_ft 32.6 / -63.3 +- 2.6), as the paper reports, but with a
downstream score below LoRAMoE's and about LoRA's.

What moved what on tiny-world (seed 0, single runs: differences of a few points are within seed noise; measured on
the earlier tiny-world base, general_base 99.1, built before ``model.pretrain.num_threads`` pinned it). Probes of
400 addition steps (add test loss; rise of the general-fact LM loss over the base): identity experts + yielding are
the forgetting lever -- without them the fact loss rises +0.25 instead of +0.03 at the same add loss. Dynamic
merging with the DARE rescale costs learning (add loss 0.83 at p=0, 1.04 at p=0.1, 1.11 at p=0.3) without a
measurable change in forgetting; without the rescale (p=0.3) it shrinks the delta: fact loss +0.01, add loss 1.12.
L1 at 1e-4 changes little. Full tiny-world runs, seed 0 (final_avg / general_delta in points): this default
17.8 / -12.6, gamma=3 16.8 / -12.4, lora 16.3 / -35.7, full_ft 32.5 / -60.1. On an earlier version of the sequence
(100 sentiment steps, p=0.3 default): default 15.5 / -12.9, gamma=0 16.0 / -14.6, attention=True 15.2 / -23.8 (as
the paper's ablation: attention adapters add forgetting), a top-2 MoE-LoRA without any SLIM mechanism 22.5 / -19.1,
lora 15.5 / -35.6, full_ft 31.7 / -61.7. Most of SLIM's remaining general loss comes in the city stage; a likely
reason (not measured) is that its "X is a city in Y." facts pull the clusters toward the general facts' distribution.

Parameter counts (``param_counts``): trainable per adapted linear ``N*r*(d_in + d_out) + d_in*E``; active per
token ``min(top_k, N)*r*(d_in + d_out) + d_in*E`` -- the upper bound when all selected experts are LoRA experts
(identity experts cost nothing); the router and the cluster search (``M*C``, not a parameter) always run.
Linears that read one tensor (gate_proj/up_proj; q/k/v_proj with ``attention``) keep separate cluster states, but
with the data initialisation those stay bitwise equal, so the second reuses the first's distances and cluster
sums (exact, about 2.5 % of a training step at hidden 512; ``random`` initialisation gives each its own centres,
and then nothing is shared). The equality is compared after the initialisation (and after loading a state) and
then carried by Python-side lineage tokens, so the forward never compares tensors.

The forward and backward read nothing back from the device (no ``bool``/``float``/``.item()``/``torch.equal`` on
a tensor: each would stall the host until an accelerator catches up); see ``clustering.py`` for how, and for the
reads left outside the steady-state forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from methods.base import Method, TaskInfo, check_targets, register_method
from methods.moe_lora import (collect_aux, inject_moe_lora, load_trainable_state, routing_context, total_param_count,
                              trainable_state)
from methods.slim.clustering import SlidingClusters, update_clusters
from methods.slim.config import SlimConfig
from methods.slim.merging import DynamicMerging, l1_penalty
from methods.slim.model import (layer_seed, link_twins, make_slim_layer, refresh_mirrors, set_tracking,
                                slim_diagnostics, weight_yielding)

__all__ = ["DynamicMerging", "Slim", "SlimConfig", "SlidingClusters", "l1_penalty", "make_slim_layer",
           "update_clusters", "weight_yielding"]


@register_method("slim")
class Slim(Method):
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

    @contextlib.contextmanager
    def forward_context(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        # the attention mask keeps padding out of the cluster statistics and the routing diagnostics
        with routing_context(attention_mask=batch.get("attention_mask")):
            yield

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        return collect_aux(model)

    def on_step(self, model: nn.Module, step: int) -> None:
        update_clusters(model)

    def on_task_start(self, model: nn.Module, task: TaskInfo) -> None:
        self._diagnostics = {}
        set_tracking(model, True)

    def on_task_end(self, model: nn.Module, task: TaskInfo) -> None:
        # snapshot the stage's training-token statistics before evaluation forwards could add to them
        self._diagnostics = slim_diagnostics(model)
        set_tracking(model, False)

    def diagnostics(self, model: nn.Module) -> dict[str, Any]:
        return dict(self._diagnostics)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)  # adapters, routers and the clusters / mask-seed buffers

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(model, state)
        refresh_mirrors(model)  # the loader copies into the buffers past load_state_dict's hooks

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        return total_param_count(model)
