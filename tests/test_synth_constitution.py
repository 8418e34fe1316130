"""Constitutional feedback (qwen2/synth/constitution.py, `qwen2 synth constitution`) and reward-model
scoring (`qwen2 synth score`), end to end on a tiny random model.

- every prompt gets a draft, a critique and a revision per principle, each asked in the conversation
  the chain has reached; the pairs load in `qwen2 train dpo`, which runs two steps on them;
- a rerun samples nothing; an empty principles file or a prompt file without prompts is one line;
- `synth score` writes each reply's reward, as the reward model scores it.
"""
from __future__ import annotations

import json

import pytest

import qwen2.train
from qwen2.cli import main
from qwen2.errors import Qwen2Error
from qwen2.synth import constitution, rejection
from qwen2.tokenizer import Tokenizer
from qwen2.train.reward import from_language_model, load_reward_model, save_reward_model, score_replies

from ggufs import random_model, save_random_model_dir, small_tokenizer_metadata, tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_gguf_metadata(small_tokenizer_metadata())


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, tokenizer) -> str:
    # a context long enough for a conversation of a prompt, two principles and their critiques, byte by byte
    return save_random_model_dir(tmp_path_factory.mktemp("constitution") / "model", tokenizer,
                                 tiny_config(vocab_size=264, max_position_embeddings=2048))


PROMPTS = [{"task_id": "p1", "prompt": "tell me about the cat"},
           {"task_id": "p2", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]},
           {"task_id": "p3", "prompt": "the hat?"}]


def test_draft_critique_revise_per_principle_and_train_dpo_on_the_pairs(small_dir, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    principles = tmp_path / "principles.txt"
    principles.write_text("# ours\nBe kind.\n\nBe honest.\n")
    seen = []  # every conversation the model is asked to continue
    generate = rejection.generate_replies

    def recording(m, jobs, max_batch):
        seen.extend(m.tokenizer.decode(ids) for ids, _ in jobs)
        return generate(m, jobs, max_batch)

    monkeypatch.setattr(rejection, "generate_replies", recording)
    args = ["synth", "constitution", str(prompts), "--principles", str(principles), "--model", small_dir,
            "--out", str(tmp_path / "out"), "--max-new-tokens", "6", "--temperature", "1.0", "--batch", "2",
            "--no-progress"]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in records] == ["p1", "p2", "p3"]
    assert len(seen) == 3 * (1 + 2 * 2)  # a draft, then a critique and a revision per principle
    for r in records:
        assert [s["principle"] for s in r["steps"]] == ["Be kind.", "Be honest."] and r["revision"] == r["steps"][-1]["revision"]
        # the second critique is asked of the first revision, in the prompt's own conversation, which
        # no longer holds the first principle's exchange
        critique_2 = [text for text in seen if constitution.CRITIQUE.format(principle="Be honest.") in text
                      and r["prompt"][-1]["content"] in text and r["steps"][0]["revision"] in text]
        assert critique_2 and all(constitution.CRITIQUE.format(principle="Be kind.") not in t for t in critique_2)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert stats["prompts"] == 3 and stats["principles"] == 2 and stats["pairs"] == len(pairs) >= 1
    assert all(p["chosen"] == next(r["revision"] for r in records if r["task_id"] == p["task_id"]) for p in pairs)
    assert "3 prompts x 2 principles" in capsys.readouterr().out
    log = qwen2.train.dpo({"model": small_dir, "data": str(tmp_path / "out" / "pairs.jsonl"), "max_steps": 2,
                           "batch_size": 1, "seq_len": 256, "output_dir": str(tmp_path / "dpo")}).log
    assert [r["step"] for r in log] == [1, 2]
    # a rerun reads what is there: no model (the path is gone), the same files
    before = (tmp_path / "out" / "sft.jsonl").read_text()
    assert main([*args[:5], "--model", str(tmp_path / "gone"), *args[7:]]) == 0
    assert (tmp_path / "out" / "sft.jsonl").read_text() == before


def test_bad_principles_and_prompts_are_one_line_errors(small_dir, tmp_path, capsys):
    principles = tmp_path / "empty.txt"
    principles.write_text("# nothing but a comment\n\n")
    with pytest.raises(Qwen2Error, match=r"empty.txt holds no principle; write one per line"):
        constitution.read_principles(principles)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"task_id": "p1"}) + "\n")
    (tmp_path / "p.txt").write_text("Be kind.\n")
    assert main(["synth", "constitution", str(prompts), "--principles", str(tmp_path / "p.txt"), "--model", small_dir,
                 "--out", str(tmp_path / "out")]) == 1
    assert "prompts.jsonl:1: \"prompt\" must be a string or a list of chat messages" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_synth_score_writes_each_replys_reward(tokenizer, tmp_path, capsys):
    model = from_language_model(random_model(tiny_config(vocab_size=264)), seed=2)
    save_reward_model(str(tmp_path / "rm"), model, tokenizer)
    rows = [{"prompt": "the cat", "response": "sat in the hat"},
            {"prompt": "hi", "chosen": "the end", "rejected": "zzz", "id": 7},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "in a tin"}]}]
    (tmp_path / "replies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["synth", "score", str(tmp_path / "replies.jsonl"), "--reward-model", str(tmp_path / "rm"),
                 "--out", str(tmp_path / "scored.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    rm, tok = load_reward_model(tmp_path / "rm")
    expected = score_replies(rm, tok, [[{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat in the hat"}],
                                       [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the end"}],
                                       [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "zzz"}],
                                       rows[2]["messages"]])
    got = [scored[0]["reward"], scored[1]["reward_chosen"], scored[1]["reward_rejected"], scored[2]["reward"]]
    assert got == pytest.approx(expected, abs=1e-6) and scored[1]["id"] == 7
    assert "scored 4 replies of 3 records" in capsys.readouterr().out


def test_the_real_model_check_runs_and_reports(small_dir, tmp_path):
    """benchmarks/experiments/synth_constitution_check.py, as a command, on the tiny model and 2 of its
    20 prompts: its report counts what the records hold."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "benchmarks.experiments.synth_constitution_check", "--model", small_dir,
                          "--quantize", "none", "--limit", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "out"),
                          "--results", str(tmp_path / "report")], cwd=repo, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert report["stats"]["prompts"] == len(records) == 2 and report["stats"]["principles"] == 3
    assert report["revision_differs"] == sum(r["revision"].strip() != r["draft"].strip() for r in records)
    assert [e["draft"] for e in report["examples"]] == [r["draft"] for r in records]
    assert "prompts x 3 principles" in (tmp_path / "report.md").read_text()
