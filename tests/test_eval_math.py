"""`qwen2 eval math` (GSM8K, MATH, MGSM) against lm-eval: the same prompts as lm-eval's own tasks build,
and on the same replies (hand-written tricky ones) the same scores as lm-eval's filters and metric
functions give; the packs against what lm-eval ships; the runner end to end on a tiny random model,
offline, resumed after a kill; the CLI; `--data` in the hub layouts."""
import json
import os

import pytest

from lm_eval_reference import antlr_411_accepted, lm_eval_contexts, lm_eval_scores, lm_eval_task, task_yaml
from qwen2.errors import Qwen2Error
from qwen2.eval import math_benchmarks as mb
from qwen2.eval import runner
from qwen2.eval.datasets import PACKS_DIR

GSM8K = mb.BENCHMARKS["gsm8k"]
MATH = mb.BENCHMARKS["math"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _prompts(bench, items, shots, chat=False, tokenizer=None):
    return [bench.prompt(item, shots, chat, tokenizer) for item in items]


# ---- GSM8K: lm-eval's gsm8k_cot ------------------------------------------------------------------

GSM8K_DOCS = [
    {"question": "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest at $2 each. "
                 "How much does she make?", "answer": "16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = <<9*2=18>>18\n#### 18"},
    {"question": "A company pays 40 workers $25 each. How much is that?", "answer": "40 * 25 = 1000\n#### 1000"},
    {"question": "The temperature was 4 and fell by 7. What is it now?", "answer": "4 - 7 = -3\n#### -3"},
    {"question": "What is 2 + 3?", "answer": "#### 5"},
]

# (document index, reply): formats a model really writes, and the traps of each regex
GSM8K_REPLIES = [
    (0, "Janet sells 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18."),
    (0, "She makes 9 * 2 = $18 every day. The answer is $18."),                 # "$" after "is": strict misses
    (0, "The answer is 18"),                                                   # no character after the number
    (0, "The answer is 17. Wait, let me recount. The answer is 18."),          # several: strict takes the first
    (0, "I cannot tell from the question."),                                   # no number at all
    (0, "the answer is 18."),                                                  # lower case: strict is case-sensitive
    (0, "The answer is 18.\n\nQ: What is 1 + 1?\nA: The answer is 2."),        # more text after the answer
    (0, "The answer is 18 eggs."),
    (0, "18"),
    (0, "The answer is: 18."),                                                 # a colon
    (0, "The answer is 18.5."),
    (0, ""),
    (0, "#### 18"),
    (1, "40 * 25 = 1,000. The answer is 1,000."),                              # thousands separator
    (1, "The answer is $1,000.00."),                                           # dollars and cents
    (1, "The answer is 1,000.00 dollars."),
    (1, "The answer is 1 000."),                                               # a space as separator
    (1, "The total is 40 * $25 = $1000. The answer is 1000"),
    (2, "4 - 7 = -3. The answer is -3."),                                      # negative
    (2, "It is 3 degrees below zero. The answer is 3."),
    (2, "The answer is -3.0."),
    (2, "The answer is − 3."),                                                 # a Unicode minus and a space
    (3, "2 + 3 = 5. The answer is 5, since 2 + 3 = 5."),
    (3, "The answer is 5.\n"),
    (3, "The answer is five. 2+3=5"),
]


def test_gsm8k_prompts_are_lm_eval_gsm8k_cot_prompts(tmp_path):
    items = GSM8K.load(_jsonl(tmp_path / "test.jsonl", GSM8K_DOCS))
    task = lm_eval_task(task_yaml("gsm8k", "gsm8k-cot.yaml"), GSM8K_DOCS)
    assert _prompts(GSM8K, items, 8) == lm_eval_contexts(task)
    assert list(GSM8K.stop) == task.config.generation_kwargs["until"] and GSM8K.shots == task.config.num_fewshot


def test_gsm8k_scores_equal_lm_eval_on_tricky_replies(tmp_path):
    items = GSM8K.load(_jsonl(tmp_path / "test.jsonl", GSM8K_DOCS))
    docs = [GSM8K_DOCS[i] for i, _ in GSM8K_REPLIES]
    task = lm_eval_task(task_yaml("gsm8k", "gsm8k-cot.yaml"), docs)
    theirs = lm_eval_scores(task, [reply for _, reply in GSM8K_REPLIES])
    ours = [GSM8K.score(items[i], reply) for i, reply in GSM8K_REPLIES]
    for (i, reply), mine, reference in zip(GSM8K_REPLIES, ours, theirs):
        assert mine == {"strict_match": reference["strict-match"]["exact_match"],
                        "flexible_extract": reference["flexible-extract"]["exact_match"]}, reply
    # the replies do tell the two readings apart (else the comparison above would prove little)
    readings = {(s["strict_match"], s["flexible_extract"]) for s in ours}
    assert readings == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}


def test_gsm8k_pack_items_are_the_exemplars_each_without_itself():
    items = GSM8K.load(None)
    assert [i["id"] for i in items] == [f"gsm8k-{n}" for n in range(8)]
    task = lm_eval_task(task_yaml("gsm8k", "gsm8k-cot.yaml"), [{"question": "x", "answer": "#### 1"}])
    samples = task.fewshot_docs()
    for n, item in enumerate(items):
        prompt = GSM8K.prompt(item, 7, False, None)
        own = f"Q: {samples[n]['question']}\nA:"
        assert prompt.count(own) == 1 and prompt.endswith(own)
        assert samples[n]["target"] not in prompt
        assert all(s["target"] in prompt for j, s in enumerate(samples) if j != n)
        # the target is what the exemplar's own worked answer scores as right under both readings
        assert GSM8K.score(item, samples[n]["target"]) == {"strict_match": 1.0, "flexible_extract": 1.0}
    with pytest.raises(Qwen2Error, match="only 7 GSM8K exemplars besides the item itself"):
        GSM8K.prompt(items[0], 8, False, None)


# ---- MATH: lm-eval's minerva_math ---------------------------------------------------------------

MATH_DOCS = [
    {"problem": "What is $1/2$ as a fraction?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1",
     "type": "Algebra"},
    {"problem": "Count to a thousand.", "solution": "There are $\\boxed{1,000}$ numbers.", "level": "Level 2",
     "type": "Counting & Probability"},
    {"problem": "Convert to polar.", "solution": "So it is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
     "level": "Level 3", "type": "Precalculus"},
    {"problem": "How long is it?", "solution": "The side is $\\boxed{10\\text{ cm}}$.", "level": "Level 1",
     "type": "Geometry"},
    {"problem": "Find $\\sin 60^\\circ$.", "solution": "It is $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "level": "Level 2",
     "type": "Precalculus"},
    {"problem": "Solve $x - 5 = 0$.", "solution": "$x = \\boxed{5}$", "level": "Level 1", "type": "Algebra"},
]

FINAL = "Final Answer: The final answer is {}. I hope it is correct."
MATH_REPLIES = [
    (0, "Halving one gives $\\frac{1}{2}$.\n" + FINAL.format("$\\frac{1}{2}$")),
    (0, FINAL.format("$0.5$")),                                          # equal as numbers: sympy decides
    (0, FINAL.format("$\\frac12$")),                                     # shorthand TeX
    (0, "So the answer is $\\boxed{\\frac{1}{2}}$."),                     # boxed but no "Final Answer" line
    (0, FINAL.format("$\\frac{2}{4}$")),
    (0, FINAL.format("$\\dfrac{1}{2}$")),
    (1, FINAL.format("$1000$")),                                         # the reference writes 1,000
    (1, FINAL.format("$\\$1,000.00$")),
    (1, FINAL.format("1,000 integers")),
    (2, FINAL.format("$\\left( 3, \\frac{\\pi}{2} \\right)$")),          # a tuple: equal only as strings
    (2, FINAL.format("$(3,\\frac{\\pi}{2})$")),
    (3, FINAL.format("$10$ cm")),                                        # units
    (3, FINAL.format("$10\\text{ cm}$")),
    (4, FINAL.format("$\\frac{\\sqrt{3}}{2}$")),                         # nested braces
    (4, "Final Answer: The final answer is $\\frac{\\sqrt3}{2}$"),       # cut before "I hope it is correct."
    (4, FINAL.format("$\\sqrt{3}/2$")),
    (5, FINAL.format("$x = 5$")),                                        # an equation: its right side
    (5, FINAL.format("5") + "\n\nProblem: Next one."),
    (5, "The final answer is 5."),
    (5, FINAL.format("$6$")),
]


def minerva_task(docs, **kw):
    with antlr_411_accepted():
        return lm_eval_task(task_yaml("minerva_math", "minerva_math_algebra.yaml"), docs, **kw)


def test_math_prompts_are_lm_eval_minerva_prompts(tmp_path):
    items = MATH.load(_jsonl(tmp_path / "math.jsonl", MATH_DOCS))
    task = minerva_task(MATH_DOCS)
    assert _prompts(MATH, items, 4) == lm_eval_contexts(task)
    assert list(MATH.stop) == task.config.generation_kwargs["until"] and MATH.shots == task.config.num_fewshot
    # the targets are lm-eval's normalised answers of the solutions' last \boxed{}
    assert [i["target"] for i in items] == [d["answer"] for d in task.test_docs()]
    assert [i["type"] for i in items] == [d["type"] for d in MATH_DOCS]


def test_math_scores_equal_lm_eval_on_tricky_replies(tmp_path):
    items = MATH.load(_jsonl(tmp_path / "math.jsonl", MATH_DOCS))
    task = minerva_task([MATH_DOCS[i] for i, _ in MATH_REPLIES])
    with antlr_411_accepted():
        theirs = lm_eval_scores(task, [reply for _, reply in MATH_REPLIES])
    ours = [MATH.score(items[i], reply) for i, reply in MATH_REPLIES]
    for (i, reply), mine, reference in zip(MATH_REPLIES, ours, theirs):
        assert mine == reference["none"], reply
    assert {(s["exact_match"], s["math_verify"]) for s in ours} >= {(1.0, 1.0), (0.0, 1.0), (0.0, 0.0)}


def test_minerva_normalisation_equals_lm_eval_on_tricky_answers():
    from qwen2.eval.answer_filters import last_boxed, normalize_answer, stated_answer

    with antlr_411_accepted():
        from lm_eval.tasks.minerva_math import utils
    answers = ["\\frac12", "\\sqrt2", "\\sqrt[3]8", "1,000", "0,1", "-1,234,567", "5 dollars", "10^\\circ",
               "90^{\\circ}",
               "\\text{(A)}", "\\textbf{18}", "$2\\pi$ cm", "x = \\frac{1}{2}", "\\left( 3, \\frac{\\pi}{2} \\right)",
               "\\$1,000.00", "12 students", "\\mbox{5 feet}", "3\\text{ and }4", "\\boxed{7}", "7\\ldots",
               "\\overline{12}", "a 5", "\\fracab", "\\{1,2\\}", ""]
    for answer in answers:
        assert normalize_answer(answer) == utils.normalize_final_answer(answer), answer
    solutions = ["so $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\boxed 5$ done",
                 "$\\boxed{\\{1, \\{2\\}\\}}$ and $\\boxed{9}$",
                 "x = \\boxed{-\\frac{2}{3}}."]
    for solution in solutions:
        assert last_boxed(solution) == utils.remove_boxed(utils.last_boxed_only_string(solution)), solution
    assert last_boxed("no box here") is None and utils.last_boxed_only_string("no box here") is None
    for reply in [FINAL.format("$7$"), "Final Answer: The final answer is 7", "the final answer is 7", "",
                  FINAL.format("$1$") + " " + FINAL.format("$2$")]:
        assert stated_answer(reply) == utils.get_unnormalized_answer(reply), reply


def test_math_pack_items_are_the_minerva_exemplars_each_without_itself():
    items = MATH.load(None)
    samples = minerva_task(MATH_DOCS[:1]).fewshot_docs()
    assert [(i["question"], i["solution"]) for i in items] == \
        [(mb.MATH_QUESTION.format(problem=s["problem"]), s["solution"]) for s in samples]
    for n, item in enumerate(items):
        prompt = MATH.prompt(item, 3, False, None)
        assert item["solution"] not in prompt and prompt.endswith(item["question"])
        assert MATH.score(item, item["solution"]) == {"exact_match": 1.0, "math_verify": 1.0}
    with pytest.raises(Qwen2Error, match="only 3 Minerva MATH exemplars"):
        MATH.prompt(items[0], 4, False, None)


# ---- MGSM: lm-eval's mgsm_native_cot_XX ---------------------------------------------------------

# (language, the exemplar's question header, its answer header): lm-eval's templates in each language
MGSM_CASES = {
    "de": ("Frage:", "Schritt-für-Schritt-Antwort:", ["Die Antwort lautet 18.", "Die Antwort lautet 1.000.",
           "die Antwort lautet 18", "Die Antwort lautet: 18.", "Also 18 Euro. Die Antwort lautet 18,00."]),
    "zh": ("问题：", "逐步解答:", ["答案是 18。", "答案是18。", "答案是 18", "所以她每天赚 18 美元。答案是 18。"]),
    "ja": ("問題：", "ステップごとの答え:", ["答えは18です。", "答えは 18 です。", "答えは18"]),
    "fr": ("Question :", "Réponse étape par étape :",
           ["La réponse est 18.", "La reponse est 18.", "La réponse est 18,5."]),
    "ru": ("Задача:", "Пошаговоерешение:", ["Ответ — 18.", "Ответ - 18", "Ответ — -18."]),
    "sw": ("Swali:", "Jibu la Hatua kwa Hatua:", ["Jibu ni 18.", "Jibu ni kumi na nane."]),
    "en": ("Question:", "Step-by-Step Answer:", ["The answer is 18", "The answer is 18.", "So she makes $18."]),
}


def _mgsm_rows(language):
    question_header, answer_header, _ = MGSM_CASES[language]
    train = [{"question": f"{question_header} Roger hat {n} Bälle.", "answer": f"{answer_header} Er hat {n}. {n}",
              "answer_number": n, "equation_solution": f"{n}"} for n in (5, 7, 9)]
    test = [{"question": "Janet verkauft Eier für 18.", "answer": None, "answer_number": 18,
             "equation_solution": None},
            {"question": "Wie viel ist 1000?", "answer": None, "answer_number": 1000, "equation_solution": None},
            {"question": "Was ist 2 + 3?", "answer": None, "answer_number": 5, "equation_solution": None}]
    return train, test


@pytest.mark.parametrize("language", sorted(MGSM_CASES))
def test_mgsm_prompts_and_scores_equal_lm_eval(tmp_path, language):
    bench = mb.BENCHMARKS[f"mgsm-{language}"]
    train, test = _mgsm_rows(language)
    path = _jsonl(tmp_path / "mgsm.jsonl", train + test)
    items = bench.load(path)
    assert [i["id"] for i in items] == ["0", "1", "2"]  # the train rows are exemplars, not items
    for shots in (0, 2):  # 2 of 3: lm-eval draws them with its seeded sampler, a different pick per item
        task = lm_eval_task(task_yaml("mgsm", "native_cot", f"mgsm_native_cot_{language}.yaml"), test, train,
                            num_fewshot=shots)
        assert _prompts(bench, items, shots) == lm_eval_contexts(task)
    assert list(bench.stop) == task.config.generation_kwargs["until"]
    default = lm_eval_task(task_yaml("mgsm", "native_cot", f"mgsm_native_cot_{language}.yaml"), test, train)
    assert bench.shots == (default.config.num_fewshot or 0)
    replies = MGSM_CASES[language][2] + ["18", "Nichts.", ""]
    task = lm_eval_task(task_yaml("mgsm", "native_cot", f"mgsm_native_cot_{language}.yaml"),
                        [test[0]] * len(replies), train)
    theirs = lm_eval_scores(task, replies)
    for reply, reference in zip(replies, theirs):
        assert bench.score(items[0], reply) == {"strict_match": reference["strict-match"]["exact_match"],
                                                "flexible_extract": reference["flexible-extract"]["exact_match"]}, reply


def test_mgsm_needs_data_and_reads_the_train_split_alone_as_items(tmp_path):
    bench = mb.BENCHMARKS["mgsm-de"]
    with pytest.raises(Qwen2Error, match="mgsm-de has no offline items.*--data"):
        bench.load(None)
    train, _ = _mgsm_rows("de")
    items = bench.load(_jsonl(tmp_path / "train.jsonl", train))
    assert [i["target"] for i in items] == ["5", "7", "9"]
    prompt = bench.prompt(items[1], 2, False, None)
    assert "Er hat 7." not in prompt and "Er hat 5." in prompt and "Er hat 9." in prompt
    assert prompt.endswith("Frage: Roger hat 7 Bälle.\nSchritt-für-Schritt-Antwort:")
    with pytest.raises(Qwen2Error, match="only 2 MGSM de exemplars"):
        bench.prompt(items[0], 3, False, None)


# ---- --data layouts and bad input --------------------------------------------------------------

def test_data_layouts_jsonl_and_parquet_and_missing_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_DOCS), parquet)
    assert [i["target"] for i in GSM8K.load(str(parquet))] == ["18", "1000", "-3", "5"]
    train, test = _mgsm_rows("zh")
    pq.write_table(pa.Table.from_pylist(train + test), tmp_path / "mgsm.parquet")
    assert len(mb.BENCHMARKS["mgsm-zh"].load(str(tmp_path / "mgsm.parquet"))) == 3
    cases = [(GSM8K, [{"question": "q"}], "row 1 has no column 'answer' \\(the columns of openai/gsm8k"),
             (MATH, [{"problem": "p"}], "row 1 has no column 'solution' \\(the columns of EleutherAI/hendrycks_math"),
             (MATH, [{"problem": "p", "solution": "no box"}], "row 1: its solution has no \\\\boxed\\{\\} answer"),
             (mb.BENCHMARKS["mgsm-en"], [{"question": "q", "answer": None}], "no column 'answer_number'")]
    for n, (bench, rows, message) in enumerate(cases):
        with pytest.raises(Qwen2Error, match=message) as e:
            bench.load(_jsonl(tmp_path / f"bad{n}.jsonl", rows))
        assert "\n" not in str(e.value)


def test_packs_are_what_the_builder_makes_from_lm_eval(tmp_path):
    from benchmarks.eval_packs import math as builder

    written = builder.build(str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == ["gsm8k.jsonl", "math.jsonl", "mgsm_tasks.jsonl"]
    for path in written:
        with open(path, encoding="utf-8") as fresh, open(os.path.join(PACKS_DIR, os.path.basename(path)),
                                                         encoding="utf-8") as committed:
            assert fresh.read() == committed.read(), f"{path}: rebuild with `python -m benchmarks.eval_packs math`"
    counts = {os.path.basename(p): sum(1 for _ in open(p, encoding="utf-8")) for p in written}
    assert counts == {"gsm8k.jsonl": 8, "math.jsonl": 4, "mgsm_tasks.jsonl": 11}


# ---- the runner, offline, with a tiny random model ----------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return tiny_chat_model


def test_runner_end_to_end_offline_and_resumed_after_a_kill(tmp_path, tiny, offline):
    replier = runner.model_replier(tiny, batch=2)
    asked = []

    def counting(prompts, max_new_tokens, stop):
        asked.extend(prompts)
        yield from replier(prompts, max_new_tokens, stop)

    options = dict(tokenizer=tiny.tokenizer, model="tiny", limit=3, shots=1, chat=False, max_new_tokens=6,
                   progress=False)
    whole = runner.run(GSM8K, counting, tmp_path / "whole.jsonl", **options)
    assert whole["items"] == 3 and whole["strict_match"]["n"] == 3 and len(asked) == 3

    def killed_after_one(prompts, max_new_tokens, stop):
        for n, result in enumerate(replier(prompts, max_new_tokens, stop)):
            yield result
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(GSM8K, killed_after_one, tmp_path / "resumed.jsonl", **options)
    assert sum(1 for _ in open(tmp_path / "resumed.jsonl")) == 1
    asked.clear()
    resumed = runner.run(GSM8K, counting, tmp_path / "resumed.jsonl", **options)
    assert len(asked) == 2  # only the two items the killed run had not finished
    records = {p: sorted((json.loads(line) for line in open(tmp_path / p)), key=lambda r: r["id"])
               for p in ("whole.jsonl", "resumed.jsonl")}
    assert [(r["id"], r["reply"], r["scores"]) for r in records["whole.jsonl"]] == \
        [(r["id"], r["reply"], r["scores"]) for r in records["resumed.jsonl"]]
    assert {k: v for k, v in resumed.items() if k != "settings"} == {k: v for k, v in whole.items() if k != "settings"}
    for record in records["whole.jsonl"]:  # each record's scores are its reply's
        item = next(i for i in GSM8K.load(None) if i["id"] == record["id"])
        assert record["scores"] == GSM8K.score(item, record["reply"])
        assert record["prompt"] == GSM8K.prompt(item, 1, False, None)


def test_cli_math_gsm8k_on_a_tiny_model_directory(tmp_path, tiny, offline, capsys):
    from qwen2 import cli

    tiny.save(tmp_path / "model")
    out = tmp_path / "gsm8k.jsonl"
    code = cli.main(["eval", "math", "--task", "gsm8k", "--model", str(tmp_path / "model"), "--limit", "2",
                     "--shots", "1", "--max-new-tokens", "4", "--chat", "off", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "gsm8k: 2 items" in printed and "strict_match" in printed and "flexible_extract" in printed
    summary = json.load(open(tmp_path / "gsm8k.summary.json"))
    assert summary["items"] == 2 and summary["settings"]["shots"] == 1
    assert [json.loads(line)["id"] for line in open(out)] == ["gsm8k-0", "gsm8k-1"]
    code = cli.main(["eval", "math", "--task", "mgsm-xx", "--model", str(tmp_path / "model")])
    assert code == 1 and "unknown math task 'mgsm-xx'" in capsys.readouterr().err


@pytest.mark.parametrize("verb, task", [("math", "gsm8k"), ("math", "math"), ("bbh", "all"), ("ifeval", "ifeval")])
def test_the_default_shots_fit_the_offline_pack(verb, task, tmp_path):
    """`qwen2 eval VERB --task TASK` without --shots runs the whole offline pack: where the pack's items
    are its exemplars (each prompted with the others), the default is one fewer than the task's count,
    which a --data test set keeps."""
    from qwen2.cli.eval import benchmark_of
    from qwen2.eval.results import summary_path

    bench = benchmark_of(verb, task)
    asked = []

    def replier(prompts, max_new_tokens, stop):
        asked.extend(prompts)
        yield from ((i, "") for i in range(len(prompts)))

    summary = runner.run(bench, replier, tmp_path / "r.jsonl", chat=False, progress=False)
    assert len(asked) == summary["items"] == len(bench.load(None))
    shots = json.load(open(summary_path(tmp_path / "r.jsonl")))["settings"]["shots"]
    assert shots == (bench.shots if bench.pack_shots is None else bench.pack_shots)
    assert bench.pack_shots is None or bench.pack_shots == bench.shots - 1
