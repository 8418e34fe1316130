"""`qwen2 eval mt-bench`: two-turn questions answered by the model, graded by a judge model or endpoint.

The judge, by what is given:
    --judge-url URL [--judge-model NAME]   an OpenAI-compatible endpoint (NAME: its model; default the
                                           first it lists); the key, if it needs one, is $OPENAI_API_KEY
    --judge-model NAME_OR_PATH             a model loaded here, with the same load options as --model
    neither                                the answering model judges its own answers: runs anywhere
                                           offline, but a self-judged score is no published MT-Bench figure
                                           (those are judged by GPT-4)
"""
from __future__ import annotations

import argparse

from ..errors import Qwen2Error


def model_judge(args, m):
    """The judge loaded here: --judge-model with --model's load options, else the answering model `m`."""
    from ..eval.mt_bench import ModelJudge

    if args.judge_model and args.judge_model != args.model:
        from ..api import load
        from ..options import LoadOptions

        return ModelJudge(load(args.judge_model, options=LoadOptions.from_args(args)), name=args.judge_model,
                          batch=args.batch_size)
    return ModelJudge(m, name=args.model, batch=args.batch_size)


def cmd_mt_bench(args) -> None:
    from ..eval import mt_bench
    from ..eval.datasets import first
    from ..eval.runner import model_replier
    from ..eval.results import summary_path
    from . import model_args

    if args.shots not in (None, 0):
        raise Qwen2Error("mt-bench has no few-shot examples: leave out --shots")
    if args.chat == "off":
        raise Qwen2Error("mt-bench is a chat benchmark, answered through the chat template: leave out --chat off")
    least = (("--max-new-tokens", args.max_new_tokens, 1), ("--judge-max-new-tokens", args.judge_max_new_tokens, 1),
             ("--batch-size", args.batch_size, 1), ("--judge-retries", args.judge_retries, 0))
    for flag, value, lowest in least:
        if value < lowest:
            raise Qwen2Error(f"{flag} must be at least {lowest}, got {value}")
    if args.judge_timeout <= 0:
        raise Qwen2Error(f"--judge-timeout must be positive seconds, got {args.judge_timeout}")
    # bad data or --limit fail before any loading
    questions = first(mt_bench.load_questions(args.data, args.references), args.limit)
    out = args.out or "mt-bench.jsonl"
    answers = args.answers or mt_bench.answers_path_for(out)
    endpoint = None
    if args.judge_url:  # before the model loads: an endpoint that is down or lists no model fails at once
        endpoint = mt_bench.EndpointJudge(args.judge_url, args.judge_model, timeout=args.judge_timeout,
                                          retries=args.judge_retries, concurrency=args.batch_size)
    m = model_args.load_model(args)
    judge = endpoint or model_judge(args, m)
    summary = mt_bench.run(questions, model_replier(m, batch=args.batch_size), m.tokenizer, judge, out,
                           answers_path=answers, model=args.model, data=args.data, references=args.references,
                           max_new_tokens=args.max_new_tokens,
                           judge_max_new_tokens=args.judge_max_new_tokens)
    print(mt_bench.describe(summary))
    print(f"judgements: {out}, answers: {answers}, summary: {summary_path(out)}")


def add_mt_bench_parser(what, add_benchmark_args, add_model_args) -> None:
    """Registers the subcommand on `what` (the `qwen2 eval` subparsers)."""
    p = what.add_parser("mt-bench", help="MT-Bench: 80 two-turn questions answered by the model and rated 1-10 "
                        "by a judge (a model, or an OpenAI-compatible endpoint), per category and overall",
                        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(p, add_model_args)
    p.add_argument("--references", default=None, help="with --data: the reference answers for the math, reasoning "
                   "and coding questions, in FastChat's reference_answer/MODEL.jsonl layout")
    p.add_argument("--answers", default=None, help="the answers' results JSONL (default: OUT's name with "
                   ".answers.jsonl); give an earlier run's to judge its answers again with another judge")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="answer length limit per turn (default 1024, "
                   "FastChat's)")
    p.add_argument("--judge-model", default=None, help="the judge: a registry name, HF directory or .gguf "
                   "(default: the answering model); with --judge-url, the endpoint's model name")
    p.add_argument("--judge-url", default=None, help="an OpenAI-compatible endpoint that judges, e.g. "
                   "http://127.0.0.1:8000/v1 (`qwen2 serve`); its key, if any, is $OPENAI_API_KEY")
    p.add_argument("--judge-max-new-tokens", type=int, default=2048, help="judgement length limit "
                   "(default 2048, FastChat's)")
    p.add_argument("--judge-timeout", type=float, default=600.0, help="seconds to wait for one judgement from "
                   "--judge-url (default 600)")
    p.add_argument("--judge-retries", type=int, default=2, help="retries of a judgement request that failed "
                   "to connect or got a 429/5xx (default 2)")
    p.set_defaults(func=cmd_mt_bench)
