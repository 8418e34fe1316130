"""qwen2 eval mc: per-choice log-likelihoods and accuracies equal lm-eval's (its own task files run
through the lm-eval adapter on the same tiny model), the reused context cache equals whole forwards,
every --data layout reads the hub's columns as lm-eval's task files do, bad rows are one-line errors,
runs resume, nothing touches the network, and the offline MMLU pack is lm-eval's 282 exemplars."""
import ast
import importlib.util
import json
import os
import random

import pytest
import torch
import yaml
import torch.nn.functional as F

from ggufs import random_model, save_random_model_dir, small_tokenizer_metadata, tiny_config
from qwen2.api import Qwen2
from qwen2.errors import Qwen2Error
from qwen2.eval import mc_formats, multiple_choice
from qwen2.eval.mc_loglikelihood import ChoiceScorer, encode_pair
from qwen2.tokenizer import Tokenizer

lm_eval = pytest.importorskip("lm_eval")
LM_TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model gains nothing from threads, and on a busy machine waiting OpenMP threads make
    each of its small operations many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def m():
    tok = Tokenizer.from_gguf_metadata({**small_tokenizer_metadata(), "tokenizer.chat_template": CHATML})
    config = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=2048)
    return Qwen2(random_model(config, seed=7), tok, {"eos_token_id": [tok.eos_token_id]}, source="tiny")


# ---- fixtures in the hub datasets' own columns ------------------------------------------------------

MMLU = [{"question": q, "subject": s, "choices": c, "answer": a} for s, q, c, a in [
    ("anatomy", "the cat sat in the", ["hat", "tree", "mat", "a"], 2),
    ("anatomy", " in the theatre there is ", ["a cat", "the end", "nothing", "then"], 0),
    ("anatomy", "a hat in the", ["rain", "sun", "dark", "theme"], 3),
    ("anatomy", "the end of the", ["day", "night", "the", "a"], 1),
    ("virology", "the thin thing in", ["a tin", "the", "thin air", "hat"], 0),
    ("virology", "then the", ["cat", "dog", "the hat", "tin"], 2),
    ("virology", "in a", ["hat", "thin", "theatre", "then"], 1),
    ("virology", "the theme is", ["thin", "the cat", "at", "in"], 3)]]
ARC = [{"id": f"q{i}", "question": q, "choices": {"text": t, "label": l}, "answerKey": k} for i, (q, t, l, k) in enumerate([
    ("What sat in the hat?", ["the cat", "a thin tin", "then"], ["A", "B", "C"], "A"),
    ("Where is the theatre?", ["in the city", "at the end", "in a hat", "the"], ["A", "B", "C", "D"], "D"),
    ("Which is thin?", ["a tin hat", "the"], ["1", "2"], "2"),
    ("What is the theme?", ["hat in the rain", "the cat in the hat", "a tin"], ["A", "B", "C"], "B"),
    ("the end?", ["then", "thin", "than the"], ["A", "B", "C"], "C")])]
HELLASWAG = [{"ind": i, "activity_label": a, "ctx_a": ca, "ctx_b": cb, "ctx": f"{ca} {cb}", "endings": e,
              "source_id": "x", "split": "val", "split_type": "indomain", "label": str(l)}
             for i, (a, ca, cb, e, l) in enumerate([
                 ("Removing ice from car", "Then, the man writes over the snow covering the window.", "then",
                  [", the man adds wax.", ", a person rides a lift  in the [snow] hills.", ", the man puts on a coat.",
                   ", the man continues removing the snow."], 3),
                 ("Home and Garden", "[header] How to paint a hat [title] Get a thin brush.", "THE brush",
                  ["is thin.", "is in the hat.", "[step] paint the hat.", "is a cat."], 0),
                 ("Baking cookies", "A woman enters the kitchen.", "she",
                  ["sings.", "bakes the cookies in the oven.", "leaves the theatre.", "sits."], 1)])]
CEVAL = [{"id": i, "question": q, "A": a, "B": b, "C": c, "D": d, "answer": k, "explanation": ""}
         for i, (q, a, b, c, d, k) in enumerate([
             ("注册会计师的职责是____。", "审计", "唱歌", "跳舞", "画画", "A"),
             (" 下列属于资产的是 ", "现金", "负债", "收入", "费用", "A"),
             ("会计的基本假设不包括____。", "会计主体", "持续经营", "会计分期", "货币贬值", "D"),
             ("the cat in the", "hat", "tin", "then", "theme", "C")])]
CEVAL_DEV = [{"id": i, "question": q, "A": a, "B": b, "C": c, "D": d, "answer": k, "explanation": "因为"}
             for i, (q, a, b, c, d, k) in enumerate([("会计要素包括____。", "资产", "天气", "音乐", "颜色", "A"),
                                                     ("the hat in the", "cat", "tin", "rain", "then", "C"),
                                                     ("审计的对象是____。", "财务报表", "山", "水", "风", "A")])]
CMMLU = [{"Question": "以下哪种作物是粮食作物？", "A": "水稻", "B": "棉花", "C": "烟草", "D": "茶叶", "Answer": "A"},
         {"Question": "the hat", "A": "in", "B": "the", "C": "a", "D": "thin", "Answer": "B"}]
MMLU_PRO = [{"question_id": 1, "question": "What is the theme of the cat in the hat?", "category": "law",
             "options": ["a hat", "the cat", " thin ", "tin", "then", "the end"], "answer": "B", "answer_index": 1,
             "cot_content": "A: Let's think step by step. The answer is (B).", "src": "x"},
            {"question_id": 2, "question": "Which is thin?", "category": "law", "options": list("abcdefghij"),
             "answer": "J", "answer_index": 9, "cot_content": "", "src": "x"}]
GPQA = [{"Question": q, "Correct Answer": c, "Incorrect Answer 1": i1, "Incorrect Answer 2": i2,
         "Incorrect Answer 3": i3, "Subdomain": "x"} for q, c, i1, i2, i3 in [
    ("What is the  theme?", "the cat [title] in the hat", " a tin ", "then", "thin"),
    ("Where is the cat?", "in the hat", "at  the end", "in a tin", "theatre"),
    ("Which is thin?", "a tin", "the hat", "the cat", "the end")]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def lm_eval_yaml(tasks_dir, name, include, data, shots, **extra):
    """A local lm-eval task: lm-eval's own task file (`include`) with the data and splits replaced."""
    config = {"include": os.path.join(LM_TASKS, include), "task": name, "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {"test": data}}, "test_split": "test", "fewshot_split": "test",
              "training_split": None, "validation_split": None, "fewshot_config": {"sampler": "first_n"},
              "num_fewshot": shots, "tag": [], "metric_list": [{"metric": x} for x in ("acc", "acc_norm", "acc_bytes")],
              **extra}
    (tasks_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")


def run_lm_eval(m, tasks_dir, names, **options):
    from lm_eval.tasks import TaskManager
    from qwen2.eval.lm_eval_adapter import Qwen2LM

    out = lm_eval.simple_evaluate(model=Qwen2LM(pretrained=m), tasks=names, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                  **options)
    return {name: sorted(out["samples"][name], key=lambda s: s["doc_id"]) for name in names}


# ---- 1. exact against lm-eval ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_eval_runs(m, tmp_path_factory):
    """The fixtures as lm-eval tasks (its mmlu, ceval-valid, arc and hellaswag task files), base and chat."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    tasks = tmp / "tasks"
    tasks.mkdir()
    files = {"mmlu": write_jsonl(tmp / "mmlu.jsonl", MMLU), "arc": write_jsonl(tmp / "arc.jsonl", ARC),
             "hellaswag": write_jsonl(tmp / "hellaswag.jsonl", HELLASWAG),
             "ceval": write_jsonl(tmp / "accountant_val.jsonl", CEVAL)}
    dev = write_jsonl(tmp / "accountant_dev.jsonl", CEVAL_DEV)
    for subject in ("anatomy", "virology"):
        rows = [r for r in MMLU if r["subject"] == subject]
        description = mc_formats._mmlu_description(subject)
        lm_eval_yaml(tasks, f"t_mmlu_{subject}", "mmlu/default/_default_template_yaml",
                     write_jsonl(tmp / f"{subject}.jsonl", rows), 2, description=description)
    # C-Eval as lm-eval runs it: examples from the dev split, so no item is left out of them
    lm_eval_yaml(tasks, "t_ceval", "ceval/_default_ceval_yaml", files["ceval"], 2, fewshot_split="dev",
                 dataset_kwargs={"data_files": {"test": files["ceval"], "dev": dev}},
                 description=mc_formats.format_of("ceval").description("accountant"))
    files["ceval_dev"] = dev
    lm_eval_yaml(tasks, "t_arc", "arc/arc_easy.yaml", files["arc"], 3)
    lm_eval_yaml(tasks, "t_hellaswag", "hellaswag/hellaswag.yaml", files["hellaswag"], 1)
    names = ["t_mmlu_anatomy", "t_mmlu_virology", "t_ceval", "t_arc", "t_hellaswag"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        base = run_lm_eval(m, tasks, names)
        chat = run_lm_eval(m, tasks, ["t_arc", "t_hellaswag"], apply_chat_template=True, fewshot_as_multiturn=True)
    return files, base, chat, tmp


def native_records(task, m, out, **options):
    multiple_choice.run(task, m, out, progress=False, **options)
    return [json.loads(line) for line in open(out)]


@pytest.mark.parametrize("task,lm_tasks,shots", [("mmlu", ["t_mmlu_anatomy", "t_mmlu_virology"], 2),
                                                 ("ceval", ["t_ceval"], 2), ("arc", ["t_arc"], 3),
                                                 ("hellaswag", ["t_hellaswag"], 1)])
def test_loglikelihoods_and_accuracy_equal_lm_evals(m, lm_eval_runs, task, lm_tasks, shots):
    files, base, _, tmp = lm_eval_runs
    ours = native_records(task, m, tmp / f"{task}-base.jsonl", data=files[task], shots=shots, batch_size=2,
                          shots_data=files.get(f"{task}_dev"))
    theirs = [s for name in lm_tasks for s in base[name]]
    assert len(ours) == len(theirs) > 0
    assert [r["id"].rsplit("/", 1)[1] for r in ours] == [str(s["doc_id"]) for s in theirs]
    for record, sample in zip(ours, theirs):
        assert record["loglikelihoods"] == pytest.approx([float(r[0][0]) for r in sample["resps"]], abs=1e-4)
        assert record["scores"] == {k: float(sample[k]) for k in ("acc", "acc_norm", "acc_bytes")}
        assert record["gold"] == sample["target"]
    assert {r["shots"] for r in ours} == {shots}


@pytest.mark.parametrize("task,shots", [("arc", 3), ("hellaswag", 1)])
def test_chat_prompting_equals_lm_evals_chat_template(m, lm_eval_runs, task, shots):
    files, base, chat, tmp = lm_eval_runs
    ours = native_records(task, m, tmp / f"{task}-chat.jsonl", data=files[task], shots=shots, chat=True)
    theirs = chat[f"t_{task}"]
    for record, sample in zip(ours, theirs, strict=True):
        context, continuation = sample["arguments"][0]
        assert context.endswith("<|im_start|>assistant\n") and not continuation.startswith(" ")
        assert record["loglikelihoods"] == pytest.approx([float(r[0][0]) for r in sample["resps"]], abs=1e-4)
        assert record["scores"]["acc"] == float(sample["acc"])
    base_lls = [float(r[0][0]) for r in base[f"t_{task}"][0]["resps"]]
    assert ours[0]["loglikelihoods"] != pytest.approx(base_lls, abs=1e-3)  # the chat prompt is another prompt


# ---- 2. the reused cache equals whole forwards --------------------------------------------------------

def whole_forward(m, context, continuation):
    with torch.no_grad():
        logprobs = F.log_softmax(m.model(torch.tensor([context + continuation]))[0].double(), -1)
    n = len(continuation)
    return logprobs[-n - 1:-1][range(n), continuation].sum().item()


def test_reused_context_cache_equals_whole_forwards(m):
    tok = m.tokenizer
    shared = "Here are some questions about the cat in the hat.\n\n" * 3
    contexts = [shared + "Q: the end?\nA:", shared + "Q: the thin tin?\nA:", shared + "Q: the thin tin?\nA:",
                shared[:40], "in the theatre, then:", shared + "Q: the end?\nA: a hat\n\nQ: then?\nA:"]
    choices = [" a hat", " the", " then the theatre in the rain", " x", " the cat sat in the hat"]
    scorer = ChoiceScorer(m.model, max_length=2048, batch_size=2)
    for context in contexts:
        pairs = [encode_pair(tok, context, c, tok.eos_token_id) for c in choices]
        assert scorer.loglikelihoods(pairs) == pytest.approx([whole_forward(m, *p) for p in pairs], abs=1e-4)
    stats = scorer.stats
    assert stats["context_tokens_run"] < stats["context_tokens"] * 0.6  # most of each prompt came from the cache
    assert stats["continuation_rows"] == len(contexts) * sum(len(encode_pair(tok, "x", c, 0)[1]) > 1 for c in choices)


def test_a_pair_longer_than_max_length_is_cut_as_the_lm_eval_adapter_cuts_it(m):
    from qwen2.eval.lm_eval_adapter import Qwen2LM

    tok = m.tokenizer
    pairs = [encode_pair(tok, "the cat sat in the hat, then in the theatre:", c, tok.eos_token_id)
             for c in (" the end", " a thin tin in the rain")]
    ours = ChoiceScorer(m.model, max_length=24).loglikelihoods(pairs)
    adapter = Qwen2LM(pretrained=m, max_length=24)._loglikelihood_tokens([(None, c, t) for c, t in pairs], disable_tqdm=True)
    assert ours == pytest.approx([ll for ll, _ in adapter], abs=1e-4)
    assert ours != pytest.approx(ChoiceScorer(m.model, max_length=2048).loglikelihoods(pairs), abs=1e-3)


def test_trailing_space_of_the_context_moves_into_the_continuation(m):
    tok = m.tokenizer
    context = tok.encode("the cat")
    assert encode_pair(tok, "the cat  ", "in", 0) == (context, tok.encode("the cat  in")[len(context):])
    assert encode_pair(tok, "", "the", tok.eos_token_id) == ([tok.eos_token_id], tok.encode("the"))


# ---- 3. the --data layouts, as lm-eval's task files read them --------------------------------------

def lm_eval_config(path):
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(os.path.join(LM_TASKS, path))


def render(template, doc):
    from lm_eval.utils import apply_template

    return template(doc) if callable(template) else apply_template(template, doc)


def test_every_layout_reads_as_lm_evals_task_files(tmp_path):
    import datasets

    def ours(task, rows, name="rows.jsonl"):
        return mc_formats.load_items(mc_formats.format_of(task), write_jsonl(tmp_path / name, rows))

    def field_or_template(spec, doc):
        """What lm-eval makes of a doc_to_choice/doc_to_target: a column name, a list, or a Jinja template."""
        if isinstance(spec, list):
            return spec
        if spec in doc:
            return doc[spec]
        value = render(spec, doc)
        return ast.literal_eval(value) if value.startswith("[") else value

    def check(items, config, docs):
        for item, doc in zip(items, docs, strict=True):
            choices = field_or_template(config["doc_to_choice"], doc)
            target = field_or_template(config["doc_to_target"], doc)
            assert item["text"] == render(config["doc_to_text"], doc)
            assert item["choices"] == choices
            assert item["gold"] == (choices.index(target) if target in choices else int(target))

    check(ours("mmlu", MMLU), lm_eval_config("mmlu/default/mmlu_anatomy.yaml"), MMLU)
    ceval = lm_eval_config("ceval/ceval-valid_accountant.yaml")
    items = ours("ceval", CEVAL, "accountant_val.jsonl")
    check(items, ceval, CEVAL)
    assert {i["subject"] for i in items} == {"accountant"}
    assert mc_formats.format_of("ceval").description("accountant") == ceval["description"]
    cmmlu = lm_eval_config("cmmlu/cmmlu_agronomy.yaml")
    check(ours("cmmlu", [{**r, "subject": "agronomy"} for r in CMMLU]), cmmlu, CMMLU)
    assert mc_formats.format_of("cmmlu").description("agronomy") == cmmlu["description"]
    check(ours("arc", ARC), lm_eval_config("arc/arc_challenge.yaml"), ARC)

    hellaswag = lm_eval_config("hellaswag/hellaswag.yaml")
    check(ours("hellaswag", HELLASWAG), hellaswag, list(hellaswag["process_docs"](datasets.Dataset.from_list(HELLASWAG))))

    gpqa = lm_eval_config("gpqa/n_shot/gpqa_main_n_shot.yaml")
    gpqa["process_docs"].__globals__["rng"] = random.Random(42)  # the state of a fresh process
    docs = list(gpqa["process_docs"](datasets.Dataset.from_list(GPQA)))
    items = ours("gpqa", GPQA)
    check(items, gpqa, docs)
    assert mc_formats.format_of("gpqa").description("all") == gpqa["description"]
    assert [i["gold"] for i in items] != [3, 3, 3]  # the correct answer was moved off its column's place

    # MMLU-Pro: lm-eval's question layout (its utils.format_cot_example), ending at "Answer:" for the letter
    utils_path = os.path.join(LM_TASKS, "mmlu_pro", "utils.py")
    spec = importlib.util.spec_from_file_location("mmlu_pro_utils", utils_path)
    mmlu_pro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mmlu_pro)
    items = ours("mmlu-pro", MMLU_PRO)
    for item, row in zip(items, MMLU_PRO, strict=True):
        assert item["text"] + " Let's think step by step." == mmlu_pro.doc_to_text(row)
        assert item["choices"][item["gold"]] == row["answer"] and len(item["choices"]) == len(row["options"])
    assert [i["id"] for i in items] == ["law/0", "law/1"]


def test_a_parquet_file_reads_like_jsonl(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed: only Parquet reading is untested")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(ARC), tmp_path / "arc.parquet")
    fmt = mc_formats.format_of("arc")
    assert mc_formats.load_items(fmt, str(tmp_path / "arc.parquet")) == \
        mc_formats.load_items(fmt, write_jsonl(tmp_path / "arc.jsonl", ARC))


@pytest.mark.parametrize("task,rows,name,message", [
    ("mmlu", [{k: v for k, v in MMLU[0].items() if k != "choices"}], "x.jsonl",
     "row 1 has no column 'choices' (the columns of cais/mmlu"),
    ("mmlu", [MMLU[0], {**MMLU[1], "answer": 4}], "x.jsonl", "row 2: answer 4 is outside the 4 choices"),
    ("ceval", [CEVAL[0], {**CEVAL[1], "answer": "E"}], "accountant.jsonl",
     "row 2: answer 'E' is not one of the choice letters A, B, C, D"),
    ("cmmlu", [{**CMMLU[0], "Answer": "AB"}], "agronomy.jsonl", "row 1: answer 'AB' is not one of the choice letters"),
    ("arc", [ARC[0], ARC[1], {**ARC[2], "answerKey": "E"}], "x.jsonl",
     "row 3: answerKey 'E' is not one of the choice labels"),
    ("hellaswag", [{**HELLASWAG[0], "label": ""}], "x.jsonl", "row 1: answer '' is not a choice index 0-3"),
    ("ceval", CEVAL, "exam.jsonl", "cannot tell the ceval subject of"),
    ("cmmlu", [{**CMMLU[0], "subject": "cooking"}], "x.jsonl", "unknown cmmlu subject 'cooking'"),
])
def test_bad_rows_are_one_line_errors(tmp_path, task, rows, name, message):
    fmt = mc_formats.format_of(task)
    with pytest.raises(Qwen2Error) as error:
        mc_formats.load_items(fmt, write_jsonl(tmp_path / name, rows))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_task_and_missing_pack_are_one_line_errors():
    with pytest.raises(Qwen2Error, match="unknown multiple-choice task 'mmlu_pro'; choose one of: mmlu, mmlu-pro"):
        mc_formats.format_of("mmlu_pro")
    with pytest.raises(Qwen2Error, match="arc has no offline pack .* give its test set with --data"):
        mc_formats.load_items(mc_formats.format_of("arc"), None)


# ---- 4. resuming, offline, the CLI ---------------------------------------------------------------

def test_a_killed_run_resumes_without_redoing_items(m, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "mmlu.jsonl", MMLU)
    fresh = native_records("mmlu", m, tmp_path / "fresh.jsonl", data=data, shots=2)
    calls = []
    real = ChoiceScorer.loglikelihoods

    def dies_after_three(self, pairs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(pairs)
        return real(self, pairs)

    monkeypatch.setattr(ChoiceScorer, "loglikelihoods", dies_after_three)
    out = tmp_path / "killed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        multiple_choice.run("mmlu", m, out, data=data, shots=2, progress=False)
    assert len(open(out).readlines()) == 3
    calls.clear()
    monkeypatch.setattr(ChoiceScorer, "loglikelihoods", lambda self, pairs: calls.append(pairs) or real(self, pairs))
    summary = multiple_choice.run("mmlu", m, out, data=data, shots=2, progress=False)
    assert len(calls) == len(MMLU) - 3
    resumed = [json.loads(line) for line in open(out)]
    assert [(r["id"], r["scores"]) for r in resumed] == [(r["id"], r["scores"]) for r in fresh]
    for a, b in zip(resumed, fresh):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)
    acc = [r["scores"]["acc"] for r in fresh]
    assert summary["acc"]["mean"] == pytest.approx(sum(acc) / len(acc))
    assert summary["acc_by_subject"] == {s: pytest.approx(sum(r["scores"]["acc"] for r in fresh if r["subject"] == s) / 4)
                                         for s in ("anatomy", "virology")}
    assert summary["acc_macro"] == pytest.approx(sum(summary["acc_by_subject"].values()) / 2)
    with pytest.raises(Qwen2Error, match="other settings"):
        multiple_choice.run("mmlu", m, out, data=data, shots=3, progress=False)


def test_the_cli_scores_the_offline_pack_with_the_network_refused(tmp_path, offline, capsys):
    from qwen2 import cli

    tok = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    config = tiny_config(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=2048)
    model_dir = save_random_model_dir(tmp_path / "model", tok, config)
    out = tmp_path / "mc.jsonl"
    assert cli.main(["eval", "mc", "--model", model_dir, "--limit", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in records] == [f"abstract_algebra/{i}" for i in range(5)] + ["anatomy/0"]
    assert [r["shots"] for r in records] == [4] * 6  # the other exemplars of the subject, never the item
    assert all(r["settings"]["chat"] is False for r in records)  # base prompts unless --chat on
    summary = json.load(open(tmp_path / "mc.summary.json"))
    assert summary["items"] == 6 and set(summary["acc_by_subject"]) == {"abstract_algebra", "anatomy"}
    assert "mc-mmlu: 6 items" in printed and "prompt tokens run" in printed
    assert cli.main(["eval", "mc", "--model", model_dir, "--task", "arc", "--out", str(tmp_path / "a.jsonl")]) == 1
    assert "arc has no offline pack" in capsys.readouterr().err


def test_pack_items_never_see_themselves_as_examples(m):
    fmt = mc_formats.format_of("mmlu")
    items = mc_formats.load_items(fmt, None)
    pool = [x for x in items if x["subject"] == "abstract_algebra"]
    for item in pool:
        shots = multiple_choice.pick_shots(item, pool, 5, leave_out_item=True)
        assert len(shots) == 4 and item not in shots
        context, continuations = multiple_choice.prompt(fmt, item, shots, False, m.tokenizer)
        assert context.count("\nAnswer:") == 5 and context.endswith(item["text"]) and continuations[0] == " A"
    assert multiple_choice.pick_shots(pool[4], pool, 2, leave_out_item=True) == pool[:2]
    assert multiple_choice.pick_shots(pool[0], pool, 2, leave_out_item=False) == pool[:2]


# ---- 5. the offline pack ---------------------------------------------------------------------------

def test_the_mmlu_pack_is_lm_evals_282_exemplars_over_57_subjects(tmp_path):
    from benchmarks.eval_packs import multiple_choice as builder

    items = mc_formats.load_items(mc_formats.format_of("mmlu"), None)
    assert len(items) == 282 and len({i["subject"] for i in items}) == 57
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(mc_formats.__file__), "packs", "mmlu.jsonl"))]
    exemplars, folder = [], os.path.join(LM_TASKS, "mmlu", "flan_cot_fewshot")
    for path in sorted(os.listdir(folder)):
        if path.startswith("mmlu_"):
            exemplars += yaml.safe_load(open(os.path.join(folder, path)))["fewshot_config"]["samples"]
    for row, sample in zip(rows, exemplars, strict=True):
        # the parsed question and options give back the exemplar's text, whitespace aside
        letters = "ABCDEFGHIJ"
        rebuilt = row["question"] + " " + " ".join(f"({letters[i]}) {c}" for i, c in enumerate(row["choices"]))
        assert rebuilt.split() == sample["question"].split()
        assert f"answer is ({letters[row['answer']]})" in sample["target"]
    assert sorted(len(r["choices"]) for r in rows)[-2:] == [4, 5]  # one exemplar has five options
    written = builder.build(str(tmp_path))  # the committed pack is what the builder makes now
    for path in written:
        committed = os.path.join(os.path.dirname(mc_formats.__file__), "packs", os.path.basename(path))
        assert open(path, encoding="utf-8").read() == open(committed, encoding="utf-8").read()
