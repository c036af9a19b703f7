"""O-LoRA's two regularisers, in float32 (as the official ``uie_trainer_lora.training_step`` computes them)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def orthogonality_loss(current: torch.Tensor, earlier: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum_i sum |current @ earlier_i^T|`` for LoRA A matrices of shape ``(r, d_in)``.

    Zero exactly when every row of ``current`` is orthogonal to every row of every earlier A. The earlier
    matrices are detached: the loss moves only the current adapter, whatever their ``requires_grad``.
    """
    a = current.float()
    total = a.new_zeros(())
    for old in earlier:
        total = total + (a @ old.detach().float().T).abs().sum()
    return total


def l2_loss(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of the (not squared) Frobenius norms of ``weights`` -- ``torch.norm(param, p=2)`` in the official code."""
    norms = [torch.linalg.vector_norm(w.float()) for w in weights]
    return torch.stack(norms).sum() if norms else torch.zeros(())
