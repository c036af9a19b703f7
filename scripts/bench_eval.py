"""Evaluation throughput: the general suite through lm-eval (the harness's path) against a plain batched loop.

Same model (the cached tiny-world base, built first if missing), same questions (the tiny-world general suite:
974 four-way multiple-choice questions), same batch size (rows per forward):

  lm-eval  ``benchmark.evaluate.evaluate`` -- what the harness runs after every stage, set-up included
           (``HFLM`` on the in-memory model, task building, request tokenisation, scoring)
  plain    a loop written here: render each prompt, tokenise context and continuations as lm-eval does (trailing
           context spaces move to the continuation; the continuation is the tail of the whole encoding), batch the
           4 choices of each question right-padded, one forward, sum the continuation tokens' log-probs, argmax

Goal (issue 9): lm-eval speed >= 0.8x the plain loop's (questions/s), with the same accuracy per task.
Interleaved rounds after one warm-up each; medians and paired ratios.

Usage: python scripts/bench_eval.py [--rounds 3] [--batch-size 64] [--limit N] [--device cuda --dtype bf16].
Writes results/bench/eval.json.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchlib import (device_and_dtype, fmt_table, interleaved, medians, offline_env, ratio_row, verdict,
                      write_result)

GOAL = 0.8


def load_suite(dtype: Any, device: Any) -> tuple[Any, Any, list[Any]]:
    """(model, tokenizer, general task specs) of the default tiny-world plan."""
    from benchmark.config import make_config
    from benchmark.models import load_base
    from benchmark.plan import make_plan
    from benchmark.runner import base_model_path

    plan = make_plan(make_config({"methods": ["lora"]}))
    model, tok = load_base(plan.cfg.model, base_model_path(plan, quiet=True))
    return model.to(device=device, dtype=dtype).eval(), tok, plan.general


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into token ids for a causal model."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def plain_accuracy(model: Any, tok: Any, specs: list[Any], batch_rows: int, limit: int | None,
                   device: Any) -> dict[str, float]:
    """Accuracy (points) per task by the plain batched log-likelihood loop."""
    import torch

    from tasks.templates import choice_list, render

    scores = {}
    step = max(1, batch_rows // 4) * 4  # whole questions per batch
    for spec in specs:
        records = spec.records("test")[:limit]
        rows, owner, golds = [], [], []
        for q, rec in enumerate(records):
            context = render(spec.prompt, rec)
            golds.append(int(render(spec.target, rec)))
            for c in choice_list(spec, rec):
                rows.append(encode_pair(tok, context, spec.target_delimiter + c))
                owner.append(q)
        lls = []
        with torch.inference_mode():
            for b in range(0, len(rows), step):
                chunk = rows[b:b + step]
                seqs = [(c + k)[:-1] for c, k in chunk]  # the last token is only predicted, never input
                width = max(len(s) for s in seqs)
                # right padding needs no attention mask: causal attention never lets a real position see it
                ids = torch.full((len(seqs), width), tok.pad_token_id or 0, dtype=torch.long)
                tgt = torch.zeros_like(ids)
                cont = torch.zeros(ids.shape, dtype=torch.bool)
                for i, ((c, k), s) in enumerate(zip(chunk, seqs)):
                    ids[i, :len(s)] = torch.tensor(s)
                    tgt[i, len(c) - 1:len(c) + len(k) - 1] = torch.tensor(k)
                    cont[i, len(c) - 1:len(c) + len(k) - 1] = True
                logp = torch.log_softmax(model(input_ids=ids.to(device)).logits.float(), dim=-1)
                tok_lp = logp.gather(-1, tgt.to(device).unsqueeze(-1)).squeeze(-1).cpu()
                lls += tok_lp.masked_fill(~cont, 0.0).sum(-1).tolist()
        best: dict[int, tuple[float, int]] = {}
        first: dict[int, int] = {}
        for row, (q, ll) in enumerate(zip(owner, lls)):
            first.setdefault(q, row)
            if q not in best or ll > best[q][0]:  # the first maximum wins, as numpy's argmax in lm-eval
                best[q] = (ll, row - first[q])
        scores[spec.name] = 100.0 * sum(best[q][1] == g for q, g in enumerate(golds)) / len(golds)
    return scores


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64, help="rows per forward (the harness's eval.batch_size)")
    ap.add_argument("--limit", type=int, help="questions per task (default: all)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    a = ap.parse_args(argv)
    offline_env()
    from benchmark.evaluate import evaluate

    device, dtype, sync = device_and_dtype(a.device, a.dtype)
    model, tok, specs = load_suite(dtype, device)
    out: dict[str, dict[str, float]] = {}
    variants = {
        "lm-eval": lambda: out.__setitem__("lm-eval", evaluate(model, tok, specs, batch_size=a.batch_size,
                                                                limit=a.limit).scores),
        "plain": lambda: out.__setitem__("plain", plain_accuracy(model, tok, specs, a.batch_size, a.limit, device)),
    }
    times = interleaved(variants, rounds=a.rounds, warmup=1, sync=sync)
    med = medians(times)
    n_q = sum(len(s.records("test")[:a.limit]) for s in specs)
    speed = {"of_medians": med["plain"] / med["lm-eval"],
             "paired": 1.0 / ratio_row(times, "lm-eval", "plain")["paired"]}
    same = all(abs(out["lm-eval"][s.name] - out["plain"][s.name]) < 1e-9 for s in specs)
    rows = [[k, med[k], n_q / med[k]] for k in variants]
    print(f"\n{len(specs)} tasks, {n_q} questions x 4 choices, batch {a.batch_size} rows, device={device} "
          f"dtype={a.dtype}, rounds={a.rounds}")
    print(fmt_table(rows, ["path", "median s", "questions/s"]))
    print(fmt_table([[s.name, out["lm-eval"][s.name], out["plain"][s.name]] for s in specs],
                    ["task", "acc lm-eval", "acc plain"]))
    print(f"lm-eval speed / plain loop speed: {speed['paired']:.3f} paired, {speed['of_medians']:.3f} of medians "
          f"(goal >= {GOAL}): {verdict(speed['paired'], '>=', GOAL)}; same accuracy: {same}")
    write_result("eval", {"goal": f"lm-eval speed >= {GOAL}x plain loop, same accuracy", "questions": n_q,
                          "batch_size": a.batch_size, "device": str(device), "dtype": a.dtype, "median_s": med,
                          "times_s": times, "speed_ratio": speed, "accuracy": out, "same_accuracy": same})
    return {"speed": speed, "same": same}


if __name__ == "__main__":
    main()
