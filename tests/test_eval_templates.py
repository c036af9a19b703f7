"""The pre-compiled template callables hand lm-eval exactly what it computes from the template strings."""

from __future__ import annotations

import pytest

from benchmark.evaluate import DocField, lm_eval_task_config
from tasks.templates import render


def _spec(task, folder):
    """A registered task, or a local generative one with word answers (tiny-world v2 classifies by multiple
    choice): v1's ``tw_city`` (answers of two words or with non-ASCII letters) and v1's generative sentiment."""
    from tasks import TASKS
    from tests.conftest import city_task, sentiment_generation_task

    local = {"local_city": lambda: city_task(folder), "local_sentiment_gen": sentiment_generation_task}
    return local[task]() if task in local else TASKS.get(task)


@pytest.mark.parametrize("task", ["tw_add", "local_city", "local_sentiment_gen", "tw_sentiment", "tw_topic",
                                  "tw_capital", "tw_element"])
def test_doc_fields_match_lm_eval_string_handling(task, tmp_path):
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.utils import apply_template

    spec = _spec(task, tmp_path)
    cfg = lm_eval_task_config(spec)
    lm_task = ConfigurableTask(config=dict(cfg))
    fields = {k: cfg[k] for k in ("doc_to_text", "doc_to_target", "doc_to_choice") if k in cfg}
    assert fields and all(isinstance(f, DocField) for f in fields.values())
    for doc in list(lm_task.eval_docs)[:40]:
        for method, field in fields.items():
            ours = getattr(lm_task, method)(doc)
            theirs = getattr(lm_task, method)(doc, field.template)  # lm-eval's own handling of the string
            assert ours == theirs and type(ours) is type(theirs), (method, ours, theirs)
        assert render(spec.prompt, doc) == apply_template(spec.prompt, doc)


def test_doc_field_reads_numbers_and_lists_as_lm_eval_does():
    doc = {"label": 2, "opts": ["a", "b"], "lst": "[1, 2]", "q": "x"}
    assert DocField("{{label}}", "target", True)(doc) == 2
    assert DocField("{{label}}", "target", False)(doc) == "2"  # no choices: lm-eval keeps the string
    assert DocField("{{opts}}", "choice", True)(doc) == ["a", "b"]
    assert DocField("{{lst}}", "target", False)(doc) == [1, 2]
    assert DocField("q", "text", False)(doc) == "x"  # a bare field name is that field
    assert DocField("Q: {{q}}", "text", True)(doc) == "Q: x"


def test_memoised_tokenisation_returns_lm_eval_ids(tiny_llama):
    from lm_eval.models.huggingface import HFLM

    from benchmark.evaluate import _memo_hflm_class
    from benchmark.models import train_tokenizer

    tok = train_tokenizer(300)
    plain = HFLM(pretrained=tiny_llama, tokenizer=tok, batch_size=2)
    memo = _memo_hflm_class()(pretrained=tiny_llama, tokenizer=tok, batch_size=2)
    texts = ["The capital of France is", " Paris", "The capital of France is Paris", "12+34=", ""]
    for _ in range(2):  # second pass: served from the memo
        for t in texts:
            assert memo.tok_encode(t) == plain.tok_encode(t)
            assert memo.tok_encode(t, left_truncate_len=3) == plain.tok_encode(t, left_truncate_len=3)
            assert memo._encode_pair("Q: 1+1=", " 2") == plain._encode_pair("Q: 1+1=", " 2")
    ids = memo.tok_encode(texts[0])
    ids.append(-1)  # callers get a copy: mutating it does not change the memo
    assert memo.tok_encode(texts[0]) == plain.tok_encode(texts[0])
