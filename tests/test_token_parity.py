"""Training ids equal what lm-eval's HFLM builds for the same request, for three tokenizer families.

For every record of a generative and a multiple-choice task (with and without the chat template), the lm-eval
requests are built by lm-eval itself from the task config the harness evaluates with, and HFLM's tokenisation is
captured where it hands ids to the model. The training example of the same record must start with exactly those
ids: the context (BOS included or not, as lm-eval does) and then the scored continuation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.tokenizer_families import FAMILIES

CHAT_FAMILIES = ["sentencepiece_bos", "bytelevel_nobos"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmark.evaluate import _memo_hflm_class  # noqa: PLC2701 -- the exact class the harness evaluates with

    tok = FAMILIES[request.param]()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256))
    lm = _memo_hflm_class()(pretrained=model, tokenizer=tok, batch_size=1, max_length=256)
    return request.param, tok, lm


def _specs():
    from tasks import TASKS
    from tests.conftest import sentiment_generation_task

    # generation: a word answer after a space (v1's generative sentiment) and digits with no delimiter (tw_add);
    # multiple choice: a downstream task (tw_sentiment, its label words) and a general one (tw_capital)
    gen, add = sentiment_generation_task(), TASKS.get("tw_add")
    mc_down, mc = TASKS.get("tw_sentiment"), TASKS.get("tw_capital")
    # a prompt ending in whitespace exercises lm-eval's move of that whitespace into the continuation
    spaced_mc = dataclasses.replace(mc, name="tw_capital_spaced", prompt="{{prompt}} ", target_delimiter="")
    specs = [gen, add, mc_down, mc, spaced_mc]
    assert [s.output_type for s in specs] == ["generate_until"] * 2 + ["multiple_choice"] * 3
    assert mc_down.group == "downstream" and mc_down.train_format == "answer"
    return specs


def _requests(spec, lm, chat: bool, n: int = 40):
    from lm_eval.tasks import TaskManager

    from benchmark.evaluate import lm_eval_task_config

    task = next(iter(TaskManager(include_defaults=False, verbosity="ERROR").load(
        [lm_eval_task_config(spec)])["tasks"].values()))
    task.build_all_requests(limit=n, rank=0, world_size=1, apply_chat_template=chat, fewshot_as_multiturn=chat,
                            chat_template=lm.apply_chat_template)
    return task.instances


def _lm_eval_ids(spec, lm, chat: bool):
    """[(doc, context ids, continuation ids or None)] as HFLM hands them to the model."""
    instances = _requests(spec, lm, chat)
    out = []
    if spec.output_type == "multiple_choice":
        captured = []

        def capture(reqs, disable_tqdm=False, **_):
            captured.extend(reqs)
            return [(0.0, True)] * len(reqs)

        lm._loglikelihood_tokens = capture
        lm.loglikelihood(instances, disable_tqdm=True)
        del lm._loglikelihood_tokens
        for inst, (_, ctx, cont) in zip(instances, captured):
            gold = int(str(inst.doc[spec.target.strip("{} ")]))
            if inst.idx == gold:
                out.append((inst.doc, list(ctx), list(cont)))
    else:
        fed = []
        encode = lm.tok_batch_encode

        def tok_batch_encode(strings, *args, **kwargs):
            ids, mask = encode(strings, *args, **kwargs)
            fed.append((strings[0], ids[0][mask[0].bool()].tolist()))  # batch size 1: no padding
            return ids, mask

        lm.tok_batch_encode = tok_batch_encode
        lm._model_generate = lambda context, **_: context  # nothing generated: only the ids fed matter here
        lm.generate_until(instances, disable_tqdm=True)
        del lm.tok_batch_encode, lm._model_generate
        doc_of = {inst.args[0]: inst.doc for inst in instances}
        out = [(doc_of[text], ids, None) for text, ids in fed]
    return instances, out


@pytest.mark.parametrize("chat", [False, True])
def test_training_ids_are_the_ids_lm_eval_scores(family, chat):
    from benchmark.data import encode_example, render

    name, tok, lm = family
    if chat and name not in CHAT_FAMILIES:
        pytest.skip("the tiny-world tokenizer has no chat template")
    for spec in _specs():
        instances, scored = _lm_eval_ids(spec, lm, chat)
        assert len(scored) == len({id(i.doc) for i in instances}) > 0
        for doc, ctx, cont in scored:
            ex = encode_example(spec, doc, tok, 10_000, chat=chat)
            n_ctx = ex.labels.index(next(x for x in ex.labels if x != -100))
            assert ex.input_ids[:n_ctx] == ctx, (name, spec.name, doc)
            answer = ex.input_ids[n_ctx:]
            if cont is not None:  # multiple choice: the scored continuation, then the end marker
                assert answer[:len(cont)] == cont, (name, spec.name, doc)
            else:  # generation: the answer continues the joint encoding of context + answer
                prompt = render(spec.prompt, doc)
                full = (lm.apply_chat_template([{"role": "user", "content": prompt}]) + render(spec.target, doc)
                        if chat else prompt + spec.target_delimiter + render(spec.target, doc))
                whole = lm.tok_encode(full)
                assert whole[:len(ctx)] == ctx
                assert answer[:len(whole) - len(ctx)] == whole[len(ctx):], (name, spec.name, doc)
            assert ex.labels[:n_ctx] == [-100] * n_ctx and ex.labels[n_ctx:] == answer


# one review as the generative (v1) and the multiple-choice (v2) sentiment task read it
REVIEW = {"prompt": "Review: good. Sentiment:", "choices": ["negative", "positive"], "label": 1}


def _sentiment_specs():
    from tasks import TASKS
    from tests.conftest import sentiment_generation_task

    return [sentiment_generation_task(), TASKS.get("tw_sentiment")]


def test_sentencepiece_answer_has_no_dummy_prefix_and_context_has_bos():
    """The two defects the parity fixes, spelled out on the Llama-2-style tokenizer."""
    from benchmark.data import encode_example

    tok = FAMILIES["sentencepiece_bos"]()
    for spec in _sentiment_specs():
        ex = encode_example(spec, REVIEW, tok, 512)
        pieces = tok.convert_ids_to_tokens(ex.input_ids)
        assert pieces[0] == "<s>", spec.name
        answer = [p for p, lab in zip(pieces, ex.labels) if lab != -100]
        assert answer == ["▁positive", "</s>"], spec.name


def test_chat_template_that_writes_bos_gets_no_second_bos():
    from benchmark.data import encode_example

    tok = FAMILIES["sentencepiece_bos"]()
    for spec in _sentiment_specs():
        ex = encode_example(spec, REVIEW, tok, 512, chat=True)
        assert ex.input_ids.count(tok.bos_token_id) == 1 and ex.input_ids[0] == tok.bos_token_id, spec.name
        assert tok.decode(ex.input_ids[:ex.labels.index(next(x for x in ex.labels if x != -100))]) == (
            "<s> [INST] Review: good. Sentiment: [/INST]"), spec.name  # the legacy dummy prefix after <s>


def test_tinyworld_ids_unchanged_by_the_parity_rules(tmp_path):
    """tiny-world's tokenizer (no BOS, no merges across the answer boundary) gives the ids it always had:
    context and answer encoded separately, without special tokens, plus EOS."""
    from benchmark.data import encode_task
    from tasks.templates import answer_text, render
    from tasks import TASKS
    from tests.conftest import city_task, sentiment_generation_task

    tok = FAMILIES["tinyworld"]()
    # generation (digits; a word after a space), multiple choice (the gold label word) and full-sentence facts
    specs = [TASKS.get(n) for n in ("tw_add", "tw_sentiment", "tw_topic")]
    specs += [sentiment_generation_task(), city_task(tmp_path)]
    assert {s.train_format for s in specs} == {"answer", "full"}
    assert {s.output_type for s in specs} == {"generate_until", "multiple_choice"}
    for spec in specs:
        for rec, ex in zip(spec.records("train"), encode_task(spec, tok, 128)):
            if spec.train_format == "full":
                text = rec.get("text") or render(spec.prompt, rec) + spec.target_delimiter + render(spec.target, rec)
                old = (tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:128]
            else:
                ctx = tok(render(spec.prompt, rec), add_special_tokens=False)["input_ids"]
                ans = tok(spec.target_delimiter + answer_text(spec, rec), add_special_tokens=False)["input_ids"]
                old = (ctx + ans + [tok.eos_token_id])[-128:]
            assert ex.input_ids == old
