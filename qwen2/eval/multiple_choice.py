"""`qwen2 eval mc`: log-likelihood multiple choice (MMLU, MMLU-Pro, C-Eval, CMMLU, ARC, HellaSwag,
GPQA), scored as lm-eval scores its `multiple_choice` tasks.

Each item's prompt is the task's description, k solved examples of its subject and the question
(`qwen2.eval.prompts.render`); each choice is scored by the sum of its tokens' log-probabilities
after that prompt (qwen2/eval/mc_loglikelihood.py: the context runs once, and on top of the prefix it
shares with the previous item). Per item: acc (the most likely choice is the gold one), acc_norm
(log-likelihood divided by the choice's length in characters, lm-eval's acc_norm) and acc_bytes (by
its UTF-8 length); summarised per subject and as the macro average over subjects, with 95 % intervals.

Few-shot examples follow lm-eval's `first_n` sampler, within the item's subject: the first k rows of
`--shots-data` (give the dev split there to prompt as lm-eval's mmlu/ceval/cmmlu do), or, without
it, of the item set itself with the item left out (lm-eval's rule when the few-shot split is the
test split). The offline `mmlu` pack IS lm-eval's set of few-shot exemplars, so there an item's
examples are the other exemplars of its subject, never the item itself: at most 4 of them (3 for the
three subjects with 4 exemplars), even when --shots asks for 5. lm-eval refuses k above what is left;
here k is capped and each record says how many shots it had. ARC, HellaSwag and GPQA take random
examples from their train split in lm-eval; here they too take the first k. Default k: the Qwen2
report's (25 for ARC, 10 for HellaSwag, 5 for the others).

Prompting is base (lm-eval's default) unless chat is asked for: log-likelihood tasks are normally
base-prompted. With chat the prompt is the chat template's (description as the system turn, each
example a user and an assistant turn, as lm-eval's --apply_chat_template --fewshot_as_multiturn) and
the choices are scored as the start of the assistant's reply, without the space before them
(lm-eval drops the target delimiter under a chat template). The shared renderer strips each turn,
so where a task's description ends in blank lines (mmlu, ceval, cmmlu) the system turn differs from
lm-eval's by that trailing whitespace.
"""
from __future__ import annotations

import os

from ..errors import Qwen2Error
from ..progress import progress_bar
from .datasets import first
from .mc_formats import McFormat, format_of, load_items
from .mc_loglikelihood import ChoiceScorer, encode_pair
from .prompts import render
from .results import ResultsFile, mean_interval, summarize_scores

METRICS = ("acc", "acc_norm", "acc_bytes")
TARGET_DELIMITER, FEWSHOT_DELIMITER = " ", "\n\n"  # lm-eval's defaults, which these tasks keep


def pick_shots(item: dict, pool: list[dict], k: int, leave_out_item: bool) -> list[dict]:
    """lm-eval's first_n: the first k rows of the pool (the item's subject's), without the item itself
    when the pool is the item set; fewer when fewer are left."""
    if leave_out_item:
        same = ("subject", "text", "choices", "gold")
        pool = [x for x in pool if any(x[key] != item[key] for key in same)]
    return pool[:k]


def prompt(fmt: McFormat, item: dict, shots: list[dict], chat: bool, tokenizer) -> tuple[str, list[str]]:
    """(context, continuations) of an item: the prompt text and the text scored for each choice."""
    delimiter = "" if chat else TARGET_DELIMITER
    context = render(tokenizer, item["text"], [(s["text"], delimiter + s["choices"][s["gold"]]) for s in shots],
                     chat=chat, description=fmt.description(item["subject"]), delimiter=FEWSHOT_DELIMITER)
    return context, [delimiter + c for c in item["choices"]]


def scores(loglikelihoods: list[float], choices: list[str], gold: int) -> dict:
    """acc, acc_norm, acc_bytes of one item; ties go to the first choice (numpy's argmax)."""
    def best(values):
        return max(range(len(values)), key=values.__getitem__)

    return {"acc": float(best(loglikelihoods) == gold),
            "acc_norm": float(best([ll / len(c) for ll, c in zip(loglikelihoods, choices)]) == gold),
            "acc_bytes": float(best([ll / len(c.encode()) for ll, c in zip(loglikelihoods, choices)]) == gold)}


def summarize(records: list[dict]) -> dict:
    summary = summarize_scores(records, METRICS, group="subject")
    by_subject: dict[str, list[float]] = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r["scores"]["acc"])
    summary["acc_interval_by_subject"] = {s: mean_interval(v) for s, v in sorted(by_subject.items())}
    return summary


def run(task: str, m, out: str | os.PathLike, *, model: str = "", data: str | None = None,
        shots_data: str | None = None, limit: int | None = None, shots: int | None = None, chat: bool = False,
        batch_size: int = 8, max_length: int | None = None, progress: bool = True) -> dict:
    """Score the first `limit` items of `task` (from `data`, else the offline pack) with the loaded
    model `m`, resuming from `out`; return the summary, also written beside `out`."""
    fmt = format_of(task)
    shots = fmt.shots if shots is None else shots
    if shots < 0:
        raise Qwen2Error(f"--shots must be 0 or more, got {shots}")
    if batch_size < 1:
        raise Qwen2Error(f"--batch-size must be at least 1, got {batch_size}")
    tokenizer = m._require_tokenizer()
    if chat and tokenizer.chat_template is None:
        raise Qwen2Error(f"--chat on needs a chat template, and {model or 'this model'}'s tokenizer has none: "
                         "use --chat off")
    all_items = load_items(fmt, data)
    items = first(all_items, limit)
    pool = load_items(fmt, shots_data) if shots_data else all_items
    by_subject: dict[str, list[dict]] = {}
    for x in pool:
        by_subject.setdefault(x["subject"], []).append(x)
    max_length = max_length or min(m.config.max_position_embeddings, 4096)  # the lm-eval adapter's default
    settings = {"benchmark": f"mc-{task}", "model": model, "data": os.path.abspath(data) if data else None,
                "shots_data": os.path.abspath(shots_data) if shots_data else None, "shots": shots, "chat": chat,
                "max_length": max_length}
    results = ResultsFile(out, settings, command="qwen2 eval mc")
    scorer = ChoiceScorer(m.model, max_length, batch_size)
    eot = tokenizer.eos_token_id
    todo = [item for item in items if item["id"] not in results]
    with progress_bar(total=len(items), initial=len(items) - len(todo), desc=f"mc {task}", unit="item",
                      disable=not progress) as bar:
        for item in todo:
            examples = pick_shots(item, by_subject.get(item["subject"], []), shots, leave_out_item=not shots_data)
            context, continuations = prompt(fmt, item, examples, chat, tokenizer)
            pairs = [encode_pair(tokenizer, context, c, eot) for c in continuations]
            lls = scorer.loglikelihoods(pairs)
            results.append([{"id": item["id"], "subject": item["subject"], "gold": item["gold"],
                             "shots": len(examples), "context_tokens": len(pairs[0][0]), "loglikelihoods": lls,
                             "scores": scores(lls, item["choices"], item["gold"])}])
            bar.update(1)
    summary = {"benchmark": f"mc-{task}", "model": model, **summarize(results.of([i["id"] for i in items]))}
    results.write_summary(summary)
    summary["cache"] = dict(scorer.stats)  # this run's prefix reuse (not written: it varies on resume)
    return summary
