"""Fast on every CPU kind: the int4 engine against llama.cpp on the same GGUF, for each build this CPU can
run, in one sitting, with where one decode step's time goes.

Builds: the machine's native one, and where the CPU has AVX-512 also the 256-bit (AVX2) one with
AVX-512 turned off for PyTorch and the kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2 QWEN2_KERNELS_ISA=avx2) and llama.cpp loaded from an AVX2-only build of its
libraries (LLAMA_CPP_LIB_PATH=--llama-avx2-lib). On an AVX2-only CPU the native build is the AVX2 one.

For each round (--rounds, builds and engines in alternating order), build and model (--models), in
processes with the build's environment:
  1. `python -m benchmarks.speed.bench_inference --engines qwen2-int4,llama.cpp --batch-sizes 8`: the read
     bandwidth, then each engine in a fresh process: prefill of --prompt-tokens, --new-tokens greedy decode
     steps (batch 1), batch 8 aggregate decode, the weight bytes a token reads (see its docstring)
  2. a breakdown worker: `qwen2.load(model, quantize="int4")`, the benchmark prompt
     (`benchmarks.common.build_prompt_ids`) prefilled and --new-tokens decode steps timed as
     bench_inference times them (`decode_steps`, native executor), then the step's pieces alone, each the
     median of --piece-repeats passes:
       kernels    every quantised linear of the model (`qwen2.quant.linear.quantized_linears`: one decode
                  step calls each once), its kernel op called on a (1, in_features) fp32 row; op calls from
                  Python cost a few µs each that the step's native calls do not, so this errs a little high
       attention  every layer's `torch.ops.qwen2_kernels.decode_attention` (RoPE, the cache write, attention),
                  one new token over a KV cache of the timed steps' middle length (prompt + new tokens / 2)
       rest       the median step minus both: norms, SwiGLU, residuals, embedding row, greedy choice, Python
Reported per build and model, medians over the rounds:
  decode tok/s    batch 1, ours / llama.cpp = ratio (target >= 1.3x)
  batch 8 tok/s   aggregate, ours / llama.cpp = ratio (target >= 2x)
  prefill tok/s   of the prompt (512 tokens), ours / llama.cpp = ratio (target >= 1.5x)
  bandwidth       weight bytes x decode tokens/s at batch 1 as a share of the read bandwidth measured in the
                  same run, ours and llama.cpp's
  step            ms per decode step, and kernels / attention / rest in ms and % of it

Results: benchmarks/results/cpu_kinds-<avx512|avx2>.json, .md and .png (the ratios against their targets);
with --smoke (0.5B only, a short prompt, one round) under runs/cpu_kinds-smoke/ instead.

    python -m benchmarks.speed.bench_cpu_kinds                      # both models, 2 rounds: the full run
    python -m benchmarks.speed.bench_cpu_kinds --smoke              # end to end in a few minutes
    python -m benchmarks.speed.bench_cpu_kinds --models qwen2.5-coder-0.5b-instruct --rounds 3

The AVX2-only llama.cpp (the same version as the installed llama-cpp-python, AVX-512 and AMX off; the
wheel's libraries find each other through their $ORIGIN run path; --no-cache-dir, or pip reuses the wheel
it built before with other CMAKE_ARGS):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \\
      -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \\
      CMAKE_BUILD_PARALLEL_LEVEL=2 pip wheel --no-cache-dir --no-deps llama-cpp-python==0.3.36 -w /tmp/llama/avx2
    cd /tmp/llama/avx2 && unzip -o llama_cpp_python-*.whl 'llama_cpp/lib/*' && mv llama_cpp/lib lib

Without it the AVX2 build's llama.cpp cells say "not available"; without llama-cpp-python, "not installed".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from benchmarks.common import (REPO_ROOT, RESULTS_DIR, build_prompt_ids, command_line, fmt, machine_facts, save_png,
                               set_torch_threads, spawn, timed, wait_for_quiet, write_results)
from benchmarks.speed.bench_inference import (QWEN2_ENGINES, NotAvailable, Qwen2Engine, achieved_gb_s, load_qwen2,
                                              measure_greedy, measure_warmup, ok, throughput)
from benchmarks.worker import run_worker

MODULE = "benchmarks.speed.bench_cpu_kinds"
INFERENCE_MODULE = "benchmarks.speed.bench_inference"
MODELS = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
OURS, LLAMA = "qwen2-int4", "llama.cpp"
BATCH = 8
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "QWEN2_KERNELS_ISA": "avx2"}
LLAMA_LIB_ENV = "LLAMA_CPP_LIB_PATH"
DEFAULT_LLAMA_AVX2_LIB = "/tmp/llama/avx2/lib"
# (measurement as bench_inference's `throughput` names it, what the table calls it, ours / llama.cpp at least)
TARGETS = (("decode", "decode batch 1", 1.3), (BATCH, f"decode batch {BATCH}, aggregate", 2.0),
           ("prefill", "prefill", 1.5))
FULL = {"models": ",".join(MODELS), "rounds": 2, "prompt_tokens": 512, "new_tokens": 128, "batch_new_tokens": 32,
        "repeats": 3, "piece_repeats": 20, "wait_quiet": 120.0}
SMOKE = {"models": MODELS[0], "rounds": 1, "prompt_tokens": 64, "new_tokens": 8, "batch_new_tokens": 4,
         "repeats": 1, "piece_repeats": 3, "wait_quiet": 0.0}


# --------------------------------------------------------------------------------------------------
# The CPU and its builds
# --------------------------------------------------------------------------------------------------

def cpu_flags() -> set[str]:
    """The CPU's feature flags, as the kernels' build reads them."""
    from qwen2 import kernels  # here, not at the top: importing it imports torch

    return set(kernels._cpu_flags().split(":", 1)[-1].split())


def cpu_kind(flags: set[str]) -> str:
    """The result files' slug: avx512 (the CPU has AVX-512 F), avx2, or other."""
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def notable_flags(flags: set[str]) -> list[str]:
    """The flags that choose kernels: AVX-512 (all of them), VNNI, BF16, AMX."""
    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or "vnni" in f or "bf16" in f)


@dataclass(frozen=True)
class Build:
    name: str
    label: str
    env: dict = field(default_factory=dict)  # set in every process of the build; AVX2_ENV's other keys removed
    llama_lib: str | None = None  # LLAMA_CPP_LIB_PATH; None: the installed llama-cpp-python's own libraries
    llama_missing: str | None = None  # why llama.cpp does not run in this build

    def process_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in AVX2_ENV and k != LLAMA_LIB_ENV}
        env |= self.env
        if self.llama_lib:
            env[LLAMA_LIB_ENV] = self.llama_lib
        return env


def cpu_builds(kind: str, llama_avx2_lib: str) -> list[Build]:
    if kind != "avx512":
        return [Build("native", f"native ({kind.upper()})")]
    found = os.path.isfile(os.path.join(llama_avx2_lib, "libllama.so"))
    avx2 = Build("avx2", "AVX2 (AVX-512 off)", dict(AVX2_ENV), llama_avx2_lib if found else None,
                 None if found else f"not available: build an AVX2-only libllama.so into {llama_avx2_lib} "
                                    f"(python -m {MODULE} --help says how)")
    return [Build("native", "native (AVX-512)"), avx2]


def model_label(model: str) -> str:
    size = re.search(r"(\d+(?:\.\d+)?)b\b", os.path.basename(model).lower())
    return f"{size.group(1)}B" if size else os.path.basename(model)


# --------------------------------------------------------------------------------------------------
# The breakdown worker: one decode step, then its pieces alone
# --------------------------------------------------------------------------------------------------

def median_pass_s(one_pass, repeats: int) -> float:
    """Median seconds of `one_pass()` over `repeats` calls, after one untimed call."""
    one_pass()
    return statistics.median(timed(one_pass)[1] for _ in range(repeats))


def time_linears(model, repeats: int) -> dict:
    """One decode step's quantised-linear kernel calls: each layer's op on one row of x."""
    import torch

    from qwen2.quant.linear import quantized_linears

    layers = list(quantized_linears(model).values())
    off_kernel = [layer for layer in layers if layer.path(1) != "kernel"]
    if off_kernel:
        raise NotAvailable(f"{len(off_kernel)} quantised linears do not take the kernel at one row here")
    generator = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(1, k, generator=generator) for k in {layer.in_features for layer in layers}}
    calls = [(layer._kernel, xs[layer.in_features]) for layer in layers]

    def one_step():
        for kernel, x in calls:
            kernel(x)

    with torch.inference_mode():
        seconds = median_pass_s(one_step, repeats)
    weight_bytes = sum(layer.weight_bytes for layer in layers)
    modes = {}
    for layer in layers:
        modes[layer.mode] = modes.get(layer.mode, 0) + 1
    return {"kernels_ms": 1e3 * seconds, "kernel_calls": len(calls), "kernel_modes": modes,
            "kernel_weight_bytes": weight_bytes, "kernels_gb_s": weight_bytes / seconds / 1e9}


def time_attention(model, context: int, repeats: int) -> dict:
    """Every layer's native decode attention of one new token after `context` cached ones."""
    import torch

    from qwen2 import kernels

    config, ops = model.config, kernels.ops()
    nh, nkv, hs = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    generator = torch.Generator().manual_seed(0)
    cache = model.new_cache(1, context + 1)
    cache.k.normal_(generator=generator), cache.v.normal_(generator=generator)
    cache.length = context
    q, k, v = (torch.randn(1, 1, n, hs, generator=generator) for n in (nh, nkv, nkv))
    cos, sin = model.rope(torch.tensor([[context]]), torch.float32)
    slots, scale = cache.first_slots(1), hs ** -0.5
    per_layer = [(cache.k[i], cache.v[i]) for i in range(config.num_hidden_layers)]

    def one_step():
        for cache_k, cache_v in per_layer:
            ops.decode_attention(q, k, v, cos, sin, cache_k, cache_v, slots, None, scale)

    with torch.inference_mode():
        seconds = median_pass_s(one_step, repeats)
    return {"attention_ms": 1e3 * seconds, "attention_layers": len(per_layer), "attention_context": context}


def worker_breakdown(job: dict) -> dict:
    """Decode steps of the int4 engine as bench_inference times them, then one step's kernels and attention."""
    import torch

    from qwen2 import kernels

    set_torch_threads(job["threads"])
    m, load_s = load_qwen2(job["model"], QWEN2_ENGINES[OURS].load)
    if kernels.ops() is None:
        raise NotAvailable(f"no native kernels here: {kernels.status()}")
    ids = build_prompt_ids(m.tokenizer, job["prompt_tokens"])
    n = job["new_tokens"] + 1  # the prefill's token and new_tokens decode steps, as bench_inference counts
    pad_id = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
    engine = Qwen2Engine(m.decoder, pad_id)
    measure_warmup(engine, ids, n)
    decode = measure_greedy(engine, ids, n, f"{model_label(job['model'])} breakdown")
    steps = decode["decode_step_s"]
    pieces = time_linears(m.model, job["piece_repeats"]) | time_attention(m.model, len(ids) + len(steps) // 2,
                                                                          job["piece_repeats"])
    step_ms = 1e3 * statistics.median(steps)
    return {**pieces, "step_ms": step_ms, "step_mean_ms": 1e3 * decode["decode_s"] / len(steps),
            "decode_tok_s": decode["decode_tok_s"], "decode_steps": len(steps),
            "rest_ms": step_ms - pieces["kernels_ms"] - pieces["attention_ms"], "load_s": load_s,
            "executor": m.decoder.name, "kernels_isa": kernels.ops().vector_isa(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


WORKERS = {"breakdown": worker_breakdown}


# --------------------------------------------------------------------------------------------------
# The parent: rounds of bench_inference and breakdown processes
# --------------------------------------------------------------------------------------------------

KEPT = ("status", "error", "prefill_tok_s", "decode_tok_s", "decode_s", "decode_forwards", "weight_bytes_per_token",
        "load_s", "peak_rss_mb", "others_cpu_pct", "executor", "weights", "version", "system_info")


def kept(result: dict) -> dict:
    """What this report needs of one bench_inference engine result (not its tokens and step times)."""
    out = {k: result[k] for k in KEPT if k in result}
    out["batch"] = {size: {k: v for k, v in b.items() if k in ("status", "error", "tok_s", "batch_size")}
                    for size, b in result.get("batch", {}).items()}
    return out


def run_inference(model: str, engines: list[str], env: dict, args, scratch: str) -> dict:
    """One bench_inference run in `env`: {"engines": {name: kept result}, "read_bandwidth_gb_s": ...}."""
    out = os.path.join(scratch, "inference.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, "-m", INFERENCE_MODULE, "--model", model, "--engines", ",".join(engines),
           "--batch-sizes", str(BATCH), "--out", out, "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--batch-new-tokens", str(args.batch_new_tokens),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--wait-quiet", str(args.wait_quiet),
           "--timeout", str(args.timeout)]
    try:  # its report to stderr: this script's stdout is its own table
        code = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=sys.stderr, timeout=args.timeout * 4).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    if not os.path.isfile(out):
        return {"status": "error", "error": f"bench_inference ended ({code}) without a result file"}
    with open(out) as f:
        data = json.load(f)
    return {"status": "ok", "read_bandwidth_gb_s": data["machine"].get("read_bandwidth_gb_s"),
            "engines": {name: kept(r) for name, r in data["engines"].items()}}


def run_rounds(builds: list[Build], args, scratch: str) -> list[dict]:
    """Every (round, build, model), builds and engines in reversed order every other round."""
    runs, total = [], args.rounds * len(builds) * len(args.models)
    for rnd in range(args.rounds):
        for build in builds if rnd % 2 == 0 else builds[::-1]:
            env = build.process_env()
            for model in args.models:
                engines = [OURS] + ([LLAMA] if build.llama_missing is None else [])
                engines = engines if rnd % 2 == 0 else engines[::-1]
                print(f"[{len(runs) + 1}/{total}] round {rnd + 1}, {build.label}, {model}: {', '.join(engines)}",
                      file=sys.stderr, flush=True)
                inference = run_inference(model, engines, env, args, scratch)
                job = {"model": model, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                       "new_tokens": args.new_tokens, "piece_repeats": args.piece_repeats}
                quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
                breakdown = (spawn(MODULE, "breakdown", job, scratch, env, args.timeout)
                             | {"others_cpu_pct_before": quiet})
                runs.append({"round": rnd, "build": build.name, "model": model, "engines_order": engines,
                             "inference": inference, "breakdown": breakdown})
                print(f"    {run_line(runs[-1])}", file=sys.stderr, flush=True)
    return runs


def run_line(run: dict) -> str:
    inference, b = run["inference"], run["breakdown"]
    if inference.get("status") != "ok":
        return f"bench_inference: {inference.get('error')}"
    parts = []
    for name, r in inference["engines"].items():
        parts.append(f"{name} " + (f"decode {fmt(throughput(r, 'decode'))}, batch {BATCH} {fmt(throughput(r, BATCH))}, "
                                   f"prefill {fmt(throughput(r, 'prefill'))} tok/s" if ok(r) else
                                   f"{r.get('status')}: {r.get('error', '')}"))
    parts.append(f"step {fmt(b.get('step_ms'), '.2f')} ms = kernels {fmt(b.get('kernels_ms'), '.2f')} + attention "
                 f"{fmt(b.get('attention_ms'), '.2f')} + rest {fmt(b.get('rest_ms'), '.2f')}" if ok(b) else
                 f"breakdown {b.get('status')}: {b.get('error')}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Summary, tables, plot
# --------------------------------------------------------------------------------------------------

def median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def engine_results(runs: list[dict], engine: str) -> list[tuple[dict, float | None]]:
    """(engine result, the run's read bandwidth) of every run that has one."""
    return [(r["inference"]["engines"][engine], r["inference"].get("read_bandwidth_gb_s")) for r in runs
            if r["inference"].get("status") == "ok" and engine in r["inference"]["engines"]]


def engine_summary(results: list[tuple[dict, float | None]]) -> dict:
    good = [(r, bw) for r, bw in results if ok(r)]
    summary = {str(what): median_or_none(throughput(r, what) for r, _ in good) for what, _, _ in TARGETS}
    summary["bandwidth_share"] = median_or_none(achieved_gb_s(r) / bw if bw and achieved_gb_s(r) else None
                                                for r, bw in good)
    summary["achieved_gb_s"] = median_or_none(achieved_gb_s(r) for r, _ in good)
    summary["others_cpu_pct"] = max((r.get("others_cpu_pct") or 0 for r, _ in results), default=None)
    failed = [r for r, _ in results if not ok(r)]
    if not good:
        summary["missing"] = (f"{failed[0].get('status')}: {failed[0].get('error', '')}" if failed
                              else "no result")
    summary["system_info"] = next((r.get("system_info") for r, _ in good if r.get("system_info")), None)
    return summary


def summarize(runs: list[dict], builds: list[Build], models: list[str]) -> list[dict]:
    """One row per (build, model): medians over its rounds."""
    rows = []
    for build in builds:
        for model in models:
            mine = [r for r in runs if r["build"] == build.name and r["model"] == model]
            ours = engine_summary(engine_results(mine, OURS))
            if build.llama_missing:
                llama = {"missing": build.llama_missing}
            else:
                llama = engine_summary(engine_results(mine, LLAMA))
            broken = [r["inference"]["error"] for r in mine if r["inference"].get("status") != "ok"]
            if broken and not engine_results(mine, OURS):
                ours["missing"] = broken[0]
                llama.setdefault("missing", broken[0])
            pieces = [r["breakdown"] for r in mine if ok(r["breakdown"])]
            breakdown = {k: median_or_none(p[k] for p in pieces) for k in ("step_ms", "kernels_ms", "attention_ms")}
            if breakdown["step_ms"] is not None:
                breakdown["rest_ms"] = breakdown["step_ms"] - breakdown["kernels_ms"] - breakdown["attention_ms"]
                breakdown |= {k: pieces[0][k] for k in ("kernels_isa", "torch_cpu_capability", "executor",
                                                        "attention_context", "kernel_calls")}
                breakdown["kernels_gb_s"] = median_or_none(p["kernels_gb_s"] for p in pieces)
            else:
                failed = [r["breakdown"] for r in mine]
                breakdown["missing"] = (f"{failed[0].get('status')}: {failed[0].get('error')}" if failed
                                        else "no result")
            ratios = {key: (ours[key] / llama[key] if ours.get(key) and llama.get(key) else None)
                      for key in map(str, (what for what, _, _ in TARGETS))}
            rows.append({"build": build.name, "model": model, "ours": ours, "llama.cpp": llama, "ratios": ratios,
                         "breakdown": breakdown, "rounds": len(mine)})
    return rows


def acceptance(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        for what, label, target in TARGETS:
            measured = row["ratios"][str(what)]
            out.append({"build": row["build"], "model": row["model"], "target": f"{label} >= {target}x llama.cpp",
                        "threshold": target, "measured": measured,
                        "verdict": "not measured" if measured is None else "met" if measured >= target else "not met",
                        "why_not_measured": None if measured is not None else (row["llama.cpp"].get("missing")
                                                                                or row["ours"].get("missing"))})
    return out


def versus(row: dict, what) -> str:
    """'ours / theirs = ratio' for one measurement; what is missing says why."""
    ours, llama = row["ours"], row["llama.cpp"]
    mine, theirs = ours.get(str(what)), llama.get(str(what))
    if mine is None:
        return f"– ({short(ours.get('missing'))})"
    if theirs is None:
        return f"{mine:.1f} / – ({short(llama.get('missing'))})"
    return f"{mine:.1f} / {theirs:.1f} = **{mine / theirs:.2f}×**"


def short(reason: str | None) -> str:
    """A missing measurement's reason as a table cell gives it: its status (the whole text is listed below)."""
    return (reason or "no result").split(":", 1)[0]


def share(summary: dict) -> str:
    return "–" if summary.get("bandwidth_share") is None else f"{100 * summary['bandwidth_share']:.0f} %"


def piece(breakdown: dict, key: str) -> str:
    ms, step = breakdown.get(key), breakdown.get("step_ms")
    return "–" if ms is None else f"{ms:.2f} ({100 * ms / step:.0f} %)"


def cell(text) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def build_lines(data: dict) -> list[str]:
    """Per build: its environment, what PyTorch and the kernels ran, llama.cpp's own system_info."""
    lines = []
    for build in data["builds"]:
        rows = [r for r in data["rows"] if r["build"] == build["name"]]
        b = next((r["breakdown"] for r in rows if "kernels_isa" in r["breakdown"]), {})
        info = next((r["llama.cpp"].get("system_info") for r in rows if r["llama.cpp"].get("system_info")), None)
        env = " ".join(f"{k}={v}" for k, v in build["env"].items()) or "no overrides"
        llama = (build["llama_missing"] or (f"{LLAMA_LIB_ENV}={build['llama_lib']}" if build["llama_lib"]
                                            else "the installed llama-cpp-python's libraries"))
        text = (f"* **{build['label']}**: env {env}; torch CPU capability {b.get('torch_cpu_capability', '–')}, "
                f"qwen2 kernels {b.get('kernels_isa', '–')}; llama.cpp: {llama}"
                + (f"; its system_info `{info}`" if info else ""))
        if build["name"] == "avx2" and info and "AVX512 = 1" in info:
            text += " — **warning: this llama.cpp uses AVX-512, the AVX2 library was not the one loaded**"
        lines.append(text)
    return lines


def markdown(data: dict) -> str:
    s, m = data["settings"], data["machine"]
    flags = ", ".join(data["cpu_flags"]) or "none of AVX-512, VNNI, BF16, AMX"
    out = [f"# Fast on every CPU kind: qwen2 int4 vs llama.cpp, {m['cpu']} ({data['cpu_kind']})", "",
           "```", s["command"], "```", "",
           f"CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs, {s['threads']} threads; flags: {flags}. "
           f"torch {m['torch']}, llama-cpp-python {m['llama_cpp'] or 'not installed'}, {m['date']}.", "",
           *build_lines(data), "",
           f"Each (round, build, model): `bench_inference --engines {OURS},{LLAMA} --batch-sizes {BATCH}` (prompt "
           f"{s['prompt_tokens']} tokens, {s['new_tokens']} decode steps, batch {BATCH} × {s['batch_new_tokens']} "
           f"steps, prefill median of {s['repeats']}), then the step breakdown in a process of its own; "
           f"{s['rounds']} round(s), builds and engines alternating; medians over the rounds. "
           "Cells: ours / llama.cpp = ratio (tok/s). Bandwidth: weight bytes × decode tokens/s at batch 1, of the "
           "read bandwidth measured in the same run. Step: median decode step of the breakdown process; kernels: "
           "one step's quantised-linear kernel calls alone; attention: every layer's native decode attention at "
           "the steps' middle cache length; rest: the step minus both.", "",
           f"| build | model | decode tok/s | batch {BATCH} tok/s | prefill tok/s | bandwidth ours / llama.cpp | "
           "step ms | kernels ms | attention ms | rest ms | CPU taken by others |",
           "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    labels = {b["name"]: b["label"] for b in data["builds"]}
    for row in data["rows"]:
        b = row["breakdown"]
        others = max((x for x in (row["ours"].get("others_cpu_pct"), row["llama.cpp"].get("others_cpu_pct"))
                      if x is not None), default=None)
        cells = [labels[row["build"]], model_label(row["model"]), versus(row, "decode"), versus(row, BATCH),
                 versus(row, "prefill"), f"{share(row['ours'])} / {share(row['llama.cpp'])}",
                 fmt(b.get("step_ms"), ".2f") if "missing" not in b else f"– ({short(b['missing'])})",
                 piece(b, "kernels_ms"), piece(b, "attention_ms"), piece(b, "rest_ms"), f"{fmt(others, '.0f')} %"]
        out.append("| " + " | ".join(cell(c) for c in cells) + " |")
    reasons = sorted({r for row in data["rows"] for r in (row["ours"].get("missing"), row["llama.cpp"].get("missing"),
                                                           row["breakdown"].get("missing")) if r})
    out += ["", "Cells without a number:", ""] + [f"* {cell(r)}" for r in reasons] if reasons else []
    out += ["", "## Acceptance", "", "| target | build | model | measured | |", "| --- | --- | --- | ---: | --- |"]
    for a in data["acceptance"]:
        measured = f"{a['measured']:.2f}×" if a["measured"] is not None else f"– ({short(a['why_not_measured'])})"
        out.append("| " + " | ".join(cell(c) for c in (a["target"], labels[a["build"]], model_label(a["model"]),
                                                        measured, a["verdict"])) + " |")
    if s["smoke"]:
        out += ["", "Smoke run (--smoke: a short prompt, few steps, one round): its numbers check the script, "
                    "they measure nothing."]
    return "\n".join(out) + "\n"


def plot(data: dict, path: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: nothing to show, no backend to pick

    rows = data["rows"]
    names = [f"{model_label(r['model'])}\n{r['build']}" for r in rows]
    fig = Figure(figsize=(4 * len(TARGETS), 4.2))
    for ax, (what, label, target) in zip(fig.subplots(1, len(TARGETS)), TARGETS):
        values = [r["ratios"][str(what)] for r in rows]
        x = range(len(rows))
        bars = ax.bar(x, [v or 0 for v in values], 0.6,
                      color=["tab:green" if v is not None and v >= target else "tab:orange" for v in values])
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), "n/a" if v is None else f"{v:.2f}×",
                    ha="center", va="bottom", fontsize=8)
        ax.axhline(target, color="tab:red", linestyle="--")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set(title=f"{label} (target ≥ {target}×, dashed)", ylabel="ours / llama.cpp tok/s (1 = llama.cpp)")
        ax.set_ylim(0, max([target * 1.2] + [v * 1.15 for v in values if v is not None]))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"qwen2 int4 vs llama.cpp, {data['machine']['cpu']} ({data['cpu_kind']})", fontsize=10)
    save_png(fig, path)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--smoke", action="store_true",
                   help="a quick end-to-end check: options left unset take the smoke values (0.5B, 1 round, "
                        "64-token prompt, 8 steps); results under runs/cpu_kinds-smoke/")
    p.add_argument("--models", help=f"comma-separated registry names (default: {FULL['models']})")
    p.add_argument("--rounds", type=int, help=f"rounds over builds and models (default: {FULL['rounds']})")
    p.add_argument("--prompt-tokens", type=int, help=f"default: {FULL['prompt_tokens']}")
    p.add_argument("--new-tokens", type=int, help=f"decode steps at batch 1 (default: {FULL['new_tokens']})")
    p.add_argument("--batch-new-tokens", type=int,
                   help=f"timed steps of the batch of {BATCH} (default: {FULL['batch_new_tokens']})")
    p.add_argument("--repeats", type=int, help=f"prefill repeats, median (default: {FULL['repeats']})")
    p.add_argument("--piece-repeats", type=int,
                   help=f"passes over a step's kernels and attention, median (default: {FULL['piece_repeats']})")
    p.add_argument("--wait-quiet", type=float, metavar="SECONDS",
                   help="wait up to this long for a quiet CPU before each engine and breakdown process "
                        f"(default: {FULL['wait_quiet']:.0f})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-avx2-lib", default=DEFAULT_LLAMA_AVX2_LIB,
                   help="directory of an AVX2-only build of libllama.so and libggml*.so for the AVX2 build's "
                        "llama.cpp (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each engine process")
    p.add_argument("--out", help="JSON result file; .md and .png beside it "
                                 "(default: benchmarks/results/cpu_kinds-<cpu kind>.json)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    if not args.models or min(args.rounds, args.prompt_tokens, args.new_tokens, args.batch_new_tokens, args.repeats,
                              args.piece_repeats) < 1:
        p.error("--models must name one model or more; counts must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(WORKERS, args.worker, args.job, args.result, {NotAvailable: "not available"})
        return 0
    flags = cpu_flags()
    kind = cpu_kind(flags)
    builds = cpu_builds(kind, args.llama_avx2_lib)
    out = args.out or (os.path.join(REPO_ROOT, "runs", "cpu_kinds-smoke", f"cpu_kinds-{kind}.json") if args.smoke
                       else os.path.join(RESULTS_DIR, f"cpu_kinds-{kind}.json"))
    scratch = tempfile.mkdtemp(prefix="qwen2-cpu-kinds-")
    start = time.monotonic()
    try:
        runs = run_rounds(builds, args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = summarize(runs, builds, args.models)
    settings = {k: getattr(args, k) for k in ("models", "rounds", "prompt_tokens", "new_tokens", "batch_new_tokens",
                                              "repeats", "piece_repeats", "wait_quiet", "threads", "llama_avx2_lib",
                                              "smoke")}
    data = {"settings": settings | {"batch_size": BATCH, "command": command_line(MODULE, argv),
                                    "wall_s": time.monotonic() - start},
            "machine": machine_facts(args.threads), "cpu_kind": kind, "cpu_flags": notable_flags(flags),
            "builds": [{"name": b.name, "label": b.label, "env": b.env, "llama_lib": b.llama_lib,
                        "llama_missing": b.llama_missing} for b in builds],
            "rows": rows, "acceptance": acceptance(rows), "runs": runs}
    text = markdown(data)
    print(text)
    write_results(out, data, text)
    plot(data, os.path.splitext(out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
