"""Passkey retrieval on the real 0.5B model (trained context 32,768), with and without the Qwen2
report's long-context techniques.

    python -m benchmarks.experiments.passkey                       # the whole grid (hours on 2 CPU cores)
    python -m benchmarks.experiments.passkey --lengths 4096,8192   # part of it; later calls resume
    python -m benchmarks.experiments.passkey --device cuda         # on a GPU
    python -m benchmarks.experiments.passkey --report              # rewrite the table and plot only

Settings:
  plain  the checkpoint as it is (RoPE, context 32,768): 4K, 8K, 16K, 32K prompts
  long   `qwen2.load(long_context=True)`: YaRN x4 plus Dual Chunk Attention (chunk 32,768,
         local 1,024), the Qwen2.5 model cards' preset: the same lengths and 48K, 64K
At each length the 5-digit key sits at depths 0, 0.25, 0.5, 0.75, 1 of the filler
(`qwen2.eval.retrieval.passkey_prompt`, the one generator; chat template on, as for `qwen2 eval
passkey` on an instruct model). "32K" for plain RoPE is 32,768 - max_new_tokens prompt tokens, so
prompt and reply fit the trained context. A reply is right when its first number is the key
(`retrieval.retrieved`); decoding is greedy, 16 new tokens (the key alone takes 5: digits are single tokens).

Every run is its own subprocess, so its peak memory is its own: the child loads the model, builds
the prompt, then times `generate` (prefill on the dense path, then up to --max-new-tokens decode
steps) and reports the process's peak RSS (getrusage ru_maxrss), its RSS after loading and after
one token (the weights paged in), and on a GPU torch's peak allocated memory. Results go to
benchmarks/results/passkey.json and .md and a plot passkey.png after every run (atomically); a run
already in the JSON is not run again, so an interrupted grid resumes. Two grids may run side by
side with different --out and be joined with `--merge OTHER.json`. The .md also checks that peak
memory grows linearly with length: the memory added per 1K prompt tokens between successive lengths
should stay about constant (a T x T attention matrix would double it at every doubling of length).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from benchmarks.common import REPO_ROOT, RESULTS_DIR
from qwen2.errors import Qwen2Error
from qwen2.eval.retrieval import fitting_length
from qwen2.fileio import atomic_file, write_text_atomic
from qwen2.progress import progress_bar

MODULE = "benchmarks.experiments.passkey"

SETTINGS = {"plain": {}, "long": {"long_context": True}}
LENGTHS = {"plain": [4096, 8192, 16384, 32768], "long": [4096, 8192, 16384, 32768, 49152, 65536]}
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
TRAINED_CONTEXT = 32768
DEFAULT_OUT = os.path.join(RESULTS_DIR, "passkey")


# --- one run, in a child process ------------------------------------------------------------
def run_one(spec: dict) -> dict:
    """Load the model with `spec`'s setting, answer one passkey prompt; what was measured."""
    import torch

    import qwen2
    from qwen2.eval.retrieval import passkey_prompt, retrieved

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    m = qwen2.load(spec["model"], device=spec["device"], quantize=spec["quantize"], progress=False,
                   **SETTINGS[spec["setting"]])
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_now()
    # safetensors weights are mapped lazily: one token through the model pages them all in, so
    # rss_warm is the memory before any prompt (what the prompt's length adds to is measured from it).
    with torch.no_grad():
        m.model(torch.zeros(1, 1, dtype=torch.long, device=spec["device"]))
    rss_warm = _rss_now()
    p = passkey_prompt(m.tokenizer, spec["prompt_tokens"], spec["depth"], seed=spec["seed"], chat=True)
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    reply = m.generate(p.prompt, max_new_tokens=spec["max_new_tokens"], temperature=0.0)
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    record = {"tokens": p.tokens, "answer": p.answer, "reply": reply, "correct": retrieved(reply, p.answer),
              "seconds": round(seconds, 2), "load_s": round(load_s, 2), "rss_loaded_mb": round(rss_loaded, 1),
              "rss_warm_mb": round(rss_warm, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if spec["device"].startswith("cuda"):
        record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return record


def _rss_now() -> float:
    """This process's resident set now, MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# --- the grid, from the parent --------------------------------------------------------------
def run_key(r: dict) -> tuple:
    return (r["setting"], r["length"], r["depth"], r["seed"])


def load_results(path: str) -> dict:
    if not os.path.exists(path):
        return {"runs": []}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def prompt_tokens(setting: str, length: int, max_new_tokens: int) -> int:
    """The prompt length for a grid length: plain RoPE must fit prompt + reply in its context."""
    return fitting_length(length, max_new_tokens, TRAINED_CONTEXT if setting == "plain" else None)


def run_grid(args) -> None:
    path = args.out + ".json"
    results = load_results(path)
    done = {run_key(r) for r in results["runs"]}
    # Plain RoPE stops at its trained context; any other length may be asked for (the grid is the default).
    cases = [(s, n, d) for n in sorted(set(args.lengths)) for s in args.settings
             if s == "long" or n <= TRAINED_CONTEXT for d in args.depths]
    todo = [c for c in cases if (c[0], c[1], c[2], args.seed) not in done]
    print(f"{len(cases)} runs asked, {len(cases) - len(todo)} already in {path}, {len(todo)} to run", flush=True)
    for setting, length, depth in progress_bar(todo, desc="passkey", unit="run"):
        spec = {"setting": setting, "length": length, "depth": depth, "seed": args.seed, "model": args.model,
                "device": args.device, "quantize": args.quantize, "threads": args.threads,
                "max_new_tokens": args.max_new_tokens,
                "prompt_tokens": prompt_tokens(setting, length, args.max_new_tokens)}
        child = subprocess.run([sys.executable, "-m", MODULE, "--worker", json.dumps(spec)],
                               capture_output=True, text=True, cwd=REPO_ROOT)
        if child.returncode != 0:
            last = (child.stderr.strip().splitlines() or ["no output"])[-1]
            raise Qwen2Error(f"run {setting} {length} depth {depth:g} failed: {last}")
        record = {**{k: spec[k] for k in ("setting", "length", "depth", "seed", "device", "quantize", "threads")},
                  **json.loads(child.stdout.strip().splitlines()[-1])}
        print(json.dumps(record), flush=True)
        results["runs"].append(record)
        results["runs"].sort(key=lambda r: (r["setting"], r["length"], r["depth"], r["seed"]))
        results["model"], results["max_new_tokens"] = args.model, args.max_new_tokens
        write_text_atomic(path, json.dumps(results, indent=1) + "\n")
        write_report(results, args.out)


def merge(out: str, others: list[str]) -> None:
    """Runs of several result files in one (a run already in `out` wins); two grids can run side by
    side with different --out and be merged afterwards."""
    results = load_results(out + ".json")
    have = {run_key(r) for r in results["runs"]}
    for path in others:
        other = load_results(path)
        if not other["runs"]:
            raise Qwen2Error(f"{path}: no runs to merge")
        results.setdefault("model", other.get("model"))
        results.setdefault("max_new_tokens", other.get("max_new_tokens"))
        for r in other["runs"]:
            if run_key(r) not in have:
                results["runs"].append(r)
                have.add(run_key(r))
    results["runs"].sort(key=lambda r: (r["setting"], r["length"], r["depth"], r["seed"]))
    write_text_atomic(out + ".json", json.dumps(results, indent=1) + "\n")
    write_report(results, out)


# --- report: table, memory check, plot ------------------------------------------------------
def memory_rows(runs: list[dict]) -> list[str]:
    """Per setting: peak RSS per length (the largest over its depths) and the memory added per 1K
    tokens from the previous length (from the RSS after loading, for the first)."""
    lines = ["| setting | tokens | peak RSS MB | weights in MB | added per 1K tokens MB |", "|---|---:|---:|---:|---:|"]
    for setting in SETTINGS:
        mine = [r for r in runs if r["setting"] == setting]
        previous = None
        for n in sorted({r["length"] for r in mine}):
            at = [r for r in mine if r["length"] == n]
            peak = max(r["peak_rss_mb"] for r in at)
            warm = [r["rss_warm_mb"] for r in at if "rss_warm_mb" in r]  # absent in runs before it was recorded
            base_n, base_mb = previous if previous else (0, min(warm) if warm else None)
            slope = "-" if base_mb is None else f"{(peak - base_mb) / ((at[0]['tokens'] - base_n) / 1024):.1f}"
            lines.append(f"| {setting} | {at[0]['tokens']} | {peak:.0f} | {min(warm):.0f} | {slope} |" if warm else
                         f"| {setting} | {at[0]['tokens']} | {peak:.0f} | - | {slope} |")
            previous = (at[0]["tokens"], peak)
    return lines


def write_report(results: dict, out: str) -> None:
    runs = results["runs"]
    lines = [f"# Passkey retrieval: {results.get('model')}", "",
             "Written by `python -m benchmarks.experiments.passkey` (see its docstring for the method). "
             "plain: RoPE as trained "
             "(32K); long: YaRN x4 + DCA (`long_context=True`). Cells: right/asked, greedy, "
             f"max_new_tokens {results.get('max_new_tokens')}.", ""]
    for setting in SETTINGS:
        mine = [r for r in runs if r["setting"] == setting]
        if not mine:
            continue
        depths = sorted({r["depth"] for r in mine})
        lines += [f"## {setting}: accuracy by length and depth", "",
                  "| tokens | " + " | ".join(f"depth {d:g}" for d in depths) + " | all |",
                  "|---:|" + "---:|" * (len(depths) + 1)]
        for n in sorted({r["length"] for r in mine}):
            at = [r for r in mine if r["length"] == n]
            cells = []
            for d in depths:
                hits = [r["correct"] for r in at if r["depth"] == d]
                cells.append(f"{sum(hits)}/{len(hits)}" if hits else "-")
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {sum(r['correct'] for r in at)}/{len(at)} |")
        lines.append("")
    lines += ["## Every run", "", "| setting | length | prompt tokens | depth | answer | reply | right | seconds | "
              "peak RSS MB | device | quantize | threads |", "|---|---:|---:|---:|---|---|---|---:|---:|---|---|---:|"]
    for r in runs:
        reply = r["reply"].strip().replace("|", "\\|").replace("\n", " ")[:40]
        lines.append(f"| {r['setting']} | {r['length']} | {r['tokens']} | {r['depth']:g} | {r['answer']} | {reply} | "
                     f"{'yes' if r['correct'] else 'no'} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['device']} | {r['quantize'] or 'fp32'} | {r['threads']} |")
    lines += ["", "## Peak memory against length", "",
              "Linear growth shows as a roughly constant 'added per 1K tokens' down each setting (the first row "
              "of a setting counts from the RSS with the weights paged in, before any prompt, so it also carries "
              "fixed prefill buffers).", ""]
    lines += memory_rows(runs)
    write_text_atomic(out + ".md", "\n".join(lines) + "\n")
    plot(runs, out + ".png")


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for setting, style in (("plain", "o-"), ("long", "s--")):
        mine = [r for r in runs if r["setting"] == setting]
        lengths = sorted({r["length"] for r in mine})
        if not lengths:
            continue
        acc.plot(lengths, [sum(r["correct"] for r in mine if r["length"] == n) /
                           len([r for r in mine if r["length"] == n]) for n in lengths], style, label=setting)
        mem.plot(lengths, [max(r["peak_rss_mb"] for r in mine if r["length"] == n) / 1024 for n in lengths],
                 style, label=setting)
    acc.set(xscale="log", xlabel="prompt tokens", ylabel="passkey accuracy", ylim=(-0.05, 1.05),
            title="accuracy over the depths run at each length")
    mem.set(xlabel="prompt tokens", ylabel="peak RSS (GiB)", title="peak memory per run")
    for ax in (acc, mem):
        ax.axvline(TRAINED_CONTEXT, color="grey", lw=0.8, ls=":")
        ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="plain,long", help="plain, long or both (default)")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS["long"])), help="grid lengths to run")
    ap.add_argument("--depths", default=",".join(f"{d:g}" for d in DEPTHS))
    ap.add_argument("--seed", type=int, default=0, help="the key's seed")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantize", default=None, help="int8/int4: weight-only, decode kernels; prefill stays dense")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per run")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default=DEFAULT_OUT, help="results path without extension")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md and .png from the .json")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="add the runs of these result files (e.g. a second process's --out) to --out's, then report")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return
    try:
        args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
        if unknown := [s for s in args.settings if s not in SETTINGS]:
            raise Qwen2Error(f"unknown setting {unknown[0]!r}; use plain and/or long")
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        args.depths = [float(x) for x in args.depths.split(",") if x.strip()]
        if args.merge:
            merge(args.out, args.merge)
        elif args.report:
            write_report(load_results(args.out + ".json"), args.out)
        else:
            run_grid(args)
    except (Qwen2Error, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
