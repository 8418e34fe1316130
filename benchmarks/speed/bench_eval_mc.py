"""`qwen2 eval mc` against lm-eval on the same MMLU items: same scores, how much faster.

The items are the offline pack's 282 MMLU exemplars (57 subjects; --limit for the first N), 5-shot
as `qwen2 eval mc` prompts them: each item's examples are the other exemplars of its subject (at
most 4; the item itself is never one). Three runners score them, one after the other in this
process, on the same fp32 weights:

  native         `qwen2.eval.multiple_choice.run`: each prompt run once, on top of the prefix it shares
                 with the previous item's (rewound KV cache); only the last position's logits
  lm-eval hf     `lm_eval.simple_evaluate` with its transformers backend (HFLM, batch size 1, the
                 fp32 safetensors qwen2's loader caches): a local task per subject that includes
                 lm-eval's own mmlu task file, the subject's exemplars as both test and few-shot split
                 (lm-eval then leaves the item out of its examples, first_n), only the chosen items
                 evaluated (`samples=`). HFLM runs each context once for its one-token choices
                 (its logits cache) and computes the logits of every position.
  lm-eval qwen2  the same tasks through our lm-eval adapter (`qwen2.eval.lm_eval_adapter`), the same
                 loaded model as native: one forward per choice, what the native runner saves.

Checked, not assumed: the prompts lm-eval built equal ours; per item the predicted choice, and per
choice the log-likelihoods (largest difference reported). Times are the wall time of each run, its
model already loaded (lm-eval's include building its tasks and reading the data). While each run
lasts, the share of the CPU that other processes took is recorded: on a shared machine, compare
runs only when it is small.

    python -m benchmarks.speed.bench_eval_mc [--limit N] [--shots 5] [--threads N] [--skip-adapter]
                                             [--wait-quiet S]

Writes benchmarks/results/eval_mc-0.5b.{json,md} (with --limit: eval_mc-0.5b-limitN.*).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from benchmarks.common import (CpuWatch, RESULTS_DIR, command_line, fmt, machine_facts, one_line_errors,
                               set_torch_threads, wait_for_quiet, write_results)

MODULE = "benchmarks.speed.bench_eval_mc"
MODEL = "qwen2.5-coder-0.5b-instruct"
# lm-eval's mmlu template, its fixed four options written as a loop: one exemplar has five
DOC_TO_TEXT = ("{{question.strip()}}\n{% for c in choices %}{{'ABCDEFGHIJ'[loop.index0]}}. {{c}}\n{% endfor %}"
               "Answer:")
DOC_TO_CHOICE = "{{['A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J'][:choices|length]}}"


def local_tasks(folder: str, pack: list[dict], items: list[dict], shots: int) -> dict[str, list[int]]:
    """lm-eval task files, one per subject of `items`, in `folder`; {task: doc indices to evaluate}."""
    import yaml
    from lm_eval import tasks as lm_tasks

    from qwen2.eval.mc_formats import FORMATS

    template = os.path.join(os.path.dirname(lm_tasks.__file__), "mmlu", "default", "_default_template_yaml")
    chosen: dict[str, list[int]] = {}
    for item in items:
        chosen.setdefault(f"qwen2_mc_{item['subject']}", []).append(int(item["id"].rsplit("/", 1)[1]))
    for subject in {i["subject"] for i in items}:
        rows = [{k: r[k] for k in ("question", "subject", "choices", "answer")} for r in pack if r["subject"] == subject]
        data = os.path.join(folder, f"{subject}.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        config = {"include": template, "task": f"qwen2_mc_{subject}", "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {"test": data}}, "test_split": "test", "fewshot_split": "test",
                  "fewshot_config": {"sampler": "first_n"}, "num_fewshot": min(shots, len(rows) - 1),
                  "description": FORMATS["mmlu"].description(subject), "doc_to_text": DOC_TO_TEXT,
                  "doc_to_choice": DOC_TO_CHOICE,
                  "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
        with open(os.path.join(folder, f"qwen2_mc_{subject}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f, allow_unicode=True)
    return chosen


def run_lm_eval(lm, folder: str, chosen: dict[str, list[int]]) -> tuple[dict[str, dict], float, float]:
    """({item id: sample}, wall seconds, others' CPU share) of lm-eval on the local tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    watch = CpuWatch()
    out = lm_eval.simple_evaluate(model=lm, tasks=sorted(chosen), samples=chosen, log_samples=True,
                                  task_manager=TaskManager(include_path=folder, include_defaults=False))
    wall, others = watch.wall_s(), watch.others_share()
    samples = {}
    for task, rows in out["samples"].items():
        for s in rows:
            samples[f"{task[len('qwen2_mc_'):]}/{s['doc_id']}"] = s
    return samples, wall, others


def summary_of(name: str, lls: dict[str, list[float]], items: list[dict], wall: float, others: float,
               contexts_equal: bool | None = None) -> dict:
    from qwen2.eval.multiple_choice import scores

    per_item = {i["id"]: scores(lls[i["id"]], i["choices"], i["gold"]) for i in items}
    return {"runner": name, "items": len(items), "wall_s": wall, "s_per_item": wall / len(items),
            "others_cpu_share": others, "prompts_equal_native": contexts_equal,
            "acc": sum(s["acc"] for s in per_item.values()) / len(items),
            "acc_norm": sum(s["acc_norm"] for s in per_item.values()) / len(items),
            "predictions": {k: max(range(len(v)), key=v.__getitem__) for k, v in lls.items()}}


def markdown(data: dict) -> str:
    native = data["runs"]["native"]
    lines = [f"# qwen2 eval mc against lm-eval: {data['items']} MMLU exemplars, {data['shots']}-shot, {data['model']} fp32",
             "", f"Machine: {data['machine']['cpu']}, {data['machine']['threads']} threads. Command: "
             f"`{data['command']}`", "",
             "| runner | items | acc | acc_norm | wall s | s/item | native is faster by | others' CPU share |",
             "|---|---|---|---|---|---|---|---|"]
    for run in data["runs"].values():
        ratio = run["wall_s"] / native["wall_s"]
        lines.append(f"| {run['runner']} | {run['items']} | {run['acc']:.4f} | {run['acc_norm']:.4f} | "
                     f"{fmt(run['wall_s'])} | {fmt(run['s_per_item'], '.2f')} | {ratio:.2f}x | "
                     f"{100 * run['others_cpu_share']:.0f} % |")
    agree = data["agreement"]
    lines += ["", f"Same predicted choice on every item: {agree['same_predictions']}. Largest per-choice "
              f"log-likelihood difference from native: " + ", ".join(
                  f"{k} {v:.2e}" for k, v in agree["max_abs_loglikelihood_diff"].items()) + ". lm-eval's prompts "
              f"equal native's: {agree['prompts_equal']}.",
              f"Prompt tokens native ran: {data['cache']['context_tokens_run']} of {data['cache']['context_tokens']} "
              f"(the rest reused from the previous item's KV cache)."]
    busiest = max(run["others_cpu_share"] for run in data["runs"].values())
    if busiest > 0.2:
        lines.append(f"Other processes took up to {100 * busiest:.0f} % of the CPU during these runs: the times "
                     "and ratios are not a fair comparison; rerun on a quiet machine.")
    return "\n".join(lines) + "\n"


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N pack items (default all 282)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--skip-adapter", action="store_true", help="leave out lm-eval through our adapter "
                        "(the slowest run: one forward per choice)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S", help="before each run, wait up to S "
                        "seconds for other processes to leave the CPU (default 0: start at once)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    import qwen2
    from lm_eval.models.huggingface import HFLM
    from qwen2.checkpoint.registry import KNOWN_MODELS, hf_dir
    from qwen2.eval import multiple_choice
    from qwen2.eval.datasets import first, read_pack
    from qwen2.eval.lm_eval_adapter import Qwen2LM
    from qwen2.eval.mc_formats import format_of, load_items

    set_torch_threads(args.threads)
    fmt_mmlu = format_of("mmlu")
    all_items = load_items(fmt_mmlu, None)
    items = first(all_items, args.limit)
    m = qwen2.load(args.model)
    tokenizer = m.tokenizer
    by_subject: dict[str, list[dict]] = {}
    for x in all_items:
        by_subject.setdefault(x["subject"], []).append(x)
    contexts = {i["id"]: multiple_choice.prompt(fmt_mmlu, i, multiple_choice.pick_shots(
        i, by_subject[i["subject"]], args.shots, leave_out_item=True), False, tokenizer)[0] for i in items}

    runs, lls = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        print(f"native: {len(items)} items", file=sys.stderr)
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        watch = CpuWatch()
        summary = multiple_choice.run("mmlu", m, os.path.join(scratch, "native.jsonl"), model=args.model,
                                      limit=args.limit, shots=args.shots)
        wall, others = watch.wall_s(), watch.others_share()
        records = [json.loads(line) for line in open(os.path.join(scratch, "native.jsonl"))]
        lls["native"] = {r["id"]: r["loglikelihoods"] for r in records}
        runs["native"] = summary_of("native (qwen2 eval mc)", lls["native"], items, wall, others)
        cache = summary["cache"]

        chosen = local_tasks(scratch, read_pack("mmlu"), items, args.shots)
        weights = hf_dir(args.model) if args.model.lower() in KNOWN_MODELS else args.model  # an HF directory
        engines = [("lm-eval hf", lambda: HFLM(pretrained=weights, dtype="float32", device="cpu", batch_size=1))]
        if not args.skip_adapter:
            engines.append(("lm-eval qwen2", lambda: Qwen2LM(pretrained=m, batch_size=1)))
        for name, make in engines:
            print(f"{name}: {len(items)} items", file=sys.stderr)
            lm = make()
            if args.wait_quiet:
                wait_for_quiet(args.wait_quiet)
            samples, wall, others = run_lm_eval(lm, scratch, chosen)
            lls[name] = {k: [float(r[0][0]) for r in s["resps"]] for k, s in samples.items()}
            equal = all(samples[k]["arguments"][0][0] == contexts[k] for k in contexts)
            runs[name] = summary_of(name, lls[name], items, wall, others, equal)
            del lm
            torch.set_num_threads(args.threads)  # HFLM may change it

    native = lls["native"]
    agreement = {"same_predictions": all(r["predictions"] == runs["native"]["predictions"] for r in runs.values()),
                 "same_accuracy": len({round(r["acc"], 12) for r in runs.values()}) == 1,
                 "prompts_equal": all(r["prompts_equal_native"] for r in runs.values()
                                      if r["prompts_equal_native"] is not None),
                 "max_abs_loglikelihood_diff": {
                     name: max(abs(a - b) for k in native for a, b in zip(native[k], other[k]))
                     for name, other in lls.items() if name != "native"}}
    data = {"command": command_line(MODULE, argv), "model": args.model, "items": len(items), "shots": args.shots,
            "machine": machine_facts(args.threads), "runs": runs, "agreement": agreement, "cache": cache,
            "speedup": {name: run["wall_s"] / runs["native"]["wall_s"] for name, run in runs.items() if name != "native"}}
    stem = "eval_mc-" + ("0.5b" if args.model == MODEL else os.path.basename(args.model.rstrip("/"))) + \
        (f"-limit{args.limit}" if args.limit else "")
    write_results(args.out or os.path.join(RESULTS_DIR, stem + ".json"), data, markdown(data))
    print(markdown(data))
    return 0 if agreement["same_accuracy"] else 1


if __name__ == "__main__":
    sys.exit(main())
