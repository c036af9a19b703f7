"""The plugin contract, checked for every registered method (built-in or installed through an entry point)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from benchmark.data import Example, collate
from methods import METHODS, StageData, TaskInfo


def _batch(vocab: int = 100, b: int = 3, t: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}  # as benchmark.data.collate makes it


def _stage_data(batch: dict[str, torch.Tensor]) -> StageData:
    """The batch's rows as a stage's encoded examples, with general text of the same shape."""
    rows = [Example([int(t) for t, m in zip(ids, mask) if m], [int(t) for t, m in zip(lab, mask) if m])
            for ids, mask, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"])]
    return StageData(examples=rows, general=lambda: list(rows), collate=lambda ex: collate(ex, pad_id=0))


def _logits(method, model, batch):
    m = method.eval_model(model)
    m.eval()
    with torch.no_grad():
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name, tiny_llama):
    cls = METHODS.get(name)
    method = cls(cls.config_cls())
    base_logits = tiny_llama(input_ids=_batch()["input_ids"], attention_mask=_batch()["attention_mask"]).logits
    model = method.wrap(tiny_llama)
    counts = method.param_counts(model)
    assert counts["trainable"] > 0 and 0 < counts["active"] <= counts["trainable"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == counts["trainable"]

    batch = _batch()
    # a freshly wrapped model behaves like the base model (adapters start as no-ops)
    if method.adapted_modules(model) != ["all"]:
        torch.testing.assert_close(_logits(method, model, batch), base_logits.detach(), rtol=0, atol=1e-5)

    opt = torch.optim.SGD(trainable, lr=0.5)
    for stage, kind in enumerate(["skill", "knowledge"], start=1):
        info = TaskInfo(name=f"t{stage}", kind=kind, stage=stage, num_stages=2)
        method.on_task_start(model, info)
        method.on_stage_data(model, info, _stage_data(batch))
        mixture = method.batch_mixture()
        assert mixture is None or (0 <= mixture.fraction < 1 and isinstance(mixture.pool, list))
        model.train()
        with method.forward_context(model, batch):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            aux = method.aux_loss(model)
            loss = out.loss + (aux if aux is not None else 0)
            loss.backward()
        assert aux is None or (aux.dim() == 0 and torch.isfinite(aux))
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        opt.step()
        opt.zero_grad()
        method.on_step(model, stage)
        method.on_task_end(model, info)

    assert isinstance(method.diagnostics(model), dict)
    state = method.trainable_state(model)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    after = _logits(method, model, batch)
    assert not torch.allclose(after, base_logits.detach()), "training changed nothing"

    # save -> load into a freshly wrapped copy of the same base (same seed, same weights) gives identical logits
    torch.manual_seed(0)
    base2 = LlamaForCausalLM(tiny_llama.config)
    method2 = cls(cls.config_cls())
    model2 = method2.wrap(base2)
    with tempfile.TemporaryDirectory() as d:
        save_file({k: v.contiguous() for k, v in state.items()}, f"{d}/state.safetensors")
        method2.load_trainable_state(model2, load_file(f"{d}/state.safetensors"))
    torch.testing.assert_close(_logits(method2, model2, batch), after, rtol=0, atol=0)
