"""Online Elastic Weight Consolidation: a quadratic penalty that holds the weights earlier stages found important.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 114(13), 2017,
https://doi.org/10.1073/pnas.1611835114 (arXiv 1612.00796); the online form of Schwarz et al., "Progress &
Compress: A scalable framework for continual learning", ICML 2018 (arXiv 1805.06370). No official code of either.

After each stage (``on_task_end``) the diagonal empirical Fisher ``F_new`` of the trainable parameters is estimated
on ``fisher_samples`` of the stage's training examples and folded into the running one, ``F <- gamma * F + F_new``;
the anchor ``theta*`` becomes the parameters as trained. Every later training forward adds
``(ewc_lambda / 2) * sum F * (theta - theta*)^2`` (float32) to the loss through ``aux_loss``.

Fisher normalisation (``fisher.py``): per example, the squared gradient of the *summed* log-likelihood of its
answer tokens; ``F`` is the mean of those over the chosen examples. The training loss it is added to is the mean
cross-entropy over a batch's answer tokens.

| detail | paper says | our default | why |
|---|---|---|---|
| penalty | ``sum_i (lambda/2) F_i (theta_i - theta*_i)^2`` | the same, float32, via ``aux_loss`` | the paper's form |
| Fisher | diagonal Fisher at ``theta*`` | diagonal **empirical** Fisher (the data's labels) | no sampling from the model: deterministic, and one backward per example |
| Fisher estimate | not stated | ``fisher_samples=200`` examples, evenly spaced over the stage's list, one at a time | at most 6 % of the example passes of tiny-world's shortest stage (50 steps x 64); no RNG, so the run's streams are untouched |
| Fisher unit | per-sample log-likelihood | one example's summed answer-token log-likelihood, mean over examples | the sequence-level analogue of a sample's log-likelihood |
| several tasks | one penalty per task (Kirkpatrick); one running penalty, ``F <- gamma F + F_new`` (Schwarz) | online, ``gamma=1.0`` | one penalty, anchored at the latest weights; every stage is scored alike, so none is decayed |
| lambda | tuned per domain; values not transferable (they depend on the Fisher's unit and the loss's scale) | ``ewc_lambda=100`` | see below |
| what is regularised | every weight | ``base=full_ft``: every weight; ``base=lora``: the LoRA parameters only | ``lora`` trains only its adapter |
| learning rate | not applicable | ``lr=None``: the base method's default (3e-4 / 3e-3) | chosen on tiny-world-val for the base method; not re-tuned for EWC |

Why ``ewc_lambda=100``: with this Fisher and a per-token mean loss, the Laplace reading of EWC gives
``lambda ~ N_old / (N_new * T_new)`` (examples of the earlier stages, examples and answer tokens of the current
one), about 1 on tiny-world (1,500 / 1,000 / 600 examples of 1-3 answer tokens). That value barely restrains
training: the empirical Fisher shrinks like ``(1 - p)^2`` on the examples a stage has fitted, and the softmax
curvature with it, so the quadratic model holds only near ``theta*``. Two decades above it lets the penalty reach
the size of the cross-entropy for weight changes of the size a stage makes. It is a design choice [D], not tuned
on validation data; ``ewc_lambda`` is the knob to sweep.

The runner calls the hooks on every process with the unwrapped model; each process estimates the same Fisher from
the same examples (no communication), and under gradient accumulation the penalty of each micro-batch is weighted
like its LM loss, so each optimiser step counts it once. ``trainable_state`` is the base's state plus
``ewc.fisher.<name>`` and ``ewc.anchor.<name>`` for each regularised parameter (``<name>`` as in
``model.named_parameters()``, so a tied tensor appears once), which is all a resumed run needs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from methods.base import StageData, TaskInfo, register_method
from methods.ewc.config import EwcConfig
from methods.ewc.fisher import combine, diagonal_fisher, evenly_spaced, ewc_penalty
from methods.on_base import OnBase

logger = logging.getLogger(__name__)
FISHER, ANCHOR = "ewc.fisher.", "ewc.anchor."  # prefixes of the EWC tensors in trainable_state

__all__ = ["ANCHOR", "FISHER", "Ewc", "EwcConfig"]


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters EWC regularises: the trainable ones, each tied tensor once (``named_parameters`` order)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@register_method("ewc")
class Ewc(OnBase):
    """A base learner (``full_ft`` or ``lora``) plus the online EWC penalty on its trainable parameters."""

    config_cls = EwcConfig

    def __init__(self, config: EwcConfig | None = None) -> None:
        super().__init__(config)
        self.fisher: dict[str, torch.Tensor] | None = None  # float32, on the parameters' devices
        self.anchor: dict[str, torch.Tensor] | None = None
        self.data: StageData | None = None
        self.stats: dict[str, Any] = {}

    def on_stage_data(self, model: nn.Module, task: TaskInfo, data: StageData) -> None:
        self.data = data

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.fisher is None or self.config.ewc_lambda == 0:
            return None
        return ewc_penalty(trainable_params(model), self.fisher, self.anchor, self.config.ewc_lambda)

    def on_task_end(self, model: nn.Module, task: TaskInfo) -> None:
        if self.data is None:
            raise RuntimeError("ewc: on_task_end without on_stage_data (the Fisher needs the stage's examples)")
        params = trainable_params(model)
        with torch.no_grad():  # the penalty the stage ended with, against the earlier stages' anchor
            end_penalty = 0.0 if self.fisher is None else float(ewc_penalty(params, self.fisher, self.anchor,
                                                                             self.config.ewc_lambda))
        examples = self.data.examples
        chosen = [examples[i] for i in evenly_spaced(len(examples), self.config.fisher_samples)]
        new = diagonal_fisher(model, params, chosen, self.data.collate)
        self.fisher = combine(self.fisher, new, self.config.gamma)
        self.anchor = {n: p.detach().float().clone() for n, p in params.items()}
        self.data = None  # the examples are not needed past the stage
        self.stats = {"fisher_examples": len(chosen), "penalty_at_stage_end": end_penalty,
                      "fisher_new_mean": _mean(new), **_summary(self.fisher)}
        logger.info("ewc: stage %d Fisher from %d examples, mean %.3g, max %.3g", task.stage, len(chosen),
                    self.stats["fisher_mean"], self.stats["fisher_max"])

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = self.base.trainable_state(model)
        if self.fisher is not None:
            state.update({FISHER + n: f.detach().cpu().clone() for n, f in self.fisher.items()})
            state.update({ANCHOR + n: a.detach().cpu().clone() for n, a in self.anchor.items()})
        return state

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = (FISHER, ANCHOR)
        self.base.load_trainable_state(model, {k: v for k, v in state.items() if not k.startswith(own)})
        fisher = {k[len(FISHER):]: v for k, v in state.items() if k.startswith(FISHER)}
        anchor = {k[len(ANCHOR):]: v for k, v in state.items() if k.startswith(ANCHOR)}
        if not fisher and not anchor:  # a state saved before the first stage ended
            self.fisher = self.anchor = None
            return
        params = trainable_params(model)
        if set(fisher) != set(anchor) or not set(fisher) <= set(params):
            raise KeyError(f"ewc state does not match the model's trainable parameters: "
                           f"{sorted((set(fisher) ^ set(anchor)) | (set(fisher) - set(params)))[:5]}")
        self.fisher = {n: fisher[n].to(params[n].device, torch.float32) for n in params if n in fisher}
        self.anchor = {n: anchor[n].to(params[n].device, torch.float32) for n in params if n in anchor}

    def diagnostics(self, model: nn.Module) -> dict[str, Any]:
        return dict(self.stats)


def _mean(fisher: dict[str, torch.Tensor]) -> float:
    """Mean over every entry of a Fisher (float64 sums, so large models do not lose precision)."""
    total = sum(float(f.double().sum()) for f in fisher.values())
    return total / max(1, sum(f.numel() for f in fisher.values()))


def _summary(fisher: dict[str, torch.Tensor]) -> dict[str, float]:
    """The running Fisher's mean and max (plain floats, for the run record)."""
    return {"fisher_mean": _mean(fisher), "fisher_max": max(float(f.max()) for f in fisher.values())}
