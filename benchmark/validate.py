"""Check everything about a run before any work starts: one :class:`UserError` naming the field and the value.

Called by ``run`` (and its ``--dry-run``) before anything is written, so a typo costs seconds, not an hour.
Checks, in order: names and method options (:func:`benchmark.plan.make_plan`), the output directory, the model
(a local path must exist and hold ``config.json``; its module names are read from a model built on the ``meta``
device, so no weight is loaded), each method against those module names (:meth:`Method.validate`), every
record of every task split (non-empty, templates render, a target exists and is one of the choices), and the
results directory (a finished run or a checkpoint made with other settings is not silently mixed in).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from benchmark import checkpoint
from benchmark.builtin_models import BUILTIN_MODELS
from benchmark.config import TINY_WORLD, ExperimentConfig, ModelConfig
from benchmark.errors import UserError
from benchmark.paths import checkpoint_dir, record_path
from benchmark.plan import Plan, make_plan, run_inputs
from benchmark.records import finished_result, first_difference
from benchmark.reference import all_runs
from benchmark.sharding import check_launch, resolve_sharding
from benchmark.trackers import check_trackers
from methods import METHODS
from tasks import SUITES
from tasks.templates import compiled_template

logger = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def validate(cfg: ExperimentConfig, force: bool = False, job_processes: int | None = None) -> Plan:
    """The validated :class:`Plan` of ``cfg``; raises :class:`UserError` on the first problem found.

    ``job_processes``: with ``--launcher``, how many processes each job will start (they, not this process,
    form the distributed group a sharded run needs).
    """
    plan = make_plan(cfg)
    check_output(cfg.output)
    names = model_module_names(cfg.model)
    for name, (cls, mcfg) in plan.methods.items():
        check_method(name, cls, mcfg, names)
        if cls(mcfg).uses_general_text():
            check_corpus(name, plan)
    check_sharding(plan, job_processes)
    check_trackers(cfg.report_to)
    for spec in plan.tasks + plan.general:
        check_task_data(spec)
    check_existing(plan, force)
    return plan


def check_output(output: str) -> None:
    """The output directory is a directory we can write to (or can be created)."""
    p = Path(output).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"invalid output: {output!r} exists and is not a directory")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"invalid output: {output!r} is not writable ({str(parent)!r})")


# -- the model --------------------------------------------------------------------------------------------
def _meta_module_names(config: Any, trust_remote_code: bool) -> set[str]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {n for n, _ in model.named_modules() if n}


def model_module_names(mcfg: ModelConfig) -> set[str]:
    """Dotted module names of the base model, from its config alone (built on ``meta``: no weights, no memory)."""
    from transformers import AutoConfig, LlamaConfig  # deferred: transformers takes seconds to import

    if mcfg.name in BUILTIN_MODELS:  # its architecture is pinned with it: checked without fetching anything
        return _meta_module_names(LlamaConfig(**BUILTIN_MODELS[mcfg.name].llama_config), False)
    if mcfg.name == TINY_WORLD:
        p = mcfg.pretrain  # the tiny-world model is a Llama (benchmark.models.pretrain_tinyworld)
        config = LlamaConfig(vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
                             num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads,
                             num_key_value_heads=p.num_heads, tie_word_embeddings=True)
        return _meta_module_names(config, False)
    name = mcfg.name
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise UserError(f"invalid model: {name!r} is not a model directory (no config.json)")
    elif name.startswith((".", "/", "~")) or ".." in name or not _HUB_ID.match(name):
        raise UserError(f"model path does not exist: {name!r}")
    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else name,
                                            revision=None if local.exists() else getattr(mcfg, "revision", None),
                                            trust_remote_code=mcfg.trust_remote_code)
        return _meta_module_names(config, mcfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        msg = " ".join(str(exc).split())
        if "trust_remote_code" in msg and not mcfg.trust_remote_code:
            raise UserError(f"model {name!r} needs its own code from the model repository; pass "
                            f"--trust-remote-code only if you trust it") from exc
        raise UserError(f"cannot load model config of {name!r}: {msg[:300]}") from exc


def check_method(name: str, cls: type, mcfg: Any, module_names: set[str]) -> None:
    """Let the method check its options against the model (optional ``validate`` hook)."""
    hook = getattr(cls(mcfg), "validate", None)
    if hook is None:
        return
    try:
        hook(module_names)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"methods.{name}: {exc.args[0] if exc.args else exc}") from exc


def check_sharding(plan: Plan, job_processes: int | None = None) -> None:
    """Under FSDP only shardable methods run, and only under a launcher.

    An accelerate FSDP launch config turns ``train.sharding`` to ``fsdp`` here, so the record says how the run
    was made (and a checkpoint of an unsharded run is not resumed sharded without notice).
    """
    cfg = plan.cfg
    cfg.train.sharding = resolve_sharding(cfg.train.sharding)
    if cfg.train.sharding != "fsdp":
        return
    refused = [n for n, (cls, _) in plan.methods.items() if not cls.shardable]
    if refused:
        able = [n for n in METHODS.names() if METHODS.get(n).shardable]
        raise UserError(f"train.sharding=fsdp: method(s) {', '.join(refused)} cannot run sharded (they need whole "
                        f"parameters or add parameters mid-run); methods that can: {', '.join(able)}")
    if job_processes is None:
        check_launch(cfg.train.sharding)
    elif job_processes < 2:  # a one-task job gets no rendezvous variables: nothing to shard over
        raise UserError(f"train.sharding=fsdp with --launcher needs --gpus-per-run of 2 or more (one job of several "
                        f"processes per run); got {job_processes}")


def check_corpus(name: str, plan: Plan) -> None:
    """A method that replays general text needs a general suite with a corpus file."""
    suite = plan.sequence.general
    path = suite.corpus_path()
    if path is None:
        with_corpus = sorted(n for n in SUITES.names() if SUITES.get(n).corpus)
        raise UserError(f"methods.{name}: replays general text, but general suite {suite.name!r} has no corpus "
                        f"(suites with one: {', '.join(with_corpus) or 'none'})")
    if not path.is_file():
        raise UserError(f"general suite {suite.name!r}: corpus {str(path)!r} does not exist")


# -- task data ----------------------------------------------------------------------------------------------
def _split_names(spec: Any) -> list[str]:
    return list(getattr(spec, "splits", None) or sorted(spec.data))


def _load_split(spec: Any, split: str) -> list[Any]:
    """Records of one split; a plain JSONL file is parsed here to name the bad line."""
    if getattr(spec, "source", None) is None and getattr(spec, "preprocess", None) is None:
        path = spec.path(split)
        records = []
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, start=1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise UserError(f"task {spec.name!r}: {split} data {str(path)!r} line {n} is not "
                                            f"valid JSON ({exc.msg})") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"task {spec.name!r}: cannot read {split} data {str(path)!r}: {exc}") from exc
        return records
    try:
        return spec.records(split)
    except UserError:
        raise
    except Exception as exc:  # an upstream dataset that is missing or malformed: one line, not a traceback
        raise UserError(f"task {spec.name!r}: cannot load the {split} split: {type(exc).__name__}: {exc}") from exc


def check_task_data(spec: Any) -> None:
    """Every split is non-empty and every record renders, with a non-empty target that is one of its choices."""
    # compiled in lm-eval's own Jinja environment (StrictUndefined), as rendered at training and evaluation
    prompt = compiled_template(spec.prompt)
    mc = spec.output_type == "multiple_choice"
    choices = compiled_template("{{" + spec.choices + "}}") if mc else None
    for split in _split_names(spec):
        records = _load_split(spec, split)
        if not records:
            raise UserError(f"task {spec.name!r}: the {split} split is empty")
        eval_target = getattr(spec, "eval_target", None) if split == "test" else None
        target = compiled_template(eval_target or spec.target)
        for i, rec in enumerate(records):
            where = f"task {spec.name!r}: {split} record {i}"
            if not isinstance(rec, dict):
                raise UserError(f"{where} is not a JSON object: {str(rec)[:80]!r}")
            if split == "train" and spec.train_format == "full" and rec.get("text"):
                continue
            try:
                prompt.render(**rec)
                tgt = target.render(**rec)
                opts = ast.literal_eval(choices.render(**rec)) if mc else None
            except Exception as exc:  # jinja UndefinedError, literal_eval's ValueError/SyntaxError
                raise UserError(f"{where}: template does not render: {exc}") from exc
            if mc:
                _check_choice(where, tgt, opts)
            elif not tgt.strip():
                raise UserError(f"{where}: empty target {tgt!r}")


def _check_choice(where: str, target: str, options: Any) -> None:
    if not isinstance(options, (list, tuple)) or len(options) < 2:
        raise UserError(f"{where}: choices must be a list of at least 2 options, got {options!r}")
    t = target.strip()
    if t.isdigit():  # lm-eval reads a digit string as the index of the gold choice
        if int(t) >= len(options):
            raise UserError(f"{where}: target index {int(t)} is not among its {len(options)} choices")
    elif t not in options:
        raise UserError(f"{where}: target {t!r} is not one of its choices {list(options)!r}")


# -- what is already in the results directory -----------------------------------------------------------
def check_existing(plan: Plan, force: bool) -> None:
    """A finished run or a checkpoint in the output directory must match this run's settings (or ``force``)."""
    if force:
        return
    out = plan.cfg.output
    for run in all_runs(plan):
        new = run_inputs(plan, run)
        rp = record_path(out, run.run_id)
        done, diff = finished_result(rp, new)  # unreadable: the run is simply redone
        if done is not None and diff:
            raise UserError(f"{str(rp)!r} holds finished run {run.run_id} made with other settings ({diff}); "
                            f"use --force to redo it, or another --output")
        meta = checkpoint.latest_meta(checkpoint_dir(out, run.run_id))
        if meta is not None:
            diff = first_difference(meta.get("inputs"), new)
            if diff:
                raise UserError(f"the checkpoint of run {run.run_id} was made with other settings ({diff}); use "
                                f"--force to start it over, or another --output")
            problem = checkpoint.thread_mismatch(meta.get("torch_threads"), plan.cfg.num_threads)
            if problem:
                raise UserError(f"run {run.run_id}: {problem}; use --set num_threads={meta['torch_threads']}, "
                                f"or --force to start over")
