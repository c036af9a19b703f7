"""Token ids as lm-eval's ``HFLM`` builds them for a causal LM, so that training sees what evaluation scores.

The rules, read from lm-eval 0.4 (``HFLM`` with ``add_bos_token`` unset, the default here):

- A string is encoded with the tokenizer's own special-token policy (a Llama-2 tokenizer prepends ``<s>``,
  GPT-2 and Qwen tokenizers add nothing), except that a string which already starts with the BOS text -- a chat
  template that writes ``<|begin_of_text|>`` itself -- gets no special tokens (``HFLM.tok_encode``).
- A log-likelihood request ``(context, continuation)`` moves the context's trailing whitespace into the
  continuation, encodes context + continuation as one string and splits that encoding after the context's own
  length (``TemplateLM._encode_pair``); an empty context is the prefix token (BOS, else EOS).
- A generation request encodes its context alone, with the BOS check done against ``tokenizer.bos_token``
  (``HFLM.tok_batch_encode``); the model continues right after those ids.
- With a chat template the context is ``tokenizer.apply_chat_template([user turn], add_generation_prompt=True)``
  and a multiple-choice continuation has no target delimiter (``Task.construct_requests``).

Encoding the answer on its own instead (the obvious way) gives a SentencePiece tokenizer's dummy-prefix piece:
``' positive'`` becomes ``['▁', '▁positive']`` where evaluation scores ``['▁positive']``. The tests compare every
function here with what the installed lm-eval builds for the same requests, for three tokenizer families.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def prefix_token_id(tokenizer: Any) -> int | None:
    """The token lm-eval conditions an empty context on: BOS, else EOS (``HFLM.prefix_token_id``)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _starts_with(text: str, prefix: str | None) -> bool:
    return bool(prefix) and text.startswith(prefix)


def encode_string(tokenizer: Any, text: str) -> list[int]:
    """``HFLM.tok_encode(text)``: the tokenizer's default special tokens, none if ``text`` starts with BOS."""
    prefix = prefix_token_id(tokenizer)
    if prefix is not None and _starts_with(text, tokenizer.decode(prefix)):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_generation_context(tokenizer: Any, context: str) -> list[int]:
    """The ids ``HFLM.generate_until`` feeds the model for ``context`` (``tok_batch_encode``, one row, no padding)."""
    if _starts_with(context, getattr(tokenizer, "bos_token", None)):
        return list(tokenizer.encode(context, add_special_tokens=False))
    return list(tokenizer.encode(context))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` of a log-likelihood request, as ``HFLM.loglikelihood`` builds them."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_string(tokenizer, context + continuation)
    ctx = encode_string(tokenizer, context)
    return ctx, whole[len(ctx):]


def encode_generation_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, answer ids)`` for training a generative task: the context exactly as generation sees it,
    the answer as the rest of the encoding of context + answer.

    When that encoding does not start with the generation context's ids (the context ends in whitespace that
    merges into the answer's first token), no split reproduces both; the log-likelihood split is used then.
    """
    ctx = encode_generation_context(tokenizer, context)
    whole = encode_string(tokenizer, context + continuation)
    if whole[:len(ctx)] == ctx:
        return ctx, whole[len(ctx):]
    logger.debug("context %r ends where its answer's first token begins: log-likelihood split used", context[-20:])
    return encode_pair(tokenizer, context, continuation)


def chat_context(tokenizer: Any, prompt: str) -> str:
    """The context string of a zero-shot request under a chat template (``HFLM.apply_chat_template``)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, continue_final_message=False)


def chat_turn_end(tokenizer: Any, prompt: str, answer: str) -> str | None:
    """What the chat template writes after the assistant's ``answer`` (its end-of-turn marker), or None when the
    rendered conversation does not continue the generation prompt with the answer verbatim."""
    context = chat_context(tokenizer, prompt)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                         tokenize=False)
    return full[len(context) + len(answer):] if full.startswith(context + answer) else None
