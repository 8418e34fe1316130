"""MT-Bench (Zheng et al. 2023): 80 two-turn questions in 8 categories, answered by the model through
its chat template and graded 1-10 by a judge with FastChat's single-answer grading prompts.

Answering: turn 1 is the first question alone; turn 2 is the conversation so far (question 1, the
model's stripped answer 1, question 2), as FastChat's `gen_model_answer` builds it. Greedy (FastChat
samples writing and roleplay at temperature 0.7; greedy keeps a run reproducible).

Judging, per question and turn, as FastChat's `gen_judgment --mode single` does: the system prompt
and the filled `prompt_template` of `single-v1` (turn 1) or `single-v1-multi-turn` (turn 2); the math,
reasoning and coding questions use the `single-math-v1*` prompts, which also show GPT-4's reference
answer. The rating is the first "[[n]]" of the judgement, else the first "[n]" (FastChat's two
patterns; like FastChat, no range check); a judgement with neither is recorded as -1 and counted as
unparseable. The summary, as FastChat's show_result computes it: the mean rating of turn 1, turn 2
and both, overall and per category, unparseable (and failed) judgements left out and counted.

The judge is anything with `name` and `judge(conversations, max_new_tokens)`: a model loaded here
(`ModelJudge`, greedy through the batching engine) or an OpenAI-compatible endpoint (`EndpointJudge`).

Two resumable results files: the answers (`NAME.answers.jsonl`, made with the answering settings only,
so another judge can grade the same answers without generating them again) and the judgements
(`NAME.jsonl`). Answers are all made before any judging, so a judge that is down loses nothing; a
judgement that failed (an HTTP error, a prompt too long for the judge) is recorded, counted, and
asked again on the next run.
"""
from __future__ import annotations

import os
import queue
import re
import threading
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

from ..errors import Qwen2Error
from ..progress import progress_bar
from .datasets import first, read_pack, read_rows
from .results import ResultsFile, mean_interval
from .runner import Replier

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# FastChat's NEED_REF_CATS (fastchat/llm_judge/common.py), less its "arena-hard-200" which is no
# MT-Bench category: the questions whose judge sees a reference answer.
NEED_REFERENCE = ("math", "reasoning", "coding")

# FastChat's `one_score_pattern` and `one_score_pattern_backup` (fastchat/llm_judge/common.py), so a
# judgement is read exactly as FastChat reads it.
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
UNPARSEABLE = -1

QUESTION_COLUMNS = ("question_id", "category", "turns")
QUESTION_LAYOUT = "FastChat's mt_bench/question.jsonl"


def parse_rating(judgment: str) -> float:
    """The judge's rating: the first "[[n]]", else the first "[n]"; -1 when there is neither.
    FastChat reads the number with `ast.literal_eval`; float() gives the same value (and does not
    raise on "[[07]]")."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return float(match.group(1)) if match else UNPARSEABLE


# ---- questions ----------------------------------------------------------------------------------

def load_questions(data: str | None = None, references: str | None = None) -> list[dict]:
    """The questions as items {id, category, turns, reference_answer}: the offline pack, or `data` in
    FastChat's question.jsonl layout with the reference answers from its `reference_answer` column or
    from `references` (FastChat's reference_answer/MODEL.jsonl layout)."""
    rows = read_pack("mt_bench") if data is None else read_rows(data, QUESTION_COLUMNS, QUESTION_LAYOUT)
    source = data or "the mt_bench pack"
    given = {}
    if references:
        for row in read_rows(references, ("question_id", "choices"), "FastChat's reference_answer/MODEL.jsonl"):
            try:
                given[row["question_id"]] = row["choices"][0]["turns"]
            except (IndexError, KeyError, TypeError):
                raise Qwen2Error(f"{references}: question {row['question_id']} has no choices[0].turns; give "
                                 "FastChat's reference_answer/MODEL.jsonl layout") from None
    items, seen = [], set()
    for row in rows:
        qid, category, turns = row["question_id"], row["category"], row["turns"]
        if qid in seen:
            raise Qwen2Error(f"{source}: question_id {qid} appears twice; give each question once")
        seen.add(qid)
        if not (isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) and t.strip() for t in turns)):
            raise Qwen2Error(f"{source}: question {qid} needs 'turns' as a list of two non-empty questions")
        reference = given.get(qid, row.get("reference_answer"))
        if category in NEED_REFERENCE:
            if not (isinstance(reference, list) and len(reference) == 2 and all(isinstance(t, str) for t in reference)):
                raise Qwen2Error(f"{source}: question {qid} ({category}) needs a reference answer of two turns, "
                                 "which its judge compares with: give FastChat's reference_answer/gpt-4.jsonl with "
                                 "--references, or a 'reference_answer' column")
        items.append({"id": qid, "category": category, "turns": list(turns),
                      "reference_answer": reference if category in NEED_REFERENCE else None})
    return items


def answer_messages(item: dict, first_answer: str | None = None) -> list[dict]:
    """The conversation the model answers: turn 1 alone, or (with its first answer) turn 2 after it."""
    messages = [{"role": "user", "content": item["turns"][0]}]
    if first_answer is not None:
        messages += [{"role": "assistant", "content": first_answer}, {"role": "user", "content": item["turns"][1]}]
    return messages


# ---- judge prompts ------------------------------------------------------------------------------

def judge_prompts() -> dict[str, dict]:
    """FastChat's single-answer grading prompts by name (system_prompt, prompt_template, ...)."""
    return {p["name"]: p for p in read_pack("mt_bench_judge_prompts")}


def judge_conversation(item: dict, answers: Sequence[str], turn: int,
                       prompts: dict[str, dict]) -> tuple[str, list[dict]]:
    """(prompt name, [system, user] messages) with which the judge grades the answer to `turn` (1 or 2)."""
    with_reference = item["category"] in NEED_REFERENCE
    name = ("single-math-v1" if with_reference else "single-v1") + ("-multi-turn" if turn == 2 else "")
    prompt = prompts[name]
    fields = {}
    if with_reference:
        fields["ref_answer_1"] = item["reference_answer"][0]
        if turn == 2:
            fields["ref_answer_2"] = item["reference_answer"][1]
    if turn == 2:
        user = prompt["prompt_template"].format(question_1=item["turns"][0], question_2=item["turns"][1],
                                                answer_1=answers[0], answer_2=answers[1], **fields)
    else:
        user = prompt["prompt_template"].format(question=item["turns"][0], answer=answers[0], **fields)
    return name, [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


# ---- judges -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failed:
    """A judgement that could not be had (recorded with its reason and asked again on the next run)."""
    reason: str


class JudgeUnreachable(Qwen2Error):
    """The judge endpoint does not answer at all: judging stops, what is finished is kept."""


class Judge(Protocol):
    name: str  # recorded in the results' settings: a resumed run must use the same judge

    def judge(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> Iterator[tuple[int, str | Failed]]:
        """(conversation index, the judgement text or Failed) for each conversation, in any order."""


class ModelJudge:
    """A model loaded here judges, greedy, `batch` judgements decoding together."""

    def __init__(self, m, name: str | None = None, batch: int = 8):
        self.m, self.name, self.batch = m, name or m.source, batch

    def judge(self, conversations, max_new_tokens):
        from .replies import generate_replies

        tokenizer, context = self.m.tokenizer, self.m.config.max_position_embeddings
        prompts, fitting = [], []
        for i, messages in enumerate(conversations):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # A byte-level BPE token is at least one byte: only a prompt with more bytes than room is tokenized
            length = len(text.encode("utf-8"))
            if length + max_new_tokens > context:
                length = len(tokenizer.encode(text))
            if length + max_new_tokens > context:
                yield i, Failed(f"the judge prompt ({length} tokens) and {max_new_tokens} new tokens exceed the "
                                f"judge's context of {context} tokens")
            else:
                prompts.append(text)
                fitting.append(i)
        for j, texts in generate_replies(self.m, prompts, max_new_tokens=max_new_tokens, batch=self.batch):
            yield fitting[j], texts[0]


class EndpointJudge:
    """An OpenAI-compatible chat endpoint judges (`qwen2 serve`, vLLM, llama.cpp's server, OpenAI),
    `concurrency` requests at a time, temperature 0. The API key is $OPENAI_API_KEY (none needed by
    default). Without `model`, the endpoint's first listed model judges."""

    def __init__(self, url: str, model: str | None = None, *, timeout: float = 600.0, retries: int = 2,
                 concurrency: int = 8, api_key: str | None = None):
        try:
            import openai
        except ImportError:
            raise Qwen2Error("judging through --judge-url needs the openai client: pip install openai") from None
        self._openai, self.url, self.timeout, self.concurrency = openai, url, timeout, concurrency
        self.client = openai.OpenAI(base_url=url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "unused",
                                    timeout=timeout, max_retries=retries)
        self.model = model or self._first_model()
        self.name = f"{self.model} at {url}"

    def _first_model(self) -> str:
        try:
            models = [m.id for m in self.client.models.list().data]
        except self._openai.APIConnectionError as e:
            raise JudgeUnreachable(self._unreachable(e)) from None
        except self._openai.APIError as e:
            raise Qwen2Error(f"{self.url} did not list its models ({_one_line(e)}); "
                             "name the judge with --judge-model") from None
        if not models:
            raise Qwen2Error(f"{self.url} serves no models; name the judge with --judge-model")
        return models[0]

    def _unreachable(self, e: Exception) -> str:
        cause = f": {_one_line(e.__cause__)}" if e.__cause__ else ""
        return f"the judge endpoint {self.url} is not answering ({_one_line(e)}{cause})"

    def _ask(self, messages: list[dict], max_new_tokens: int) -> str:
        r = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                max_tokens=max_new_tokens)
        return r.choices[0].message.content or ""

    def _failure(self, e: Exception) -> Failed:
        """What a failed request means: this judgement failed, or (no connection) the endpoint is down."""
        openai = self._openai
        if isinstance(e, openai.APITimeoutError):  # before APIConnectionError, its base class
            return Failed(f"no reply from {self.url} within {self.timeout:g} s")
        if isinstance(e, openai.APIConnectionError):
            raise JudgeUnreachable(self._unreachable(e))
        if isinstance(e, openai.APIStatusError):
            return Failed(f"{self.url} answered HTTP {e.status_code}: {_one_line(e)}")
        if isinstance(e, (openai.APIError, IndexError)):  # IndexError: a reply with no choices
            return Failed(f"{self.url} sent an unusable reply: {_one_line(e)}")
        raise e

    def judge(self, conversations, max_new_tokens):
        # Daemon threads, not a ThreadPoolExecutor: an interrupted run must not wait for the requests in
        # flight (up to `timeout` each) before it can exit.
        work, results, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
        for i, messages in enumerate(conversations):
            work.put((i, messages))

        def worker():
            while not stop.is_set():
                try:
                    i, messages = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.put((i, self._ask(messages, max_new_tokens)))
                except Exception as e:  # judged in the caller's thread, by _failure
                    results.put((i, e))

        for _ in range(min(self.concurrency, len(conversations))):
            threading.Thread(target=worker, name="mt-bench-judge", daemon=True).start()
        try:
            for _ in conversations:
                i, reply = results.get()
                yield i, self._failure(reply) if isinstance(reply, Exception) else reply
        finally:
            stop.set()


def _one_line(e) -> str:
    return " ".join(str(e).split())[:300]


# ---- the run ------------------------------------------------------------------------------------

def answers_path_for(out: str | os.PathLike) -> str:
    root, _ = os.path.splitext(os.fspath(out))
    return root + ".answers.jsonl"


def answer_all(items: Sequence[dict], replier: Replier, tokenizer, answers: ResultsFile, max_new_tokens: int,
               progress: bool = True) -> None:
    """Both turns of every item not answered yet into `answers` (turn 1 of all, then turn 2 of all, so
    each batch holds many questions); a record is written after each turn, so a killed run keeps them."""
    def answered(item) -> list[str]:
        record = answers.records.get(str(item["id"]))
        return record["answers"] if record else []

    def prompt(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    done = sum(len(answered(item)) for item in items)
    with progress_bar(total=2 * len(items), initial=done, desc="mt-bench answers", unit="turn",
                      disable=not progress) as bar:
        for turn in (1, 2):
            todo = [item for item in items if len(answered(item)) == turn - 1]
            prompts = [prompt(answer_messages(item, *answered(item))) for item in todo]
            for i, reply in replier(prompts, max_new_tokens, ()):
                item = todo[i]
                answers.append([{"id": item["id"], "category": item["category"],
                                 "answers": answered(item) + [reply.strip()]}])  # FastChat strips its answers
                bar.update(1)


def judgement_record(item: dict, judgements: dict[int, dict]) -> dict:
    return {"id": item["id"], "category": item["category"], "judgements": [judgements[1], judgements[2]],
            "scores": {"turn1": judgements[1]["rating"], "turn2": judgements[2]["rating"]}}


def needs_judging(record: dict | None) -> bool:
    return record is None or any("error" in j for j in record["judgements"])


def judge_all(items: Sequence[dict], answers: ResultsFile, judge: Judge, judged: ResultsFile, max_new_tokens: int,
              progress: bool = True) -> None:
    """Judge both turns of every item without a complete judgement in `judged`; a question's record is
    written once both its turns are judged. An endpoint that stops answering is a one-line error."""
    prompts = judge_prompts()
    todo = [item for item in items if needs_judging(judged.records.get(str(item["id"])))]
    conversations, asked = [], []
    for item in todo:
        for turn in (1, 2):
            name, messages = judge_conversation(item, answers.records[str(item["id"])]["answers"], turn, prompts)
            conversations.append(messages)
            asked.append((item, turn, name))
    finished: dict = {}
    with progress_bar(total=2 * len(items), initial=2 * (len(items) - len(todo)), desc="mt-bench judgements",
                      unit="turn", disable=not progress) as bar:
        try:
            for k, reply in judge.judge(conversations, max_new_tokens):
                item, turn, name = asked[k]
                judgement = {"turn": turn, "prompt": name, "user_prompt": conversations[k][1]["content"]}
                if isinstance(reply, Failed):
                    judgement.update(error=reply.reason, rating=None)
                else:
                    judgement.update(judgment=reply, rating=parse_rating(reply))
                both = finished.setdefault(item["id"], {})
                both[turn] = judgement
                if len(both) == 2:
                    judged.append([judgement_record(item, both)])
                bar.update(1)
        except JudgeUnreachable as e:
            complete = sum(not needs_judging(judged.records.get(str(item["id"]))) for item in items)
            raise Qwen2Error(f"{e}; {complete} of {len(items)} questions are judged in {judged.path} and the answers "
                             f"are kept in {answers.path}: rerun when the judge is up to judge the rest") from None


def summarize(records: Sequence[dict]) -> dict:
    """The mean rating (with its 95 % interval) of turn 1, turn 2 and both, over all questions and per
    category, leaving out unparseable and failed judgements (as FastChat's show_result drops -1), and
    how many there were."""
    judgements = [(r["category"], j) for r in records for j in r["judgements"]]
    rated = [(category, j) for category, j in judgements if j["rating"] is not None and j["rating"] != UNPARSEABLE]

    def ratings(turns, category=None):
        return [j["rating"] for c, j in rated if j["turn"] in turns and category in (None, c)]

    summary: dict = {"questions": len(records), "judgements": len(judgements),
                     "unparseable": sum(j["rating"] == UNPARSEABLE for _, j in judgements),
                     "failed": sum("error" in j for _, j in judgements)}
    turns = {"turn1": (1,), "turn2": (2,), "overall": (1, 2)}
    for key, which in turns.items():
        values = ratings(which)
        summary[key] = mean_interval(values) if values else None
    present = {r["category"] for r in records}
    order = [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))
    summary["by_category"] = {c: {key: (sum(v) / len(v) if (v := ratings(which, c)) else None)
                                  for key, which in turns.items()} for c in order}
    return summary


def run(questions: Sequence[dict], replier: Replier, tokenizer, judge: Judge, out: str | os.PathLike, *,
        answers_path: str | os.PathLike | None = None, model: str = "", data: str | None = None,
        references: str | None = None, limit: int | None = None, max_new_tokens: int = 1024,
        judge_max_new_tokens: int = 2048, progress: bool = True) -> dict:
    """Answer (with `replier`, prompts rendered by `tokenizer`'s chat template) and judge the first
    `limit` questions, resuming from both results files; return the summary, also written beside `out`."""
    items = first(questions, limit)
    answer_settings = {"benchmark": "mt-bench", "model": model, "data": os.path.abspath(data) if data else None,
                       "references": os.path.abspath(references) if references else None,
                       "max_new_tokens": max_new_tokens}
    answers = ResultsFile(answers_path or answers_path_for(out), answer_settings, command="qwen2 eval mt-bench")
    answer_all(items, replier, tokenizer, answers, max_new_tokens, progress)
    judged = ResultsFile(out, {**answer_settings, "judge": judge.name, "judge_max_new_tokens": judge_max_new_tokens},
                         command="qwen2 eval mt-bench")
    judge_all(items, answers, judge, judged, judge_max_new_tokens, progress)
    summary = {"benchmark": "mt-bench", "model": model, "judge": judge.name,
               **summarize(judged.of([item["id"] for item in items]))}
    judged.write_summary(summary)
    return summary


def describe(summary: dict) -> str:
    """A few lines: the mean rating per turn and overall, per category, and the judgements not rated."""
    def mean(stats) -> str:
        if stats is None:
            return "no rating"
        return f"{stats['mean']:.2f} (95 % interval {stats['low']:.2f}-{stats['high']:.2f}, n={stats['n']})"

    lines = [f"mt-bench: {summary['questions']} questions, judged by {summary['judge']}",
             f"  turn 1: {mean(summary['turn1'])}", f"  turn 2: {mean(summary['turn2'])}",
             f"  overall: {mean(summary['overall'])}"]
    lines += [f"  {category}: {'-' if s['overall'] is None else format(s['overall'], '.2f')}"
              for category, s in summary["by_category"].items()]
    lines.append(f"  unparseable judgements: {summary['unparseable']}, failed: {summary['failed']} "
                 f"(of {summary['judgements']})")
    return "\n".join(lines)
