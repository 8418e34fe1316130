"""Two or more versions of the decode kernels (`qwen2/kernels/quant_linear.cpp`), side by side, on a
model's own quantised weights: for kernel work, "is this change faster, and where?".

Each source (a file, or `git:REV` for the file as it was at a commit) is compiled as its own op
namespace into the same process, then every quantised linear of the model (`qwen2.load(...,
quantize=...)`, one decode step's worth: ~200 calls for the 1.5B model) runs through each version in
turn with one row of x (--rows: a batch's), the versions alternating round after round so that a
noisy moment of this shared machine falls on all of them. Outputs must equal the first source's bit for bit (a kernel
change that is only about speed must not change a number), or with --rtol differ by at most that
fraction of the largest output (a change that adds the same products in another order). Per kind of layer: ms per decode step
and GB/s (its weight bytes, scales included / time). Then whole decode steps, everything else
included: `decode_steps` after a 512-token prompt, the model's layers switched from build to build, through
the eager executor (`make_decoder(model, "eager")`: each block in Python, so every linear calls its own
layer's ops; the native executor calls the installed build's ops whatever a layer holds),
--decode-steps steps per round, --rounds / 2 rounds; per source the median step of each round, and
the best round.

    python -m benchmarks.speed.bench_kernel_sources git:HEAD~1 qwen2/kernels/quant_linear.cpp
    python -m benchmarks.speed.bench_kernel_sources --model qwen2.5-coder-0.5b-instruct git:HEAD~1 qwen2/kernels/quant_linear.cpp

Results: printed, and with --out a JSON plus a markdown table beside it (written atomically).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import qwen2
from benchmarks.common import REPO_ROOT
from qwen2 import kernels
from qwen2.checkpoint.registry import cache_dir
from qwen2.fileio import write_text_atomic
from qwen2.quant import QuantLinear

NAMESPACE = "qwen2_kernels"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO_ROOT, *args], check=True, capture_output=True, text=True).stdout


def resolve(spec: str) -> str:
    """git:REV with REV as a short commit hash (HEAD~1 names another commit tomorrow); paths as given."""
    return f"git:{git('rev-parse', '--short', spec[4:]).strip()}" if spec.startswith("git:") else spec


def read_source(spec: str) -> str:
    """The text of a kernel source: a path, or git:REV (the repository's kernel file at REV)."""
    if spec.startswith("git:"):
        return git("show", f"{spec[4:]}:{os.path.relpath(kernels.SOURCE, REPO_ROOT)}")
    with open(spec, encoding="utf-8") as f:
        return f.read()


def build(spec: str, text: str):
    """Compile `text` with its ops renamed into a namespace of their own; returns that namespace."""
    from torch.utils.cpp_extension import load

    tag = "qwen2_kernels_" + hashlib.sha256(text.encode()).hexdigest()[:12]
    if f"TORCH_LIBRARY({NAMESPACE}," not in text:
        raise SystemExit(f"{spec}: no TORCH_LIBRARY({NAMESPACE}, ...) block to rename")
    text = text.replace(f"TORCH_LIBRARY({NAMESPACE},", f"TORCH_LIBRARY({tag},")
    text = text.replace(f"TORCH_LIBRARY_IMPL({NAMESPACE},", f"TORCH_LIBRARY_IMPL({tag},")
    directory = os.path.join(cache_dir(), "kernels", "variants", tag)
    os.makedirs(directory, exist_ok=True)
    source = os.path.join(directory, f"{tag}.cpp")
    write_text_atomic(source, text)
    print(f"building {spec} ...", file=sys.stderr, flush=True)
    load(name=tag, sources=[source], extra_cflags=kernels.cflags(), extra_ldflags=kernels.LDFLAGS,
         extra_include_paths=[os.path.dirname(kernels.SOURCE)],  # its headers (layer_kinds.h)
         build_directory=directory, is_python_module=False, verbose=False)
    return WithInstalledOps(getattr(torch.ops, tag))


class WithInstalledOps:
    """A build's op namespace; the ops its source does not define (the prefill's GEMM, in quant_gemm.cpp)
    come from the installed kernels, so a decode step's prefill runs whichever build its layers hold."""

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name: str):
        try:
            return getattr(self.ops, name)
        except AttributeError:
            return getattr(kernels.ops(), name)


def layer_kind(name: str, layer: QuantLinear) -> str:
    return f"{name.rsplit('.', 1)[-1]} {layer.mode}"


def run_with(layer: QuantLinear, ops, x: torch.Tensor) -> torch.Tensor:
    """The layer's kernel call, through another build's ops (the layer reads its ops from `_ops`)."""
    layer._ops = ops
    return layer._kernel(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", help="kernel sources: paths or git:REV (the first is the baseline)")
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--quantize", default="int4")
    p.add_argument("--rounds", type=int, default=8, help="decode steps' worth of calls per source (the first untimed)")
    p.add_argument("--decode-steps", type=int, default=64, help="whole decode steps per source and round, over rounds / 2 rounds (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=1, help="rows of x per call, and sequences per decode step (a batch)")
    p.add_argument("--rtol", type=float, default=0.0,
                   help="accept outputs within rtol x max|y| of the first source's (default 0: bit for bit)")
    p.add_argument("--out", default=None, help="JSON results (a .md table is written beside it)")
    args = p.parse_args(argv)
    if len(args.sources) < 2:
        p.error("give at least two sources to compare")
    torch.set_num_threads(args.threads)
    args.sources = [resolve(spec) for spec in args.sources]
    builds = [(spec, build(spec, read_source(spec))) for spec in args.sources]
    loaded = qwen2.load(args.model, quantize=args.quantize, progress=False)
    model = loaded.model
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.kernel_ok]
    if not layers:
        raise SystemExit(f"{args.model} with quantize={args.quantize!r} has no kernel layers here ({kernels.status()})")
    generator = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(args.rows, k, generator=generator) for k in {m.in_features for _, m in layers}}
    for name, layer in layers:
        reference = run_with(layer, builds[0][1], xs[layer.in_features])
        for spec, ops in builds[1:]:
            difference = (run_with(layer, ops, xs[layer.in_features]) - reference).abs().max().item()
            if difference > args.rtol * reference.abs().max().item():
                raise SystemExit(f"{spec} changes the output of {name} by {difference:.3g} (against {builds[0][0]}; "
                                 f"--rtol {args.rtol})")
    seconds = {spec: collections.defaultdict(float) for spec, _ in builds}
    bytes_per_step = collections.defaultdict(int)
    for name, layer in layers:
        bytes_per_step[layer_kind(name, layer)] += layer.weight_bytes
    for round_ in range(args.rounds):
        for spec, ops in builds:
            for name, layer in layers:
                x = xs[layer.in_features]
                start = time.perf_counter()
                run_with(layer, ops, x)
                if round_ > 0:
                    seconds[spec][layer_kind(name, layer)] += time.perf_counter() - start
    timed = args.rounds - 1
    kinds = sorted(bytes_per_step, key=lambda k: -seconds[builds[0][0]][k])
    rows = [{"layer": kind, "mb_per_step": bytes_per_step[kind] / 1e6,
             **{spec: {"ms_per_step": seconds[spec][kind] / timed * 1e3,
                       "gb_s": bytes_per_step[kind] * timed / seconds[spec][kind] / 1e9} for spec, _ in builds}}
            for kind in kinds]
    totals = {spec: sum(seconds[spec].values()) / timed * 1e3 for spec, _ in builds}
    steps = decode_step_ms(loaded, layers, builds, args) if args.decode_steps else {}
    table = markdown(args, rows, totals, [spec for spec, _ in builds], steps)
    print(table)
    if args.out:
        write_text_atomic(args.out, json.dumps({"settings": vars(args), "torch": torch.__version__,
                                                "rows": rows, "total_ms_per_step": totals,
                                                "decode_step_ms_by_round": steps}, indent=1))
        write_text_atomic(os.path.splitext(args.out)[0] + ".md", table)
        print(f"wrote {args.out} and its .md", file=sys.stderr)
    return 0


def decode_step_ms(loaded, layers, builds, args) -> dict[str, list[float]]:
    """Per source, the median decode step (ms) of each round: greedy decoding after a 512-token prompt
    (this repository's README), every round running each build in turn, through the eager executor (every
    linear through its layer's `_ops`)."""
    from qwen2.runtime.executor import make_decoder
    from qwen2.runtime.generate import SamplingParams, decode_steps

    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        prompt = loaded.tokenizer.encode(f.read())[:512]
    params = SamplingParams(max_new_tokens=args.decode_steps + 1, temperature=0.0)
    medians: dict[str, list[float]] = {spec: [] for spec, _ in builds}
    eager = make_decoder(loaded.model, "eager")
    for _ in range(args.rounds // 2):
        for spec, ops in builds:
            for _, layer in layers:
                layer._ops = ops
            with torch.inference_mode():
                tokens = decode_steps(eager, [prompt] * args.rows, params)
                next(tokens)  # the prefill's token
                times = []
                for _ in range(args.decode_steps):
                    start = time.perf_counter()
                    next(tokens)
                    times.append((time.perf_counter() - start) * 1e3)
            medians[spec].append(statistics.median(times))
    return medians


def markdown(args, rows, totals, specs, steps) -> str:
    head = (f"# Decode kernels by source: {args.model}, quantize={args.quantize}, {args.rows} row(s) of x, "
            f"{args.threads} threads, {args.rounds - 1} decode steps' worth of calls each\n\n"
            "| layer | MB / step | " + " | ".join(f"{s} ms / step | GB/s" for s in specs) + " |\n"
            "| --- | ---: | " + " | ".join("---: | ---:" for _ in specs) + " |\n")
    body = "".join(f"| {r['layer']} | {r['mb_per_step']:.1f} | "
                   + " | ".join(f"{r[s]['ms_per_step']:.2f} | {r[s]['gb_s']:.1f}" for s in specs) + " |\n"
                   for r in rows)
    total = "| **all** | {:.1f} | ".format(sum(r["mb_per_step"] for r in rows)) + " | ".join(
        f"**{totals[s]:.2f}** | {sum(r['mb_per_step'] for r in rows) / totals[s]:.1f}" for s in specs) + " |\n"
    if steps:
        total += (f"\nWhole decode steps (median step of {args.decode_steps}, 512-token prompt; best round, then every round): "
                  + "; ".join(f"{s} **{min(steps[s]):.1f} ms** ({', '.join(f'{v:.1f}' for v in steps[s])})" for s in specs) + "\n")
    return head + body + total


if __name__ == "__main__":
    sys.exit(main())
