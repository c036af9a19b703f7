"""Dynamic merging (SLIM §3.4, fast row/column form) and the L1 regularisation of the adapters (§3.4).

Dynamic merging drops, per expert, random rows of B (d_out) and random columns of A (d_in), each with probability
``q = 1 - sqrt(1 - p)``, so an entry of ``BA`` survives with probability ``(1 - q)^2 = 1 - p`` -- DARE's drop
ratio ``p`` at the cost of two small masks instead of a d_out x d_in one. The kept delta is rescaled by
``1 / (1 - p)`` (DARE; optional) so its expectation is ``BA``.

Evaluation masks: ``fixed`` draws ONE mask per layer from a CPU generator seeded by the layer's ``seed`` buffer
(saved with the trainable state) and reuses it on every evaluation forward, so an evaluation is exactly repeatable
and independent of batch size, order and the evaluation cache; ``resample`` draws a fresh mask per forward from
the global RNG (stochastic evaluation, the paper's literal reading). Training masks always come from the global
RNG: reproducible given the run seed, restored on resume, and replayed by gradient-checkpoint recomputes
(``torch.utils.checkpoint`` restores the RNG state).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from methods.slim.clustering import seen, unchanged

if TYPE_CHECKING:  # pragma: no cover
    from methods.moe_lora import MoELoRALinear, RouterOutput


class DynamicMerging(nn.Module):
    """Row/column masking settings of one layer plus its fixed-evaluation-mask ``seed`` buffer (int64).

    The forward reads the seed from a Python mirror (:meth:`seed_value`): reading the buffer would wait for the
    device on every evaluation forward.
    """

    def __init__(self, ratio: float, rescale: bool, phase: str, eval_mask: str, seed: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.ratio, self.rescale, self.phase, self.eval_mask = float(ratio), rescale, phase, eval_mask
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64, device=device))
        self._fixed: dict = {}  # (seed, shapes, device) -> (keep_rows, keep_cols), built on first use
        self._set_seed_value(int(seed))

    def _set_seed_value(self, value: int) -> None:
        self._seed_value = value
        self._seed_seen = seen((self.seed,))

    def seed_value(self) -> int:
        """The ``seed`` buffer as a Python int; read from the buffer only after a write from outside
        (``load_state_dict`` and :meth:`refresh` keep the mirror current)."""
        if not unchanged(self._seed_seen, (self.seed,)):
            self.refresh()
        return self._seed_value

    def refresh(self) -> None:
        """Re-read the seed mirror from the buffer (reads a tensor: not in a forward)."""
        self._set_seed_value(int(self.seed))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.refresh()  # loading runs outside any forward

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_seed_seen"] = ()  # weak references do not pickle: a copy reads the seed once
        return state

    def _apply(self, fn, recurse: bool = True):
        value = self.seed_value()
        out = super()._apply(fn, recurse)
        self._set_seed_value(value)  # a move keeps the value: follow the new tensor without reading it
        return out

    def extra_repr(self) -> str:
        return f"p={self.ratio:g}, rescale={self.rescale}, phase={self.phase}, eval_mask={self.eval_mask}"

    @property
    def q(self) -> float:
        """Drop probability of a row of B and of a column of A."""
        return 1.0 - math.sqrt(1.0 - self.ratio)

    def active(self, training: bool) -> bool:
        if self.ratio == 0.0 or self.phase == "none":
            return False
        return self.phase == "both" or self.phase == ("train" if training else "eval")

    def masks(self, n: int, d_out: int, d_in: int, device: torch.device,
              fixed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean keep masks: rows ``(n, d_out)`` of B and columns ``(n, d_in)`` of A."""
        if not fixed:
            return (torch.rand(n, d_out, device=device) >= self.q, torch.rand(n, d_in, device=device) >= self.q)
        seed = self.seed_value()
        key = (seed, n, d_out, d_in, str(device), self.q)
        if key not in self._fixed:
            self._fixed.clear()
            g = torch.Generator().manual_seed(seed)
            rows = torch.rand(n, d_out, generator=g) >= self.q
            cols = torch.rand(n, d_in, generator=g) >= self.q
            self._fixed[key] = (rows.to(device), cols.to(device))
        return self._fixed[key]

    def forward(self, a: torch.Tensor, b: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked ``(A', B')`` for stacked ``A`` (N, r, d_in) and ``B`` (N, d_out, r)."""
        if not self.active(training):
            return a, b
        n, d_out, d_in = b.shape[0], b.shape[1], a.shape[2]
        rows, cols = self.masks(n, d_out, d_in, a.device, fixed=not training and self.eval_mask == "fixed")
        scale = 1.0 / (1.0 - self.ratio) if self.rescale else 1.0
        return a * cols[:, None, :].to(a.dtype), b * (rows[:, :, None].to(b.dtype) * scale)


def apply_dynamic_merging(a: torch.Tensor, b: torch.Tensor, layer: MoELoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's ``delta_mask`` hook: delegates to its ``slim_merge`` module in the layer's train/eval mode."""
    return layer.slim_merge(a, b, layer.training)


def l1_penalty(layer: MoELoRALinear) -> torch.Tensor:
    """``sum_experts |B_k|_1 / (r * C_out) + |A_k|_1 / (r * C_in)`` of one layer (fp32, unweighted)."""
    r = layer.rank
    return (layer.lora_B.float().abs().sum() / (r * layer.out_features)
            + layer.lora_A.float().abs().sum() / (r * layer.in_features))


def l1_term(weight: float):
    """Aux term ``weight * l1_penalty(layer)`` in training mode (``None`` in eval mode or when weight is 0)."""

    def term(layer: MoELoRALinear, out: RouterOutput, x: torch.Tensor) -> torch.Tensor | None:
        if weight == 0 or not layer.training:
            return None
        return weight * l1_penalty(layer)

    return term
