"""The real Qwen2.5-Coder-0.5B-Instruct against transformers on the same dequantised weights."""
import pytest
import torch

from qwen2.runtime.generate import SamplingParams, decode_steps

pytestmark = pytest.mark.real_model

LOGIT_PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The capital of France is",
    "<|im_start|>user\n用中文解释一下什么是递归。<|im_end|>\n<|im_start|>assistant\n",
]

CHAT_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that returns the ten most recent orders.",
    "Explain in one sentence what a hash map is.",
    "写一个计算阶乘的 JavaScript 函数。",
    "Fix the bug: def add(a, b): return a - b",
]


def test_config_read_from_gguf(real_model, hf_reference):
    ours, theirs = real_model.config, hf_reference[0].config
    assert (ours.num_hidden_layers, ours.hidden_size, ours.intermediate_size) == (24, 896, 4864)
    assert (ours.num_attention_heads, ours.num_key_value_heads, ours.head_dim) == (14, 2, 64)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 1e6
    assert ours.tie_word_embeddings is False  # this GGUF carries a separate output.weight (Q8_0)
    assert ours.vocab_size == theirs.vocab_size == 151936


@pytest.mark.parametrize("prompt", LOGIT_PROMPTS)
def test_against_original_real_logits(real_model, hf_reference, prompt):
    hf_model, hf_tokenizer = hf_reference
    ids = real_model.tokenizer.encode(prompt)
    assert ids == hf_tokenizer.encode(prompt, add_special_tokens=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = hf_model(x).logits
        got = real_model.model(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-3


def test_real_padded_batch_logits(real_model, hf_reference):
    """Left-padded batch of different-length prompts against the reference with the same positions."""
    hf_model, _ = hf_reference
    rows = [real_model.tokenizer.encode(p) for p in LOGIT_PROMPTS]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), real_model.tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, T - len(row):], mask[r, T - len(row):] = torch.tensor(row), 1
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got = real_model.model(ids, attention_mask=mask)
    assert (got - expected)[mask.bool()].abs().max().item() <= 1e-3


def _hf_greedy(hf_model, ids, n):
    out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_against_original_greedy_chat_continuations(real_model, hf_reference):
    """Greedy 32-token continuations of chat prompts, token for token (end tokens not stopped on,
    so all 32 are compared)."""
    hf_model, hf_tokenizer = hf_reference
    tok = real_model.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True))
               for c in CHAT_PROMPTS]
    for ids, content in zip(prompts, CHAT_PROMPTS):
        reference_text = hf_tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                          add_generation_prompt=True, tokenize=False)
        assert ids == hf_tokenizer.encode(reference_text, add_special_tokens=False)
    ours = [[int(t) for t in step] for step in decode_steps(real_model.model, prompts, SamplingParams(max_new_tokens=32))]
    ours = [list(row) for row in zip(*ours)]  # (B, 32), decoded as one left-padded batch
    for row, ids in enumerate(prompts):
        assert ours[row] == _hf_greedy(hf_model, ids, 32), CHAT_PROMPTS[row]


def test_chat_answer_is_sensible_and_stops(real_model):
    reply = real_model.chat([{"role": "user", "content": "What is 2 + 3? Answer with just the number."}],
                            max_new_tokens=16)
    assert reply.strip() == "5"  # stopped at <|im_end|>, which is not part of the text


def test_batch_generation_equals_one_at_a_time(real_model):
    prompts = ["def is_even(n):", "# Sort a list in Python\n", "SELECT name FROM"]
    batched = real_model.generate(prompts, max_new_tokens=12)
    assert batched == [real_model.generate(p, max_new_tokens=12) for p in prompts]


def test_stream_pieces_equal_full_text(real_model):
    prompt = "# 中文注释: 计算列表平均值 🚀\ndef mean(xs):"
    pieces = list(real_model.generate(prompt, max_new_tokens=24, stream=True))
    assert "".join(pieces) == real_model.generate(prompt, max_new_tokens=24)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string(real_model):
    full = real_model.generate("def add(a, b):", max_new_tokens=24)
    stop = full.strip().split("\n")[0][-3:]  # three characters that do occur in the first line
    cut = real_model.generate("def add(a, b):", max_new_tokens=24, stop=[stop])
    assert cut == full[:full.index(stop)]
