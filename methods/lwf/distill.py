"""The LwF distillation term on a causal LM's next-token distributions."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """``T^2 * mean_pos KL(softmax(teacher / T) || softmax(student / T))``, a float32 scalar.

    ``*_logits`` are ``(batch, positions, vocab)``; the KL is summed over the vocabulary and averaged over the
    positions where ``attention_mask == 1`` (0 when there is none). The teacher side carries no gradient.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != attention_mask.shape:
        raise ValueError(f"distill_loss: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)} and mask {tuple(attention_mask.shape)} do not match")
    keep = attention_mask == 1
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_pos = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)  # sum_v p_t (log p_t - log p_s)
    # a masked mean without boolean indexing, which would stall the host until the device catches up
    total = torch.where(keep, per_pos, torch.zeros_like(per_pos)).sum()
    return total * (temperature ** 2) / keep.sum().clamp_min(1)


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a causal LM's forward output (a ``ModelOutput``, a dict, or a tuple with them first)."""
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        # return_dict=False: (loss, logits, ...) with labels, (logits, ...) without
        logits = next((t for t in output if isinstance(t, torch.Tensor) and t.dim() == 3), None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"lwf: cannot find logits in the model output ({type(output).__name__})")
    return logits
