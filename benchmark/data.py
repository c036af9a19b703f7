"""Training examples from task specs: the same Jinja templates lm-eval renders, tokenised the same way.

The context is encoded on its own (no special tokens, as lm-eval's HFLM does for causal models) and the answer
(delimiter + target + EOS) after it, so the model is trained on exactly the token boundary it is tested on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tasks.base import TaskSpec

KIND_TO_TYPE = {"knowledge": 1, "skill": 0}  # LoRAMoE task types: 1 = world knowledge


def render(template: str, record: dict[str, Any]) -> str:
    """Render a Jinja template exactly as lm-eval does."""
    from lm_eval.utils import apply_template

    return apply_template(template, record)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    task_type: int


def encode_example(spec: TaskSpec, record: dict[str, Any], tokenizer: Any, max_len: int) -> Example:
    """Tokenise one record: loss on the answer only (``answer``) or on the whole text (``full``)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    task_type = KIND_TO_TYPE[spec.kind]
    if spec.train_format == "full":
        text = record.get("text") or (render(spec.prompt, record) + spec.target_delimiter
                                      + render(spec.target, record))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        ids = ids[:max_len]
        return Example(ids, list(ids), task_type)
    ctx = tokenizer(render(spec.prompt, record), add_special_tokens=False)["input_ids"]
    ans = tokenizer(spec.target_delimiter + render(spec.target, record), add_special_tokens=False)["input_ids"] + eos
    ids = (ctx + ans)[-max_len:]  # keep the answer when truncating
    labels = ([-100] * len(ctx) + ans)[-max_len:]
    return Example(ids, labels, task_type)


def encode_texts(texts: list[str], tokenizer: Any, max_len: int, task_type: int = 1) -> list[Example]:
    """Plain language-modelling examples (pretraining corpus)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for t in texts:
        ids = (tokenizer(t, add_special_tokens=False)["input_ids"] + eos)[:max_len]
        out.append(Example(ids, list(ids), task_type))
    return out


def encode_task(spec: TaskSpec, tokenizer: Any, max_len: int, limit: int | None = None) -> list[Example]:
    """All training examples of a task (first ``limit`` records if set)."""
    records = spec.records("train")
    if limit is not None:
        records = records[:limit]
    return [encode_example(spec, r, tokenizer, max_len) for r in records]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of the loss and of attention."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    task_types = torch.tensor([e.task_type for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_types": task_types}


def batches(examples: list[Example], batch_size: int, steps: int, generator: torch.Generator,
            pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches drawn epoch by epoch from a seeded permutation (reproducible and resumable)."""
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in idx], pad_id)
