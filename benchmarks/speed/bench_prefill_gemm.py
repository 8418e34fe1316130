"""The prefill's integer GEMM (`qwen2/kernels/quant_gemm.cpp`) against what prefill ran before it, layer by layer,
on the real model's own quantised layers, for each build of the kernels this CPU runs.

For every distinct (layout, out, in) of the int4 model's block linears (`qwen2.load(model, quantize="int4")`),
--rows rows of x (default 512: the prompt of the speed table), --threads threads:
  gemm        the layer's "gemm" backend: x rounded to int8 per block of 32, integer dot products against the
              weights repacked a panel at a time
  dequant     the "dense" backend where this build has bf16 units (bf16 weights dequantised in row chunks,
              one bf16 GEMM), else "reference" (fp32 dequantisation, one fp32 GEMM): what prefill ran before
and, for the layer with the most weights, the decode kernel's time over the GEMM's at a few row counts (where
"auto" should switch: `QuantLinear.gemm_rows`). GMAC/s = rows x out x in / best of --repeats.

Builds: this CPU's native one and, where the CPU has AVX-512, the 256-bit one with AVX-512 off for PyTorch and
the kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 QWEN2_KERNELS_ISA=avx2),
each in a process of its own.

    python -m benchmarks.speed.bench_prefill_gemm                                   # 1.5B, both builds
    python -m benchmarks.speed.bench_prefill_gemm --model qwen2.5-coder-0.5b-instruct
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from benchmarks.common import RESULTS_DIR, command_line, machine_facts, spawn, wait_for_quiet, write_results
from benchmarks.worker import run_worker

MODULE = "benchmarks.speed.bench_prefill_gemm"
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "QWEN2_KERNELS_ISA": "avx2"}
CROSSOVER_ROWS = (4, 8, 12, 16, 24, 32)


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def worker_layers(job: dict) -> dict:
    import torch

    import qwen2
    from qwen2 import kernels
    from qwen2.quant.linear import quantized_linears

    torch.set_num_threads(job["threads"])
    model = qwen2.load(job["model"], quantize="int4")
    layers = {}
    for name, layer in quantized_linears(model.model).items():
        if "lm_head" not in name:  # a prefill multiplies only the last row by the head
            layers.setdefault((layer.mode, layer.out_features, layer.in_features), (name, layer))
    rows, repeats, results = job["rows"], job["repeats"], []
    for (mode, n, k), (name, layer) in layers.items():
        x = torch.randn(rows, k)
        timings = {}
        for backend in ("gemm", "dense" if layer.dense_dtype != torch.float32 else "reference"):
            layer.backend = backend
            timings[backend] = best_of(lambda: layer(x), repeats)
        layer.backend = "auto"
        old = "dense" if "dense" in timings else "reference"
        results.append({"layer": name.split(".", 2)[-1], "layout": mode, "out": n, "in": k, "old_path": old,
                        "gemm_gmac_s": rows * n * k / timings["gemm"] / 1e9,
                        "old_gmac_s": rows * n * k / timings[old] / 1e9, "speedup": timings[old] / timings["gemm"]})
    (mode, n, k), (name, biggest) = max(layers.items(), key=lambda item: item[0][1] * item[0][2])
    crossover = {}
    for m in CROSSOVER_ROWS:
        x = torch.randn(m, k)
        biggest.backend = "kernel"
        kernel = best_of(lambda: biggest(x), repeats)
        biggest.backend = "gemm"
        crossover[m] = kernel / best_of(lambda: biggest(x), repeats)
    biggest.backend = "auto"
    return {"status": "ok", "vector_isa": kernels.ops().vector_isa(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "layers": results, "crossover_layer": f"{mode} {n} x {k}", "kernel_over_gemm": crossover,
            "gemm_rows": biggest.gemm_rows}


WORKERS = {"layers": worker_layers}


def builds() -> dict[str, dict]:
    from qwen2 import kernels

    native = {"native": {}}
    return native | ({"avx2": AVX2_ONLY} if "avx512f" in kernels._cpu_flags().split() else {})


def report(data: dict) -> str:
    lines = [f"model {data['settings']['model']}, {data['settings']['rows']} rows of x, {data['settings']['threads']} "
             f"threads, best of {data['settings']['repeats']}; {data['machine']['cpu']}, {data['machine']['date']}", ""]
    for build, r in data["builds"].items():
        if r.get("status") != "ok":
            lines += [f"**{build}**: {r.get('status')}: {r.get('error')}", ""]
            continue
        lines += [f"**{build}** build: kernels {r['vector_isa']}, PyTorch {r['cpu_capability']}", "",
                  "| layer | layout | out x in | GEMM GMAC/s | before (path) GMAC/s | speed-up |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {x['layer']} | {x['layout']} | {x['out']} x {x['in']} | {x['gemm_gmac_s']:.1f} | "
                  f"{x['old_gmac_s']:.1f} ({x['old_path']}) | {x['speedup']:.2f}x |" for x in r["layers"]]
        cross = ", ".join(f"{m} rows {v:.2f}" for m, v in r["kernel_over_gemm"].items())
        lines += ["", f"decode kernel time / GEMM time, {r['crossover_layer']}: {cross} (auto takes the GEMM from "
                  f"{r['gemm_rows']} rows)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--wait-quiet", type=float, default=60, metavar="SECONDS")
    p.add_argument("--out", help="JSON result file (default: benchmarks/results/prefill_gemm-<model>.json)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(WORKERS, args.worker, args.job, args.result, {})
        return 0
    job = {"model": args.model, "rows": args.rows, "threads": args.threads, "repeats": args.repeats}
    results = {}
    with tempfile.TemporaryDirectory(prefix="qwen2-gemm-") as scratch:
        for build, env in builds().items():
            print(f"{build} build", file=sys.stderr, flush=True)
            wait_for_quiet(args.wait_quiet)
            results[build] = spawn(MODULE, "layers", job, scratch, dict(os.environ, **env), timeout=1800)
    data = {"settings": job | {"command": command_line(MODULE, argv)}, "machine": machine_facts(args.threads),
            "builds": results}
    text = report(data)
    print(text)
    slug = os.path.basename(args.model.rstrip("/")).removesuffix(".gguf")
    out = args.out or os.path.join(RESULTS_DIR, f"prefill_gemm-{slug}.json")
    write_results(out, data, "```\n" + data["settings"]["command"] + "\n```\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
