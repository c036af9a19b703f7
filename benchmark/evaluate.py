"""Evaluation through lm-eval, in-process, on the model already in memory.

Downstream and local general tasks are turned into lm-eval task configs (a dict per task, with the records
handed over through ``custom_dataset`` so no data file is cached by path and mtime); lm-eval's own tasks are
referred to by name (``lm_eval:mmlu``), with a few-shot count per task: lm-eval applies one
``num_fewshot`` to all the tasks of a call, so tasks are evaluated in one call per distinct few-shot count. Every
evaluation is deterministic: greedy generation, log-likelihood multiple choice, a fixed batch size.
"""

from __future__ import annotations

import ast
import functools
import logging
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from benchmark import textmetrics
from benchmark.progress import bars_disabled
from benchmark.samples import check_log_samples, sample_rows
from tasks.base import TaskSpec
from tasks.templates import render

logger = logging.getLogger(__name__)
LM_EVAL_PREFIX = "lm_eval:"
# lm-eval metric names tried in order for a built-in task when the suite names none
METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match")
FEWSHOT_SEED = 1234  # seed of lm-eval's few-shot example sampling (as in lm-eval's own runs)


def _records_dataset(spec: TaskSpec, **_: Any):
    """``custom_dataset`` callable: the spec's test records as a ``datasets.DatasetDict``."""
    import datasets  # deferred: a heavy import that only an evaluation needs

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(spec.records("test"))})


@dataclass(frozen=True)
class DocField:
    """``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` as a callable that returns exactly what lm-eval
    (0.4) returns for the template string (a field name -> that field; else the rendered template, read as a
    number or list where lm-eval reads it so), without recompiling the template per document."""

    template: str
    role: str  # "text", "target" or "choice"
    has_choices: bool

    def __call__(self, doc: dict[str, Any]) -> Any:
        if self.template in doc:
            return doc[self.template]
        text = render(self.template, doc)
        if self.role == "choice" or (text.isdigit() and self.has_choices):
            return ast.literal_eval(text)
        if self.role == "target" and len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text


def _metric_entry(metric: str) -> dict[str, Any]:
    """lm-eval ``metric_list`` entry; text-overlap metrics are plain functions from :mod:`benchmark.textmetrics`."""
    if metric in ("rouge_l", "edit_sim"):
        return {"metric": getattr(textmetrics, metric), "aggregation": "mean", "higher_is_better": True}
    return {"metric": metric, "aggregation": "mean", "higher_is_better": True}


def lm_eval_task_config(spec: TaskSpec) -> dict[str, Any]:
    """The lm-eval task config of a :class:`TaskSpec` (same templates as training)."""
    mc = spec.output_type == "multiple_choice"
    cfg: dict[str, Any] = {
        "task": spec.name,
        "custom_dataset": functools.partial(_records_dataset, spec),
        "test_split": "test",
        "output_type": spec.output_type,
        "doc_to_text": DocField(spec.prompt, "text", mc),
        "doc_to_target": DocField(spec.eval_target or spec.target, "target", mc),
        "target_delimiter": spec.target_delimiter,
        "num_fewshot": 0,
        "metadata": {"version": spec.version},
    }
    if spec.output_type == "multiple_choice":
        cfg["doc_to_choice"] = DocField("{{" + spec.choices + "}}", "choice", True)
        cfg["metric_list"] = [_metric_entry("acc")]
    else:
        cfg["generation_kwargs"] = {"until": list(spec.until), "do_sample": False, "max_gen_toks": spec.max_gen_toks}
        cfg["metric_list"] = [_metric_entry(spec.metric)]
        # the model writes " negative" after "Sentiment:"; compare without the delimiter's whitespace
        steps: list[dict[str, Any]] = [{"function": "remove_whitespace"}]
        if spec.answer_regex:
            steps.append({"function": "regex", "regex_pattern": spec.answer_regex, "group_select": 0})
        cfg["filter_list"] = [{"name": "strip", "filter": steps + [{"function": "take_first"}]}]
    return cfg


def spec_metric(spec: TaskSpec) -> str:
    """The metric a spec is scored by (multiple choice: log-likelihood accuracy)."""
    return "acc" if spec.output_type == "multiple_choice" else spec.metric


@dataclass
class EvalResult:
    """Scores in points (0-100) per task, the number of examples scored, and the wall time.

    ``metrics`` names the lm-eval result key each score came from and ``fewshot`` the few-shot count lm-eval
    used (for groups such as ``mmlu``: the score of the group, its subtasks' examples summed).
    """

    scores: dict[str, float]
    n_examples: dict[str, int]
    seconds: float
    metrics: dict[str, str] = field(default_factory=dict)
    fewshot: dict[str, int | None] = field(default_factory=dict)
    # task -> per-sample rows (benchmark/samples.py); only with log_samples, lm-eval subtasks under their own names
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _find_key(task_result: dict[str, Any], metric: str) -> str | None:
    """The lm-eval result key for ``metric`` (``name`` or ``name,filter``), ignoring stderr entries."""
    if "," in metric:
        return metric if metric in task_result else None
    for key in task_result:
        if key.split(",")[0] == metric and "stderr" not in key:
            return key
    return None


def _pick_score(task_result: dict[str, Any], metric: str) -> float:
    key = _find_key(task_result, metric)
    if key is None:
        raise KeyError(f"metric {metric!r} not in lm-eval result keys {sorted(task_result)}")
    return float(task_result[key]) * 100.0


def _builtin_score(out: dict[str, Any], name: str, metric: str | None) -> tuple[float, str, int]:
    """(score, metric key, examples) of an lm-eval task or group; a group without an aggregate is averaged."""
    res = out.get("results", {}).get(name) or out.get("groups", {}).get(name) or {}
    for m in [metric] if metric else METRIC_PREFERENCE:
        key = _find_key(res, m)
        if key is not None and isinstance(res[key], (int, float)):
            return float(res[key]) * 100.0, key, _count(out, name)
    subtasks = out.get("group_subtasks", {}).get(name)
    if subtasks:  # a group with no aggregate metric: mean over its subtasks
        parts = [_builtin_score(out, s, metric) for s in subtasks]
        return sum(p[0] for p in parts) / len(parts), parts[0][1], sum(p[2] for p in parts)
    raise KeyError(f"lm-eval returned no {metric or '/'.join(METRIC_PREFERENCE)} score for {name!r} "
                   f"(keys: {sorted(res)})")


def _count(out: dict[str, Any], name: str) -> int:
    n = out.get("n-samples", {}).get(name)
    if isinstance(n, dict):
        return int(n.get("effective", n.get("original", 0)))
    return sum(_count(out, s) for s in out.get("group_subtasks", {}).get(name, []))


def _fewshot_groups(builtin: list[str], fewshot: dict[str, int | None] | None,
                    num_fewshot: int | None) -> dict[int | None, list[str]]:
    """Built-in task names grouped by few-shot count (None: the task's own default)."""
    groups: dict[int | None, list[str]] = {}
    for name in builtin:
        k = (fewshot or {}).get(name, (fewshot or {}).get(LM_EVAL_PREFIX + name, num_fewshot))
        groups.setdefault(k, []).append(name)
    return groups


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    specs: list[TaskSpec],
    lm_eval_tasks: list[str] | None = None,
    batch_size: int | str = 64,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    fewshot: dict[str, int | None] | None = None,
    metrics: dict[str, str] | None = None,
    include_path: str | None = None,
    apply_chat_template: bool = False,
    log_samples: str = "none",
) -> EvalResult:
    """Evaluate ``model`` on local task specs and lm-eval tasks; returns scores in points.

    Args:
        lm_eval_tasks: lm-eval task or group names, with or without the ``lm_eval:`` prefix.
        batch_size: a fixed batch size, or ``"auto"``: lm-eval's largest that fits (from 64 down, on OOM).
        limit: examples per task (an int), or a fraction in (0, 1) of each task's examples (lm-eval's float limit).
        num_fewshot: few-shot count of lm-eval tasks not in ``fewshot`` (None: each task's own default);
            local specs are always zero-shot.
        fewshot, metrics: per lm-eval task few-shot count and result key (e.g. ``exact_match,strict-match``).
        include_path: folder of extra lm-eval task YAMLs (e.g. offline copies of built-in tasks).
        apply_chat_template: format every prompt with the tokenizer's chat template (instruction models);
            training must then use it too (:func:`benchmark.data.encode_task`).
        log_samples: per-sample rows in ``EvalResult.samples``: ``local`` (of ``specs``), ``all`` (lm-eval's
            tasks too) or ``none``. Scores are the same either way.
    """
    from lm_eval.tasks import TaskManager  # deferred: lm-eval takes seconds to import

    check_log_samples(log_samples)

    t0 = time.perf_counter()
    was_training = model.training
    # add_bos_token unset: the tokenizer's own BOS policy, the rule training follows (benchmark/tokens.py)
    lm = _memo_hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                            add_bos_token=None)
    builtin = [t[len(LM_EVAL_PREFIX):] if t.startswith(LM_EVAL_PREFIX) else t for t in (lm_eval_tasks or [])]
    metric_of = {(k[len(LM_EVAL_PREFIX):] if k.startswith(LM_EVAL_PREFIX) else k): v
                 for k, v in (metrics or {}).items()}
    # indexing lm-eval's ~14k built-in task YAMLs costs seconds: only do it when a built-in task is asked for
    manager = TaskManager(include_path=include_path, include_defaults=bool(builtin) and not all_included(
        builtin, include_path), verbosity="ERROR")
    calls: list[tuple[int | None, list[Any]]] = []
    groups = _fewshot_groups(builtin, fewshot, num_fewshot)
    local = [lm_eval_task_config(s) for s in specs]
    if local or None in groups:
        calls.append((None, local + groups.pop(None, [])))
    calls += sorted(groups.items(), key=lambda kv: kv[0])
    scores: dict[str, float] = {}
    counts: dict[str, int] = {}
    used: dict[str, str] = {}
    shots: dict[str, int | None] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    local_names = {s.name for s in specs}
    try:
        with torch.no_grad():
            for k, task_list in calls:
                # "local": only the call holding the specs (task configs, not names) logs; only theirs are kept
                has_local = any(isinstance(t, dict) for t in task_list)
                log = log_samples == "all" or (log_samples == "local" and has_local)
                out = _run_lm_eval(lm, manager, task_list, k, limit, apply_chat_template, log_samples=log)
                for name, logged in (out.get("samples") or {}).items():
                    if log_samples == "all" or name in local_names:
                        output_type = (out.get("configs", {}).get(name) or {}).get("output_type", "")
                        samples[name] = sample_rows(name, output_type, logged)
                for s in specs:
                    if s.name in out["results"] and s.name not in scores:
                        key = _find_key(out["results"][s.name], spec_metric(s))
                        scores[s.name] = _pick_score(out["results"][s.name], spec_metric(s))
                        used[s.name], counts[s.name], shots[s.name] = key or "", _count(out, s.name), 0
                for name in task_list:
                    if isinstance(name, str):
                        scores[name], used[name], counts[name] = _builtin_score(out, name, metric_of.get(name))
                        shots[name] = out.get("n-shot", {}).get(name, k)
    finally:
        model.train(was_training)
    missing = [s.name for s in specs if s.name not in scores]
    if missing:
        raise RuntimeError(f"lm-eval returned no score for {missing}")
    return EvalResult(scores=scores, n_examples=counts, seconds=time.perf_counter() - t0, metrics=used,
                      fewshot=shots, samples=samples)


# tokenizer -> {(string, add_special_tokens, left_truncate_len, add_bos_token, vocab size): token ids}
_TOKEN_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKEN_MEMO_MAX = 100_000


@functools.cache
def _memo_hflm_class() -> type:
    """lm-eval's ``HFLM`` with ``tok_encode`` memoised per tokenizer.

    Every stage evaluates the same requests with the same tokenizer, and the four choices of a question share
    its context: lm-eval encodes each (context, continuation) pair twice per request, so most of its ~2 calls
    per request repeat earlier ones. Memoising returns identical ids (a copy) without re-running the tokenizer.
    """
    from lm_eval.models.huggingface import HFLM  # deferred: lm-eval takes seconds to import

    class MemoHFLM(HFLM):
        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
            # keywords, not positions: lm-eval has reordered these parameters between releases
            if kwargs:
                return super().tok_encode(string, add_special_tokens=add_special_tokens,
                                          left_truncate_len=left_truncate_len, **kwargs)
            memo = _TOKEN_MEMO.setdefault(self.tokenizer, {})
            key = (string, add_special_tokens, left_truncate_len, self.add_bos_token, len(self.tokenizer))
            ids = memo.get(key)
            if ids is None:
                ids = super().tok_encode(string, add_special_tokens=add_special_tokens,
                                         left_truncate_len=left_truncate_len)
                if len(memo) < _TOKEN_MEMO_MAX:  # bounded: large suites (e.g. 5-shot MMLU) keep their memory
                    memo[key] = ids
            return list(ids)

        # lm-eval's request bars pass `disable=` themselves, so TQDM_DISABLE alone leaves them on: `-q` turns
        # them off through the model API's own `disable_tqdm` argument
        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or bars_disabled())

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or bars_disabled())

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            return super().generate_until(requests, disable_tqdm=disable_tqdm or bars_disabled())

    return MemoHFLM


def _run_lm_eval(lm: Any, manager: Any, task_list: list[Any], num_fewshot: int | None,
                 limit: int | float | None, chat: bool, log_samples: bool = False) -> dict[str, Any]:
    """What ``lm_eval.simple_evaluate`` does for an in-memory model, minus its environment report.

    ``simple_evaluate`` ends every call by collecting ``torch.utils.collect_env`` and git information for its
    results (subprocesses such as ``pip list``: about a second per evaluation, i.e. per stage) that are not kept
    here. This applies the same per-task settings -- the few-shot count (an explicit 0 in a task config wins, as
    there) and the few-shot sampling seed -- and calls ``lm_eval.evaluate``. No global seed is set, so the
    training RNG streams are left untouched (greedy evaluation needs no randomness). ``log_samples`` only adds
    lm-eval's per-sample log (``out["samples"]``) to the result; the scores are computed the same way.
    """
    import lm_eval  # deferred: lm-eval takes seconds to import

    loaded = manager.load(task_list)
    for task in loaded["tasks"].values():
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif num_fewshot is None and default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return lm_eval.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=log_samples,
                            apply_chat_template=chat, fewshot_as_multiturn=chat)


def all_included(builtin: list[str], include_path: str | None) -> bool:
    """True when every requested lm-eval task is defined under ``include_path`` (no need to index lm-eval's)."""
    if not include_path:
        return False
    names: set[str] = set()
    for p in Path(include_path).rglob("*.yaml"):
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            continue  # lm-eval YAMLs may use tags like !function; lm-eval itself reads those
        if isinstance(doc, dict):
            names.update(str(doc[k]) for k in ("task", "group") if isinstance(doc.get(k), str))
    return set(builtin) <= names
