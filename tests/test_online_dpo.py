"""Online DPO and the Online Merging Optimizer (qwen2/train/online.py, onmerge.py).

- OnDARE / OnTIES update rules against the paper's formulas computed directly on small tensors;
- the rewards: execution feedback in the sandbox (fraction of tests passed), a reward model's score;
- pairing best and worst, ties skipped;
- an end-to-end run: a tiny model SFT'd to answer "x=1" or "x=2", then online DPO with the execution
  reward (tests: x == 1) and the Online Merging Optimizer moves the policy towards "x=1".
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import qwen2
import qwen2.train
from qwen2.tokenizer import Tokenizer
from qwen2.train import data as D
from qwen2.train.dpo import sequence_log_probs
from qwen2.train.forward import forward
from qwen2.train.online import CodeTask, ExecutionReward, LogProbReward, best_and_worst
from qwen2.train.onmerge import OnlineMergingAdamW, dare, ondare, onties, top_k

from ggufs import save_random_model_dir, small_tokenizer_metadata


# ---- update rules ---------------------------------------------------------------------------------

def adamw_step(p0, grad, lr=0.1):
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


def onmerge_step(p0, grad, tau, **options):
    p = torch.nn.Parameter(p0.clone())
    opt = OnlineMergingAdamW([p], [tau], lr=0.1, **options)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


def test_onmerge_without_sparsity_mixes_the_adamw_step_with_the_reference_delta():
    """Drop rate 0 / density 1: OnDARE steps by alpha * tau + (1 - alpha) * the AdamW update; OnTIES
    keeps of each only the entries whose sign agrees with the sign of tau + update (0 counts as +).
    Weight decay stays outside the merge (the authors' code decays after merging)."""
    p0, grad, tau = torch.randn(5, 4), torch.randn(5, 4), 0.5 * torch.randn(5, 4)
    update = adamw_step(p0, grad) - p0
    dare_step = onmerge_step(p0, grad, tau, method="dare", drop_rate=0.0, ref_weight=0.3, weight_decay=0.0)
    assert torch.allclose(dare_step, p0 + 0.3 * tau + 0.7 * update, atol=1e-6)
    ties_step = onmerge_step(p0, grad, tau, method="ties", density=1.0, ref_weight=0.3, weight_decay=0.0)
    s = torch.where(tau + update >= 0, 1.0, -1.0)
    expected = p0 + 0.3 * torch.where(torch.sign(tau) == s, tau, 0) + 0.7 * torch.where(torch.sign(update) == s, update, 0)
    assert torch.allclose(ties_step, expected, atol=1e-6)
    decayed = onmerge_step(p0, grad, tau, method="dare", drop_rate=0.0, ref_weight=0.3, weight_decay=0.2)
    assert torch.allclose(decayed, p0 * (1 - 0.1 * 0.2) + 0.3 * tau + 0.7 * update, atol=1e-6)


def test_dare_drops_the_masked_entries_and_rescales_the_rest():
    delta = torch.arange(1.0, 201.0)
    gen = torch.Generator().manual_seed(7)
    out = dare(delta, 0.75, gen)
    keep = torch.rand(200, generator=torch.Generator().manual_seed(7)) >= 0.75  # the same draw
    assert torch.equal(out, torch.where(keep, delta * 4, torch.zeros(200)))
    assert 20 < int(keep.sum()) < 80
    tau = torch.ones(200)
    both = ondare(delta, tau, 0.5, 0.1, torch.Generator().manual_seed(3))
    m = torch.rand(200, generator=torch.Generator().manual_seed(3)) >= 0.5
    assert torch.allclose(both, 0.1 * tau + 0.9 * m * delta * 2)
    # the optimizer sparsifies tau once, with the run's seed: the same mask on every step and on resume
    p = torch.nn.Parameter(torch.zeros(200))
    opt = OnlineMergingAdamW([p], [delta], method="dare", drop_rate=0.75, seed=5)
    keep_tau = torch.rand(200, generator=torch.Generator().manual_seed(5)) >= 0.75
    assert torch.equal(opt.reference_deltas[id(p)], torch.where(keep_tau, delta * 4, torch.zeros(200)))


def test_onties_keeps_the_sign_consistent_top_k():
    delta = torch.tensor([5.0, -4.0, 0.5, -3.0, 0.1, 2.0])
    tau = torch.tensor([0.0, -8.0, 6.0, 7.0, 0.0, 0.0])  # already trimmed, as the optimizer keeps it
    assert torch.equal(top_k(delta, 0.5), torch.tensor([5.0, -4.0, 0.0, -3.0, 0.0, 0.0]))
    # d = [5, -4, 0, -3, 0, 0]; elected signs of tau + d = [+, -, +, +, +, +]: the -3 disagrees with tau's 7
    expected = 0.5 * torch.tensor([0.0, -8.0, 6.0, 7.0, 0.0, 0.0]) + 0.5 * torch.tensor([5.0, -4.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(onties(delta, tau, 0.5, 0.5), expected)


# ---- rewards and pairs ------------------------------------------------------------------------------

def test_execution_reward_runs_the_extracted_code_against_the_tests():
    reward = ExecutionReward(timeout=10)
    task = CodeTask([{"role": "user", "content": "add"}], ["assert add(1, 2) == 3", "assert add(-1, 1) == 0",
                                                           "assert add(2, 2) == 5"], "add")
    answer = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert reward(task, answer) == pytest.approx(2 / 3)
    assert reward(task, "def add(a, b):\n    return a - b") == 0.0
    single = CodeTask(task.messages, "assert add(1, 2) == 3", "add")
    assert reward(single, answer) == 1.0 and reward(single, "not code at all") == 0.0


def test_best_and_worst_and_ties():
    assert best_and_worst([0.5, 1.0, 0.0, 1.0, 0.0]) == (1, 2)
    assert best_and_worst([1.0, 1.0]) is None


# ---- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A tiny random base model, and the same SFT'd to reply "x=1" or "x=2" to "set x"."""
    root = tmp_path_factory.mktemp("online")
    tokenizer = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    base = save_random_model_dir(root / "base", tokenizer)
    chats = [{"messages": [{"role": "user", "content": "set x"}, {"role": "assistant", "content": f"x={v}"}]}
             for v in (1, 2)]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    sft = qwen2.train.sft({"model": base, "data": str(root / "chat.jsonl"), "output_dir": str(root / "sft"),
                           "batch_size": 2, "max_steps": 40, "lr": 1e-2, "min_lr": 1e-3, "seq_len": 64})
    return root, base, sft.model_dir


def reply_logps(model_dir, tokenizer, replies):
    model = qwen2.load(model_dir, progress=False).model
    rows = [D.render_chat(tokenizer, [{"role": "user", "content": "set x"}, {"role": "assistant", "content": r}],
                          "last") for r in replies]
    batch = D.collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        return sequence_log_probs(forward(model, batch.input_ids, batch.doc_ids), batch.labels).tolist()


def test_online_dpo_with_execution_reward_and_onmerge_moves_the_policy(sft_model):
    root, base, sft_dir = sft_model
    tokenizer = qwen2.load(sft_dir, progress=False).tokenizer
    before = reply_logps(sft_dir, tokenizer, ["x=1", "x=2"])
    assert abs(before[0] - before[1]) < 1.0 and max(before) > math.log(0.2)  # it says either
    (root / "tasks.jsonl").write_text(json.dumps({"prompt": "set x", "tests": "assert x == 1"}) + "\n")
    result = qwen2.train.online_dpo({"model": sft_dir, "data": str(root / "tasks.jsonl"),
                                     "output_dir": str(root / "online"), "batch_size": 2, "num_samples": 4,
                                     "max_new_tokens": 6, "temperature": 1.0, "max_steps": 4, "lr": 2e-3,
                                     "min_lr": 2e-3, "seq_len": 64, "beta": 0.5, "optimizer": "onmerge",
                                     "onmerge_method": "dare", "onmerge_drop_rate": 0.1,
                                     "onmerge_base_model": base})
    assert [r["step"] for r in result.log] == [1, 2, 3, 4]
    assert result.log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its reference
    assert 0 < result.log[0]["sample_reward"] < 1  # some samples pass, some fail: pairs exist
    assert max(r["margin"] for r in result.log[1:]) > 0  # DPO rewards favour the passing replies
    after = reply_logps(result.model_dir, tokenizer, ["x=1", "x=2"])
    assert after[0] - after[1] > before[0] - before[1] + 1.0  # the passing reply gained on the failing one


def test_reward_model_scores_the_reply_it_was_tuned_on_higher(sft_model):
    root, base, sft_dir = sft_model
    scorer = qwen2.load(sft_dir, progress=False)
    reward = LogProbReward(scorer.model, scorer.tokenizer)
    task = CodeTask([{"role": "user", "content": "set x"}], "assert True")
    assert reward(task, "x=1") > reward(task, "zzzz") + 1.0
    with pytest.raises(qwen2.errors.Qwen2Error, match="reward=model needs reward_model"):
        qwen2.train.online_dpo({"model": sft_dir, "data": str(root / "tasks.jsonl"), "reward": "model",
                                "output_dir": str(root / "rm")})
