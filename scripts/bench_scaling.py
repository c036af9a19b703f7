"""How wall time and memory grow with the number of stages and with the number of experts.

Stages: the tiny-world downstream tasks repeated into temporary 1-, 3- and 6-task sequences (registered by
``scripts/harness_probe.py --sequence-of N``: ``tw_add, tw_sentiment, tw_city, tw_add_r2, ...``), one run per
length in its own process, ``train.max_steps`` and ``eval.limit`` fixed so every stage does the same training
work (up to the tasks' sequence lengths: per-token figures are shown). After every stage all N downstream tasks
and the 4 general tasks are evaluated, so the evaluation work of a run grows as N * (N + 4): the table
normalises by it. Expected: training time per token constant, evaluation time per evaluated example constant (or
falling: fixed costs amortise), overhead per stage constant, peak memory flat.

Experts: LoRAMoE's configuration with N = 4, 8, 16 experts of rank 4 (adapter FLOPs linear in N)
  layer  one ``MoELoRALinear`` (hidden 512 -> FFN 1408, 1024 tokens) forward + backward, minus the frozen Linear
  step   a training step of ``loramoe`` (the registered method, ``n_experts`` = N) on a random 2-layer Llama
         (hidden 512, FFN 1408, batch 8 x 128), minus the frozen model's forward + backward down to the first
         adapted module (the floor of ``bench_train_step.py``)
Expected: the adapter's time grows at most linearly in N (time per expert constant or falling).

Usage: python scripts/bench_scaling.py [--stages 1,3,6] [--experts 4,8,16] [--steps 20] [--limit 24]
       [--skip-stages] [--skip-experts] [--device cuda --dtype bf16]. Writes results/bench/scaling.json and,
       when matplotlib is present, results/bench/scaling.png. --plot-only redraws the figure from the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from benchlib import (BENCH_DIR, device_and_dtype, fmt_table, interleaved, medians, offline_env, probe_run,
                      write_result)
from benchmark.records import read_record  # noqa: E402 - benchlib puts the repository on sys.path

N_GENERAL = 4  # tasks of the tiny-world general suite


def stage_curve(lengths: list[int], steps: int, limit: int, method: str) -> dict[int, dict[str, Any]]:
    out = {}
    for n in lengths:
        with tempfile.TemporaryDirectory(prefix="fb-bench-scaling-") as tmp:
            cli = ["-q", "run", "--methods", method, "--seeds", "0", "--output", str(Path(tmp) / "out"),
                   "--set", f"train.max_steps={steps}", "--set", f"eval.limit={limit}"]
            d = probe_run(cli, ["--sequence-of", str(n)])
            rec = read_record(next((Path(tmp) / "out" / "runs").glob("*.json")))
        t = d["times"]
        evalm = t.get("eval_model_call", 0.0) + t.get("eval_model_generate", 0.0)
        train = t.get("train_loop", 0.0) - t.get("collate", 0.0)
        examples = sum((rec.n_examples or {}).values())  # examples of one evaluation (all tasks)
        evals = d["calls"].get("evaluate", 0)
        tokens = sum(st["tokens"] for st in d.get("train_stages", []))
        out[n] = {"wall_s": d["wall_s"], "train_s": train, "train_tokens": tokens,
                  "eval_s": t.get("evaluate", 0.0), "eval_forward_s": evalm,
                  "overhead_s": d["wall_s"] - train - evalm, "startup_s": d["wall_s"] - d["main_s"],
                  "evaluations": evals, "examples_per_eval": examples,
                  "peak_memory_mb": rec.costs.peak_memory_mb, "status": rec.status}
    return out


def layer_curve(experts: list[int], rounds: int, device: Any, dtype: Any, sync: Any) -> dict[str, Any]:
    import torch
    from torch import nn

    from methods.moe_lora import MoELoRALinear

    torch.manual_seed(0)
    base = nn.Linear(512, 1408, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(1024, 512, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(1024, 1408, device=device, dtype=dtype)
    variants = {}
    for n in experts:
        layer = MoELoRALinear(base, n_experts=n, rank=4, alpha=32.0)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.02)
        variants[f"N={n}"] = layer
    variants["base"] = base

    def fb(mod: Any) -> Any:
        def run() -> None:
            x.grad = None
            for p in mod.parameters():
                p.grad = None
            mod(x).backward(g)
        return run

    times = interleaved({k: fb(m) for k, m in variants.items()}, rounds=rounds, warmup=2, sync=sync)
    return {"median_s": medians(times), "times_s": times}


def step_curve(experts: list[int], rounds: int, device: Any, dtype: Any, sync: Any) -> dict[str, Any]:
    from bench_train_step import SIZES, build_model, first_adapted, floor_fn, make_batch, train_step_fn, wrap_method

    shape = dict(SIZES["realistic"], layers=2)
    base = build_model(shape, device, dtype)
    batch = make_batch(shape, device)
    variants, keep = {}, []
    for n in experts:
        method, model = wrap_method("loramoe", base, n_experts=n)
        variants[f"N={n}"] = train_step_fn(model, method, batch)
        keep.append(model)
    variants["floor"] = floor_fn(copy.deepcopy(base), batch, first_adapted(model))
    times = interleaved(variants, rounds=rounds, warmup=1, sync=sync)
    return {"shape": shape, "median_s": medians(times), "times_s": times}


def expert_rows(curve: dict[str, Any], experts: list[int], ref: str) -> list[list[Any]]:
    med = curve["median_s"]
    rows = []
    for n in experts:
        extra = med[f"N={n}"] - med[ref]
        rows.append([n, med[f"N={n}"] * 1e3, extra * 1e3, extra * 1e3 / n,
                     (extra / (med[f"N={experts[0]}"] - med[ref])) if med[f"N={experts[0]}"] > med[ref] else "-",
                     n / experts[0]])
    return rows


def _panel(ax: Any, x: list[int], ys: list[float], style: str, title: str, xlabel: str, ylabel: str) -> None:
    ax.plot(x, ys, style)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(x)
    ax.set_ylim(0, 1.15 * max(max(ys), 1e-9))  # from zero: "flat" and "linear" read off the figure honestly
    ax.grid(alpha=0.3)


def plot(result: dict[str, Any], path: Path) -> None:
    """One panel per quantity, each axis labelled with its quantity and unit (stages on top, experts below)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2))
    st = result.get("stages")
    if st:
        ns = sorted(int(k) for k in st)
        st = {int(k): v for k, v in st.items()}
        xl = "stages in the sequence (N)"
        _panel(axes[0][0], ns, [1e6 * st[n]["train_s"] / max(1, st[n]["train_tokens"]) for n in ns], "o-",
               "training time per token", xl, "training time (ms per 1k tokens)")
        _panel(axes[0][1], ns, [1e3 * st[n]["eval_s"] / max(1, st[n]["evaluations"] * st[n]["examples_per_eval"])
                                for n in ns], "s-", "evaluation time per evaluated example", xl,
               "evaluation time (ms per example)")
        _panel(axes[0][2], ns, [(st[n]["overhead_s"] - st[n]["startup_s"]) / n for n in ns], "^-",
               "harness overhead per stage (start-up excluded)", xl, "overhead (s per stage)")
        _panel(axes[1][0], ns, [st[n]["peak_memory_mb"] for n in ns], "D-", "peak memory of the run", xl,
               "peak memory (MiB)")
    else:
        for ax in axes[0].tolist() + [axes[1][0]]:
            ax.set_axis_off()
    for ax, key, ref, what, unit in (
            (axes[1][1], "layer", "base", "MoELoRALinear fwd + bwd, minus the frozen Linear", "call"),
            (axes[1][2], "step", "floor", "loramoe training step, minus the frozen-model floor", "step")):
        c = result.get(key)
        if not c:
            ax.set_axis_off()
            continue
        ex = c["experts"]
        _panel(ax, ex, [(c["median_s"][f"N={n}"] - c["median_s"][ref]) * 1e3 for n in ex], "o-",
               what, "experts (N)", f"adapter time (ms per {unit}, median)")
    env = result.get("env") or {}
    fig.suptitle(f"bench_scaling: {result.get('steps')} steps per stage, eval.limit={result.get('limit')}; "
                 f"{env.get('cuda') or 'CPU'}, {env.get('threads')} threads, {env.get('time', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="1,3,6")
    ap.add_argument("--experts", default="4,8,16")
    ap.add_argument("--steps", type=int, default=20, help="train.max_steps of every stage")
    ap.add_argument("--limit", type=int, default=24, help="eval.limit (examples per task)")
    ap.add_argument("--method", default="lora", help="method of the stage runs")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-stages", action="store_true")
    ap.add_argument("--skip-experts", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--plot-only", action="store_true",
                    help="measure nothing: redraw results/bench/scaling.png from results/bench/scaling.json")
    a = ap.parse_args(argv)
    if a.plot_only:
        result = json.loads((BENCH_DIR / "scaling.json").read_text())
        plot(result, BENCH_DIR / "scaling.png")
        return result
    offline_env()
    result: dict[str, Any] = {}
    if not a.skip_stages:
        lengths = [int(x) for x in a.stages.split(",")]
        st = stage_curve(lengths, a.steps, a.limit, a.method)
        result["stages"] = st
        rows = []
        for n in lengths:
            r = st[n]
            per_example = r["eval_s"] / max(1, r["evaluations"] * r["examples_per_eval"])
            per_1k = 1e6 * r["train_s"] / max(1, r["train_tokens"])
            rows.append([n, r["status"], r["wall_s"], r["train_s"] / n, per_1k, r["eval_s"] / r["evaluations"],
                         per_example * 1e3, r["startup_s"], (r["overhead_s"] - r["startup_s"]) / n,
                         r["peak_memory_mb"]])
        print(f"\nstages ({a.method}, {a.steps} steps per stage, eval.limit={a.limit}; evaluation work grows as "
              f"N x (N + {N_GENERAL}) tasks)")
        print(fmt_table(rows, ["N stages", "status", "wall s", "train s/stage", "train ms/1k tokens",
                               "eval s/evaluation",
                               "eval ms/example", "start-up s", "other overhead s/stage", "peak MB"]))
    if not a.skip_experts:
        experts = [int(x) for x in a.experts.split(",")]
        device, dtype, sync = device_and_dtype(a.device, a.dtype)
        layer = layer_curve(experts, a.rounds, device, dtype, sync) | {"experts": experts}
        step = step_curve(experts, max(2, a.rounds - 2), device, dtype, sync) | {"experts": experts}
        result["layer"], result["step"] = layer, step
        hdr = ["experts", "ms", "adapter ms", "adapter ms/expert", "adapter x smallest", "FLOPs x smallest"]
        print(f"\nexperts, layer level (512 -> 1408, 1024 tokens, rank 4; frozen Linear "
              f"{layer['median_s']['base'] * 1e3:.2f} ms)")
        print(fmt_table(expert_rows(layer, experts, "base"), hdr))
        print(f"\nexperts, step level (loramoe, 2-layer Llama 512/1408, batch 8x128; floor "
              f"{step['median_s']['floor'] * 1e3:.1f} ms)")
        print(fmt_table(expert_rows(step, experts, "floor"), hdr))
    written = write_result("scaling", {"steps": a.steps, "limit": a.limit, **result})
    plot(json.loads(written.read_text()), BENCH_DIR / "scaling.png")  # the figure is drawn from the file alone
    return result


if __name__ == "__main__":
    main()
