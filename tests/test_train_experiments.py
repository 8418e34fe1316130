"""The issue-6 experiments' own logic (benchmarks/experiments/train_pretrain_experiment.py and
train_lora_sft_experiment.py, imported as package modules; the corpus split and run bookkeeping they
take from benchmarks/common.py): the arithmetic task and its scoring, the held-out split, the
tokenizer trained for pre-training and the directory `pretrain` starts from, the held-out loss, the
bookkeeping of reruns. Fast: no training run, no 0.5B model (only its tokenizer)."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from benchmarks.experiments import train_lora_sft_experiment as sft_exp
from benchmarks.experiments import train_pretrain_experiment as pt_exp
from ggufs import random_model, tiny_config
from qwen2.errors import Qwen2Error
from qwen2.tokenizer import Tokenizer
from qwen2.train import data as D
from qwen2.train.config import TrainConfig, from_dict, to_dict

QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


# ---- (b) the arithmetic task ------------------------------------------------------------------------

def test_examples_are_seeded_disjoint_in_range_and_right():
    train, held = sft_exp.make_examples(320, 100, seed=0)
    assert (len(train), len(held)) == (320, 100)
    assert (train, held) == sft_exp.make_examples(320, 100, seed=0)  # a rerun trains on the same file
    assert train != sft_exp.make_examples(320, 100, seed=1)[0]
    assert not {e["question"] for e in train} & {e["question"] for e in held}
    assert len({e["question"] for e in train + held}) == 420
    ops = set()
    for e in train + held:  # the answer, recomputed from the question's text
        a, op, b = QUESTION.fullmatch(e["question"]).groups()
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        assert e["answer"] == int(a) + int(b) * (1 if op == "+" else -1)
        ops.add(op)
    assert ops == {"+", "-"}
    # the space is 90 x 90 x 2 questions, each drawn once
    every = sft_exp.make_examples(16_200, 0, seed=3)[0]
    assert len({e["question"] for e in every}) == 16_200
    with pytest.raises(Qwen2Error, match="distinct questions"):
        sft_exp.make_examples(16_200, 1, seed=0)


@pytest.mark.parametrize("reply, exact, fmt, number", [
    ("#### 85", True, True, True),
    ("  #### 85\n", True, True, True),        # surrounding whitespace aside
    ("#### 86", False, True, False),          # the format, a wrong number
    ("#### 085", False, True, True),          # the format, not the exact line
    ("####85", False, False, True),
    ("#### 85.", False, False, True),
    ("The answer is #### 85", False, False, True),
    ("47 + 38 equals 85.", False, False, True),
    ("#### 85\n#### 86", False, False, False),
    ("85", False, False, True),
    ("1,085", False, False, False),            # 1085, not 85
    ("", False, False, False),
])
def test_scoring_is_strict_about_the_format_and_lenient_about_the_number(reply, exact, fmt, number):
    assert sft_exp.score(reply, 85) == {"exact": exact, "format": fmt, "number": number}


def test_negative_answers_and_the_tally():
    assert sft_exp.score("#### -23", -23) == {"exact": True, "format": True, "number": True}
    assert sft_exp.score("#### 23", -23)["exact"] is False
    assert sft_exp.last_number("from 1,234 down to -7") == -7
    scored = [sft_exp.score(r, 5) for r in ("#### 5", "#### 6", "5", "x")]
    acc = sft_exp.accuracy(scored)
    assert (acc["exact_count"], acc["format_count"], acc["number_count"], acc["n"]) == (1, 2, 2, 4)
    assert acc["exact"] == 0.25 and acc["format"] == 0.5


@pytest.fixture(scope="module")
def real_tokenizer():
    from qwen2.checkpoint.registry import DEFAULT_MODEL, hf_dir

    return Tokenizer.from_dir(hf_dir(DEFAULT_MODEL, progress=False))


def test_sft_trains_exactly_the_reply_after_the_prompt_evaluation_sends(real_tokenizer):
    example = {"question": "What is 47 - 58?", "answer": -11}
    record = sft_exp.chat_record(example)
    assert D.check_messages(record["messages"]) is None
    row = D.render_chat(real_tokenizer, record["messages"])
    labelled = [t for t, label in zip(row.input_ids, row.labels) if label != D.IGNORE_INDEX]
    assert real_tokenizer.decode(labelled) == "#### -11<|im_end|>"  # the loss is on the reply alone
    prompt = sft_exp.prompts_for(real_tokenizer, [example])[0]
    first = row.labels.index(next(label for label in row.labels if label != D.IGNORE_INDEX))
    assert real_tokenizer.encode(prompt) == row.input_ids[:first]  # evaluation continues where SFT's reply starts
    assert len(row) <= sft_exp.train_options(sft_exp.parse_args([]), "x")["seq_len"]  # never truncated


def test_sft_options_are_valid_lora_options_and_bad_flags_are_one_line(tmp_path, capsys):
    args = sft_exp.parse_args(["--out", str(tmp_path)])
    cfg = from_dict(sft_exp.train_options(args, str(tmp_path / "train.jsonl")))
    assert cfg.lora and not cfg.merge_lora and cfg.max_steps == args.steps
    assert sft_exp.main(["--steps", "0", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: --train, --held-out, --steps")


# ---- (a) corpus split, tokenizer, starting directory ----------------------------------------------

def test_every_eighth_play_is_held_out():
    plays = [(f"play-{i:02d}", f"text {i}") for i in reversed(range(17))]
    train, held = pt_exp.split_plays(plays)
    assert [n for n, _ in held] == ["play-07", "play-15"]
    assert sorted(train + held) == sorted(plays) and not set(train) & set(held)
    with pytest.raises(Qwen2Error, match="cannot be split"):
        pt_exp.split_plays(plays[:5])


def _english() -> list[str]:
    """Real English prose with no download: the docstrings of this project's modules."""
    import qwen2.eval.perplexity
    import qwen2.long_context
    import qwen2.model.moe
    import qwen2.train.data
    import qwen2.train.loop
    return [m.__doc__ for m in (qwen2.eval.perplexity, qwen2.long_context, qwen2.model.moe, qwen2.train.data,
                                qwen2.train.loop)]


@pytest.fixture(scope="module")
def small_bpe() -> Tokenizer:
    return pt_exp.train_tokenizer(_english(), vocab_size=400)


def test_trained_tokenizer_round_trips_compresses_and_matches_transformers(small_bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert len(small_bpe) == 400
    eod = small_bpe.token_to_id("<|endoftext|>")
    assert small_bpe.eos_token_id == eod and small_bpe.encode("<|endoftext|>") == [eod]
    text = "Now is the winter of our discontent\n\n  Made glorious summer — ça, 1623!<|endoftext|>Exit."
    ids = small_bpe.encode(text)
    assert small_bpe.decode(ids) == text and ids.count(eod) == 1
    prose = "\n\n".join(_english())
    assert len(small_bpe.encode(prose)) < 0.75 * len(prose.encode())  # the merges apply in our pipeline
    small_bpe.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).encode(text) == ids
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids


def test_the_starting_directory_is_what_pretrain_takes(small_bpe, tmp_path):
    from qwen2.train.run import load_model

    config = pt_exp.model_config(small_bpe, 64, pt_exp.SMOKE_MODEL)
    init_dir = str(tmp_path / "init")
    pt_exp.write_init_dir(init_dir, small_bpe, config, seed=5)
    cfg = TrainConfig(model=init_dir, from_scratch=True, seed=5)
    m = load_model(cfg, torch.device("cpu"))  # what pretrain(from_scratch=true) starts from
    assert m.config.vocab_size == len(small_bpe) and m.config.max_position_embeddings == 64
    counts = pt_exp.parameter_counts(config)
    assert counts["total"] == sum(p.numel() for p in m.model.parameters())
    assert counts["embedding"] == len(small_bpe) * config.hidden_size
    saved = load_model(TrainConfig(model=init_dir), torch.device("cpu")).model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in m.model.state_dict().items())  # the same seeded init
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _english()[:2]))
    report = D.DataReport(str(data))
    rows = D.pretraining_rows(m.tokenizer, str(data), 64, True, report)
    assert report.records == 2 and all(len(r) == 64 for r in rows)
    ends = [t for r in rows for t, doc in zip(r.input_ids, r.doc_ids)
            if doc != D.PAD_DOCUMENT and t == small_bpe.eos_token_id]
    assert len(ends) == 2  # each play ends in <|endoftext|> (padding aside, which reuses its id)


# ---- (a) held-out loss and bookkeeping --------------------------------------------------------------

def test_held_out_loss_is_the_mean_next_token_nll_over_the_plays():
    model = random_model(tiny_config(vocab_size=97))
    gen = torch.Generator().manual_seed(2)
    plays = [(f"p{i}", torch.randint(0, 97, (50,), generator=gen).tolist()) for i in range(3)]
    got = pt_exp.held_out_loss(model, plays, seq_len=64, max_tokens=3 * 40)  # 40 tokens of each: one window
    nll, count = 0.0, 0
    with torch.no_grad():
        for _, ids in plays:
            x = torch.tensor(ids[:40])
            logits = model(x[None])[0]
            nll += F.cross_entropy(logits[:-1], x[1:], reduction="sum").item()
            count += 39
    assert got["tokens_scored"] == count
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_log_bookkeeping():
    log = [{"step": s, "loss": float(10 - s), "tokens": 100 + s} for s in range(1, 7)]
    assert pt_exp.tokens_seen_by_step(log) == [101, 203, 306, 410, 515, 621]
    assert pt_exp.train_loss_before(log, 4, 2) == pytest.approx((7 + 6) / 2)
    assert pt_exp.train_loss_before(log, 0, 2) is None
    assert pt_exp.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_a_rerun_resumes_only_a_run_with_the_same_options(tmp_path):
    args = pt_exp.parse_args(["--smoke", "--out", str(tmp_path)])
    options = pt_exp.train_options(args, str(tmp_path / "init"), str(tmp_path / "train.jsonl"))
    assert options["keep_checkpoints"] * args.eval_every >= args.steps  # every evaluated checkpoint is kept
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(to_dict(from_dict({**options, "resume": True}))))
    pt_exp.check_same_run(str(run), options)  # same options: resume
    with pytest.raises(Qwen2Error, match=r"other options \(lr: 0.002 -> 0.001\)"):
        pt_exp.check_same_run(str(run), {**options, "lr": 1e-3})
    assert pt_exp.main(["--eval-tokens", "8", "--out", str(tmp_path)]) == 1
