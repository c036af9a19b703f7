"""Forward+backward time of ONE adapted linear: stacked MoE-LoRA vs peft LoRA vs a naive expert loop vs base.

Variants (same frozen ``nn.Linear``, input requires grad so every backward computes dx):
  ours   MoELoRALinear, N experts of rank r, dense softmax routing (LoRAMoE configuration)
  peft   peft LoRA of rank N*r on the same Linear (same delta parameter budget, no router)
  naive  per-expert Python loop like the official LoRAMoE code: ``y += g[..., i:i+1] * B_i(A_i(x)) * s``
  base   the frozen Linear alone

Usage: python scripts/bench_moe_layer.py [--tokens 4096 --d-in 2048 --d-out 5632 --experts 8 --rank 4
       --repeats 9 --naive-repeats 3] [--quick]. fp32 on CPU, bf16 on CUDA. Writes results/bench/moe_layer.json.

Variants run interleaved round by round after a warm-up. Reported ratios: of the per-variant medians, "paired"
(median over rounds of the ratio within one round: robust when other work shares the machine) and of minima.
Goals: ours/peft <= 1.0, ours/base <= 1.2, naive/ours >= 2.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from methods.moe_lora import MoELoRALinear  # noqa: E402


class NaiveLoRAMoE(nn.Module):
    """The official LoRAMoE forward (peft/tuners/lora.py, class Linear): experts as separate Linear pairs."""

    def __init__(self, base: nn.Linear, n: int, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.n, self.scaling = base, n, alpha / r
        self.route = nn.Linear(base.in_features, n, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        kw = {"bias": False, "device": base.weight.device, "dtype": base.weight.dtype}
        self.A = nn.ModuleList(nn.Linear(base.in_features, r, **kw) for _ in range(n))
        self.B = nn.ModuleList(nn.Linear(r, base.out_features, **kw) for _ in range(n))
        for b in self.B:
            nn.init.normal_(b.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        g = F.softmax(self.route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i in range(self.n):
            result = result + g[..., i : i + 1] * self.B[i](self.A[i](x)) * self.scaling
        return result


class Holder(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.proj = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make_peft(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(Holder(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)  # non-zero B so no kernel can short-cut a zero delta
    return model


def time_fb(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, warmup: int, repeats: int, sync) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        x.grad = None
        for p in module.parameters():
            p.grad = None
        sync()
        t0 = time.perf_counter()
        y = module(x)
        y.backward(grad)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=2048)
    ap.add_argument("--d-out", type=int, default=5632)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--naive-repeats", type=int, default=3, help="repeats of the (slow) naive loop")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "moe_layer.json")
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.d_in, a.d_out, a.repeats, a.warmup, a.naive_repeats = 256, 128, 352, 5, 2, 3

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    base = nn.Linear(a.d_in, a.d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    n, r = a.experts, a.rank

    ours = MoELoRALinear(base, n_experts=n, rank=r, alpha=a.alpha, dropout=0.0)
    with torch.no_grad():
        ours.lora_B.normal_(std=0.02)
    variants = {
        "ours": ours,
        "peft": make_peft(base, n * r, a.alpha * n),  # same alpha/r scaling as one expert
        "naive": NaiveLoRAMoE(base, n, r, a.alpha),
        "base": base,
    }
    x = torch.randn(a.tokens, a.d_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(a.tokens, a.d_out, device=device, dtype=dtype)

    # interleave the variants round by round so drifting machine load hits them alike
    times: dict[str, list[float]] = {k: [] for k in variants}
    for k, mod in variants.items():
        time_fb(mod, x, grad, a.warmup, 0, sync)
    for i in range(a.repeats):
        for k, mod in variants.items():
            if k != "naive" or i < a.naive_repeats:
                times[k] += time_fb(mod, x, grad, 0, 1, sync)
    med = {k: statistics.median(v) for k, v in times.items()}

    best = {k: min(v) for k, v in times.items()}
    ratio = lambda d: {"ours/peft": d["ours"] / d["peft"], "ours/base": d["ours"] / d["base"],  # noqa: E731
                       "naive/ours": d["naive"] / d["ours"]}
    ratios, ratios_min = ratio(med), ratio(best)
    # paired: median over rounds of the ratio within a round (robust to load drifting on a shared machine)
    rounds = [{k: v[i] for k, v in times.items()} for i in range(a.naive_repeats)]
    paired = {k: statistics.median(ratio(rd)[k] for rd in rounds) for k in ("naive/ours",)}
    for k, (num, den) in {"ours/peft": ("ours", "peft"), "ours/base": ("ours", "base")}.items():
        paired[k] = statistics.median(t_num / t_den for t_num, t_den in zip(times[num], times[den]))
    paired = {k: paired[k] for k in ratios}
    goals = {"ours/peft": ("<=", 1.0), "ours/base": ("<=", 1.2), "naive/ours": (">=", 2.0)}
    print(f"device={device} dtype={str(dtype).replace('torch.', '')} threads={torch.get_num_threads()} "
          f"tokens={a.tokens} d_in={a.d_in} d_out={a.d_out} experts={n} rank={r} repeats={a.repeats}")
    print(f"{'variant':<8}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    for k in variants:
        print(f"{k:<8}{med[k] * 1e3:>12.2f}{min(times[k]) * 1e3:>10.2f}{max(times[k]) * 1e3:>10.2f}")
    print(f"{'ratio':<11}{'of medians':>11}{'paired':>8}{'of mins':>8}   goal")
    for k, v in ratios.items():
        op, goal = goals[k]
        okay = lambda val: "ok" if (val <= goal if op == "<=" else val >= goal) else "MISSED"  # noqa: E731
        print(f"{k:<11}{v:>11.3f}{paired[k]:>8.3f}{ratios_min[k]:>8.3f}   {op} {goal}: "
              f"{okay(v)} (of medians), {okay(paired[k])} (paired)")

    record = {
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "config": {k: getattr(a, k) for k in ("tokens", "d_in", "d_out", "experts", "rank", "alpha", "repeats",
                                              "naive_repeats", "warmup", "quick")},
        "median_s": med,
        "times_s": times,
        "ratios": ratios,
        "ratios_paired": paired,
        "ratios_of_min": ratios_min,
        "goals": {k: f"{op} {g}" for k, (op, g) in goals.items()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    assert all(math.isfinite(v) for v in med.values())
    return record


if __name__ == "__main__":
    main()
