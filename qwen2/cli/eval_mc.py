"""`qwen2 eval mc`: log-likelihood multiple choice (MMLU, MMLU-Pro, C-Eval, CMMLU, ARC, HellaSwag, GPQA)."""
from __future__ import annotations

TASKS = ("mmlu", "mmlu-pro", "ceval", "cmmlu", "arc", "hellaswag", "gpqa")  # qwen2.eval.mc_formats.FORMATS


def cmd_mc(args) -> None:
    from ..eval import multiple_choice
    from ..eval.runner import describe
    from . import model_args

    out = args.out or f"mc-{args.task}.jsonl"
    m = model_args.load_model(args)
    summary = multiple_choice.run(args.task, m, out, model=args.model, data=args.data, shots_data=args.shots_data,
                                  limit=args.limit, shots=args.shots, chat=args.chat == "on",
                                  batch_size=args.batch_size)
    print(describe(summary))
    print(f"  acc macro over {len(summary['acc_by_subject'])} subjects: {summary['acc_macro']:.4f}")
    cache = summary["cache"]
    if cache["context_tokens"]:
        print(f"  prompt tokens run: {cache['context_tokens_run']} of {cache['context_tokens']} "
              f"(the rest reused from the previous item's cache)")
    print(f"results: {out}")


def add_mc_parser(what, add_benchmark_args, add_model_args) -> None:
    """Registers the subcommand on `what` (the `qwen2 eval` subparsers)."""
    p = what.add_parser("mc", help="log-likelihood multiple choice (MMLU, MMLU-Pro, C-Eval, CMMLU, ARC, HellaSwag, "
                        "GPQA): acc and acc_norm per subject and macro, as lm-eval scores them")
    add_benchmark_args(p, add_model_args)
    p.add_argument("--task", choices=TASKS, default="mmlu", help="the dataset's format (default mmlu: without "
                   "--data, the offline pack of lm-eval's 282 MMLU exemplars)")
    p.add_argument("--shots-data", default=None, help="where few-shot examples come from, in the same layout "
                   "(e.g. the dev split; default: the item set itself, each item left out of its own examples)")
    # log-likelihood tasks are scored on base prompts (lm-eval's default too): --chat is off unless asked
    for action in p._actions:
        if action.dest == "chat":
            action.help = "score the choices as the start of the chat template's assistant reply (default off)"
    p.set_defaults(func=cmd_mc, chat="off")
