"""Sampling against transformers' logits processors, decoding loops on a tiny random model, and
the text layer (end tokens, stop strings, streaming) with the real tokenizer."""
import pytest
import torch
from transformers.generation import logits_process as hf

from qwen2.config import Qwen2Config
from qwen2.errors import Qwen2Error
from qwen2.runtime.generate import (SamplingParams, TextStream, decode_steps, generate_text, next_token,
                            sampling_distribution)
from qwen2.model import Transformer


def hf_distribution(logits, input_ids, p: SamplingParams):
    processors = [hf.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)] if p.repetition_penalty != 1 else []
    processors.append(hf.TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        processors.append(hf.TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        processors.append(hf.TopPLogitsWarper(p.top_p))
    if p.min_p:
        processors.append(hf.MinPLogitsWarper(p.min_p))
    for proc in processors:
        logits = proc(input_ids, logits)
    return logits.softmax(-1)


@pytest.mark.parametrize("options", [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=20),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.7, top_k=50, top_p=0.8, repetition_penalty=1.1),
    dict(temperature=0.6, top_p=0.95, min_p=0.1, repetition_penalty=0.9),
])
def test_sampling_distribution_equals_transformers(options):
    params = SamplingParams(**options)
    logits = torch.randn(3, 500) * 3
    context = torch.randint(0, 500, (3, 40))
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter_(1, context, True)
    ours = sampling_distribution(logits, params, seen)
    theirs = hf_distribution(logits.clone(), context, params)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert ((ours > 0) == (theirs > 0)).all()  # the same tokens survive the filters


@pytest.mark.parametrize("scale", [8.0, 0.05])  # a peaked nucleus (the shortlist holds it) and a flat one (it grows)
def test_top_p_on_a_full_vocabulary_equals_transformers(scale):
    """Top-p sorts a shortlist first and the whole vocabulary only when the shortlist holds too
    little mass: either way the same tokens survive as under transformers' full sort."""
    params = SamplingParams(temperature=0.7, top_p=0.95)
    logits = torch.randn(4, 151_936, generator=torch.Generator().manual_seed(0)) * scale
    context = torch.zeros(4, 1, dtype=torch.long)
    ours = sampling_distribution(logits, params)
    theirs = hf_distribution(logits.clone(), context, params)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert ((ours > 0) == (theirs > 0)).all()
    assert 1 <= int((ours[0] > 0).sum()) < 151_936


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0]])
    seen = torch.tensor([[False, True, False, False]])
    assert next_token(logits, SamplingParams()).tolist() == [1]
    assert next_token(logits, SamplingParams(repetition_penalty=1.2), seen).tolist() == [2]


def test_sampling_follows_the_distribution():
    params = SamplingParams(temperature=1.0, top_k=3)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([next_token(logits, params, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
    assert freq[3] == 0  # cut by top_k
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03)




def test_draw_follows_each_rows_distribution_and_never_draws_a_zero():
    """`draw` (inverse CDF) against the law it samples: per-row frequencies over 20,000 draws of a
    batch whose rows differ, with zero-probability tokens first, inside and last (the rounding
    guard must not hand out a trailing zero)."""
    from qwen2.runtime.generate import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9], [0.0] * 5 + [1.0]])
    g = torch.Generator().manual_seed(7)
    draws = torch.stack([draw(probs, g) for _ in range(20_000)])  # (N, 3)
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=6).float() / len(draws)
        assert (freq[probs[row] == 0] == 0).all()
        assert torch.allclose(freq, probs[row], atol=0.012), (row, freq)

@pytest.mark.parametrize("temperature", [1e-5, 1e-168, 5e-324])
def test_a_vanishing_temperature_samples_the_argmax(temperature):
    # logits / 1e-168 overflow to inf and the softmax to NaN without the floor (an API fuzzer found it)
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0], [0.5, -2.0, 0.25, 0.0]])
    probs = sampling_distribution(logits, SamplingParams(temperature=temperature))
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert next_token(logits, SamplingParams(temperature=temperature), generator=torch.Generator().manual_seed(0)).tolist() == [1, 0]

@pytest.mark.parametrize("penalty", [5e-324, 1e-40, 1e300])
@pytest.mark.parametrize("temperature", [1.0, 5e-324])
def test_an_extreme_repetition_penalty_gives_a_distribution(penalty, temperature):
    # logits / 5e-324 overflow to inf, and every seen negative logit * 1e300 to -inf: NaN without the
    # bounds (the API fuzzer sent temperature 5e-324 with repetition_penalty 5e-324)
    logits = torch.tensor([[1.0, 3.0, 2.9, -1.0], [-0.5, -2.0, -0.25, -3.0]])
    seen = torch.tensor([[False, True, False, False], [True, True, True, True]])
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty)
    probs = sampling_distribution(logits, params, seen)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))
    favoured = 1 if penalty < 1 else 2  # a penalty below 1 favours the seen token, above 1 the others
    assert probs[0].argmax() == favoured
    token = next_token(logits, params, seen, generator=torch.Generator().manual_seed(0))
    assert token.shape == (2,)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(min_p=1.0), dict(repetition_penalty=0), dict(max_new_tokens=0),
                                 dict(temperature=float("nan")), dict(stop=[""])])
def test_invalid_sampling_values(bad):
    with pytest.raises(Qwen2Error, match="invalid sampling parameter: " + next(iter(bad))):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def tiny():
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _steps(model, prompts, **kw):
    return [list(r) for r in zip(*[t.tolist() for t in decode_steps(model, prompts, SamplingParams(**kw))])]


def test_greedy_decode_equals_argmax_of_full_forward(tiny):
    prompt = [5, 17, 250, 3]
    out = _steps(tiny, [prompt], max_new_tokens=10)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(tiny(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]


def test_batch_equals_one_at_a_time(tiny):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 41, 42]]
    batched = _steps(tiny, prompts, max_new_tokens=12)
    assert batched == [_steps(tiny, [p], max_new_tokens=12)[0] for p in prompts]


def test_seed_makes_sampling_reproducible(tiny):
    kw = dict(max_new_tokens=20, temperature=1.5)
    assert _steps(tiny, [[1, 2]], seed=7, **kw) == _steps(tiny, [[1, 2]], seed=7, **kw)
    assert _steps(tiny, [[1, 2]], seed=7, **kw) != _steps(tiny, [[1, 2]], seed=8, **kw)


def test_context_length_and_empty_prompt_errors(tiny):
    with pytest.raises(Qwen2Error, match="exceeds the model's context length of 64"):
        next(decode_steps(tiny, [[1] * 60], SamplingParams(max_new_tokens=5)))
    with pytest.raises(Qwen2Error, match="empty prompt"):
        next(decode_steps(tiny, [[]], SamplingParams()))


@pytest.fixture(scope="module")
def tokenizer(real_gguf):
    from qwen2.checkpoint.registry import DEFAULT_MODEL, hf_dir
    from qwen2.tokenizer import Tokenizer

    return Tokenizer.from_dir(hf_dir(DEFAULT_MODEL, progress=False))


def _feed(stream, ids):
    return [stream.push(i) for i in ids]


def test_text_stream_stops_on_any_eos_and_hides_it(tokenizer):
    ids = tokenizer.encode("Hello world")
    for eos in (151645, 151643):
        s = TextStream(tokenizer, [151645, 151643], stop=[])
        text = "".join(_feed(s, ids + [eos] + tokenizer.encode(" more")))
        assert text == "Hello world" and s.finish_reason == "stop"


def test_text_stream_stop_string_across_tokens(tokenizer):
    ids = tokenizer.encode("def f():\n    return 1\n\n\ndef g():")
    s = TextStream(tokenizer, [151645], stop=["\n\n\n", "zzz"])
    pieces = _feed(s, ids)
    assert "".join(pieces) + s.close() == "def f():\n    return 1" and s.finish_reason == "stop"
    # nothing after the stop string was ever emitted, not even a prefix of it
    assert all("\n\n" not in p for p in pieces)


def test_text_stream_never_splits_a_character(tokenizer):
    text = "naïve 日本語 🚀👩‍💻 done"
    ids = tokenizer.encode(text)
    s = TextStream(tokenizer, [151645], stop=[])
    pieces = _feed(s, ids) + [s.close()]
    assert "".join(pieces) == text and s.finish_reason == "length"
    assert all("\ufffd" not in p for p in pieces)


def test_generate_text_is_the_decoded_tokens(tiny, tokenizer):
    """Without end tokens, exactly max_new_tokens tokens are generated and decoded."""
    tokens = _steps(tiny, [[1, 2, 3]], max_new_tokens=7)[0]
    assert len(tokens) == 7
    texts = generate_text(tiny, tokenizer, [[1, 2, 3]], SamplingParams(max_new_tokens=7), eos_ids=[])
    assert texts == [tokenizer.decode(tokens)]


def test_greedy_choice_is_argmax_with_ties_and_nan():
    from qwen2.runtime.generate import greedy_choice

    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (5, 151936), generator=gen).float()  # many ties: the first must win
    logits[1, 70000] = 9.0
    logits[2, 123] = float("nan")  # NaN counts as the largest, as in argmax
    logits[3, 5], logits[3, 6] = float("nan"), float("nan")
    assert torch.equal(greedy_choice(logits), logits.argmax(-1))
    assert greedy_choice(logits).tolist()[1:4] == [70000, 123, 5]


@pytest.mark.parametrize("top_p", [5e-324, 1e-50])
def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token(top_p):
    """A top_p below fp32's smallest number compares as 0: the most likely token must still stay
    (the server's schema fuzzing sent 5e-324 and sampling raised on an all-masked distribution)."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    params = SamplingParams(temperature=1.24, top_p=top_p)
    probs = sampling_distribution(logits, params)
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert next_token(logits, params).tolist() == [1]
