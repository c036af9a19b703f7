"""General text a method may replay: a suite's corpus, screened so that no general evaluation question is in it.

Replaying general text is the usual defence against general-knowledge forgetting. Replaying the *questions* the
general score is computed on would be training on the test set, so every corpus text that contains the rendered
prompt of any record (any split) of the suite's local tasks is dropped before a method sees the corpus. The check is
a substring test after collapsing whitespace: over-eager (a question that is a prefix of another text drops that
text too), never lenient. Questions of lm-eval's built-in tasks cannot be screened here; a suite that mixes them
with a corpus gets a warning.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from tasks.base import GeneralSuite
from tasks.templates import render

logger = logging.getLogger(__name__)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def questions(general: list[Any]) -> set[str]:
    """The rendered prompts of every record of every split of the given general task specs."""
    out = set()
    for spec in general:
        for split in spec.splits:
            out.update(_norm(render(spec.prompt, r)) for r in spec.records(split))
    out.discard("")
    return out


def holds_question(text: str, asked: set[str]) -> bool:
    """Whether ``text`` contains any of the (normalised) questions."""
    t = _norm(text)
    return any(q in t for q in asked)


def general_texts(suite: GeneralSuite, general: list[Any], builtin: list[str] = ()) -> list[str]:
    """The suite's corpus texts, in file order, without any text that holds one of its general questions.

    ``general`` are the suite's local task specs; ``builtin`` its lm-eval task names (not screened: warned about).
    Empty when the suite has no corpus.
    """
    path = suite.corpus_path()
    if path is None:
        return []
    if builtin:
        logger.warning("suite %r: the corpus is not screened against lm-eval's own tasks %s", suite.name, builtin)
    asked = questions(general)
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    kept = [t for t in texts if not holds_question(t, asked)]
    logger.info("suite %r: %d of %d corpus texts hold no general question", suite.name, len(kept), len(texts))
    return kept
