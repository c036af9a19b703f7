"""A task's templates rendered exactly as lm-eval renders them, for training, floors and data mixtures alike.

Every template is compiled in lm-eval's own Jinja environment (``lm_eval.utils.env``), so the strings the model
is trained on, the strings a floor is measured on and the strings lm-eval scores are the same strings.
"""

from __future__ import annotations

import ast
import functools
from typing import Any


@functools.lru_cache(maxsize=512)
def compiled_template(template: str) -> Any:
    """``template`` compiled once in lm-eval's own Jinja environment.

    ``lm_eval.utils.apply_template`` compiles its template again for every document (about 1 ms each: the
    largest share of lm-eval's set-up per evaluation and of tokenising the training data); rendering the
    compiled template in the same environment gives the identical string.
    """
    # deferred on purpose: lm_eval.utils takes ~0.3 s to import, and every command (``ls`` too) imports tasks
    from lm_eval import utils

    return utils.env.from_string(template)


def render(template: str, record: dict[str, Any]) -> str:
    """``lm_eval.utils.apply_template(template, record)``, with the template compiled once."""
    return compiled_template(template).render(**record)


def choice_list(spec: Any, record: dict[str, Any]) -> list[str]:
    """The answer options of a multiple-choice record, read as lm-eval reads ``doc_to_choice``."""
    if spec.choices in record:
        return list(record[spec.choices])
    return list(ast.literal_eval(render("{{" + spec.choices + "}}", record)))


def answer_text(spec: Any, record: dict[str, Any]) -> str:
    """The training answer: the rendered target, or for multiple choice the gold option's text."""
    target = render(spec.target, record)
    if spec.output_type == "multiple_choice":
        options = choice_list(spec, record)
        t = target.strip()
        return options[int(t)] if t.isdigit() else t
    return target
