"""Evaluation throughput at SmolLM2-135M's shape through the harness's ``benchmark.evaluate.evaluate``.

The model: a randomly initialised ``LlamaForCausalLM`` of SmolLM2-135M's shape (30 layers, hidden 576, FFN 1536,
9 / 3 heads, vocab 49,152, tied embeddings: ``bench_train_step.SMOLLM2``), the same compute per token as the real
checkpoint. The tokenizer: the real one is not available offline here, and a tokenizer cannot be resized to the
model, so a smaller one is used -- every id it produces is in the model's range: the byte-level BPE of
``tests/tokenizer_families.py`` (GPT-2 / SmolLM2 style, no BOS) trained on the tiny-world texts with vocabulary
``--tok-vocab`` (default 49,152, which the small corpus saturates at about 5,400 tokens: every task word one
token, as a large vocabulary does for common words; the real tokenizer splits rarer names, so its prompts are
somewhat longer -- the mean tokens per request are printed for comparison). ``--pretrained DIR`` instead loads a
local Hugging Face checkpoint and its own tokenizer (the real SmolLM2-135M, once it is available).

Timed, interleaved rounds after one warm-up each (same batch size, the harness's eval.batch_size 64):

  lm-eval mc   ``evaluate`` on the tiny-world general suite (tw_capital, tw_continent, tw_currency, tw_element:
               4-way multiple choice by log-likelihood), set-up included, as the harness runs it after each stage
  plain mc     the plain batched log-likelihood loop of ``scripts/bench_eval.py`` on the same questions (the
               reference for lm-eval's overhead; issue 9's goal: lm-eval speed >= 0.8x plain)
  lm-eval gen  ``evaluate`` on generative tasks (default tw_add, tw_sentiment: greedy, until "\\n\\n", capped by
               each task's max_gen_toks, 4 and 8). A random model never writes the stop string, so every
               generation runs to the cap: an upper bound of the real model's generation time per example.

``--limit`` questions per task (default 40) keeps one run within about 5 minutes on 2 loaded CPU cores; examples/s
is per scored example (a multiple-choice question = 4 requests). One torch thread unless ``--threads``.

Usage: python scripts/bench_eval_smollm2.py [--rounds 3] [--limit 40] [--batch-size 64] [--threads 1]
       [--gen tw_add,tw_sentiment] [--pretrained DIR] [--device cuda --dtype bf16].
Writes results/bench/eval_smollm2.json (``--tok-vocab N``: eval_smollm2_tokN.json; ``--pretrained``:
eval_smollm2_pretrained.json).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from bench_eval import GOAL, encode_pair, plain_accuracy
from bench_train_step import SMOLLM2, build_model
from benchlib import (device_and_dtype, fmt_table, interleaved, medians, offline_env, ratio_row, verdict,
                      write_result)

MC_TASKS = ["tw_capital", "tw_continent", "tw_currency", "tw_element"]


def load_model(a: argparse.Namespace, device: Any, dtype: Any) -> tuple[Any, Any, str]:
    """(model in eval mode, tokenizer, description)."""
    if a.pretrained:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(a.pretrained, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(a.pretrained)
        return model.to(device).eval(), tok, f"pretrained {a.pretrained}"
    from tests.tokenizer_families import bytelevel_nobos

    tok = bytelevel_nobos(vocab_size=a.tok_vocab)
    model = build_model(SMOLLM2, device, dtype).eval()
    assert len(tok) <= model.config.vocab_size
    return model, tok, (f"random-weight SmolLM2-135M shape (vocab {model.config.vocab_size}), byte-level BPE "
                        f"tokenizer of {len(tok)} tokens trained on the tiny-world texts")


def mc_tokens(tok: Any, specs: list[Any], limit: int | None) -> dict[str, float]:
    """Mean tokens per multiple-choice request (context + continuation), per task."""
    from tasks.templates import choice_list, render

    out = {}
    for spec in specs:
        n = []
        for rec in spec.records("test")[:limit]:
            context = render(spec.prompt, rec)
            for c in choice_list(spec, rec):
                ctx, cont = encode_pair(tok, context, spec.target_delimiter + c)
                n.append(len(ctx) + len(cont))
        out[spec.name] = sum(n) / len(n)
    return out


def gen_tokens(tok: Any, specs: list[Any], limit: int | None) -> dict[str, float]:
    """Mean prompt tokens per generative example, per task."""
    from tasks.templates import render

    return {s.name: sum(len(tok(render(s.prompt, r), add_special_tokens=False)["input_ids"])
                        for r in s.records("test")[:limit]) / len(s.records("test")[:limit]) for s in specs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=40, help="examples per task (0: all)")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per forward (the harness's eval.batch_size)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    ap.add_argument("--gen", default="tw_add,tw_sentiment", help="comma-separated generative tasks ('': none)")
    ap.add_argument("--tok-vocab", type=int, default=49152, help="vocabulary the stand-in tokenizer is trained to")
    ap.add_argument("--pretrained", help="a local Hugging Face checkpoint folder instead of the random model")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    a = ap.parse_args(argv)
    offline_env()
    import torch

    from benchmark.evaluate import evaluate
    from tasks import TASKS

    if a.threads:
        torch.set_num_threads(a.threads)
    limit = a.limit or None
    device, dtype, sync = device_and_dtype(a.device, a.dtype)
    model, tok, what = load_model(a, device, dtype)
    mc = [TASKS.get(n) for n in MC_TASKS]
    gen = [TASKS.get(n.strip()) for n in a.gen.split(",") if n.strip()]
    out: dict[str, dict[str, float]] = {}

    def run_eval(key: str, specs: list[Any]) -> None:
        out[key] = evaluate(model, tok, specs, batch_size=a.batch_size, limit=limit).scores

    variants = {
        "lm-eval mc": lambda: run_eval("lm-eval mc", mc),
        "plain mc": lambda: out.__setitem__("plain mc", plain_accuracy(model, tok, mc, a.batch_size, limit, device)),
    }
    if gen:
        variants["lm-eval gen"] = lambda: run_eval("lm-eval gen", gen)
    load0 = os.getloadavg()
    times = interleaved(variants, rounds=a.rounds, warmup=1, sync=sync)
    load1 = os.getloadavg()
    med = medians(times)
    n_mc = sum(len(s.records("test")[:limit]) for s in mc)
    n_gen = sum(len(s.records("test")[:limit]) for s in gen)
    count = {"lm-eval mc": n_mc, "plain mc": n_mc, "lm-eval gen": n_gen}
    speed = {"of_medians": med["plain mc"] / med["lm-eval mc"],
             "paired": 1.0 / ratio_row(times, "lm-eval mc", "plain mc")["paired"]}
    same = all(abs(out["lm-eval mc"][s.name] - out["plain mc"][s.name]) < 1e-9 for s in mc)
    toks_mc, toks_gen = mc_tokens(tok, mc, limit), gen_tokens(tok, gen, limit)
    print(f"\n{what}; device={device} dtype={a.dtype} threads={torch.get_num_threads()} batch {a.batch_size} rows, "
          f"rounds={a.rounds}, limit {limit} per task; load avg {load0[0]:.2f} -> {load1[0]:.2f}")
    print(fmt_table([[k, count[k], med[k], count[k] / med[k]] for k in variants],
                    ["path", "examples", "median s", "examples/s"]))
    print("mean tokens per request: " + ", ".join(f"{k} {v:.1f}" for k, v in {**toks_mc, **toks_gen}.items())
          + "; max_gen_toks: " + ", ".join(f"{s.name} {s.max_gen_toks}" for s in gen))
    print(f"lm-eval mc speed / plain loop speed: {speed['paired']:.3f} paired, {speed['of_medians']:.3f} of medians "
          f"(goal >= {GOAL}): {verdict(speed['paired'], '>=', GOAL)}; same accuracy: {same}")
    custom = not a.pretrained and a.tok_vocab != 49152  # its own file: the default figures stay
    write_result("eval_smollm2" + (f"_tok{a.tok_vocab}" if custom else "_pretrained" if a.pretrained else ""), {
        "model": what, "shape": None if a.pretrained else SMOLLM2, "tokenizer_size": len(tok),
        "mc_tasks": MC_TASKS, "gen_tasks": [s.name for s in gen],
        "max_gen_toks": {s.name: s.max_gen_toks for s in gen},
        "limit": limit, "examples": count, "batch_size": a.batch_size, "device": str(device), "dtype": a.dtype,
        "threads": torch.get_num_threads(), "rounds": a.rounds, "load_avg_before": list(load0),
        "load_avg_after": list(load1), "median_s": med, "times_s": times,
        "examples_per_s": {k: count[k] / med[k] for k in variants}, "mean_tokens_per_request": {**toks_mc, **toks_gen},
        "speed_ratio_lm_eval_vs_plain": speed, "same_accuracy": same, "accuracy": out})
    return {"speed": speed, "same": same, "examples_per_s": {k: count[k] / med[k] for k in variants}}


if __name__ == "__main__":
    main()
