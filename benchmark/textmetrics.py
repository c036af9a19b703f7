"""Text-overlap metrics for generative tasks, as lm-eval metric functions (one document per call, 0..1).

lm-eval calls a metric given as a function with ``references=[gold], predictions=[generation]`` and uses the
function's name as the metric name, so these names appear in result keys (``rouge_l,strip``).
"""

from __future__ import annotations

import difflib
import re

_TOKEN = re.compile(r"\w+", re.UNICODE)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(references: list[str], predictions: list[str]) -> float:
    """ROUGE-L F1 over lower-cased word tokens (Lin, 2004), as TRACE scores MeetingBank summaries.

    Tokenisation is ``\\w+`` (no stemming), so it also works on German (20Minuten) and Chinese characters.
    """
    ref = _TOKEN.findall(references[0].lower())
    hyp = _TOKEN.findall(predictions[0].lower())
    lcs = _lcs(ref, hyp)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)


def edit_sim(references: list[str], predictions: list[str]) -> float:
    """Character-level similarity ratio (``difflib``), the measure TRACE uses for Py150 next-line completion."""
    return difflib.SequenceMatcher(None, references[0].strip(), predictions[0].strip()).ratio()
