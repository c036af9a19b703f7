"""Learning without Forgetting (LwF), adapted to causal LMs: distil the previous model's next-token distributions.

Zhizhong Li and Derek Hoiem, "Learning without Forgetting", ECCV 2016 and IEEE TPAMI 40(12), 2018 (online 2017),
arXiv 1606.09282.

From the second stage on, the teacher is the model as it was when the stage started (after the previous stage),
frozen. Every training forward adds ``lwf_lambda * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (float32;
summed over the vocabulary, averaged over the batch's positions with ``attention_mask == 1``) through ``aux_loss``:
LwF distils on the new task's inputs, as no old data is kept. Stage 1 has no teacher and trains plainly.

| detail | paper says | our default | why |
|---|---|---|---|
| old-task targets | old heads' outputs on the new task's images, recorded before training | the stage-start model's next-token distributions at every real input position (prompt and answer), computed on the fly by the frozen teacher | a causal LM has one output head shared by every task; the teacher is frozen, so the values are the recorded ones, without storing them per example |
| loss | cross-entropy with targets ``y^(1/T)`` renormalised (= softmax(z/T)) | ``KL(p_t, p_s) = sum_v p_t log(p_t / p_s)`` at T, mean over real positions | the cross-entropy minus the teacher's entropy (a constant): same gradient, and 0 at the teacher |
| T | 2 | temperature=2.0 | as the paper |
| T^2 scaling | none | the term is multiplied by T^2 | Hinton et al. (2015): keeps the soft targets' gradient scale independent of T (x4 at T = 2) |
| lambda_o | 1 | lwf_lambda=1.0 | as the paper |
| several old tasks | one term per old task head | one teacher: the model after the previous stage | the shared head's distribution covers every earlier stage at once |
| new-task head, warm-up | a new head, trained alone first (warm-up) | none | the LM head is shared and already trained: nothing new to warm up |
| what trains | the whole network | base=full_ft (every weight); base=lora (the default lora adapter) | as the paper; lora for the parameter-efficient comparison |
| teacher memory | not discussed | full_ft: one frozen deep copy; lora: one frozen adapter snapshot on the same frozen base | lora needs no second base model |
| learning rate | tuned per setting | lr=None: the base method's default (3e-4 / 3e-3) | chosen on tiny-world-val for the base method; not re-tuned for LwF |

The teacher runs in eval mode (no dropout), under ``torch.no_grad``, on the batch's ``input_ids`` and
``attention_mask``. ``forward_context`` registers two hooks on the model for the forward run inside it: a pre-hook
that runs the teacher first -- inside the training loop's autocast, which the loop enters within the context, so
the teacher runs at the student's precision -- and a hook that captures the student's logits. Both are removed on
exit, also on error. Under gradient accumulation every micro-batch gets its own context (the term is a mean over
that micro-batch, like its LM loss); under DDP the hooks sit on the unwrapped model and the teacher pass, outside
DDP's autograd graph, needs no communication. The teacher exists from ``on_task_start`` to ``on_task_end`` only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from methods.base import TaskInfo, register_method
from methods.on_base import OnBase
from methods.lwf.config import LwfConfig
from methods.lwf.distill import distill_loss, output_logits
from methods.lwf.teacher import (TEACHER, add_teacher_adapter, frozen_copy, is_teacher_param,
                                 remove_teacher_adapter, teacher_adapter_active)

logger = logging.getLogger(__name__)

__all__ = ["TEACHER", "Lwf", "LwfConfig"]


@register_method("lwf")
class Lwf(OnBase):
    """A base learner (``full_ft`` or ``lora``) plus the LwF distillation term against the stage-start model."""

    config_cls = LwfConfig

    def __init__(self, config: LwfConfig | None = None) -> None:
        super().__init__(config)
        self.teacher: nn.Module | None = None  # full_ft: the frozen copy (lora: the adapter TEACHER in the model)
        self.has_teacher = False
        self._batch: dict[str, torch.Tensor] | None = None
        self._teacher_logits: torch.Tensor | None = None
        self._student_logits: torch.Tensor | None = None
        self._in_teacher = False  # the lora teacher pass re-enters the model's own hooks
        self._last: torch.Tensor | None = None  # kept on the device: read only by diagnostics

    def on_task_start(self, model: nn.Module, task: TaskInfo) -> None:
        self._drop_teacher(model)  # before copying: at most one teacher is alive at a time
        self._last = None
        if task.stage < 2:
            return
        if self.config.base == "lora":
            add_teacher_adapter(model)
        else:
            self.teacher = frozen_copy(model)
        self.has_teacher = True
        logger.info("lwf: stage %d distils from the model after stage %d", task.stage, task.stage - 1)

    def on_task_end(self, model: nn.Module, task: TaskInfo) -> None:
        self._drop_teacher(model)  # not needed for evaluation: the memory goes back now

    def _drop_teacher(self, model: nn.Module) -> None:
        if self.config.base == "lora":
            remove_teacher_adapter(model)
        self.teacher, self.has_teacher = None, False

    @contextlib.contextmanager
    def forward_context(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        if not self.has_teacher:
            yield
            return
        self._batch = batch
        handles = [model.register_forward_pre_hook(lambda module, args: self._run_teacher(model)),
                   model.register_forward_hook(lambda module, args, output: self._capture(output))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._batch = self._teacher_logits = self._student_logits = None

    def _run_teacher(self, model: nn.Module) -> None:
        """Pre-hook of the student's forward: the teacher's logits on the context's batch, once per context."""
        if self._in_teacher or self._teacher_logits is not None:
            return
        inputs = {"input_ids": self._batch["input_ids"], "attention_mask": self._batch["attention_mask"],
                  "use_cache": False}
        self._in_teacher = True
        try:
            with torch.no_grad():
                if self.teacher is not None:
                    out = self.teacher(**inputs)
                else:
                    with teacher_adapter_active(model):
                        out = model(**inputs)
            self._teacher_logits = output_logits(out)
        finally:
            self._in_teacher = False

    def _capture(self, output: Any) -> None:
        if not self._in_teacher:
            self._student_logits = output_logits(output)

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self._student_logits is None or self._teacher_logits is None:
            return None  # stage 1, or no forward inside the context
        loss = self.config.lwf_lambda * distill_loss(self._student_logits, self._teacher_logits,
                                                     self._batch["attention_mask"], self.config.temperature)
        self._last = loss.detach()
        return loss

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # The teacher is not stored: a stage's teacher is the model as the previous stage left it, which is what
        # load_trainable_state restores, and the next on_task_start rebuilds it from those very weights.
        state = self.base.trainable_state(model)
        return {k: v for k, v in state.items() if not is_teacher_param(k)}

    def diagnostics(self, model: nn.Module) -> dict[str, Any]:
        return {} if self._last is None else {"distill_loss": float(self._last)}

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        n = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and not is_teacher_param(name))
        return {"trainable": n, "active": n}
