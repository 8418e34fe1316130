"""Quality filtering (qwen2/data/quality*.py, `qwen2 data filter` and `train-classifier`): the default
heuristics remove the planted junk and keep the clean text of every language and code; every record
carries its scores, kept or not; the perplexity of packed, batched documents is each document's own
mean NLL; the classifier trains, saves without pickle and scores in the pipeline; ROC AUC is right;
bad flags are one-line errors before anything is written."""
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("datatrove")
from ggufs import save_random_model_dir, small_tokenizer_metadata  # noqa: E402

from qwen2.cli import main  # noqa: E402
from qwen2.data import planted, quality_heuristics  # noqa: E402
from qwen2.data.quality import FilterSettings, filter_shards  # noqa: E402
from qwen2.data.quality_model import Classifier, ScoringModel, pack, roc_auc, roc_curve, score_texts  # noqa: E402
from qwen2.data.shards import RunOptions  # noqa: E402

QUIET = RunOptions(progress=False)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return str(path)


def read_jsonl(*paths):
    records = []
    for path in paths:
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".jsonl")) \
            if os.path.isdir(path) else [path]
        for file in files:
            with open(file, encoding="utf-8") as f:
                records += [json.loads(line) for line in f]
    return records


@pytest.fixture(scope="module")
def planted_corpus(tmp_path_factory):
    """1 MB of the planted corpus with 30 % junk (about 60 junk records of the four kinds, 140 clean)."""
    out = str(tmp_path_factory.mktemp("planted") / "corpus")
    planted.build(out, 1.0, seed=3, shares={"junk": 0.3})
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Qwen2 with a byte-level tokenizer, as an HF directory `qwen2.load` reads."""
    from qwen2.tokenizer import Tokenizer

    return save_random_model_dir(tmp_path_factory.mktemp("tiny") / "model",
                                 Tokenizer.from_gguf_metadata(small_tokenizer_metadata()))


def test_default_heuristics_remove_planted_junk_and_keep_clean(planted_corpus, tmp_path):
    out, removed = str(tmp_path / "out"), str(tmp_path / "removed.jsonl")
    stats = filter_shards([planted_corpus], out, FilterSettings(), RunOptions(progress=False, removed=removed))
    kept, dropped = read_jsonl(out), read_jsonl(removed)
    records = read_jsonl(planted_corpus)

    def junk(r):
        return bool(r["planted"]) and r["planted"]["kind"] == "junk"

    n_junk, n_clean = sum(map(junk, records)), sum(not junk(r) for r in records)
    assert n_junk >= 40 and {r["planted"]["junk"] for r in records if junk(r)} == set(planted.JUNK_KINDS)
    assert sum(map(junk, dropped)) >= 0.95 * n_junk
    assert sum(not junk(r) for r in kept) >= 0.98 * n_clean
    # stats.json counts what was removed, by the rule that removed it; --removed keeps each with its reason
    assert stats["documents_in"] == len(records) and stats["documents_out"] == len(kept)
    assert sum(stats["removed"].values()) == len(dropped) == len(records) - len(kept)
    assert set(stats["removed"]) <= {"dup_line_char_frac", "dup_para_char_frac", "mojibake", "gibberish",
                                     "boilerplate"}
    assert all(r["filter_reason"] in stats["removed"] for r in dropped)
    # every record, kept or removed, has every field it came with and all the measured values
    by_id = {r["id"]: r for r in records}
    keys = set(quality_heuristics.measure("a line\nanother", FilterSettings().rules))
    for r in kept + dropped:
        assert set(r["quality"]) == keys
        assert {k: v for k, v in r.items() if k not in ("quality", "filter_reason")} == by_id[r["id"]]


def test_web_heuristics_run_offline_and_leave_the_text_alone(tmp_path):
    """datatrove's Gopher, C4 and FineWeb filters with the offline word tokenizer (their own needs spaCy):
    English prose passes, code does not; C4 rewrites the text it keeps (here: drops the citation mark),
    which the filter must not pass on."""
    with open(os.path.join(os.path.dirname(__file__), "data", "declaration_of_independence.txt")) as f:
        prose = "\n".join(f.read().split("\n\n")[:6]) + " [1]"
    records = [{"id": "prose", "text": prose}, {"id": "code", "text": "def f(x):\n    return {x: 1}\n" * 3}]
    stats = filter_shards([write_jsonl(tmp_path / "in.jsonl", records)], str(tmp_path / "out"),
                          FilterSettings(rules=quality_heuristics.parse_heuristics("web")), QUIET)
    kept = read_jsonl(str(tmp_path / "out"))
    assert [r["id"] for r in kept] == ["prose"] and kept[0]["text"] == prose
    assert sum(stats["removed"].values()) == 1
    assert {"words", "stop_words", "alpha_word_frac", "line_punct_frac"} <= set(kept[0]["quality"])


def test_pack_fills_rows_without_overflow():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(50)]
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(50))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) < 40  # packed, not one document a row


def test_perplexity_and_hidden_state_are_each_documents_own(tiny_model):
    """Packed several to a row, batched and truncated, each document gets the mean NLL and mean last
    hidden state a forward of it alone gives (and qwen2.eval's perplexity agrees)."""
    from qwen2.eval.perplexity import perplexity

    spec = ScoringModel(tiny_model, max_tokens=48, batch_tokens=96)
    texts = ["the cat sat on the mat", "a", "in the beginning " * 10, "xyz" * 7, "hello there", "the end."]
    scored = score_texts(spec, texts)
    model = spec.load()
    for text, s in zip(texts, scored):
        ids = torch.tensor(model.tokenizer.encode(text)[:48])
        captured = {}
        hook = model.model.model.norm.register_forward_hook(lambda m, i, o: captured.update(h=o))
        with torch.no_grad():
            logits = model.model(ids[None])[0]
        hook.remove()
        assert s.tokens == len(ids)
        torch.testing.assert_close(s.hidden, captured["h"][0].mean(0), rtol=1e-4, atol=1e-5)
        if len(ids) < 2:
            assert s.nll is None and s.perplexity is None
            continue
        direct = F.cross_entropy(logits[:-1], ids[1:]).item()
        assert s.nll == pytest.approx(direct, rel=1e-4)
        assert s.nll == pytest.approx(perplexity(model.model, ids.tolist(), context=len(ids)).mean_nll, rel=1e-4)
        assert s.perplexity == pytest.approx(math.exp(direct), rel=1e-4)
    # the classifier's pass: the same hidden states, no likelihood made
    hidden_only = score_texts(spec, texts, likelihood=False)
    assert all(h.nll is None and h.tokens == s.tokens for h, s in zip(hidden_only, scored))
    torch.testing.assert_close(torch.stack([h.hidden for h in hidden_only]), torch.stack([s.hidden for s in scored]))


def test_roc_auc_matches_a_hand_count_and_sklearn():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of the 4 pairs ordered right
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5  # a tie counts half
    rng = random.Random(1)
    labels = [rng.random() < 0.3 for _ in range(300)]
    scores = [round(rng.gauss(1.0 if y else 0.0, 1.0), 1) for y in labels]  # rounded: many ties
    fpr, tpr, _ = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    trapezoid = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert roc_auc(scores, labels) == pytest.approx(trapezoid)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert roc_auc(scores, labels) == pytest.approx(sklearn.roc_auc_score(labels, scores))
    ref_fpr, ref_tpr, _ = sklearn.roc_curve(labels, scores, drop_intermediate=False)
    assert fpr == pytest.approx(ref_fpr.tolist()) and tpr == pytest.approx(ref_tpr.tolist())


def test_classifier_trains_saves_and_scores_every_record(tiny_model, tmp_path):
    """train-classifier on prose (good) against random characters (bad), then filter with it and with a
    perplexity limit: every record gets tokens, nll, perplexity and classifier_score."""
    rng = random.Random(0)
    words = "the of and to in is it that was for on are with as his they be at one have this from".split()

    def prose():
        return " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "."

    def noise():
        return "".join(rng.choice("!#$%&*+/0123456789<=>?@[]^{|}~QXZJK") for _ in range(rng.randint(60, 200)))

    pos = write_jsonl(tmp_path / "pos.jsonl", [{"text": prose()} for _ in range(24)])
    neg = write_jsonl(tmp_path / "neg.jsonl", [{"text": noise()} for _ in range(24)])
    clf_dir = str(tmp_path / "clf")
    assert main(["data", "train-classifier", pos, neg, "--model", tiny_model, "--out", clf_dir,
                 "--max-tokens", "64", "--no-progress"]) == 0
    assert sorted(os.listdir(clf_dir)) == ["classifier.safetensors", "config.json"]
    classifier = Classifier.load(clf_dir)
    assert classifier.config["model"] == tiny_model and classifier.config["positives"] == 24
    assert classifier.config["train_auc"] >= 0.95

    held_out = [{"id": f"p{i}", "text": prose(), "label": 1} for i in range(10)] + \
               [{"id": f"n{i}", "text": noise(), "label": 0} for i in range(10)]
    data, out = write_jsonl(tmp_path / "held_out.jsonl", held_out), str(tmp_path / "out")
    removed = str(tmp_path / "removed.jsonl")
    assert main(["data", "filter", data, out, "--heuristics", "none", "--classifier", clf_dir, "--min-score", "0.5",
                 "--max-perplexity", "1e6", "--batch-size", "8", "--removed", removed, "--no-progress"]) == 0
    records = read_jsonl(out, removed)
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in held_out)
    for r in records:
        assert {"tokens", "nll", "perplexity", "classifier_score"} <= set(r["quality"])
    scores = [r["quality"]["classifier_score"] for r in records]
    assert roc_auc(scores, [r["label"] for r in records]) >= 0.9
    # the pipeline's score is the classifier's on the model's hidden state of the same document
    spec = classifier.scoring_model()
    direct = classifier.score(torch.stack([s.hidden for s in score_texts(spec, [records[0]["text"]])]))
    assert records[0]["quality"]["classifier_score"] == pytest.approx(direct.item(), abs=1e-5)
    stats = json.loads(open(os.path.join(out, "stats.json")).read())
    assert set(stats["removed"]) <= {"classifier_score", "perplexity"}
    assert all(r["quality"]["classifier_score"] < 0.5 for r in read_jsonl(removed))


def test_model_steps_load_the_model_in_each_worker(tiny_model, tmp_path):
    """The pipeline's steps go to worker processes pickled: the model is named, not loaded, and each
    worker loads it; two workers give the records one gives."""
    texts = ["a short text", "another one, a little longer than that", "the the the", "x"]
    shards = [write_jsonl(tmp_path / f"s{k}.jsonl", [{"id": f"{k}-{i}", "text": t} for i, t in enumerate(texts)])
              for k in range(2)]
    settings = FilterSettings(rules=(), scorer=ScoringModel(tiny_model, max_tokens=32))
    filter_shards(shards, str(tmp_path / "one"), settings, QUIET)
    filter_shards(shards, str(tmp_path / "two"), settings, RunOptions(workers=2, progress=False))
    one, two = read_jsonl(str(tmp_path / "one")), read_jsonl(str(tmp_path / "two"))
    assert [r["id"] for r in one] == [r["id"] for r in two] and len(one) == 8
    for a, b in zip(one, two):
        qa, qb = a["quality"], b["quality"]
        assert qa["tokens"] == qb["tokens"] and (qa["nll"] is None) == (qb["nll"] is None) == (a["text"] == "x")
        if qa["nll"] is not None:
            assert qa["nll"] == pytest.approx(qb["nll"], abs=1e-3)


@pytest.mark.parametrize("flags, message", [
    (["--heuristics", "default,shiny"], "unknown heuristic 'shiny'"),
    (["--max-perplexity", "50"], "--max-perplexity needs --model"),
    (["--min-score", "0.5"], "--min-score needs --classifier"),
    (["--classifier", "{tmp}/nowhere"], "not a quality classifier"),
    (["--model", "no-such-model", "--max-perplexity", "50"], "unknown model 'no-such-model'"),
    (["--model", "{tmp}/no/such/dir"], "no such file or directory"),
    (["--model", "{tiny}", "--max-perplexity", "0.5"], "--max-perplexity must be a number above 1"),
    (["--model", "{tiny}", "--dtype", "float13"], "float13"),
    (["--model", "{tiny}", "--max-tokens", "1"], "max_tokens must be an integer >= 2"),
])
def test_bad_flags_are_one_line_errors_before_any_output(flags, message, tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "some text"}])
    flags = [f.format(tmp=tmp_path, tiny=tiny_model) for f in flags]
    assert main(["data", "filter", data, str(tmp_path / "out"), *flags, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not os.path.exists(tmp_path / "out")


def test_bad_input_is_a_one_line_error(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"id": 2}\n')
    assert main(["data", "filter", str(bad), str(tmp_path / "out"), "--no-progress"]) == 1
    assert 'bad.jsonl:2: a record without "text"' in capsys.readouterr().err
    assert main(["data", "train-classifier", str(tmp_path / "missing.jsonl"), str(bad), "--model", tiny_model,
                 "--out", str(tmp_path / "clf"), "--no-progress"]) == 1
    assert "missing.jsonl: no such file or directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "clf")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")  # an --out that is not a classifier is not replaced
    assert main(["data", "train-classifier", str(bad), str(bad), "--model", tiny_model, "--out",
                 str(tmp_path / "notes"), "--no-progress"]) == 1
    assert "not a quality classifier" in capsys.readouterr().err
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
