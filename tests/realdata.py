"""Helpers for the real-benchmark tests: the fixture "hub", a tiny local HF model, an offline lm-eval suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# a run small enough for a test: 2 steps per stage, 2 documents per task
TINY_REAL_RUN = ["train.max_steps=2", "train.batch_size=2", "train.max_seq_len=96", "eval.limit=2",
                 "eval.batch_size=4"]


def fixture_rows(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of the fixture standing for hub dataset ``path`` (config ``name``), split ``split``."""
    f = FIXTURES / "hub" / path.replace("/", "__") / (name or "default") / f"{split}.jsonl"
    if not f.is_file():
        raise FileNotFoundError(f"no fixture for {path} {name} {split}: {f}")
    return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def fake_hub_load(path: str, name: str | None, split: str, revision: str | None) -> Any:
    """Stand-in for :func:`tasks.sources.hub_load`: the fixture as a ``datasets.Dataset`` (no network)."""
    import datasets

    return datasets.Dataset.from_list(fixture_rows(path, name, split))


def make_tiny_model(directory: Path) -> Path:
    """Save a random 2-layer Llama and a byte-level BPE tokenizer (with a chat template) to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmark.models import train_tokenizer

    if (directory / "config.json").is_file():
        return directory
    tok = train_tokenizer(300)
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_fixture_suite(directory: Path) -> Path:
    """lm-eval task YAMLs in the style of built-ins (a weighted group like MMLU, PIQA- and GSM8K-like tasks)
    over the local fixture documents, plus a suite YAML using them with per-task few-shot counts."""
    data = FIXTURES / "lm_eval"
    tasks = directory / "lm_eval_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    mc = ("dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {test}\n"
          "    train: {train}\ntest_split: test\nfewshot_split: train\noutput_type: multiple_choice\n"
          "doc_to_text: \"{{{{question}}}}\\nAnswer:\"\ndoc_to_choice: \"{{{{choices}}}}\"\ndoc_to_target: answer\n"
          "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
          "metadata:\n  version: 1.0\n")
    (tasks / "fx_mmlu_a.yaml").write_text("task: fx_mmlu_a\n" + mc.format(test=data / "mc_a.jsonl",
                                                                        train=data / "mc_b.jsonl"))
    (tasks / "fx_mmlu_b.yaml").write_text("task: fx_mmlu_b\n" + mc.format(test=data / "mc_b.jsonl",
                                                                        train=data / "mc_a.jsonl"))
    (tasks / "_fx_mmlu.yaml").write_text("group: fx_mmlu\ntask:\n  - fx_mmlu_a\n  - fx_mmlu_b\n"
                                         "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
                                         "metadata:\n  version: 1\n")
    (tasks / "fx_piqa.yaml").write_text(
        f"task: fx_piqa\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data / 'piqa_like.jsonl'}\ntest_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{goal}}\\nAnswer:\"\ndoc_to_choice: \"{{[sol1, sol2]}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    (tasks / "fx_gsm8k.yaml").write_text(
        f"task: fx_gsm8k\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data / 'gsm_like.jsonl'}\n    train: {data / 'gsm_like.jsonl'}\ntest_split: test\n"
        "fewshot_split: train\noutput_type: generate_until\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"Question:\"]\n  do_sample: false\n"
        "  max_gen_toks: 6\nfilter_list:\n  - name: strict-match\n    filter:\n      - function: regex\n"
        "        regex_pattern: \"#### (\\\\-?[0-9\\\\.\\\\,]+)\"\n      - function: take_first\n"
        "  - name: flexible-extract\n    filter:\n      - function: regex\n        group_select: -1\n"
        "        regex_pattern: \"(-?[$0-9.,]{2,})|(-?[0-9]+)\"\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    suite = directory / "fixture-suite.yaml"
    suite.write_text("name: fixture-suite\ndescription: offline stand-in for a built-in suite\n"
                     "tasks: [lm_eval:fx_mmlu, lm_eval:fx_piqa, lm_eval:fx_gsm8k]\n"
                     "fewshot: {lm_eval:fx_mmlu: 2, lm_eval:fx_piqa: 0, lm_eval:fx_gsm8k: 1}\n"
                     "metrics: {lm_eval:fx_gsm8k: 'exact_match,strict-match'}\n"
                     "include_path: lm_eval_tasks\n")
    # for end-to-end runs: a group at 2-shot plus a 0-shot task (two lm-eval calls per evaluation, not three)
    (directory / "fixture-suite-small.yaml").write_text(
        "name: fixture-suite-small\ntasks: [lm_eval:fx_mmlu, lm_eval:fx_piqa]\n"
        "fewshot: {lm_eval:fx_mmlu: 2}\ninclude_path: lm_eval_tasks\n")
    return suite
