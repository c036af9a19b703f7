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
    """Render a Jinja template exactly as lm-eval does (compiled once per template)."""
    from benchmark.evaluate import render_template

    return render_template(template, record)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    task_type: int


def choice_list(spec: TaskSpec, record: dict[str, Any]) -> list[str]:
    """The answer options of a multiple-choice record, read as lm-eval reads ``doc_to_choice``."""
    import ast

    if spec.choices in record:
        return list(record[spec.choices])
    return list(ast.literal_eval(render("{{" + spec.choices + "}}", record)))


def answer_text(spec: TaskSpec, record: dict[str, Any]) -> str:
    """The training answer: the rendered target, or for multiple choice the gold option's text."""
    target = render(spec.target, record)
    if spec.output_type == "multiple_choice":
        options = choice_list(spec, record)
        t = target.strip()
        return options[int(t)] if t.isdigit() else t
    return target


def chat_prompt(tokenizer: Any, prompt: str, answer: str | None = None) -> str:
    """The prompt (and answer) in the tokenizer's chat format, as lm-eval's ``apply_chat_template`` builds it."""
    messages = [{"role": "user", "content": prompt}]
    if answer is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)


def encode_example(spec: TaskSpec, record: dict[str, Any], tokenizer: Any, max_len: int,
                   chat: bool = False) -> Example:
    """Tokenise one record: loss on the answer only (``answer``) or on the whole text (``full``).

    With ``chat`` the prompt is wrapped in the tokenizer's chat template and the answer is the assistant turn
    (with the template's end-of-turn marker, no delimiter), matching lm-eval's ``apply_chat_template`` contexts.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    task_type = KIND_TO_TYPE[spec.kind]
    if spec.train_format == "full":
        text = record.get("text") or (render(spec.prompt, record) + spec.target_delimiter
                                      + render(spec.target, record))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        ids = ids[:max_len]
        return Example(ids, list(ids), task_type)
    prompt, answer = render(spec.prompt, record), answer_text(spec, record)
    if chat:
        context = chat_prompt(tokenizer, prompt)
        full = chat_prompt(tokenizer, prompt, answer)
        # the assistant turn is what the template adds after the generation prompt; fall back to answer + EOS
        answer_part = full[len(context):] if full.startswith(context) else None
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        ans = (tokenizer(answer_part, add_special_tokens=False)["input_ids"] if answer_part
               else tokenizer(answer, add_special_tokens=False)["input_ids"] + eos)
    else:
        ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ans = tokenizer(spec.target_delimiter + answer, add_special_tokens=False)["input_ids"] + eos
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


def encode_task(spec: TaskSpec, tokenizer: Any, max_len: int, limit: int | None = None,
                chat: bool = False) -> list[Example]:
    """All training examples of a task (first ``limit`` records if set); ``chat``: see :func:`encode_example`."""
    records = spec.records("train")
    if limit is not None:
        records = records[:limit]
    return [encode_example(spec, r, tokenizer, max_len, chat=chat) for r in records]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of the loss and of attention."""
    width = max(len(e.input_ids) for e in examples)
    # padded Python lists -> one tensor each (one small tensor per row costs ~3x more; this runs every step)
    ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples], dtype=torch.long)
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in examples], dtype=torch.long)
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples],
                        dtype=torch.long)
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
