"""The training experiments (benchmarks/experiments/train_pretrain_experiment.py and
train_lora_sft_experiment.py), run as the scripts they are, with --prepare-only: what they would
train on and with which options, and their one-line errors. Fast: no training run, no model
loaded here (only the real tokenizer). What they take from the library (the corpus, the trained
tokenizer, answer scoring, the run directory) is tested in test_data_*.py, test_eval*.py and
test_train.py."""
import json
import os
import re
import subprocess
import sys

import pytest

from qwen2.config import Qwen2Config
from qwen2.eval.answers import answer_line, formatted_answer
from qwen2.tokenizer import Tokenizer
from qwen2.train import data as D
from qwen2.train.config import from_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def run_experiment(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("QWEN2_PROGRESS", None)
    return subprocess.run([sys.executable, "-m", f"benchmarks.experiments.{name}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---- LoRA SFT: the arithmetic task ------------------------------------------------------------------

def prepare_sft(out, *args: str) -> dict:
    """--prepare-only into `out`: the training records, the examples they hold, the held-out
    examples and the options SFT would be given."""
    proc = run_experiment("train_lora_sft_experiment", "--prepare-only", "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(os.path.join(out, "train.jsonl"))
    train = [{"question": r["messages"][0]["content"], "answer": formatted_answer(r["messages"][1]["content"])}
             for r in records]
    with open(os.path.join(out, "train_options.json"), encoding="utf-8") as f:
        options = json.load(f)
    return {"records": records, "train": train, "held": read_jsonl(os.path.join(out, "heldout.jsonl")),
            "options": options}


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> dict:
    """The full run's 320 training and 100 held-out questions (seed 0), 5 steps."""
    return prepare_sft(tmp_path_factory.mktemp("sft") / "out", "--train", "320", "--held-out", "100", "--seed", "0",
                       "--steps", "5")


@pytest.fixture(scope="module")
def every_question(tmp_path_factory) -> dict:
    """All 16,200 questions there are: 16,199 to train on, 1 held out (seed 3)."""
    return prepare_sft(tmp_path_factory.mktemp("sft") / "out", "--train", "16199", "--held-out", "1", "--seed", "3")


def test_examples_are_seeded_disjoint_in_range_and_right(full_size, every_question, tmp_path):
    train, held = full_size["train"], full_size["held"]
    assert (len(train), len(held)) == (320, 100)
    again = prepare_sft(tmp_path / "again", "--train", "320", "--held-out", "100", "--seed", "0")
    assert (train, held) == (again["train"], again["held"])  # a rerun trains on the same file
    assert train != prepare_sft(tmp_path / "seed-1", "--train", "320", "--held-out", "100", "--seed", "1")["train"]
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
    every = every_question["train"] + every_question["held"]
    assert len({e["question"] for e in every}) == 16_200
    proc = run_experiment("train_lora_sft_experiment", "--prepare-only", "--out", str(tmp_path / "too-many"),
                          "--train", "16200", "--held-out", "1")
    assert proc.returncode == 1 and re.match(r"error: only 16200 distinct questions", proc.stderr)


def test_sft_trains_exactly_the_answer_line_and_never_truncates_it(every_question, real_tokenizer):
    """The question as the user's turn, `#### <answer>` as the assistant's: the conversation whose
    rendering test_train.py checks (the loss on the reply alone, evaluation's prompt its prefix)."""
    record = next(r for r in every_question["records"] if r["messages"][0]["content"] == "What is 47 - 58?")
    assert record == {"messages": [{"role": "user", "content": "What is 47 - 58?"},
                                   {"role": "assistant", "content": answer_line(-11)}]}
    row = D.render_chat(real_tokenizer, record["messages"])
    assert len(row) <= every_question["options"]["seq_len"]  # never truncated


def test_sft_options_are_valid_lora_options_and_bad_flags_are_one_line(full_size, tmp_path):
    cfg = from_dict(full_size["options"])
    assert cfg.lora and not cfg.merge_lora and cfg.max_steps == 5
    proc = run_experiment("train_lora_sft_experiment", "--steps", "0", "--out", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --train, --held-out, --steps")


# ---- pre-training: what the smoke run would train on ------------------------------------------------

def test_pretrain_prepares_its_starting_directory_data_and_options(tmp_path):
    out = tmp_path / "out"
    proc = run_experiment("train_pretrain_experiment", "--smoke", "--prepare-only", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert not (out / "run").exists()  # nothing trained
    with open(out / "train_options.json", encoding="utf-8") as f:
        options = json.load(f)
    cfg = from_dict(options)
    assert cfg.from_scratch and cfg.pack_documents and cfg.model == str(out / "init")
    assert options["keep_checkpoints"] * options["save_every"] >= options["max_steps"]  # every evaluated one is kept
    config = Qwen2Config.from_json_file(str(out / "init" / "config.json"))
    assert config.vocab_size == len(Tokenizer.from_dir(str(out / "init"))) == 512
    assert config.max_position_embeddings == options["seq_len"] == 64
    assert len(read_jsonl(out / "train.jsonl")) == 14  # the smoke run's 16 plays, every 8th held out


def test_pretrain_bad_flags_are_one_line(tmp_path):
    proc = run_experiment("train_pretrain_experiment", "--eval-tokens", "8", "--out", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --steps and --eval-every must be at least 1, --eval-tokens at least 64")
