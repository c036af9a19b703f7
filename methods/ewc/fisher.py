"""The diagonal empirical Fisher, its online combination, and the EWC penalty.

Normalisation (``ewc_lambda``'s scale depends on it): for each chosen example ``i`` (a batch of one),
``l_i = sum_t log p(y_t | y_<t, x)`` over its answer tokens (labels other than ``-100``, shifted as the causal LM
loss shifts them), and ``F = (1/n) sum_i (d l_i / d theta)^2`` elementwise, in float32: the squared gradient of one
example's *summed* log-likelihood, averaged over the ``n`` examples. The labels are the data's (the empirical
Fisher), not samples from the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def evenly_spaced(total: int, k: int) -> list[int]:
    """``min(k, total)`` distinct indices spread evenly over ``range(total)`` (the middle of each of ``k`` equal
    spans), chosen without any RNG, so the choice never shifts the run's random streams."""
    k = min(k, total)
    return [(2 * j + 1) * total // (2 * k) for j in range(k)]


def answer_loglik(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-likelihood of the answer tokens of ``batch`` (float32 scalar), with the causal LM's shift."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                            reduction="sum")


def diagonal_fisher(model: nn.Module, params: dict[str, nn.Parameter], examples: Iterable[Any],
                    collate: Callable[[list[Any]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of ``params`` over ``examples`` (module docstring), one example at a time.

    Runs with every module in eval mode (no dropout), then gives each module back its own previous mode. Gradients
    come from ``torch.autograd.grad``, so no parameter's ``.grad`` is written. The result is float32, on each
    parameter's device.
    """
    names, tensors = list(params), list(params.values())
    if not tensors:
        raise ValueError("diagonal_fisher: no parameters to estimate the Fisher of")
    device = tensors[0].device
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    count = 0
    try:
        for example in examples:
            batch = {k: v.to(device) for k, v in collate([example]).items()}
            with torch.enable_grad():
                loglik = answer_loglik(model, batch)
                grads = torch.autograd.grad(loglik, tensors, allow_unused=True) if loglik.requires_grad \
                    else [None] * len(tensors)
            for n, g in zip(names, grads):
                if g is not None:  # None: the parameter does not reach this example's answer tokens
                    fisher[n].add_(g.detach().float().square())
            count += 1
    finally:
        for m, mode in modes:
            m.training = mode
    if count == 0:
        raise ValueError("diagonal_fisher: no examples to estimate the Fisher from")
    return {n: f.div_(count) for n, f in fisher.items()}


def combine(previous: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor],
            gamma: float) -> dict[str, torch.Tensor]:
    """Online EWC (Schwarz et al., 2018): ``gamma * previous + new``; ``new`` alone when there is no previous."""
    if previous is None:
        return new
    if set(previous) != set(new):
        raise KeyError(f"Fisher keys changed between stages: {sorted(set(previous) ^ set(new))[:5]}")
    return {n: previous[n].mul(gamma).add_(new[n]) for n in new}


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                anchor: dict[str, torch.Tensor], ewc_lambda: float) -> torch.Tensor:
    """``(ewc_lambda / 2) * sum F * (theta - theta*)^2`` in float32, differentiable in ``params``."""
    total = None
    for n, f in fisher.items():
        term = (f * (params[n].float() - anchor[n]).square()).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("ewc_penalty: empty Fisher")
    return total * (ewc_lambda / 2)
