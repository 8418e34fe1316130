"""`qwen2 eval ...`: humaneval, perplexity, passkey, needle, lm-eval (added to the `qwen2` parser by
qwen2/cli/__init__.py). Heavy imports happen inside the commands."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import Qwen2Error
from . import model_args


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_humaneval(args) -> None:
    from ..eval import humaneval
    from ..eval.sandbox import Limits

    settings = humaneval.Settings(model=args.model, samples=args.samples, temperature=args.temperature,
                                  top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    ks = sorted({1, args.k or 1})
    problems = humaneval.load_problems(limit=args.limit)
    limits = Limits(timeout=args.timeout)
    m = model_args.load_model(args)
    summary = humaneval.run(humaneval.model_generator(m, batch=args.batch), problems, args.out, settings, ks=ks, limits=limits,
                            tokenizer=m.tokenizer)
    rates = ", ".join(f"{k} {summary[k]:.3f}" for k in summary if k.startswith("pass@"))
    print(f"{summary['problems']} problems, {summary['passed']}/{summary['samples']} samples passed: {rates}")
    print(f"results: {args.out}, summary: {humaneval.summary_path(args.out)}")


def cmd_perplexity(args) -> None:
    from ..fileio import read_text
    from ..eval.perplexity import perplexity

    text = read_text(args.file)
    m = model_args.load_model(args)
    r = perplexity(m.model, m.tokenizer.encode(text), context=args.context, stride=args.stride, progress=True)
    print(f"perplexity {r.perplexity:.4f} over {r.scored} scored tokens of {r.tokens} "
          f"({r.windows} windows of {r.context} tokens, stride {r.stride}; mean NLL {r.mean_nll:.4f} nats)")


def cmd_retrieval(args) -> None:
    from ..eval import retrieval

    m = model_args.load_model(args)
    chat = None if args.chat is None else args.chat == "on"
    records = retrieval.run(m, args.kind, args.lengths, args.depths, trials=args.trials, chat=chat,
                            max_new_tokens=args.max_new_tokens)
    print(retrieval.table(records))
    correct = sum(r["correct"] for r in records)
    print(f"{args.kind}: {correct}/{len(records)} correct")
    if args.out:
        from ..fileio import write_text_atomic

        write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in records))


def cmd_lm_eval(args) -> None:
    try:
        from ..eval.lm_eval_adapter import main
    except ImportError as e:
        raise Qwen2Error(f"qwen2 eval lm-eval needs lm-eval ({e.name} is missing): pip install -e '.[eval]'") from None
    code = main(args.args)
    if code:
        sys.exit(code)


# The generation benchmarks: `qwen2 eval VERB --task NAME`, VERB -> (the module whose BENCHMARKS maps
# task names to `qwen2.eval.runner.GenerationBenchmark`s, the default task, help). A new benchmark is a
# module and a line here.
GENERATION_VERBS: dict[str, tuple[str, str, str]] = {
    "math": ("qwen2.eval.math_benchmarks", "gsm8k", "final-answer math (GSM8K, MATH, MGSM): generate, extract, "
             "strict and flexible match"),
    "bbh": ("qwen2.eval.bbh", "all", "BIG-Bench Hard, chain-of-thought few-shot, exact match"),
    "ifeval": ("qwen2.eval.ifeval", "ifeval", "instruction following (IFEval's verifiable instructions), "
               "strict and loose, prompt and instruction level"),
}


def benchmark_of(verb: str, task: str | None):
    """The GenerationBenchmark `qwen2 eval VERB --task TASK` names; an unknown task is a one-line error."""
    import importlib

    module, default, _ = GENERATION_VERBS[verb]
    benchmarks = importlib.import_module(module).BENCHMARKS
    task = task or default
    if task not in benchmarks:
        raise Qwen2Error(f"unknown {verb} task {task!r}; choose one of: {', '.join(benchmarks)}")
    return benchmarks[task]


def cmd_generation_benchmark(args) -> None:
    from ..eval import runner

    bench = benchmark_of(args.benchmark, args.task)
    out = args.out or f"{args.benchmark}-{bench.name}.jsonl"
    m = model_args.load_model(args)
    chat = m.tokenizer.chat_template is not None if args.chat is None else args.chat == "on"
    summary = runner.run(bench, runner.model_replier(m, batch=args.batch_size), out, tokenizer=m.tokenizer,
                         model=args.model, data=args.data, limit=args.limit, shots=args.shots, chat=chat,
                         max_new_tokens=args.max_new_tokens)
    print(runner.describe(summary))
    print(f"results: {out}")


def add_benchmark_args(p, add_model_args) -> None:
    """The options every native benchmark runner takes."""
    add_model_args(p)
    p.add_argument("--data", default=None, help="a full test set, JSONL or Parquet in the public dataset's "
                   "columns (default: the offline pack shipped with qwen2)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences run together (default 8)")
    p.add_argument("--chat", choices=["on", "off"], default=None,
                   help="prompt through the chat template (default: when the model has one)")
    p.add_argument("--out", default=None, help="per-item results JSONL, appended as it goes; a run resumes "
                   "from it (default: VERB-TASK.jsonl); the summary goes beside it (.summary.json)")


def add_eval_parser(sub, add_model_args) -> None:
    """The `eval` command and its subcommands, on the top-level subparsers `sub`."""
    ev = sub.add_parser("eval", help="benchmarks: humaneval, perplexity, passkey, needle, lm-eval")
    what = ev.add_subparsers(dest="benchmark", required=True)

    p = what.add_parser("humaneval", help="HumanEval pass@1 (pass@k with --samples), code run in a sandbox")
    add_model_args(p)
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--out", default="humaneval_results.jsonl",
                   help="results, one line per sample, appended as it goes; a run resumes from it "
                        "(default: humaneval_results.jsonl); the summary goes beside it (.summary.json)")
    p.add_argument("--samples", type=int, default=1, help="samples per problem (needs --temperature > 0 above 1)")
    p.add_argument("--k", type=int, default=None, help="also report pass@K (K <= --samples)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together (continuous batching; default 8)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sample's tests (default 10)")
    p.set_defaults(func=cmd_humaneval)

    p = what.add_parser("perplexity", help="sliding-window perplexity of a text file")
    add_model_args(p)
    p.add_argument("file")
    p.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's, "
                   "at most 4096)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: context/2)")
    p.set_defaults(func=cmd_perplexity)

    for kind, helptext in (("passkey", "find a 5-digit pass key hidden in filler text"),
                           ("needle", "find a 'special magic number' hidden in filler text")):
        p = what.add_parser(kind, help=helptext)
        add_model_args(p)
        p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096], help="prompt lengths in tokens, "
                       "comma-separated (default 1024,2048,4096)")
        p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                       help="needle depths from 0 (start) to 1 (end), comma-separated")
        p.add_argument("--trials", type=int, default=1, help="prompts (different keys) per length and depth")
        p.add_argument("--chat", choices=["on", "off"], default=None,
                       help="use the chat template (default: when the model has one)")
        p.add_argument("--max-new-tokens", type=int, default=16)
        p.add_argument("--out", default=None, help="write every prompt's record as JSONL")
        p.set_defaults(func=cmd_retrieval, kind=kind)

    for verb, (_, default, helptext) in GENERATION_VERBS.items():
        p = what.add_parser(verb, help=helptext)
        add_benchmark_args(p, add_model_args)
        p.add_argument("--task", default=None, help=f"which {verb} benchmark (default: {default})")
        p.add_argument("--max-new-tokens", type=int, default=None, help="reply length limit (default: the task's)")
        p.set_defaults(func=cmd_generation_benchmark)

    from .eval_mc import add_mc_parser
    from .eval_mt_bench import add_mt_bench_parser
    from .eval_report import add_report_parser

    add_mc_parser(what, add_benchmark_args, add_model_args)
    add_mt_bench_parser(what, add_benchmark_args, add_model_args)
    add_report_parser(what)

    # Everything after `lm-eval` is lm_eval's (its options look like ours, so none are parsed here).
    p = what.add_parser("lm-eval", prefix_chars="+", add_help=False,
                        help="lm_eval's command line with the 'qwen2' model registered (lm-eval --help for options)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)
