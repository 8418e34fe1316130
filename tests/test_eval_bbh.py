"""`qwen2 eval bbh` against lm-eval: every task's prompt equals what lm-eval's bbh_cot_fewshot task
builds; on the same tricky replies, `exact_match` equals bbh_cot_fewshot's get-answer score and
`flexible_extract` bbh_cot_zeroshot's flexible-extract score; the packs against lm-eval's YAMLs; the
runner and the CLI on a tiny random model, offline; `--data` in lukaemon/bbh's layout."""
import json
import os

import pytest

from lm_eval_reference import lm_eval_contexts, lm_eval_scores, lm_eval_task, task_yaml
from qwen2.errors import Qwen2Error
from qwen2.eval import bbh, runner
from qwen2.eval.datasets import PACKS_DIR

ALL = bbh.BENCHMARKS["all"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


OPTIONS = "\nOptions:\n(A) 12/03/2002\n(B) 12/01/2002\n(C) 11/30/2002"
DOCS = {
    "boolean_expressions": {"input": "not ( True ) and ( True ) is", "target": "False"},
    "date_understanding": {"input": "Today is 12/02/2002. What is the date yesterday?" + OPTIONS, "target": "(B)"},
    "object_counting": {"input": "I have a chair, two beds and three lamps. How many objects do I have?",
                        "target": "6"},
    "word_sorting": {"input": "Sort the following words alphabetically: List: cherry apple banana",
                     "target": "apple banana cherry"},
    "sports_understanding": {"input": "Is the following sentence plausible? \"Messi scored a goal.\"", "target": "yes"},
    "dyck_languages": {"input": "Complete the rest of the sequence: ( [", "target": "] )"},
    "multistep_arithmetic_two": {"input": "((-1 + 2) * 3 - 45) =", "target": "-42"},
    "web_of_lies": {"input": "Question: Fidel lies. Does Fidel tell the truth?", "target": "No"},
    "formal_fallacies": {"input": "Is the argument deductively valid or invalid?", "target": "invalid"},
    "causal_judgement": {"input": "How would a typical person answer? Did he cause it?", "target": "Yes"},
}

# (task, reply): the answer sentence the exemplars teach, and the ways a model strays from it
REPLIES = [
    ("boolean_expressions", "not ( True ) = False. False and True = False. So the answer is False."),
    ("boolean_expressions", "So the answer is False"),                          # no final character: "Fals"
    ("boolean_expressions", "The answer is False."),                            # capital T: get-answer misses
    ("boolean_expressions", "So the answer is True. Hmm, no: it is False."),
    ("boolean_expressions", "So the answer is False.\nQ: next"),
    ("boolean_expressions", "So the answer is False.\nA careless reader would say True."),  # flexible: the last
    ("date_understanding", "Yesterday was 12/01/2002. So the answer is (B)."),
    ("date_understanding", "So the answer is B."),                              # "(B)" vs "B"
    ("date_understanding", "So the answer is (B) 12/01/2002."),
    ("date_understanding", "So the answer is 12/01/2002."),                     # an option's text
    ("date_understanding", "Answer: B"),
    ("date_understanding", "So the answer is (A). No wait, the answer is (B)."),  # several answer sentences
    ("date_understanding", "So the answer is (b)."),
    ("object_counting", "1 + 2 + 3 = 6. So the answer is 6."),
    ("object_counting", "So the answer is six."),                               # a number in words
    ("object_counting", "I count 5, then 6 objects in all"),
    ("word_sorting", "So the answer is apple banana cherry."),
    ("word_sorting", "The sorted list: apple, banana, cherry"),
    ("sports_understanding", "Messi is a soccer player. So the answer is yes."),
    ("sports_understanding", "So the answer is plausible."),
    ("sports_understanding", "So the answer is no."),
    ("dyck_languages", "We close [ then (. So the answer is ] )."),
    ("multistep_arithmetic_two", "(1 * 3) - 45 = -42. So the answer is -42."),
    ("multistep_arithmetic_two", "So the answer is −42."),                      # a Unicode minus
    ("web_of_lies", "Fidel lies. So the answer is No."),
    ("web_of_lies", "So the answer is no."),
    ("formal_fallacies", "So the answer is invalid."),
    ("formal_fallacies", "So the answer is valid."),
    ("causal_judgement", "So the answer is Yes."),
    ("causal_judgement", ""),
]


def test_every_task_prompt_is_lm_eval_bbh_cot_fewshot_prompt(tmp_path):
    for task in bbh.TASKS:
        doc = DOCS.get(task, {"input": f"A question of {task}.\nOptions:\n(A) one\n(B) two", "target": "(A)"})
        [item] = bbh.BENCHMARKS[task].load(_jsonl(tmp_path / f"{task}.jsonl", [doc]))
        reference = lm_eval_task(task_yaml("bbh", "cot_fewshot", f"{task}.yaml"), [doc])
        assert [ALL.prompt(item, 3, False, None)] == lm_eval_contexts(reference), task
        assert list(ALL.stop) == reference.config.generation_kwargs["until"]
        assert ALL.shots == reference.config.num_fewshot
        assert ALL.max_new_tokens == reference.config.generation_kwargs["max_gen_toks"]


def test_scores_equal_lm_eval_get_answer_and_flexible_extract_on_tricky_replies(tmp_path):
    tasks = sorted({task for task, _ in REPLIES})
    ours, theirs = [], []
    for task in tasks:
        replies = [reply for t, reply in REPLIES if t == task]
        [item] = bbh.BENCHMARKS[task].load(_jsonl(tmp_path / f"{task}.jsonl", [DOCS[task]]))
        ours += [bbh.BENCHMARKS[task].score(item, reply) for reply in replies]
        docs = [DOCS[task]] * len(replies)
        fewshot = lm_eval_scores(lm_eval_task(task_yaml("bbh", "cot_fewshot", f"{task}.yaml"), docs), replies)
        zeroshot = lm_eval_scores(lm_eval_task(task_yaml("bbh", "cot_zeroshot", f"{task}.yaml"), docs), replies)
        theirs += [{"exact_match": f["get-answer"]["exact_match"],
                    "flexible_extract": z["flexible-extract"]["exact_match"]} for f, z in zip(fewshot, zeroshot)]
    replies = [reply for task in tasks for t, reply in REPLIES if t == task]
    for reply, mine, reference in zip(replies, ours, theirs):
        assert mine == reference, reply
    assert {(s["exact_match"], s["flexible_extract"]) for s in ours} == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}


def test_a_reply_that_breaks_an_lm_eval_filter_scores_wrong_instead_of_stopping_the_run():
    from lm_eval.tasks.bbh.cot_zeroshot.utils import WordSortFilter

    item = {"id": "0", "task": "word_sorting", "input": "Sort these words: pear fig", "target": "fig pear"}
    with pytest.raises(IndexError):  # lm-eval's word-sorting filter needs "List:" in the input
        list(WordSortFilter().apply([["fig pear"]], [item]))
    assert bbh.BENCHMARKS["word_sorting"].score(item, "So the answer is fig pear.") == \
        {"exact_match": 1.0, "flexible_extract": 0.0}


def test_pack_has_81_exemplars_over_27_tasks_as_lm_eval_ships_them(tmp_path):
    from benchmarks.eval_packs import bbh as builder

    written = builder.build(str(tmp_path))
    for path in written:
        with open(path, encoding="utf-8") as fresh, open(os.path.join(PACKS_DIR, os.path.basename(path)),
                                                         encoding="utf-8") as committed:
            assert fresh.read() == committed.read(), f"{path}: rebuild with `python -m benchmarks.eval_packs bbh`"
    items = ALL.load(None)
    assert len(items) == 81 and {i["task"] for i in items} == set(bbh.TASKS) == set(bbh.task_specs())
    assert all(sum(i["task"] == task for i in items) == 3 for task in bbh.TASKS)
    for item in items[:6] + items[-6:]:  # each asked with the other two of its task, its own answer scores right
        prompt = ALL.prompt(item, 2, False, None)
        own = bbh.exemplars()[item["task"]][item["leave_out"]]
        assert own["target"] not in prompt and prompt.endswith(bbh.QUESTION.format(input=item["input"]))
        assert ALL.score(item, own["target"])["exact_match"] == 1.0
    with pytest.raises(Qwen2Error, match="only 2 boolean_expressions exemplars besides the item itself"):
        ALL.prompt(items[0], 3, False, None)


def test_data_in_lukaemon_layout_and_bad_rows(tmp_path):
    rows = [{"input": "Take 1 step. Take 1 step back. Are you back at the start?", "target": "Yes"}]
    items = bbh.BENCHMARKS["navigate"].load(_jsonl(tmp_path / "navigate.jsonl", rows))
    assert [(i["id"], i["task"], i["target"]) for i in items] == [("0", "navigate", "Yes")]
    mixed = [{**DOCS["date_understanding"], "task": "date_understanding"},
             {**DOCS["web_of_lies"], "task": "web_of_lies"}]
    items = ALL.load(_jsonl(tmp_path / "mixed.jsonl", mixed))
    assert [(i["id"], i["task"]) for i in items] == [("date_understanding-0", "date_understanding"),
                                                     ("web_of_lies-1", "web_of_lies")]
    for rows, message in (([{"input": "q"}], "row 1 has no column 'target' \\(the columns of lukaemon/bbh"),
                          ([DOCS["web_of_lies"]], "row 1: --task all needs a 'task' column")):
        with pytest.raises(Qwen2Error, match=message) as e:
            ALL.load(_jsonl(tmp_path / "bad.jsonl", rows))
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return tiny_chat_model


def test_runner_and_cli_on_a_tiny_model_offline(tmp_path, tiny, offline, capsys):
    summary = runner.run(ALL, runner.model_replier(tiny, batch=2), tmp_path / "bbh.jsonl", tokenizer=tiny.tokenizer,
                         model="tiny", limit=4, shots=1, chat=True, max_new_tokens=5, progress=False)
    records = [json.loads(line) for line in open(tmp_path / "bbh.jsonl")]
    assert summary["items"] == 4 and set(summary["exact_match_by_task"]) == {"boolean_expressions", "causal_judgement"}
    for record in records:
        item = next(i for i in ALL.load(None) if i["id"] == record["id"])
        assert record["task"] == item["task"] and record["scores"] == ALL.score(item, record["reply"])
        assert record["prompt"].endswith("<|im_start|>assistant\n")  # chat: the reply is the assistant's turn

    from qwen2 import cli

    tiny.save(tmp_path / "model")
    code = cli.main(["eval", "bbh", "--task", "navigate", "--model", str(tmp_path / "model"), "--limit", "1",
                     "--shots", "0", "--max-new-tokens", "3", "--out", str(tmp_path / "nav.jsonl")])
    assert code == 0 and "bbh-navigate: 1 items" in capsys.readouterr().out
    assert json.load(open(tmp_path / "nav.summary.json"))["exact_match_by_task"].keys() == {"navigate"}
