"""Training examples from task specs: the same Jinja templates lm-eval renders, tokenised as lm-eval scores them.

Context and answer ids come from :mod:`benchmark.tokens` (lm-eval's BOS policy and its split of the joint
encoding), so the model is trained on exactly the tokens and the boundary it is tested on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from benchmark import tokens
from tasks.base import TaskSpec
from tasks.templates import answer_text, render


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_example(spec: TaskSpec, record: dict[str, Any], tokenizer: Any, max_len: int,
                   chat: bool = False) -> Example:
    """Tokenise one record: loss on the answer only (``answer``) or on the whole text (``full``).

    The context and answer ids are those lm-eval scores (:mod:`benchmark.tokens`): a multiple-choice answer is
    the continuation of its log-likelihood request, a generative answer continues the generation context. The
    answer ends with EOS, or with ``chat`` with the template's end-of-turn marker (the prompt is then the user turn
    and the answer the assistant turn, as lm-eval's ``apply_chat_template`` builds them).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if spec.train_format == "full":
        text = record.get("text") or (render(spec.prompt, record) + spec.target_delimiter
                                      + render(spec.target, record))
        ids = (tokens.encode_string(tokenizer, text) + eos)[:max_len]
        return Example(ids, list(ids))
    prompt, answer = render(spec.prompt, record), answer_text(spec, record)
    end = eos
    if chat:
        # lm-eval drops the target delimiter under a chat template: the answer starts the assistant turn
        context, continuation = tokens.chat_context(tokenizer, prompt), answer
        tail = tokens.chat_turn_end(tokenizer, prompt, answer)
        if tail is not None:
            end = tokenizer.encode(tail, add_special_tokens=False)
    else:
        context, continuation = prompt, spec.target_delimiter + answer
    if spec.output_type == "multiple_choice":
        ctx, ans = tokens.encode_pair(tokenizer, context, continuation)
    else:
        ctx, ans = tokens.encode_generation_pair(tokenizer, context, continuation)
    ans = ans + end
    ids = (ctx + ans)[-max_len:]  # keep the answer when truncating
    labels = ([-100] * len(ctx) + ans)[-max_len:]
    return Example(ids, labels)


def encode_texts(texts: list[str], tokenizer: Any, max_len: int) -> list[Example]:
    """Plain language-modelling examples (pretraining corpus), each encoded as lm-eval encodes a string."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for t in texts:
        ids = (tokens.encode_string(tokenizer, t) + eos)[:max_len]
        out.append(Example(ids, list(ids)))
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
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _draw(order: list[int], n: int, size: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """The next ``n`` indices of an epoch-by-epoch permutation stream over ``size`` items, and what is left."""
    while len(order) < n:
        order += torch.randperm(size, generator=generator).tolist()
    return order[:n], order[n:]


def mixture_rows(fraction: float, batch_size: int) -> int:
    """Rows of a batch drawn from a mixture's pool: ``fraction`` of it rounded, at least one when the fraction is
    above 0, and at most all rows but one (every batch keeps some of the stage's own data)."""
    if fraction <= 0 or batch_size < 2:
        return 0
    return min(max(1, round(fraction * batch_size)), batch_size - 1)


def mixed_positions(batch_size: int, rows: int) -> list[int]:
    """Where the ``rows`` mixed-in rows sit in a batch: evenly spread, so every micro-batch (and every process's
    slice of it) holds about the same share."""
    return [int((j + 0.5) * batch_size / rows) for j in range(rows)]


def batches(examples: list[Example], batch_size: int, steps: int, generator: torch.Generator,
            pad_id: int, mixture: Any = None) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches drawn epoch by epoch from a seeded permutation (reproducible and resumable).

    With a ``mixture`` (:class:`methods.base.Mixture`: a pool and a fraction) every batch takes
    :func:`mixture_rows` rows from the pool, from a second permutation stream on the same generator, at
    :func:`mixed_positions`.
    Without one the generator is drawn exactly as before mixtures existed.
    """
    rows = mixture_rows(mixture.fraction, batch_size) if mixture is not None and mixture.pool else 0
    at = set(mixed_positions(batch_size, rows)) if rows else set()
    order: list[int] = []
    pool_order: list[int] = []
    for _ in range(steps):
        idx, order = _draw(order, batch_size - rows, len(examples), generator)
        if not rows:
            yield collate([examples[i] for i in idx], pad_id)
            continue
        extra, pool_order = _draw(pool_order, rows, len(mixture.pool), generator)
        own, mixed = iter(examples[i] for i in idx), iter(mixture.pool[i] for i in extra)
        yield collate([next(mixed) if k in at else next(own) for k in range(batch_size)], pad_id)
