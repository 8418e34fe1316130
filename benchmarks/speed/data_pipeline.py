"""`qwen2 data`'s steps on planted corpora: MB/s and peak RSS per step, against datatrove's own
pipeline on the same data; and the model-based quality score's tokens/s.

    pip install -e '.[data,models,bench]'
    python -m benchmarks.speed.data_pipeline             # 100 and 400 MB corpora, a 10 MB scoring sample
    python -m benchmarks.speed.data_pipeline --smoke     # 1 and 2 MB, a 0.02 MB sample: minutes

Steps (each on the whole corpus, not chained, so each one's MB/s is of the same input): dedup (exact
and MinHash near duplicates at 0.8), filter (the default heuristics), langid (lingua, the default 41
languages), decontaminate (HumanEval 13-grams). Each run is a fresh process (`spawn`) with
--workers processes (datatrove's local executor); its peak RSS is that of the process and all its
workers together (`TreeRSS`).

The reference, "datatrove": the same blocks (datatrove's dedup stages with the same configs;
qwen2's annotator, filters and language ID blocks) between datatrove's JsonlReader and JsonlWriter,
run by its LocalPipelineExecutor, with no qwen2 wrapper (strict record checks, atomic shard names,
stats.json, resume records). The two alternate, step by step, so the machine's drift and the other
processes on a shared machine hit both alike: the overhead ratio is meaningful where absolute MB/s
(contended) are not. The corpora keep the shard size fixed (--shard-mb), so memory should not grow
with the corpus: the report gives the 400 MB / 100 MB peak RSS ratio.

Model score: `quality_model.score_texts` (what `filter --model/--classifier` runs, one forward per
token of each record's first 512) on the first --sample-mb of the corpus, in scored tokens/s and
input MB/s, extrapolated to a 1 GB corpus; for the 0.5B in int4 and for a tiny random Qwen2 (2
layers, 64 wide, the real tokenizer): the floor the wrapper and tokenizer set.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import time

from benchmarks.common import (RESULTS_DIR, command_line, machine_facts, peak_rss_mb, save_png, spawn,
                               write_report)

MODULE = "benchmarks.speed.data_pipeline"
STEPS = ("dedup", "filter", "langid", "decontaminate")
IMPLS = ("qwen2", "datatrove")
FULL = dict(sizes=[100.0, 400.0], shard_mb=12.5, sample_mb=10.0, rounds=1)
SMOKE = dict(sizes=[1.0, 2.0], shard_mb=0.5, sample_mb=0.02, rounds=1)
MODEL = "qwen2.5-coder-0.5b-instruct"


# ---- the worker side: one measurement in a fresh process ------------------------------------------

class TreeRSS:
    """The peak RSS of this process and all its descendants together, sampled every 0.2 s by a
    thread: datatrove's worker processes are a forkserver's children, which neither VmHWM nor
    RUSAGE_CHILDREN of this process sees. For the same reason it keeps the CPU seconds of those
    descendants (each one's last sample): the parent's CPU accounting never sees them, and would count
    them as other processes' load."""

    def __init__(self, interval: float = 0.2):
        import threading

        self.peak_mb, self.interval = 0.0, interval
        self.descendants_cpu: dict[int, float] = {}  # pid -> CPU seconds at its last sample
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    @property
    def descendants_cpu_s(self) -> float:
        return sum(self.descendants_cpu.values())

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                    if proc.pid != me.pid:
                        cpu = proc.cpu_times()
                        self.descendants_cpu[proc.pid] = cpu.user + cpu.system
                except psutil.Error:  # exited meanwhile
                    pass
            self.peak_mb = max(self.peak_mb, total / 2 ** 20)
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_qwen2(step: str, corpus: str, out: str, workers: int) -> int:
    """The step as `qwen2 data pipeline` runs it (the verb's function); documents out."""
    from qwen2.data.pipeline import STEPS as KINDS
    from qwen2.data.shards import RunOptions

    stats = KINDS[step].plan()([corpus], out, RunOptions(workers=workers, progress=False))
    return stats["documents_out"]


def run_datatrove(step: str, corpus: str, out: str, workers: int) -> int:
    """The same blocks between datatrove's JsonlReader and JsonlWriter on its LocalPipelineExecutor."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from loguru import logger

    logger.remove()
    shards = len(glob.glob(os.path.join(corpus, "shard-*.jsonl")))

    def read():
        return JsonlReader(corpus, glob_pattern="shard-*.jsonl", compression=None)

    def stage(name, pipeline, tasks=shards):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks),
                              logging_dir=os.path.join(out, "logs", name)).run()

    writer = JsonlWriter(out, output_filename="${rank}.jsonl", compression=None)
    if step == "dedup":
        from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupFilter
        from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
        from datatrove.pipeline.dedup.minhash import MinhashDedupCluster

        from qwen2.data.dedup import EXACT_CONFIG, minhash_config, signature_step

        config, work = minhash_config(), os.path.join(out, "work")
        stage("exact-signatures", [read(), ExactDedupSignature(f"{work}/es", EXACT_CONFIG)])
        stage("exact-duplicates", [ExactFindDedups(f"{work}/es", f"{work}/ed", EXACT_CONFIG)], 1)
        stage("near-signatures", [read(), ExactDedupFilter(f"{work}/ed", EXACT_CONFIG), signature_step(f"{work}/ns", config)])
        stage("near-buckets", [MinhashDedupBuckets(f"{work}/ns", f"{work}/nb", config=config)], config.num_buckets)
        stage("near-clusters", [MinhashDedupCluster(f"{work}/nb", f"{work}/nc", config=config)], 1)
        stage("final", [read(), ExactDedupFilter(f"{work}/ed", EXACT_CONFIG), MinhashDedupFilter(f"{work}/nc"), writer])
    elif step == "filter":
        from qwen2.data.quality import FilterSettings, QualityAnnotator, QualityFilter

        settings = FilterSettings()
        stage("filter", [read(), QualityAnnotator(settings.rules), QualityFilter(settings.checks()), writer])
    elif step == "langid":
        from qwen2.data.langid import LanguageID

        stage("langid", [read(), LanguageID(), writer])
    else:
        from qwen2.data.decontaminate import Decontaminate, build_index

        stage("decontaminate", [read(), Decontaminate(build_index(["humaneval"])), writer])
    return sum(1 for path in glob.glob(os.path.join(out, "*.jsonl")) for _ in open(path, encoding="utf-8"))


def score_sample(model: str, quantize: str | None, corpus: str, sample_mb: float, scratch: str) -> dict:
    """Scored tokens/s and input MB/s of `score_texts` on the first `sample_mb` of the corpus."""
    from qwen2.data.quality_model import ScoringModel, score_texts
    from qwen2.data.shards import RecordReader, shard_paths

    if model == "tiny":
        model = tiny_scorer(os.path.join(scratch, "tiny-scorer"))
    spec = ScoringModel(model, quantize)
    texts, size = [], 0
    for doc in RecordReader(shard_paths([corpus])).run():
        if size >= sample_mb * 1e6:
            break
        texts.append(doc.text)
        size += len(doc.text.encode("utf-8"))
    spec.load()  # loading is not scoring
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(texts), 32):  # the filter's batch size
        tokens += sum(s.tokens for s in score_texts(spec, texts[i:i + 32]))
    seconds = time.perf_counter() - start
    return {"documents": len(texts), "bytes": size, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "mb_per_s": size / 1e6 / seconds,
            "hours_per_gb": 1e9 / (size / seconds) / 3600}


def tiny_scorer(path: str) -> str:
    """A random 2-layer, 64-wide Qwen2 with the real Qwen2 tokenizer, as an HF directory."""
    if os.path.isdir(path):
        return path
    import torch

    from qwen2.checkpoint.hf import save_hf_dir
    from qwen2.checkpoint.registry import generation_config_for, hf_dir
    from qwen2.config import Qwen2Config
    from qwen2.model import Transformer
    from qwen2.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(hf_dir(MODEL, progress=False))
    config = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, torch_dtype="float32")
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if name.endswith("norm.weight") else 0.05 * torch.randn(p.shape))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_hf_dir(path, config, state, tokenizer, generation_config_for(tokenizer))
    return path


def worker(name: str, job_path: str, result_path: str) -> None:
    from benchmarks.common import write_json

    with open(job_path) as f:
        job = json.load(f)
    if job["kind"] == "step":
        shutil.rmtree(job["out"], ignore_errors=True)
        run = run_qwen2 if job["impl"] == "qwen2" else run_datatrove
        with TreeRSS() as rss:
            start = time.perf_counter()
            documents_out = run(job["step"], job["corpus"], job["out"], job["workers"])
            seconds = time.perf_counter() - start
        result = {"seconds": seconds, "documents_out": documents_out, "peak_rss_mb": max(peak_rss_mb(), rss.peak_mb),
                  "descendants_cpu_s": rss.descendants_cpu_s}
        shutil.rmtree(job["out"], ignore_errors=True)
    else:
        import torch

        torch.set_num_threads(job["threads"])
        result = score_sample(job["model"], job["quantize"], job["corpus"], job["sample_mb"], job["scratch"])
        result["peak_rss_mb"] = peak_rss_mb()
    write_json(result_path, {"status": "ok", **result})


# ---- the driver --------------------------------------------------------------------------------

def build_corpus(root: str, size_mb: float, shard_mb: float) -> dict:
    from qwen2.data import planted

    shards = max(1, round(size_mb / shard_mb))
    folder = os.path.join(root, f"corpus-{size_mb:g}mb-{shards}shards")
    manifest = os.path.join(folder, "manifest.json")
    if not os.path.exists(manifest):
        shutil.rmtree(folder, ignore_errors=True)
        planted.build(folder, size_mb, seed=0, shards=shards)
    with open(manifest) as f:
        m = json.load(f)
    files = glob.glob(os.path.join(folder, "shard-*.jsonl"))
    return {"path": folder, "mb": sum(os.path.getsize(p) for p in files) / 1e6, "shards": len(files),
            "records": m["records"]}


def measure(args) -> dict:
    scratch = os.path.join(args.out, "scratch")
    os.makedirs(scratch, exist_ok=True)
    corpora = {size: build_corpus(args.out, size, args.shard_mb) for size in args.sizes}
    rows = []
    for size, corpus in corpora.items():
        for step in args.steps:
            times: dict[str, list] = {impl: [] for impl in IMPLS}
            for r in range(args.rounds):
                for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):  # alternate which goes first
                    job = {"kind": "step", "impl": impl, "step": step, "corpus": corpus["path"],
                           "out": os.path.join(args.out, f"out-{impl}"), "workers": args.workers}
                    result = spawn(MODULE, f"{step}-{impl}-{size:g}", job, scratch)
                    if result.get("status") != "ok":
                        sys.exit(f"{impl} {step} on {size:g} MB: {result.get('error')}")
                    # the worker's own pool is not another process's load
                    pool_pct = 100 * result["descendants_cpu_s"] / (result["process_wall_s"] * (os.cpu_count() or 1))
                    result["others_cpu_pct"] = max(0.0, result["others_cpu_pct"] - pool_pct)
                    times[impl].append(result)
                    print(f"{size:g} MB {step:13s} {impl:9s} {result['seconds']:7.1f} s "
                          f"{corpus['mb'] / result['seconds']:6.2f} MB/s peak {result['peak_rss_mb']:6.0f} MB "
                          f"(others {result['others_cpu_pct']:.0f} % CPU)", file=sys.stderr, flush=True)
            row = {"size_mb": size, "corpus_mb": round(corpus["mb"], 2), "step": step}
            for impl in IMPLS:
                seconds = statistics.median(r["seconds"] for r in times[impl])
                row[impl] = {"seconds": round(seconds, 2), "mb_per_s": round(corpus["mb"] / seconds, 3),
                             "peak_rss_mb": round(max(r["peak_rss_mb"] for r in times[impl])),
                             "documents_out": times[impl][0]["documents_out"],
                             "others_cpu_pct": round(statistics.mean(r["others_cpu_pct"] for r in times[impl]), 1)}
            row["overhead"] = round(row["qwen2"]["seconds"] / row["datatrove"]["seconds"] - 1, 4)
            rows.append(row)
    scoring = []
    for model, quantize in (("tiny", None), (MODEL, "int4")):
        job = {"kind": "score", "model": model, "quantize": quantize, "corpus": corpora[args.sizes[0]]["path"],
               "sample_mb": args.sample_mb, "scratch": scratch, "threads": args.workers}
        result = spawn(MODULE, f"score-{model}", job, scratch)
        if result.get("status") != "ok":
            sys.exit(f"scoring with {model}: {result.get('error')}")
        label = "tiny random Qwen2 (2 x 64)" if model == "tiny" else f"{MODEL} int4"
        scoring.append({"model": label, **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
                                            if k != "status"}})
        print(f"score {label}: {result['tokens_per_s']:.0f} tokens/s, {result['hours_per_gb']:.1f} h per GB",
              file=sys.stderr, flush=True)
    small, large = min(args.sizes), max(args.sizes)
    rss_ratio = {step: round(next(r for r in rows if r["size_mb"] == large and r["step"] == step)["qwen2"]["peak_rss_mb"]
                             / next(r for r in rows if r["size_mb"] == small and r["step"] == step)["qwen2"]["peak_rss_mb"], 3)
                 for step in args.steps}
    return {"command": command_line(MODULE), "machine": machine_facts(args.workers), "workers": args.workers,
            "shard_mb": args.shard_mb, "corpora": list(corpora.values()), "steps": rows, "scoring": scoring,
            "rss_ratio_large_over_small": rss_ratio, "sizes": [small, large]}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def markdown(s: dict, smoke: bool) -> str:
    m = s["machine"]
    small, large = s["sizes"]
    lines = [f"# `qwen2 data` steps: throughput, memory, overhead over datatrove{' (smoke run)' if smoke else ''}", "",
             f"`{s['command']}` on {m['cpu']} ({m['logical_cpus']} logical CPUs), "
             f"{s['workers']} worker processes, {m['date']}. Planted corpora ({s['shard_mb']:g} MB shards): "
             + ", ".join(f"{c['mb']:.1f} MB / {c['shards']} shards / {c['records']} records" for c in s["corpora"]) + ".",
             "", "Each step on the whole corpus, a fresh process per run, qwen2 and datatrove alternating. "
             "MB/s are of the input shards; absolute MB/s depend on the load (\"others\": the CPU other processes "
             "took during the runs, — where a run did not measure it), the overhead ratio is measured in the same "
             "interleaved runs.", "",
             "| corpus | step | qwen2 s | qwen2 MB/s | qwen2 peak RSS MB | datatrove s | datatrove MB/s | "
             "datatrove peak RSS MB | overhead | others CPU % |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in s["steps"]:
        q, d = r["qwen2"], r["datatrove"]
        lines.append(f"| {r['corpus_mb']:.0f} MB | {r['step']} | {q['seconds']:.1f} | {q['mb_per_s']:.2f} | "
                     f"{q['peak_rss_mb']} | {d['seconds']:.1f} | {d['mb_per_s']:.2f} | {d['peak_rss_mb']} | "
                     f"{r['overhead']:+.1%} | {_pct(q['others_cpu_pct'])} / {_pct(d['others_cpu_pct'])} |")
    total = {impl: sum(r[impl]["seconds"] for r in s["steps"] if r["size_mb"] == large) for impl in IMPLS}
    lines += ["", f"All {len(s['rss_ratio_large_over_small'])} steps on the {large:g} MB corpus: qwen2 {total['qwen2']:.1f} s, datatrove "
              f"{total['datatrove']:.1f} s: overhead **{total['qwen2'] / total['datatrove'] - 1:+.1%}** "
              "(target: at most +10 %).", "",
              f"Peak RSS, {large:g} MB corpus over {small:g} MB (same shard size; 1.0 = memory does not grow "
              "with the corpus): " + ", ".join(f"{k} {v:.2f}" for k, v in s["rss_ratio_large_over_small"].items()) + ".",
              "", "## Model-based quality score", "",
              f"`score_texts` (the `filter --model/--classifier` forward) on the first {s['scoring'][0]['bytes'] / 1e6:.2f} MB "
              f"of the {small:g} MB corpus, each record's first 512 tokens, {s['workers']} threads:", "",
              "| scorer | documents | tokens scored | s | tokens/s | MB/s | hours for 1 GB | peak RSS MB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in s["scoring"]:
        lines.append(f"| {r['model']} | {r['documents']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['mb_per_s']:.3f} | {r['hours_per_gb']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(s: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size_mb"] for r in s["steps"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = list(dict.fromkeys(r["step"] for r in s["steps"]))
    width = 0.8 / (2 * len(sizes))
    for k, size in enumerate(sizes):
        for j, impl in enumerate(IMPLS):
            rows = [next(r for r in s["steps"] if r["step"] == st and r["size_mb"] == size) for st in steps]
            x = [i + (2 * k + j - len(sizes)) * width + width / 2 for i in range(len(steps))]
            axes[0].bar(x, [r[impl]["mb_per_s"] for r in rows], width, label=f"{impl}, {size:g} MB")
            if impl == "qwen2":
                axes[1].bar([i + (k - 0.5) * 0.4 for i in range(len(steps))], [r[impl]["peak_rss_mb"] for r in rows],
                            0.4, label=f"qwen2, {size:g} MB")
    for ax, title in zip(axes, ("input MB/s per step (contended machine)", "peak RSS MB per step")):
        ax.set_xticks(range(len(steps)), steps)
        ax.set_title(title)
        ax.legend(fontsize=8)
    save_png(fig, path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="1 and 2 MB corpora, a 0.02 MB scoring sample")
    ap.add_argument("--sizes", type=float, nargs="+", default=None, metavar="MB", help="corpus sizes (default 100 400)")
    ap.add_argument("--shard-mb", type=float, default=None, help="shard size (default 12.5 MB)")
    ap.add_argument("--sample-mb", type=float, default=None, help="text scored by the models (default 10 MB)")
    ap.add_argument("--rounds", type=int, default=None, help="runs of each step and implementation (default 1)")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--out", default=None, help="scratch directory for the corpora (default runs/data-pipeline[-smoke])")
    ap.add_argument("--results", default=None, help="path stem of the .md/.json/.png (default benchmarks/results/"
                                                   "data_pipeline, with --smoke data_pipeline-smoke)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    name = "data_pipeline" + ("-smoke" if args.smoke else "")
    args.out = args.out or os.path.join(os.path.dirname(RESULTS_DIR), "..", "runs", name.replace("_", "-"))
    args.results = args.results or os.path.join(RESULTS_DIR, name)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.job, args.result)
        return
    summary = measure(args)
    write_report(summary, args.results, args.smoke, markdown, plot)


if __name__ == "__main__":
    main()
