"""O-LoRA: orthogonal subspace learning (Wang et al., "Orthogonal Subspace Learning for Language Model Continual
Learning", Findings of EMNLP 2023, https://aclanthology.org/2023.findings-emnlp.715/, arXiv 2310.14152; official
code https://github.com/cmnfriend/O-LoRA, ``src/uie_trainer_lora.py`` and its modified ``src/peft``).

Every stage trains a fresh LoRA adapter; the adapters of earlier stages stay in the model, frozen and summed in
(``adapters.py``). The loss adds (``aux_loss``, float32)

    orth_lambda * sum_modules sum_earlier |A_current A_earlier^T|_1  +  l2_lambda * sum_modules (|A|_2 + |B|_2)

(``losses.py``), which pushes the rows of the new A -- the input directions the new task writes through -- to be
orthogonal to those of every earlier task, so the new update reads input directions the earlier ones do not. In stage 1
there is no earlier adapter, and with ``l2_lambda = 0`` ``aux_loss`` returns ``None``. The checkpoint holds every
adapter, so a resumed run rebuilds the frozen ones.

| detail             | paper says / official code      | our default                | why                            |
|--------------------|---------------------------------|----------------------------|--------------------------------|
| orthogonality term | paper: squared entries of       | abs entries, as the code   | the form the reported results  |
|                    | A_old^T A_new [a]; code: sum of | (sum over earlier adapters | ran with                       |
|                    | abs(A_old A_new^T), old stacked | = the stacked sum)         |                                |
| orth weight        | code: lamda_1 = 0.5 (every      | orth_lambda=0.5            | as the code                    |
|                    | script)                         |                            |                                |
| L2 term            | code only: lamda_2 * sum of the | l2_lambda=0.0, same form   | the code's default and its     |
|                    | (not squared) norms of new A,B; | (Frobenius, not squared)   | standard-benchmark value       |
|                    | 0 (0-0.3 on the long sequence)  |                            |                                |
| aux under gradient | code: added after the task loss | once per optimiser step    | one objective whatever the     |
| accumulation       | is divided by the steps, so     | (our loop weights each     | accumulation                   |
|                    | weighted x accum (LLaMA: 8)     | micro-batch by its share)  |                                |
| targets            | code: q, v (peft's default for  | q_proj, v_proj             | as the code                    |
|                    | T5 and LLaMA)                   |                            |                                |
| rank r             | code: 8 (lora_dim)              | r=8                        | as the code and lora           |
| alpha              | code: 32 (scaling alpha/r = 4)  | alpha=16 (scaling 2)       | lora's scaling, for which the  |
|                    |                                 |                            | lr was tuned                   |
| dropout            | code: 0.1, one mask shared by   | dropout=0.0                | as lora; peft would draw one   |
|                    | the old and new adapters        |                            | mask per adapter               |
| learning rate      | code: 1e-3, constant, no warmup | lr=3e-3 (tiny-world)       | the same recipe for every      |
|                    | (T5-large and LLaMA-7B)         |                            | adapter method on our models   |
|                    |                                 |                            | (lora's validation lr)         |
| earlier adapters   | frozen, summed; code: one       | one frozen peft adapter    | the same sum; each names the   |
|                    | frozen LoRA of rank r (t - 1)   | per stage (task<i>)        | stage it came from             |

[a] The paper's L_orth(A_i, A_t) = sum_jk O[j, k]^2 with O = A_i^T A_t (A as d x r); the official code sums
absolute values instead. The rest of the table is read from the official code.

Parameter counts: ``trainable`` is the current adapter only (``r (d_in + d_out)`` per adapted module); the
adapters kept grow by that much every stage and are reported per stage in ``diagnostics``
(``stored_adapter_params``), since ``param_counts`` is read once, before stage 1.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from methods.base import TaskInfo, register_method
from methods.lora import Lora
from methods.olora.adapters import (CURRENT, activate, adapter_matrices, adapter_params, freeze_current,
                                    frozen_names, lora_config, lora_layers, state_adapter_names, task_name)
from methods.olora.config import OLoraConfig
from methods.olora.losses import l2_loss, orthogonality_loss

__all__ = ["OLora", "OLoraConfig", "orthogonality_loss", "l2_loss"]

logger = logging.getLogger(__name__)


@register_method("olora")
class OLora(Lora):
    """A new LoRA adapter per stage, kept orthogonal (in A) to the frozen adapters of the earlier stages."""

    config_cls = OLoraConfig
    shardable = False  # adds an adapter every stage: parameters FSDP did not shard

    def peft_config(self):
        """The ``peft.LoraConfig`` of every adapter."""
        c = self.config
        return lora_config(c.r, c.alpha, c.dropout, c.target_modules)

    def wrap(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model  # deferred: every CLI call imports every method plugin

        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        missing = [t for t in self.config.target_modules if t not in present]
        if missing:
            raise ValueError(f"Invalid target_modules: {missing} not in the model; linear modules: {sorted(present)}")
        wrapped = get_peft_model(model, self.peft_config(), adapter_name=CURRENT)
        activate(wrapped)
        return wrapped

    def on_task_start(self, model: nn.Module, task: TaskInfo) -> None:
        if task.stage < 2:
            return
        frozen = frozen_names(model)
        if len(frozen) != task.stage - 2:  # one frozen adapter per finished stage, or the state is not this run's
            raise RuntimeError(f"O-LoRA at stage {task.stage} holds frozen adapters {frozen}, expected "
                               f"{task.stage - 2}")
        freeze_current(model, task_name(task.stage - 1), self.peft_config())
        logger.info("O-LoRA stage %d: adapter of stage %d frozen, %d adapters active", task.stage, task.stage - 1,
                    len(frozen) + 2)

    def aux_loss(self, model: nn.Module) -> torch.Tensor | None:
        c = self.config
        frozen = frozen_names(model) if c.orth_lambda > 0 else []
        if not frozen and c.l2_lambda == 0:
            return None
        total = None
        for _, layer in lora_layers(model):
            a, b = adapter_matrices(layer, CURRENT)
            terms = []
            if frozen:
                terms.append(c.orth_lambda * orthogonality_loss(a, [layer.lora_A[n].weight for n in frozen]))
            if c.l2_lambda > 0:
                terms.append(c.l2_lambda * l2_loss([a, b]))
            for t in terms:
                total = t if total is None else total + t
        return total

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # every adapter, frozen ones included: the next stages sum them in
        return {n: p.detach().cpu().clone() for n, p in adapter_params(model).items()}

    @torch.no_grad()
    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        names = state_adapter_names(list(state))
        if CURRENT not in names:
            raise KeyError(f"O-LoRA state has no '{CURRENT}' adapter (adapters: {sorted(names)})")
        for name in sorted(names - {CURRENT} - set(model.peft_config), key=lambda n: int(n[len("task"):])):
            model.add_adapter(name, self.peft_config())
        params = adapter_params(model)
        missing, extra = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        if missing or extra:
            raise KeyError(f"O-LoRA state does not match the model: not in the model {missing[:5]}, "
                           f"not in the state {extra[:5]}")
        for k, v in state.items():  # the state's dtype too, so a resumed run computes exactly as before
            params[k].data = v.to(params[k].device).clone()
        activate(model)

    def diagnostics(self, model: nn.Module) -> dict[str, Any]:
        frozen = frozen_names(model)
        layers = lora_layers(model)
        with torch.no_grad():
            overlap = sum(float(orthogonality_loss(layer.lora_A[CURRENT].weight,
                                                   [layer.lora_A[n].weight for n in frozen])) for _, layer in layers)
        return {"adapters": len(frozen) + 1,
                "stored_adapter_params": sum(p.numel() for p in adapter_params(model).values()),
                "orth_overlap": overlap}  # unweighted sum |A_current A_earlier^T| after the stage

    def adapted_modules(self, model: nn.Module) -> list[str]:
        # the default reads the frozen adapters' weights inside lora_A/lora_B as the wrappers of the trainable ones
        return sorted({name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)})
