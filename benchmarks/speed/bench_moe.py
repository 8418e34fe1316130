"""The Qwen2-MoE layer (qwen2/model/moe.py SparseMoeBlock) against transformers' Qwen2MoeSparseMoeBlock on the
same weights, at 1, 16 and 512 tokens, side by side in one process.

    python -m benchmarks.speed.bench_moe                 # the 57B-A14B layer with every width divided by 4
    python -m benchmarks.speed.bench_moe --scale 1 --tokens 1,16    # its real shape (8 GB of fp32 experts per copy)

The layer: Qwen2-57B-A14B's MoE block (64 experts, 8 routed per token, norm_topk_prob false) with the
hidden size, expert width and shared-expert width divided by --scale (default 4: hidden 896, experts
640 wide, shared expert 5120), fp32, random weights (router N(0, 0.02^2), so routing is near uniform,
as a load-balanced router's is). Rows, each timed on the same input:
  * qwen2: SparseMoeBlock.forward (the few-token path at 1 token, the sort-by-expert dispatch above)
  * qwen2 bf16 experts: the same block after qwen2.model.moe.set_expert_dtype(bfloat16) (experts stored and
    run in bf16; router, shared-expert gate and the weighted sum fp32)
  * qwen2 int4 experts: the same block quantised as `qwen2.load(..., quantize="int4")` quantises it
    (qwen2.quant.quantize_moe_block: the experts' gate/up_proj int4 in groups of 32, down_proj int8;
    router and shared-expert gate fp32): few rows per expert on the native kernels, many (the shared
    expert at 512 tokens) dequantised into one GEMM
  * transformers eager: Qwen2MoeSparseMoeBlock with experts_implementation "eager", the block's own
    loop over the experts hit (what a block built from a config runs)
  * transformers grouped_mm: the same block with "grouped_mm", what from_pretrained picks by default
    in transformers 5.x (sort by expert, one grouped matmul; on the CPU its per-expert fallback)
  * transformers eager bf16: its block with every weight and the input in bf16 (torch_dtype=bfloat16)
Every repeat runs them one after another, so a load change on the shared machine hits them alike;
tok/s = tokens / median time. Before timing, the fp32 rows are checked equal (max |diff| <= 1e-4), the
bf16 rows within 2 % and the int4 row within 15 % (relative L2 error; int4 rounds each of these random
N(0, 1/K) matrices by ~8 %) of qwen2's fp32 output; all are recorded.
Results go to benchmarks/results/moe.json and .md (atomically).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks.common import RESULTS_DIR, CpuWatch, machine_facts, set_torch_threads, wait_for_quiet, write_results
from qwen2.config import named_config
from qwen2.model.moe import SparseMoeBlock, set_expert_dtype
from qwen2.quant import quantize_moe_block

REPEATS = {1: 40, 16: 15, 512: 5}  # more for the short calls, whose times vary more


def layer_config(scale: int):
    import dataclasses

    c = named_config("Qwen2-57B-A14B")
    return dataclasses.replace(c, hidden_size=c.hidden_size // scale, num_attention_heads=c.num_attention_heads // scale,
                               num_key_value_heads=1, head_dim=0, intermediate_size=c.intermediate_size // scale,
                               moe_intermediate_size=c.moe_intermediate_size // scale,
                               shared_expert_intermediate_size=c.shared_expert_intermediate_size // scale)


def make_blocks(config):
    """Our block with random weights, and transformers' with the same ones (its experts fused)."""
    import transformers
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    gen = torch.Generator().manual_seed(0)
    ours = SparseMoeBlock(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.normal_(0, 0.02 if name == "gate.weight" else 1 / p.shape[-1] ** 0.5, generator=gen)
    hf_config = transformers.Qwen2MoeConfig(**config.to_hf_dict())
    theirs = Qwen2MoeSparseMoeBlock(hf_config).eval()
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
        theirs.experts.gate_up_proj.copy_(torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight])
                                                       for e in ours.experts]))
        theirs.experts.down_proj.copy_(torch.stack([e.down_proj.weight for e in ours.experts]))
        theirs.shared_expert.load_state_dict(ours.shared_expert.state_dict())
        theirs.shared_expert_gate.weight.copy_(ours.shared_expert_gate.weight)
    return ours, theirs, hf_config


def bf16_copies(ours, theirs):
    """Our block with bf16 experts, and transformers' block wholly in bf16 (it has no mixed mode)."""
    import copy

    ours_bf16, theirs_bf16 = copy.deepcopy(ours), copy.deepcopy(theirs).to(torch.bfloat16)
    set_expert_dtype(ours_bf16, torch.bfloat16)
    return ours_bf16, theirs_bf16


def int4_copy(ours, config):
    """Our block with its experts quantised as an int4 model's are."""
    import copy

    return quantize_moe_block(copy.deepcopy(ours), config, "int4")


def measure(n_tokens: int, blocks, hf_config, repeats: int, wait: float) -> dict:
    ours, ours_bf16, ours_int4, theirs, theirs_bf16 = blocks
    x = torch.randn(1, n_tokens, ours.gate.in_features, generator=torch.Generator().manual_seed(n_tokens))
    x_bf16 = x.bfloat16()

    def run_theirs(block, impl, x):
        def run():
            hf_config._experts_implementation = impl
            return block(x)
        return run

    engines = {"qwen2": lambda: ours(x), "qwen2 bf16 experts": lambda: ours_bf16(x),
               "qwen2 int4 experts": lambda: ours_int4(x),
               "transformers eager": run_theirs(theirs, "eager", x),
               "transformers grouped_mm": run_theirs(theirs, "grouped_mm", x),
               "transformers eager bf16": run_theirs(theirs_bf16, "eager", x_bf16)}
    with torch.no_grad():
        expected = ours(x)
        outputs = {name: run().float() for name, run in engines.items()}
        diffs = {name: (y - expected).abs().max().item() for name, y in outputs.items()}
        rel_errors = {name: ((y - expected).norm() / expected.norm()).item() for name, y in outputs.items()}
        assert all(d <= 1e-4 for name, d in diffs.items() if "bf16" not in name and "int4" not in name), diffs
        assert all(e <= (0.15 if "int4" in name else 2e-2) for name, e in rel_errors.items()), rel_errors
        waited = wait_for_quiet(wait)
        times = {name: [] for name in engines}
        watch = CpuWatch()
        for _ in range(repeats):
            for name, run in engines.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    others = watch.others_share()
    tok_s = {name: n_tokens / statistics.median(t) for name, t in times.items()}
    row = {"tokens": n_tokens, "repeats": repeats, "times_s": times, "tok_s": tok_s, "max_abs_diff": diffs,
           "relative_error": rel_errors, "vs_eager": tok_s["qwen2"] / tok_s["transformers eager"],
           "vs_grouped_mm": tok_s["qwen2"] / tok_s["transformers grouped_mm"],
           "bf16_experts_vs_eager": tok_s["qwen2 bf16 experts"] / tok_s["transformers eager"],
           "bf16_experts_vs_eager_bf16": tok_s["qwen2 bf16 experts"] / tok_s["transformers eager bf16"],
           "int4_experts_vs_fp32": tok_s["qwen2 int4 experts"] / tok_s["qwen2"],
           "int4_experts_vs_bf16_experts": tok_s["qwen2 int4 experts"] / tok_s["qwen2 bf16 experts"],
           "others_cpu_pct": round(100 * others, 1), "quiet_before_pct": round(waited, 1)}
    print(f"  {n_tokens:4d} tokens: " + ", ".join(f"{k} {v:,.1f} tok/s" for k, v in tok_s.items())
          + f"; x{row['vs_eager']:.2f} vs eager, x{row['vs_grouped_mm']:.2f} vs grouped_mm; bf16 experts "
          + f"x{row['bf16_experts_vs_eager']:.2f} vs eager, x{row['bf16_experts_vs_eager_bf16']:.2f} vs eager bf16; "
          + f"int4 experts x{row['int4_experts_vs_fp32']:.2f} vs qwen2 fp32, x{row['int4_experts_vs_bf16_experts']:.2f} vs bf16"
          + f" (others used {row['others_cpu_pct']}% of the CPU)", flush=True)
    return row


def table(rows: list[dict]) -> str:
    """Two tables: throughput (tok/s) of every row, then the ratios and the bf16 and int4 rows' errors."""
    names = list(rows[0]["tok_s"])
    lines = ["| tokens | " + " | ".join(f"{n} tok/s" for n in names) + " | CPU taken by others |",
             "| ---: |" + " ---: |" * (len(names) + 1)]
    lines += [f"| {r['tokens']} | " + " | ".join(f"{r['tok_s'][n]:,.1f}" for n in names)
              + f" | {r['others_cpu_pct']}% |" for r in rows]
    lines += ["", "| tokens | qwen2 vs eager | qwen2 vs grouped_mm | **bf16 experts vs eager** | "
              "bf16 experts vs eager bf16 | **int4 experts vs qwen2 fp32** | int4 vs bf16 experts | "
              "error of bf16 experts | error of int4 experts | error of transformers bf16 |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['tokens']} | {r['vs_eager']:.2f}x | {r['vs_grouped_mm']:.2f}x | **{r['bf16_experts_vs_eager']:.2f}x** | "
              f"{r['bf16_experts_vs_eager_bf16']:.2f}x | **{r['int4_experts_vs_fp32']:.2f}x** | "
              f"{r['int4_experts_vs_bf16_experts']:.2f}x | {r['relative_error']['qwen2 bf16 experts']:.1e} | "
              f"{r['relative_error']['qwen2 int4 experts']:.1e} | {r['relative_error']['transformers eager bf16']:.1e} |"
              for r in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=int, default=4, help="divide the 57B-A14B layer's widths by this (default 4)")
    p.add_argument("--tokens", default="1,16,512", help="token counts, comma-separated")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per engine (default 40/15/5 by size)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait-quiet", type=float, default=20.0, help="seconds to wait for a quiet machine per size")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "moe.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    set_torch_threads(args.threads)
    config = layer_config(args.scale)
    shape = (f"hidden {config.hidden_size}, {config.num_experts} experts x {config.moe_intermediate_size} wide, "
             f"top-{config.num_experts_per_tok}, shared expert {config.shared_expert_intermediate_size} wide")
    print(f"Qwen2-57B-A14B MoE layer / {args.scale}: {shape}", flush=True)
    ours, theirs, hf_config = make_blocks(config)
    ours_bf16, theirs_bf16 = bf16_copies(ours, theirs)
    blocks = (ours, ours_bf16, int4_copy(ours, config), theirs, theirs_bf16)
    rows = [measure(n, blocks, hf_config, args.repeats or REPEATS.get(n, 10), args.wait_quiet)
            for n in (int(t) for t in args.tokens.split(","))]
    md = table(rows)
    print("\n" + md)
    facts = machine_facts(args.threads)
    data = {"layer": f"Qwen2-57B-A14B MoE layer, widths / {args.scale}", "scale": args.scale,
            "config": {k: getattr(config, k) for k in ("hidden_size", "num_experts", "num_experts_per_tok",
                                                      "moe_intermediate_size", "shared_expert_intermediate_size",
                                                      "norm_topk_prob")},
            "machine": facts, "rows": rows}
    header = (f"MoE layer throughput, Qwen2-57B-A14B layer / {args.scale} ({shape}), fp32 unless named bf16 or int4, {args.threads} thread{'s' * (args.threads != 1)}, "
              f"median of the repeats; {facts['cpu']}, torch {facts['torch']}, transformers {facts['transformers']}, "
              f"{facts['date']}.\n\n")
    write_results(args.out, data, header + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
