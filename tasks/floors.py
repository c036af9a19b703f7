"""Measured floors: the score a model reaches on a task's test split without reading the question.

A declared chance level (25 for four choices) is wrong whenever the answers are unbalanced: if "Dollar" is the
gold answer of a fifth of the currency questions, always picking "Dollar" when it is offered beats 25. The floor
is therefore measured on the test records, as the best of these answer-blind strategies:

* generation (exact match, ROUGE-L, edit similarity): the best *constant answer*, one of the test targets given
  for every prompt;
* multiple choice: the best *constant position* (always choice k), and the *frequency prior*: pick the offered
  choice that is most often gold in the *other* questions of the split (ties share their credit equally, as a
  uniform tie-break would). Leaving the question itself out matters: with unique choice texts (OBQA, SIQA),
  counting its own gold would make every gold "the most frequent" and the floor 100.

Both are computed on the test split itself, which makes the floor an upper bound of what any answer-blind
strategy could learn from training data with the same answer distribution. ``docs/metrics.md`` says where the
floor is used (the normalised general metrics and the "above floor" checks of the published tables).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from benchmark.textmetrics import edit_sim, rouge_l
from tasks.templates import answer_text, choice_list, render

logger = logging.getLogger(__name__)


def _constant_answer_floor(metric: str, targets: list[str]) -> float:
    """Best mean score of one constant answer drawn from the targets (exact match: the mode's frequency)."""
    if not targets:
        return 0.0
    if metric in ("exact_match", "acc"):
        return 100.0 * Counter(t.strip() for t in targets).most_common(1)[0][1] / len(targets)
    score = {"rouge_l": rouge_l, "edit_sim": edit_sim}[metric]
    # the best constant is almost always a frequent target; 20 candidates keep long-text tasks (TRACE
    # summaries: ~6 ms a ROUGE-L call) to seconds
    candidates = [c for c, _ in Counter(targets).most_common(20)]
    return max(100.0 * sum(score([t], [c]) for t in targets) / len(targets) for c in candidates)


def _multiple_choice_floor(options: list[list[str]], gold: list[int]) -> float:
    """Best of constant position and frequency prior, in points."""
    n = len(gold)
    if n == 0:
        return 0.0
    position = max(Counter(gold).values()) / n
    freq = Counter(opts[g] for opts, g in zip(options, gold))
    prior = 0.0
    for opts, g in zip(options, gold):
        counts = [freq[o] - (i == g) for i, o in enumerate(opts)]  # leave this question's own answer out
        top = max(counts)
        winners = [i for i, c in enumerate(counts) if c == top]
        prior += (g in winners) / len(winners)
    return 100.0 * max(position, prior / n)


def measured_floor(spec: Any, split: str = "test") -> float:
    """The task's floor in points (0-100), rounded to 0.01, measured on ``split``."""
    records = spec.records(split)
    if spec.output_type == "multiple_choice":
        options, gold = [], []
        for r in records:
            opts = choice_list(spec, r)
            t = render(spec.target, r).strip()
            options.append(opts)
            gold.append(int(t) if t.isdigit() else opts.index(t))
        value = _multiple_choice_floor(options, gold)
    else:
        targets = [render(spec.eval_target, r) if spec.eval_target else answer_text(spec, r) for r in records]
        value = _constant_answer_floor(spec.metric, targets)
    return round(value, 2)


# id(spec) -> (spec, floor): every run of a sweep records the floors, and measuring a ROUGE-L task (200 candidate
# answers against every target) takes minutes; the spec is kept so its id cannot be reused by another object
_MEASURED: dict[int, tuple[Any, float]] = {}


def task_floor(spec: Any) -> float:
    """The floor a run records for ``spec``: the stored ``floor`` (generated YAMLs write it), else measured.

    A stored floor saves reading (or downloading) the test split; it must equal :func:`measured_floor`. A
    measured one is computed once per spec object and process.
    """
    if spec.floor is not None:
        return float(spec.floor)
    if id(spec) not in _MEASURED:
        _MEASURED[id(spec)] = (spec, measured_floor(spec))
        logger.info("task %r: no stored floor; measured %.2f on its test split", spec.name, _MEASURED[id(spec)][1])
    return _MEASURED[id(spec)][1]
