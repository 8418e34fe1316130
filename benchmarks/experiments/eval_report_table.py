"""The report's evaluation table: every offline pack, for each model, through our runners, with llama.cpp
on the very same prompts for the math and BBH packs, then one table (`qwen2.eval.report`, the code of
`qwen2 eval report`) and the gaps to the published figures, computed from the runs' own settings.

For each of --models (registry names), loaded once with --quantize (default int4):

    mc-mmlu          `qwen2 eval mc --task mmlu`: log-likelihood over the MMLU pack (lm-eval's exemplars)
    bbh              `qwen2 eval bbh --task all`: BBH's 81 exemplars, chain of thought
    math-gsm8k       `qwen2 eval math --task gsm8k`, GSM8K's 8 exemplars
    math-math        `qwen2 eval math --task math`, Minerva's 4 MATH exemplars
    math-mgsm-XX     `qwen2 eval math --task mgsm-XX`: no package ships MGSM, so only with --mgsm-data
    ifeval           `qwen2 eval ifeval`: the seeded pack of 125 IFEval-style prompts
    mt-bench         `qwen2 eval mt-bench --judge-model J`: 80 two-turn questions, judged by J (default the 1.5B)

and, when `llama_cpp` is importable, llama.cpp on the registry's GGUF (its Q4_K_M blocks as they are)
for the bbh and math-* packs: the runner's own prompt texts, tokenized by our tokenizer, decoded
greedily with continuous batching (`benchmarks.common.llama_cpp_replies`), the replies cut by our
`TextStream` and scored by the runner; its summaries name the model "llama.cpp:MODEL", so the report
gives it a column of its own.

Where a pack's exemplars are also its items, an item's shots are the pack's other exemplars, so the
runners' default on the pack is one fewer than the task's (GSM8K 7, MATH 3, BBH 2), and the settings
and the gaps section say so.

Every run's per-item JSONL (and MT-Bench's answers) lies in --run-dir/MODEL/ENGINE/, resumable: a rerun
skips the finished items (the runners resume; other settings are refused). A compressed copy
`.jsonl.gz`, the one git keeps, is written beside after each run, and a missing .jsonl is restored
from it first. The report (--out, default benchmarks/results/eval_report.md) gets the table, the PNG
beside it, the gaps section, and a JSON of the runs (timings included) beside it.

    python -m benchmarks.experiments.eval_report_table                        # everything, both models (hours)
    python -m benchmarks.experiments.eval_report_table --benchmarks math-gsm8k,bbh --limit 2 \\
        --run-dir /tmp/run --out /tmp/report.md                               # a smoke run
    python -m benchmarks.experiments.eval_report_table --mgsm-data 'mgsm/{lang}.jsonl'   # MGSM too
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from dataclasses import dataclass

from benchmarks.common import (RESULTS_DIR, LlamaCppEngine, command_line, compress_results, llama_cpp_installed,
                               llama_cpp_replies, machine_facts, one_line_errors, restore_results, write_results)
from qwen2.errors import Qwen2Error

MODULE = "benchmarks.experiments.eval_report_table"
MODELS = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
JUDGE = "qwen2.5-coder-1.5b-instruct"
ENGINES = ("qwen2", "llama.cpp")
RUN_DIR = os.path.join(RESULTS_DIR, "eval_report")
OUT = os.path.join(RESULTS_DIR, "eval_report.md")


@dataclass(frozen=True)
class Pack:
    """One benchmark run of the table: which runner (`kind`: mc, generation or mt-bench) and task."""
    name: str
    kind: str
    verb: str = ""            # `qwen2 eval VERB --task TASK` for the generation runners
    task: str = ""
    llama_cpp: bool = False   # llama.cpp runs it too (math and BBH: free-form answers, the same prompts)
    needs_data: bool = False  # no offline items: runs only with --mgsm-data


def packs() -> dict[str, Pack]:
    """Every pack by name, in the table's order; the math tasks are whatever the math runner has."""
    from qwen2.eval.math_benchmarks import BENCHMARKS as MATH

    table = {"mc-mmlu": Pack("mc-mmlu", "mc", task="mmlu"),
             "bbh": Pack("bbh", "generation", "bbh", "all", llama_cpp=True)}
    for task in MATH:
        table[f"math-{task}"] = Pack(f"math-{task}", "generation", "math", task, llama_cpp=True,
                                     needs_data=task.startswith("mgsm-"))
    table["ifeval"] = Pack("ifeval", "generation", "ifeval", "ifeval")
    table["mt-bench"] = Pack("mt-bench", "mt-bench")
    return table


def select_packs(spec: str, mgsm_data: str | None) -> tuple[list[Pack], list[str]]:
    """The packs `--benchmarks` names ("all", "mgsm" for every MGSM language, or names), and why any
    of "all" is left out. A name that is no pack, or an MGSM pack without --mgsm-data, is an error."""
    table = packs()
    chosen: dict[str, Pack] = {}
    skipped = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        if name == "all":
            left_out = [p.name for p in table.values() if p.needs_data and not mgsm_data]
            chosen.update((p.name, p) for p in table.values() if p.name not in left_out)
            if left_out:
                skipped.append(f"{', '.join(left_out)}: no offline items (no package ships MGSM); give --mgsm-data")
        elif name == "mgsm" or name in table:
            for pack in ([p for p in table.values() if p.needs_data] if name == "mgsm" else [table[name]]):
                if pack.needs_data and not mgsm_data:
                    raise Qwen2Error(f"{pack.name} has no offline items (no package ships MGSM): give --mgsm-data "
                                     "with juletxara/mgsm's split per language, e.g. 'mgsm/{lang}.jsonl'")
                chosen[pack.name] = pack
        else:
            raise Qwen2Error(f"unknown benchmark {name!r}; choose from: all, mgsm, {', '.join(table)}")
    if not chosen:
        raise Qwen2Error("--benchmarks names no benchmark")
    return list(chosen.values()), skipped


def mgsm_path(pattern: str, task: str) -> str:
    """--mgsm-data's file for `task` (mgsm-XX): the pattern with {lang} replaced by XX."""
    if "{lang}" not in pattern:
        raise Qwen2Error(f"--mgsm-data {pattern!r} must hold '{{lang}}' where the language code goes, "
                         "e.g. 'mgsm/{lang}.jsonl'")
    return pattern.replace("{lang}", task[len("mgsm-"):])


# ---- engines -------------------------------------------------------------------------------------

def load_model(name: str, quantize: str | None):
    """Our model, from the registry's GGUF, quantised as asked (the tests put a tiny model here)."""
    import qwen2

    return qwen2.load(name, quantize=quantize, progress=False)


def qwen2_replier(m, batch: int):
    """Our engine's greedy replies (the runner's own `model_replier`)."""
    from qwen2.eval.runner import model_replier

    return model_replier(m, batch=batch)


def llama_cpp_replier(gguf: str, tokenizer, end_ids, threads: int, batch: int):
    """A runner Replier on llama.cpp: the runner's prompt texts as our token ids, greedy, continuously
    batched, cut by our TextStream at an end token or the runner's stop strings."""
    import llama_cpp

    engine = LlamaCppEngine(llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                                            verbose=False))

    def reply(prompts, max_new_tokens, stop):
        ids = {i: tokenizer.encode(prompt) for i, prompt in enumerate(prompts)}
        yield from llama_cpp_replies(engine, tokenizer, end_ids, ids, max_new_tokens, list(stop), batch)

    return reply


def run_name(model: str, engine: str, quantize: str | None) -> str:
    """The model a summary names: ours with its quantisation ("...-int4", which the published figures'
    matching drops), llama.cpp's as "llama.cpp:MODEL" (the report's convention for another engine)."""
    if engine == "llama.cpp":
        return f"llama.cpp:{model}"
    return f"{model}-{quantize}" if quantize else model


# ---- one run -------------------------------------------------------------------------------------

def results_paths(out: str, pack: Pack) -> list[str]:
    """The per-item JSONL files of a run (MT-Bench keeps its answers in a second one)."""
    if pack.kind == "mt-bench":
        from qwen2.eval.mt_bench import answers_path_for

        return [out, answers_path_for(out)]
    return [out]


def count_lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


def run_pack(pack: Pack, m, out: str, name: str, args, replier, judge) -> dict:
    """Run one pack through its runner into `out`; return its summary."""
    from qwen2.eval import runner

    cap = args.max_new_tokens
    progress = sys.stderr.isatty()
    if pack.kind == "mc":
        from qwen2.eval import multiple_choice

        # log-likelihood tasks are scored on base prompts, as `qwen2 eval mc` does by default
        return multiple_choice.run(pack.task, m, out, model=name, limit=args.limit, chat=False,
                                   batch_size=args.batch, progress=progress)
    if pack.kind == "mt-bench":
        from qwen2.eval import mt_bench

        return mt_bench.run(mt_bench.load_questions(None, None), replier, m.tokenizer, judge, out, model=name,
                            limit=args.limit, max_new_tokens=min(cap or 1024, 1024), progress=progress)
    from qwen2.cli.eval import benchmark_of

    bench = benchmark_of(pack.verb, pack.task)
    data = mgsm_path(args.mgsm_data, pack.task) if pack.needs_data else None
    chat = m.tokenizer.chat_template is not None  # `qwen2 eval`'s default
    return runner.run(bench, replier, out, tokenizer=m.tokenizer, model=name, data=data, limit=args.limit,
                      chat=chat, max_new_tokens=min(cap, bench.max_new_tokens) if cap else None,
                      progress=progress)


def headline_text(summary: dict) -> str:
    """The summary's first metric, for the progress line."""
    for key, value in summary.items():
        if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)) and "n" in value:
            return f"{key} {value['mean']:.3f} (n={value['n']})"
    return "nothing scored"


def timed_run(pack: Pack, engine: str, m, out: str, name: str, args, replier, judge, label: str) -> dict:
    """`run_pack` between restoring its JSONL from git's compressed copy and writing that copy again
    (also when the run stops early, so what it finished is kept); a progress line; its timing."""
    paths = results_paths(out, pack)
    for path in paths:
        restore_results(path)
    before = count_lines(paths[0])
    start = time.time()
    try:
        summary = run_pack(pack, m, out, name, args, replier, judge)
    finally:
        for path in paths:
            if os.path.exists(path):
                compress_results(path)
    seconds = time.time() - start
    new = count_lines(paths[0]) - before
    rate = f", {new / seconds:.3f} items/s" if new else ""
    print(f"{label} {name} {pack.name}: {new} new of {summary.get('items', summary.get('questions'))} items "
          f"in {seconds:.1f} s{rate}; {headline_text(summary)}", file=sys.stderr, flush=True)
    return {"pack": pack.name, "engine": engine, "model": name, "results": out, "new_items": new,
            "seconds": round(seconds, 1)}


class Models:
    """The loaded models by name: each loaded once, the judge kept while the next model may be it."""

    def __init__(self, quantize: str | None):
        self.quantize, self.loaded = quantize, {}

    def get(self, name: str):
        if name not in self.loaded:
            self.loaded[name] = load_model(name, self.quantize)
        return self.loaded[name]

    def release(self, keep: str) -> None:
        for name in [n for n in self.loaded if n != keep]:
            del self.loaded[name]
        gc.collect()


def run_all(args, chosen: list[Pack], engines: list[str]) -> list[dict]:
    """Every pack of every model with every engine that runs it; their timings."""
    from qwen2.checkpoint.registry import gguf_path
    from qwen2.eval.mt_bench import ModelJudge

    models = Models(args.quantize)
    plan = [(model, pack, engine) for model in args.models for pack in chosen
            for engine in engines if engine == "qwen2" or pack.llama_cpp]
    timings = []
    for model in args.models:
        m = models.get(model)
        repliers = {"qwen2": qwen2_replier(m, args.batch)}
        for pack in chosen:
            for engine in (e for e in engines if e == "qwen2" or pack.llama_cpp):
                if engine not in repliers:  # llama.cpp loads its GGUF once per model, when first needed
                    repliers[engine] = llama_cpp_replier(gguf_path(model, progress=False), m.tokenizer, m.eos_ids,
                                                         args.threads, args.batch)
                judge = None
                if pack.kind == "mt-bench":
                    judge = ModelJudge(models.get(args.judge_model), name=run_name(args.judge_model, "qwen2",
                                                                                    args.quantize), batch=args.batch)
                folder = f"qwen2-{args.quantize or 'fp32'}" if engine == "qwen2" else engine
                out = os.path.join(args.run_dir, model, folder, f"{pack.name}.jsonl")
                label = f"[{len(timings) + 1}/{len(plan)}]"
                timings.append(timed_run(pack, engine, m, out, run_name(model, engine, args.quantize), args,
                                         repliers[engine], judge, label))
        del m, repliers
        models.release(keep=args.judge_model)
    return timings


# ---- the report ----------------------------------------------------------------------------------

def summaries_in(run_dir: str, models: list[str]) -> list[str]:
    """Every summary under run_dir/MODEL/ of the given models: by model, then in the packs' order (any
    other summary after them), our engine's before llama.cpp's, which orders the report's columns and rows."""
    order = {name: i for i, name in enumerate(packs())}
    found = []
    for model in models:
        runs = []
        for root, _, files in os.walk(os.path.join(run_dir, model)):
            folder = os.path.basename(root)
            runs += [((order.get(f[:-len(".summary.json")], len(order)), folder == "llama.cpp", folder, f),
                      os.path.join(root, f)) for f in files if f.endswith(".summary.json")]
        found += [path for _, path in sorted(runs)]
    # the report names its inputs: relative to the working directory (the repository root) where inside it
    return [p if os.path.relpath(p).startswith("..") else os.path.relpath(p) for p in found]


def read_all(paths: list[str]):
    """The runs the report can show, and a line for each summary it cannot (nothing scored yet)."""
    from qwen2.eval import report

    runs, unreadable = [], []
    for path in paths:
        try:
            runs.append(report.read_run(path))
        except Qwen2Error as e:
            unreadable.append(str(e))  # the message names the file
    return runs, unreadable


_SIZE = re.compile(r"(\d+(?:\.\d+)?)b")


def size_of(model: str) -> str | None:
    """The parameter count a model name gives ("0.5b"), from its `model_key`."""
    from qwen2.eval.published import model_key

    found = _SIZE.findall(model_key(model))
    return found[-1] if found else None


def family_of(model: str) -> tuple[str, bool]:
    """(family, instruct) of a model name: "qwen2.5-coder-0.5b-instruct" -> ("qwen2.5-coder", True)."""
    from qwen2.eval.published import model_key

    key = model_key(model)
    family = key.split(f"-{size_of(model)}")[0] if size_of(model) else key
    return family, key.endswith("instruct")


def reference_figures(model: str, benchmark: str, figures) -> list:
    """The published figures for `benchmark` of `model` itself, or, where the paper gives none for it,
    of every model of its size."""
    from qwen2.eval.published import benchmark_key, model_key

    key = benchmark_key(benchmark)
    on_it = [f for f in figures if benchmark_key(f.benchmark) == key]
    own = [f for f in on_it if model_key(f.model) == model_key(model)]
    return own or [f for f in on_it if size_of(f.model) == size_of(model)]


def base_model(run) -> str:
    """The registry model behind a run's model name."""
    from qwen2.eval.published import model_key

    return model_key(run.model)


def item_set_text(run, bench_items: dict) -> str | None:
    """The subset reason: what was scored against the published item set, or None when it is that set."""
    from qwen2.eval import published as pub

    key = pub.benchmark_key(run.benchmark)
    if run.on_published_items:
        return None
    item_set = pub.ITEM_SETS.get(key)
    full = f"the published set's {item_set.items:,}" if item_set and item_set.items else "the published set"
    source = run.settings.get("data")
    pack = bench_items.get(run.path)
    if source:
        whence = f"of {os.path.basename(source)}"
    elif pack is not None and pack > run.items:
        whence = f"of the offline pack's {pack} (--limit)"
    else:
        whence = "from the offline pack"
    return f"subset: {run.items:,} items {whence}, not {full}"


def quantisation_text(run, quantize: str | None) -> str:
    from qwen2.checkpoint.registry import KNOWN_MODELS

    known = KNOWN_MODELS.get(base_model(run))
    weights = known.title if known else base_model(run)
    if run.model.startswith("llama.cpp:"):
        how = "llama.cpp on its quantised blocks as they are"
    else:
        how = f"loaded with quantize={quantize}" if quantize else "dequantised to fp32"
    return f"quantisation: {weights}, {how}; the published models' weights are bf16"


def model_text(run, figure) -> str | None:
    """The model reason: the figure is another model's (another family, or base against instruct)."""
    from qwen2.eval.published import model_key

    if model_key(figure.model) == base_model(run):
        return None
    (ours, ours_instruct), (theirs, theirs_instruct) = family_of(run.model), family_of(figure.model)
    parts = []
    if ours != theirs:
        parts.append(f"another family ({theirs}, not {ours})")
    if ours_instruct != theirs_instruct:
        parts.append("the base model, not the instruct one" if ours_instruct else "the instruct model, not the base one")
    return f"model: the figure is {figure.model}'s" + (": " + ", ".join(parts) if parts else "")


def prompting_text(run, figure, default_shots: dict) -> str | None:
    s = run.settings
    parts = []
    if "shots" in s:
        default = default_shots.get(run.path)
        fewer = f" (the task's default is {default}; the pack's items are its exemplars, so an item's shots " \
                "are the others)" if default is not None and s["shots"] < default else ""
        given = shots_given(run)
        if given and max(given) < s["shots"]:  # the mc runner caps the shots at what the subject has
            low, high = min(given), max(given)
            fewer = f" asked, {low if low == high else f'{low}-{high}'} given (an item's shots are the other " \
                    "exemplars of its subject in the pack)"
        parts.append(f"ours {s['shots']}-shot{fewer}")
    if "chat" in s:
        parts.append("through the chat template" if s["chat"] else "base prompt, no chat template")
    published_shots = re.search(r"(\d+)-shot", figure.source) if figure else None
    if published_shots:
        parts.append(f"the figure's table says {published_shots.group(1)}-shot")
    return "prompting: " + ", ".join(parts) if parts else None


def shots_given(run) -> list[int]:
    """The shots each item had, where the runner records them per item (the mc runner does)."""
    path = run.path[:-len(".summary.json")] + ".jsonl"
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [r["shots"] for r in map(json.loads, f) if isinstance(r.get("shots"), int)]


def judge_text(run) -> str | None:
    judge = run.settings.get("judge")
    return f"judge: rated by {judge}, not GPT-4 (the judge of published MT-Bench figures)" if judge else None


def _points(run, metric: str, figure_value: float | None) -> tuple[str, str]:
    """Ours on the figure's scale, and the gap in points (or rating steps)."""
    from qwen2.eval.report import RATING_BENCHMARKS
    from qwen2.eval.published import benchmark_key

    value = run.metrics[metric]["mean"]
    scale = 1.0 if benchmark_key(run.benchmark) in RATING_BENCHMARKS else 100.0
    ours = f"{scale * value:.1f}" if scale == 100 else f"{value:.2f}"
    gap = "" if figure_value is None else f"{scale * value - figure_value:+.1f}"
    return ours, gap


def gaps_section(runs, figures, quantize: str | None, default_shots: dict, bench_items: dict) -> str:
    """For each run (benchmark and model), each published figure of that model or its size, ours on the
    same metric, the gap, and the differences between the two measurements that the runs' settings and
    published.py show. Nothing here is measured: they are what a gap may come from."""
    lines = ["## Gaps to the published figures", "",
             "Each run against the published figures of its model in `qwen2/eval/published.py`, or, where the "
             "paper gives none for it, of every model of the same size (marked: model). Ours is the figure's "
             "metric, in percent (MT-Bench: rating 1-10); gap = ours − published. The differences are read "
             "from the runs' settings and the figures' sources; none of them is measured here.", "",
             "| benchmark | run | metric | ours | published | gap | differences |", "|---|---|---|---:|---|---:|---|"]
    for run in runs:
        matching = reference_figures(run.model, run.benchmark, figures)
        common = [item_set_text(run, bench_items), quantisation_text(run, quantize), judge_text(run)]
        for figure in matching or [None]:
            metric = (figure.metric if figure and figure.metric in run.metrics else run.headline)
            ours, gap = _points(run, metric, figure.value if figure else None)
            reasons = [r for r in [model_text(run, figure) if figure else None, *common,
                                   prompting_text(run, figure, default_shots)] if r]
            published = f"{figure.value:.1f} ({figure.model}; {figure.source})" if figure else \
                "none for a model of this size"
            lines.append("| " + " | ".join(x.replace("|", "\\|") for x in [
                run.benchmark, run.model, metric, ours, published, gap, "; ".join(reasons)]) + " |")
    return "\n".join(lines) + "\n"


def pack_facts(pack: Pack) -> tuple[int | None, int | None]:
    """(the task's default shots, the offline pack's items) of a pack; None where it has none."""
    if pack.kind == "mc":
        from qwen2.eval.mc_formats import format_of, load_items

        return None, len(load_items(format_of(pack.task), None))
    if pack.kind == "mt-bench":
        from qwen2.eval.mt_bench import load_questions

        return None, len(load_questions(None, None))
    from qwen2.cli.eval import benchmark_of

    bench = benchmark_of(pack.verb, pack.task)
    return bench.shots, None if pack.needs_data else len(bench.load(None))


def write_table(args, timings: list[dict], skipped: list[str]) -> str:
    """The report over every summary of the models in run_dir: table, PNG, gaps, what is missing."""
    from qwen2.eval import published, report

    runs, unreadable = read_all(summaries_in(args.run_dir, args.models))
    if not runs:
        raise Qwen2Error(f"no finished run under {args.run_dir} to report")
    default_shots, bench_items = {}, {}
    by_name = packs()
    for run in runs:
        pack = by_name.get(os.path.basename(run.path)[:-len(".summary.json")])
        if pack:
            default_shots[run.path], bench_items[run.path] = pack_facts(pack)
    figures = published.FIGURES
    png = os.path.splitext(args.out)[0] + ".png"
    table = report.markdown(runs, figures)
    report.plot(runs, png, figures)
    lines = ["# Evaluation table: " + ", ".join(args.models), "",
             f"Command: `{command_line(MODULE, args.argv)}`. Our engine: the registry GGUF loaded with "
             f"quantize={args.quantize}; llama.cpp: the same GGUF's blocks as they are, on our prompt token ids. "
             f"Chart: [{os.path.basename(png)}]({os.path.basename(png)}).", "", table,
             gaps_section(runs, figures, args.quantize, default_shots, bench_items)]
    missing = skipped + unreadable
    if missing:
        lines += ["## Not in the table", ""] + [f"- {line}" for line in missing] + [""]
    text = "\n".join(lines)
    data = {"command": command_line(MODULE, args.argv), "machine": machine_facts(args.threads),
            "models": args.models, "quantize": args.quantize, "runs": timings, "not_in_table": missing,
            "summaries": [run.path for run in runs]}
    write_results(os.path.splitext(args.out)[0] + ".json", data, text)
    return text


# ---- command line --------------------------------------------------------------------------------

def parse_args(argv):
    from qwen2.quant import MODES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"registry names, comma-separated (default: {','.join(MODELS)})")
    ap.add_argument("--quantize", default="int4", choices=[*MODES, "none"], help="our engine's weights (default int4)")
    ap.add_argument("--benchmarks", default="all", help="comma-separated: all (default), mgsm, or pack names "
                    "(mc-mmlu, bbh, math-gsm8k, math-math, math-mgsm-XX, ifeval, mt-bench)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="qwen2, llama.cpp (math and bbh only; skipped "
                    "with a note when llama_cpp is not importable); default both")
    ap.add_argument("--judge-model", default=JUDGE, help=f"MT-Bench's judge, a registry name (default {JUDGE})")
    ap.add_argument("--mgsm-data", default=None, metavar="PATTERN", help="juletxara/mgsm's split per language, "
                    "{lang} for the language code, e.g. 'mgsm/{lang}.jsonl' (MGSM has no offline items)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N items of each pack (a smoke run)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="cap every reply at N tokens (a smoke run; "
                    "default: each task's own; not MT-Bench's judge)")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded together by each engine (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (default 2)")
    ap.add_argument("--run-dir", default=RUN_DIR, help="per-item results (default benchmarks/results/eval_report/)")
    ap.add_argument("--out", default=OUT, help="the report (default benchmarks/results/eval_report.md; "
                    ".png and .json beside)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from qwen2.checkpoint.registry import KNOWN_MODELS

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in [*args.models, args.judge_model]:  # checked before anything loads
        if name not in KNOWN_MODELS:  # llama.cpp's column needs the registry's GGUF
            raise Qwen2Error(f"unknown model {name!r}; choose from the registry: {', '.join(KNOWN_MODELS)}")
    if not args.models:
        raise Qwen2Error("--models names no model")
    args.quantize = None if args.quantize == "none" else args.quantize
    for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise Qwen2Error(f"{flag} must be at least 1, got {value}")
    if args.batch < 1 or args.threads < 1:
        raise Qwen2Error("--batch and --threads must be at least 1")
    chosen, skipped = select_packs(args.benchmarks, args.mgsm_data)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise Qwen2Error(f"unknown engine {', '.join(unknown) or '(none)'}; choose from {', '.join(ENGINES)}")
    if "llama.cpp" in engines and not llama_cpp_installed():
        engines.remove("llama.cpp")
        skipped.append("llama.cpp: llama_cpp is not importable (pip install llama-cpp-python), no llama.cpp column")

    import torch

    torch.set_num_threads(args.threads)
    timings = run_all(args, chosen, engines)
    text = write_table(args, timings, skipped)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
