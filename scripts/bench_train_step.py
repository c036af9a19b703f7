"""Training-step time of each MoE-LoRA method against peft LoRA of equal trainable parameters, side by side.

On one random Llama and one batch, every variant runs the harness's training step (``benchmark.train``: forward
inside ``method.forward_context``, LM loss + ``method.aux_loss``, backward, grad-norm clipping, AdamW step,
``method.on_step``):

  floor@<m>    the frozen base model's own forward + backward, the backward running from the loss down to the
               first module <m> adapts (e.g. layer 0's gate_proj for FFN-only methods, q_proj for all-linear
               ones), with no optimiser: the physical limit of any adapter on those modules
  <method>     loramoe / slim / hilo with their default configs, through the method registry
  lora@<m>     peft LoRA (the ``lora`` plugin) on the same target modules as <m>, with the rank that matches
               <m>'s trainable parameter count most closely and <m>'s adapter dropout

Goal (issue 9): <method> <= 1.1x lora@<method>. Also reported: every variant as a multiple of the floor, the
parameter match, tokens/s. Two model sizes: "realistic" (hidden 512, 4 layers, FFN 1408, vocab 8192, batch 8 x
128 tokens) and, for information, the tiny-world shape (hidden 128, 4 layers, FFN 512, vocab 1024, batch 64 x 32).

``--shape smollm2``: instead, a randomly initialised model of SmolLM2-135M's shape (Llama: 30 layers, hidden 576,
FFN 1536, 9 heads / 3 key-value heads of dim 64, vocab 49,152, tied embeddings, rope theta 1e5, rms eps 1e-5;
the same compute as the real checkpoint), batch 4 x 128 tokens by default (``--batch``/``--seq``; 8 x 128 costs
twice as long), goal <method> <= 1.15x lora@<method>, with full_ft and plain lora (their default configs) timed
in the same rounds for tokens/s (``--extras``), no floors unless ``--floors`` (they cost time, and the ratios to
lora do not need them), one torch thread unless ``--threads`` (e.g. ``1,2``: each count measured in turn on the
same models). Writes results/bench/train_step_smollm2.json (another batch or depth:
train_step_smollm2_b<B>x<S>[_l<L>].json).

"x lora (cpu s)": the same paired ratio of process CPU seconds per step instead of wall seconds; with one thread
on a loaded machine it leaves out the waits for a core (with several threads it counts their spin-waits too).

Usage: python scripts/bench_train_step.py [--methods loramoe,slim,hilo] [--rounds 5] [--sizes realistic,tiny]
       [--device cuda --dtype bf16] [--quick]. Writes results/bench/train_step.json.
       python scripts/bench_train_step.py --shape smollm2 [--rounds 3] [--threads 1,2] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import math
from typing import Any

from benchlib import (device_and_dtype, fmt_table, interleaved, medians, offline_env, ratio_row, registered_methods,
                      verdict, write_result)

SIZES: dict[str, dict[str, Any]] = {  # name -> model shape and batch
    "realistic": {"hidden": 512, "layers": 4, "ffn": 1408, "heads": 8, "vocab": 8192, "batch": 8, "seq": 128},
    "tiny": {"hidden": 128, "layers": 4, "ffn": 512, "heads": 4, "vocab": 1024, "batch": 64, "seq": 32},
}
GOAL = 1.1
# --shape smollm2: HuggingFaceTB/SmolLM2-135M's config.json (LlamaForCausalLM); the batch is a CPU-sized default
SMOLLM2 = {"hidden": 576, "layers": 30, "ffn": 1536, "heads": 9, "kv_heads": 3, "vocab": 49152, "tie": True,
           "rope_theta": 100000.0, "rms_eps": 1e-5, "max_pos": 8192, "batch": 4, "seq": 128}
SMOLLM2_GOAL = 1.15


def llama_config(shape: dict[str, Any]) -> Any:
    """The ``LlamaConfig`` of a shape; keys a shape leaves out keep the values the default shapes always used."""
    from transformers import LlamaConfig

    extra = {}
    if "rope_theta" in shape:
        extra["rope_theta"] = shape["rope_theta"]
    if "rms_eps" in shape:
        extra["rms_norm_eps"] = shape["rms_eps"]
    return LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape.get("kv_heads", shape["heads"]),
                       max_position_embeddings=shape.get("max_pos", max(256, shape["seq"])),
                       tie_word_embeddings=bool(shape.get("tie", False)), **extra)


def build_model(shape: dict[str, Any], device: Any, dtype: Any) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(shape)).to(device=device, dtype=dtype)


def make_batch(shape: dict[str, Any], device: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.clone().to(device)}


def adapted_linears(model: Any, targets: list[str]) -> list[Any]:
    """The ``nn.Linear`` modules whose name ends with one of ``targets`` (as peft and inject_moe_lora match)."""
    from torch import nn

    return [m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def targets_of(model: Any) -> list[str]:
    """Suffixes of the modules a wrapped method actually adapted (read from the model, not the config)."""
    from methods.moe_lora import moe_layers

    return sorted({name.rsplit(".", 1)[-1] for name, _ in moe_layers(model)})


def train_step_fn(model: Any, method: Any, batch: dict[str, Any], lr: float = 1e-4) -> Any:
    """A closure running one training step exactly as ``benchmark.train.train_stage`` does (one process)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    count = [0]
    fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def step() -> float:
        count[0] += 1
        with method.forward_context(model, batch):
            loss = model(**fwd).loss
            aux = method.aux_loss(model)
            if aux is not None:
                loss = loss + aux
            if not bool(torch.isfinite(loss)):
                raise RuntimeError("non-finite loss")
            loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step(model, count[0])
        return value

    return step


def first_adapted(model: Any) -> str:
    """Qualified name of the first adapted module of a wrapped MoE-LoRA model (in forward order for Llama)."""
    from methods.moe_lora import moe_layers

    return next(name for name, _ in moe_layers(model))


def floor_fn(model: Any, batch: dict[str, Any], start: str | None = None) -> Any:
    """Forward + backward of the frozen model, the backward running from the loss down to the output of module
    ``start`` (where an adapter method's gradient starts; None: the embedding output, i.e. the whole network)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if start is None:
        model.enable_input_require_grads()
    else:
        model.get_submodule(start).register_forward_hook(
            lambda mod, inp, out: out if out.requires_grad else out.requires_grad_())
    model.train()
    fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def step() -> float:
        loss = model(**fwd).loss
        loss.backward()
        return loss.item()

    return step


def wrap_method(name: str, base: Any, **options: Any) -> tuple[Any, Any]:
    """(method instance, wrapped model) for a registered method with its default config (plus ``options``)."""
    from methods import METHODS
    from methods.base import TaskInfo

    cls = METHODS.get(name)
    method = cls(cls.config_cls(**options))
    model = method.wrap(copy.deepcopy(base))
    method.on_task_start(model, TaskInfo(name="bench", kind="skill", stage=1, num_stages=1))
    return method, model


def matched_lora(base: Any, targets: list[str], trainable: int, dropout: float) -> tuple[Any, Any, int]:
    """peft LoRA on ``targets`` whose rank gives the trainable count closest to ``trainable``."""
    per_rank = sum(m.in_features + m.out_features for m in adapted_linears(base, targets))
    r = max(1, round(trainable / per_rank))
    method, model = wrap_method("lora", base, r=r, alpha=2.0 * r, dropout=dropout, target_modules=targets)
    return method, model, r


def bench_size(size: str, shape: dict[str, Any], methods: list[str], a: argparse.Namespace,
               goal: float = GOAL) -> dict[str, Any]:
    """Build every variant once, then time them interleaved at each thread count of ``a.threads`` (None: torch's
    current count). One thread count: the result record; several: ``{"threads=<n>": record, ...}``."""
    import torch

    device, dtype, sync = device_and_dtype(a.device, a.dtype)
    base = build_model(shape, device, dtype)
    batch = make_batch(shape, device)
    variants: dict[str, Any] = {}
    info: dict[str, Any] = {}
    floors: dict[str, str] = {}  # method -> its floor variant (none without floors)
    keep: list[Any] = []  # keep models alive while their closures are timed
    for name in methods:
        method, model = wrap_method(name, base)
        start = first_adapted(model)
        if a.floors:
            floors[name] = f"floor@{start.rsplit('.', 1)[-1]}"
            if floors[name] not in variants:
                variants[floors[name]] = floor_fn(copy.deepcopy(base), batch, start)
        counts = method.param_counts(model)
        targets = targets_of(model)
        dropout = float(getattr(method.config, "dropout", 0.0))
        lmethod, lmodel, r = matched_lora(base, targets, counts["trainable"], dropout)
        lcount = lmethod.param_counts(lmodel)["trainable"]
        info[name] = {"trainable": counts["trainable"], "active": counts.get("active"), "targets": targets,
                      "dropout": dropout, "lora_rank": r, "lora_trainable": lcount,
                      "param_match": lcount / counts["trainable"]}
        variants[name] = train_step_fn(model, method, batch)
        variants[f"lora@{name}"] = train_step_fn(lmodel, lmethod, batch)
        keep += [model, lmodel]
    for name in a.extras:  # other registered methods with their default configs, for tokens/s only
        method, model = wrap_method(name, base)
        info[name] = {"trainable": method.param_counts(model)["trainable"], "extra": True}
        variants[name] = train_step_fn(model, method, batch)
        keep.append(model)
    del base
    records = {}
    for threads in a.threads or [None]:
        if threads:
            torch.set_num_threads(threads)
        records[f"threads={torch.get_num_threads()}"] = time_variants(size, shape, methods, a, variants, info,
                                                                      floors, goal, sync, device)
    return next(iter(records.values())) if len(records) == 1 else records


def time_variants(size: str, shape: dict[str, Any], methods: list[str], a: argparse.Namespace,
                  variants: dict[str, Any], info: dict[str, Any], floors: dict[str, str], goal: float, sync: Any,
                  device: Any) -> dict[str, Any]:
    import os

    import torch

    load0 = os.getloadavg()
    cpu: dict[str, list[float]] = {}
    times = interleaved(variants, rounds=a.rounds, warmup=a.warmup, sync=sync, cpu=cpu)
    load1 = os.getloadavg()
    med = medians(times)
    tokens = shape["batch"] * shape["seq"]
    out: dict[str, Any] = {"shape": shape, "device": str(device), "dtype": a.dtype, "threads": torch.get_num_threads(),
                           "load_avg_before": list(load0), "load_avg_after": list(load1), "methods": info,
                           "median_s": med, "times_s": times, "cpu_median_s": medians(cpu), "cpu_s": cpu,
                           "tokens_per_s": {k: tokens / v for k, v in med.items()},
                           "tokens_per_cpu_s": {k: tokens / v for k, v in medians(cpu).items()}, "ratios": {}}
    rows = []
    for name in methods:
        vs_lora = ratio_row(times, name, f"lora@{name}")
        vs_lora_cpu = ratio_row(cpu, name, f"lora@{name}")
        out["ratios"][name] = {"vs_lora": vs_lora, "vs_lora_cpu": vs_lora_cpu}
        i = info[name]
        row = [name, i["trainable"], f"r={i['lora_rank']} ({i['param_match']:.3f}x)", med[name] * 1e3,
               med[f"lora@{name}"] * 1e3, f"{tokens / med[name]:.0f}", vs_lora["paired"], vs_lora["of_medians"],
               vs_lora_cpu["paired"]]
        if floors:
            vs_floor = ratio_row(times, name, floors[name])
            lora_floor = ratio_row(times, f"lora@{name}", floors[name])
            out["ratios"][name].update(vs_floor=vs_floor, lora_vs_floor=lora_floor, floor=floors[name])
            row += [vs_floor["paired"], lora_floor["paired"]]
        rows.append(row + [verdict(vs_lora["paired"], "<=", goal)])
    floor_note = "; " + ", ".join(f"{f} {med[f] * 1e3:.1f} ms ({tokens / med[f]:.0f} tok/s)"
                                  for f in sorted(set(floors.values()))) if floors else ""
    print(f"\n[{size}] hidden={shape['hidden']} layers={shape['layers']} ffn={shape['ffn']} vocab={shape['vocab']} "
          f"batch={shape['batch']}x{shape['seq']} device={device} dtype={a.dtype} threads={torch.get_num_threads()} "
          f"rounds={a.rounds} load avg {load0[0]:.2f} -> {load1[0]:.2f}" + floor_note)
    print(fmt_table(rows, ["method", "trainable", "lora match", "ms", "lora ms", "tok/s", "x lora (paired)",
                           "x lora (medians)", "x lora (cpu s)"] + (["x floor", "lora x floor"] if floors else [])
                    + [f"<= {goal}x lora"]))
    if a.extras:
        cmed = medians(cpu)
        print(fmt_table([[n, info[n]["trainable"], med[n] * 1e3, f"{tokens / med[n]:.0f}", cmed[n] * 1e3,
                          f"{tokens / cmed[n]:.0f}"] for n in a.extras],
                        ["default config", "trainable", "ms", "tok/s", "cpu ms", "tok/cpu s"]))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="loramoe,slim,hilo", help="comma-separated MoE-LoRA methods")
    ap.add_argument("--shape", default="default", choices=["default", "smollm2"],
                    help="default: the --sizes models; smollm2: SmolLM2-135M's shape (see above)")
    ap.add_argument("--sizes", default="realistic,tiny", help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--rounds", type=int, help="interleaved timed rounds (default 5; smollm2: 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant first (default 2; smollm2: 1)")
    ap.add_argument("--layers", type=int, help="override the realistic (or smollm2) model's layer count")
    ap.add_argument("--batch", type=int, help="override the batch size (smollm2 only)")
    ap.add_argument("--seq", type=int, help="override the sequence length (smollm2 only)")
    ap.add_argument("--threads", help="comma-separated torch thread counts, each timed in turn (smollm2 default: 1)")
    ap.add_argument("--extras", help="comma-separated methods timed with their default configs for tokens/s "
                                     "(smollm2 default: full_ft,lora)")
    ap.add_argument("--floors", action=argparse.BooleanOptionalAction, default=None,
                    help="time the frozen-model floors (default: yes; smollm2: no)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--quick", action="store_true", help="2 rounds, 1 warm-up, 2-layer realistic model (smoke run)")
    a = ap.parse_args(argv)
    smol = a.shape == "smollm2"
    a.rounds = a.rounds or (3 if smol else 5)
    a.warmup = a.warmup if a.warmup is not None else (1 if smol else 2)
    a.floors = (not smol) if a.floors is None else a.floors
    a.threads = [int(t) for t in (a.threads or ("1" if smol else "")).split(",") if t.strip()]
    if a.quick:
        a.rounds, a.warmup, a.layers = 2, 1, a.layers or 2
    offline_env()
    methods, skipped = registered_methods([m.strip() for m in a.methods.split(",") if m.strip()])
    extras, skipped_extras = registered_methods([m.strip() for m in (a.extras if a.extras is not None else
                                                 ("full_ft,lora" if smol else "")).split(",") if m.strip()])
    a.extras = extras
    for name, why in {**skipped, **skipped_extras}.items():
        print(f"skipped {name}: {why}")
    if not methods:
        raise SystemExit("no MoE-LoRA method is registered; nothing to compare")
    results = {}
    if smol:
        shape = dict(SMOLLM2)
        for key in ("layers", "batch", "seq"):
            if getattr(a, key):
                shape[key] = getattr(a, key)
        results["smollm2"] = bench_size("smollm2", shape, methods, a, goal=SMOLLM2_GOAL)
    else:
        for size in [s.strip() for s in a.sizes.split(",") if s.strip()]:
            shape = dict(SIZES[size])
            if a.layers and size == "realistic":
                shape["layers"] = a.layers
            results[size] = bench_size(size, shape, methods, a)
    records = [r for res in results.values() for r in (res.values() if "ratios" not in res else [res])]
    worst = max(r["ratios"][m]["vs_lora"]["paired"] for r in records for m in methods)
    assert math.isfinite(worst)
    goal = SMOLLM2_GOAL if smol else GOAL
    extra = {"shape_source": "HuggingFaceTB/SmolLM2-135M config.json, random weights", "extras": extras,
             "threads": a.threads, "skipped_extras": skipped_extras} if smol else {}
    name = "train_step"
    if smol:  # a non-default batch or depth gets its own file, so the default figures are not overwritten
        shape = results["smollm2"]["shape"] if "shape" in results["smollm2"] else \
            next(iter(results["smollm2"].values()))["shape"]
        name = "train_step_smollm2" + ("" if (shape["batch"], shape["seq"]) == (SMOLLM2["batch"], SMOLLM2["seq"])
                                       else f"_b{shape['batch']}x{shape['seq']}") \
            + ("" if shape["layers"] == SMOLLM2["layers"] else f"_l{shape['layers']}")
    write_result(name,
                 {"goal": f"<method> <= {goal}x lora of equal trainable parameters", "methods": methods,
                  "skipped": skipped, "rounds": a.rounds, "warmup": a.warmup, **extra, "results": results})
    return results


if __name__ == "__main__":
    main()
