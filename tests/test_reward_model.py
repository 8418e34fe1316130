"""The reward model (qwen2/train/reward.py, `qwen2 train reward`).

- against the original: transformers' Qwen2ForSequenceClassification loads the saved directory and
  scores right-padded batches as ours does; the directory loads back;
- training with the Bradley-Terry loss ranks held-out pairs it never saw; LoRA trains the new head too;
- online DPO with reward = "model:DIR" pairs the samples the reward model scores highest and lowest;
- a directory without a score head, or a bad reward option, is a one-line error.
"""
from __future__ import annotations

import json

import pytest
import torch

import qwen2.train
from qwen2.cli import main
from qwen2.errors import Qwen2Error
from qwen2.tokenizer import Tokenizer
from qwen2.train import data as D
from qwen2.train import online
from qwen2.train.config import TrainConfig
from qwen2.train.reward import RewardModel, from_language_model, load_reward_model, save_reward_model, score_replies
from qwen2.train.run import _make_reward

from ggufs import random_model, save_random_model_dir, small_tokenizer_metadata, tiny_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_gguf_metadata(small_tokenizer_metadata())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> str:
    return save_random_model_dir(tmp_path_factory.mktemp("reward") / "base", tokenizer)


@pytest.mark.parametrize("tied", [False, True])
def test_against_original_sequence_classification(tied, tokenizer, tmp_path):
    model = from_language_model(random_model(tiny_config(vocab_size=264, tie_word_embeddings=tied)), seed=1)
    save_reward_model(str(tmp_path / "rm"), model, tokenizer)
    theirs = transformers.Qwen2ForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    pad = tokenizer.pad_token_id
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[1, 6:], ids[2, 3:] = pad, pad  # right padding: each row's reward is read at its last real token
    mask = (ids != pad).long()
    back, back_tokenizer = load_reward_model(tmp_path / "rm")
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        ours = model(ids, attention_mask=mask)
        assert (ours - expected).abs().max().item() <= 1e-4
        assert (back(ids, attention_mask=mask) - ours).abs().max().item() == 0.0
        doc_ids = torch.where(mask.bool(), 0, D.PAD_DOCUMENT)  # the training forward marks padding so
        assert (model(ids, document_ids=doc_ids) - ours).abs().max().item() <= 1e-6
        assert ours[1] != model(ids[1:2, :7])[0]  # a pad token read as the last one would change the score
    assert back_tokenizer.pad_token_id == pad


def preference_file(path, seed: int, count: int) -> str:
    """Pairs whose chosen reply is made of the words of "the cat sat in the hat", the rejected one of
    runs of x and z: a difference a tiny model can learn and must generalise to unseen orders."""
    gen = torch.Generator().manual_seed(seed)
    good, bad = "the cat sat in the hat".split(), ["xzx", "zzx", "xxz", "zxz"]

    def words(vocab):
        return " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (4,), generator=gen))

    pairs = [{"prompt": f"say {i}", "chosen": words(good), "rejected": words(bad)} for i in range(count)]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return str(path)


def held_out_accuracy(model_dir: str, pairs_path: str) -> float:
    model, tok = load_reward_model(model_dir)
    pairs = [json.loads(line) for line in open(pairs_path)]
    conversations = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[k]}]
                     for p in pairs for k in ("chosen", "rejected")]
    scores = score_replies(model, tok, conversations)
    return sum(c > r for c, r in zip(scores[::2], scores[1::2])) / len(pairs)


def test_training_ranks_pairs_it_never_saw(base_dir, tmp_path, capsys):
    train, heldout = preference_file(tmp_path / "train.jsonl", 0, 24), preference_file(tmp_path / "held.jsonl", 1, 20)
    assert held_out_accuracy_of_untrained(base_dir, heldout, tmp_path) < 0.9
    assert main(["train", "reward", f"model={base_dir}", f"data={train}", f"output_dir={tmp_path / 'run'}",
                 "batch_size=8", "max_steps=30", "lr=3e-3", "min_lr=3e-4", "seq_len=64"]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["accuracy"] == 1.0 and log[-1]["margin"] > 0
    assert held_out_accuracy(str(tmp_path / "run" / "model"), heldout) >= 0.9
    # transformers scores the trained directory as ours does
    model, tok = load_reward_model(tmp_path / "run" / "model")
    theirs = transformers.Qwen2ForSequenceClassification.from_pretrained(str(tmp_path / "run" / "model")).eval()
    ids = torch.tensor([tok.encode("the cat sat")])
    with torch.no_grad():
        assert abs(theirs(input_ids=ids).logits.item() - model(ids).item()) <= 1e-4


def held_out_accuracy_of_untrained(base_dir, heldout, tmp_path) -> float:
    m = qwen2.load(base_dir, progress=False)
    save_reward_model(str(tmp_path / "untrained"), from_language_model(m.model, seed=0), m.tokenizer)
    return held_out_accuracy(str(tmp_path / "untrained"), heldout)


def test_lora_trains_the_new_head_in_full_and_merges(base_dir, tmp_path):
    train = preference_file(tmp_path / "train.jsonl", 0, 16)
    result = qwen2.train.train_reward({"model": base_dir, "data": train, "output_dir": str(tmp_path / "run"),
                                       "lora": True, "lora_r": 4, "batch_size": 8, "max_steps": 3, "lr": 1e-2,
                                       "seq_len": 64})
    m = qwen2.load(base_dir, progress=False)
    start = from_language_model(m.model, seed=0)  # the head the run started from (seed 0)
    trained, _ = load_reward_model(result.model_dir)
    assert (trained.score.weight - start.score.weight).abs().max().item() > 1e-3  # the head moved
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (trained.state_dict()[q] - start.state_dict()[q]).abs().max().item() > 0  # adapters merged in
    assert result.adapter_dir is not None


def test_online_dpo_with_a_reward_model_pairs_its_highest_and_lowest(tokenizer, tmp_path, monkeypatch):
    model = from_language_model(random_model(tiny_config(vocab_size=264)), seed=3)
    save_reward_model(str(tmp_path / "rm"), model, tokenizer)
    reward = _make_reward(TrainConfig(reward=f"model:{tmp_path / 'rm'}"), torch.device("cpu"))
    responses = ["the cat", "in a tin", "zzzz", "heat", "x=1"]
    monkeypatch.setattr(online, "sample_responses", lambda *args: list(responses))
    task = online.CodeTask([{"role": "user", "content": "say"}], "assert True")
    cfg = TrainConfig(num_samples=len(responses), seq_len=64, batch_size=1)
    sampler = online.OnlineSampler(model, tokenizer, [], [task], D.ExampleOrder(1, 1, 0),
                                   slice(0, 1), reward, cfg, torch.device("cpu"))
    batch = sampler(0)
    theirs = transformers.Qwen2ForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        scores = [theirs(input_ids=torch.tensor([tokenizer.encode(tokenizer.apply_chat_template(
            task.messages + [{"role": "assistant", "content": r}]))])).logits.item() for r in responses]
    assert batch.rewards == pytest.approx(scores, abs=1e-4)
    best, worst = max(range(5), key=scores.__getitem__), min(range(5), key=scores.__getitem__)
    chosen, rejected = (tokenizer.decode([t for t in row.tolist() if t != tokenizer.pad_token_id])
                        for row in batch.pairs.rows.input_ids)
    assert chosen.endswith(responses[best] + "<|im_end|>\n") and rejected.endswith(responses[worst] + "<|im_end|>\n")


def test_bad_reward_inputs_are_one_line_errors(base_dir, tmp_path, capsys):
    with pytest.raises(Qwen2Error, match=r"is not a reward model \(its config.json names no "
                                         r"Qwen2ForSequenceClassification\); train one with qwen2 train reward"):
        load_reward_model(base_dir)
    with pytest.raises(Qwen2Error, match=r"'reward' must be one of execution, model or model:DIR"):
        TrainConfig(reward="modle")
    with pytest.raises(Qwen2Error, match=r"'reward' must be one of"):
        TrainConfig(reward="model:")
    assert isinstance(RewardModel(tiny_config()).score, torch.nn.Linear)
