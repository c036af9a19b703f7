"""Evaluation through lm-eval, in-process, on the model already in memory.

Downstream and local general tasks are turned into lm-eval task configs (a dict per task, with the records
handed over through ``custom_dataset`` so no data file is cached by path and mtime); lm-eval's own tasks are
referred to by name (``lm_eval:mmlu``). Every evaluation is deterministic: greedy generation, log-likelihood
multiple choice, a fixed batch size.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasks.base import TaskSpec

logger = logging.getLogger(__name__)
LM_EVAL_PREFIX = "lm_eval:"


def _records_dataset(spec: TaskSpec, **_: Any):
    """``custom_dataset`` callable: the spec's test records as a ``datasets.DatasetDict``."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(spec.records("test"))})


def lm_eval_task_config(spec: TaskSpec) -> dict[str, Any]:
    """The lm-eval task config of a :class:`TaskSpec` (same templates as training)."""
    cfg: dict[str, Any] = {
        "task": spec.name,
        "custom_dataset": functools.partial(_records_dataset, spec),
        "test_split": "test",
        "output_type": spec.output_type,
        "doc_to_text": spec.prompt,
        "doc_to_target": spec.target,
        "target_delimiter": spec.target_delimiter,
        "num_fewshot": 0,
        "metadata": {"version": spec.version},
    }
    if spec.output_type == "multiple_choice":
        cfg["doc_to_choice"] = "{{" + spec.choices + "}}"
        cfg["metric_list"] = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    else:
        cfg["generation_kwargs"] = {"until": list(spec.until), "do_sample": False, "max_gen_toks": spec.max_gen_toks}
        cfg["metric_list"] = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
        # the model writes " negative" after "Sentiment:"; compare without the delimiter's whitespace
        cfg["filter_list"] = [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                             {"function": "take_first"}]}]
    return cfg


@dataclass
class EvalResult:
    """Scores in points (0-100) per task, the number of examples scored, and the wall time."""

    scores: dict[str, float]
    n_examples: dict[str, int]
    seconds: float


def _pick_score(task_result: dict[str, Any], metric: str) -> float:
    for key, value in task_result.items():
        if key.split(",")[0] == metric and not key.endswith("_stderr") and "stderr" not in key:
            return float(value) * 100.0
    raise KeyError(f"metric {metric!r} not in lm-eval result keys {sorted(task_result)}")


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    specs: list[TaskSpec],
    lm_eval_tasks: list[str] | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
) -> EvalResult:
    """Evaluate ``model`` on local task specs and lm-eval built-in tasks; returns scores in points."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    builtin = [t[len(LM_EVAL_PREFIX):] for t in (lm_eval_tasks or [])]
    # indexing lm-eval's ~14k built-in task YAMLs costs seconds: only do it when a built-in task is asked for
    manager = TaskManager(include_defaults=bool(builtin), verbosity="ERROR")
    task_list: list[Any] = [lm_eval_task_config(s) for s in specs] + builtin
    metric_of = {s.name: ("acc" if s.output_type == "multiple_choice" else "exact_match") for s in specs}
    try:
        with torch.no_grad():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=task_list, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                bootstrap_iters=0, log_samples=False, verbosity="ERROR",
                # leave the training RNG streams untouched: greedy evaluation needs no randomness
                random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=1234,
            )
    finally:
        model.train(was_training)
    results = out["results"]
    scores, counts = {}, {}
    for name, res in results.items():
        if name in metric_of:
            scores[name] = _pick_score(res, metric_of[name])
        elif name in builtin:
            metric = "acc_norm" if any(k.startswith("acc_norm,") for k in res) else (
                "acc" if any(k.startswith("acc,") for k in res) else "exact_match")
            scores[name] = _pick_score(res, metric)
        n = out.get("n-samples", {}).get(name, {})
        counts[name] = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else 0
    missing = [s.name for s in specs if s.name not in scores]
    if missing:
        raise RuntimeError(f"lm-eval returned no score for {missing}")
    return EvalResult(scores=scores, n_examples=counts, seconds=time.perf_counter() - t0)
