"""Speculative decoding (qwen2/runtime/speculative.py): whatever the drafter proposes, the tokens are plain
greedy decoding's. Tiny random models for the mechanics, the real 0.5B model on a code-editing
prompt for the acceptance rate that makes it worth doing."""
import pathlib

import pytest
import torch

from qwen2 import cli
from qwen2.api import Qwen2
from qwen2.config import Qwen2Config
from qwen2.errors import Qwen2Error
from qwen2.runtime.generate import SamplingParams, decode_steps, generate_text
from qwen2.model import Transformer
from qwen2.runtime.speculative import (DraftModelDrafter, Drafter, PromptLookupDrafter, SpeculationStats, speculative_steps,
                               steps_with)


def tiny_model(seed: int, vocab_size: int = 94, context: int = 256, tie: bool = False) -> Transformer:
    # vocab 94: ids 0..93 are the printable ASCII characters in Qwen2's tokenizer, so text tests
    # decode every token to exactly one character
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def target():
    return tiny_model(1)


@pytest.fixture(scope="module")
def other():
    return tiny_model(2)


def plain(model, prompt, n):
    return [int(t) for t in decode_steps(model, [prompt], SamplingParams(max_new_tokens=n))]


def speculate(model, prompt, n, drafter):
    out = []
    for t in speculative_steps(model, prompt, SamplingParams(max_new_tokens=n), drafter):
        assert t.dtype == torch.long and t.shape == (1,)
        out.append(int(t))
    return out


def check_stats(stats: SpeculationStats, n: int):
    assert stats.generated == n
    assert stats.generated == 1 + stats.accepted + stats.verify_forwards + stats.plain_forwards
    assert 0 <= stats.accepted <= stats.proposed


class WrongDrafter(Drafter):
    """Proposes k tokens that are all wrong: the first differs from the target's next token."""

    def __init__(self, expected, num_draft_tokens):
        super().__init__(num_draft_tokens)
        self.expected, self.prompt_len = expected, 0

    def start(self, target, prompt, max_len):
        self.prompt_len = len(prompt)

    def propose(self, tokens, k):
        nxt = self.expected[len(tokens) - self.prompt_len]
        return [(nxt + 1 + i) % 94 for i in range(k)]


# ---- KVCache.rewind ------------------------------------------------------------------------------

def test_rewind_then_refeed_equals_never_fed(target):
    prompt, rejected, kept = torch.tensor([[5, 17, 80, 3, 9, 44]]), torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[7, 8, 60]])
    with torch.no_grad():
        fresh = target.new_cache(1, 32)
        target(prompt, cache=fresh)
        expected = target(kept, cache=fresh)

        cache = target.new_cache(1, 32)
        target(prompt, cache=cache)
        target(rejected, cache=cache)
        cache.rewind(5)
        assert cache.length == 6 and cache.positions.tolist() == [6] and cache.valid.sum() == 6
        cache.rewind(0)
        assert cache.length == 6
        got = target(kept, cache=cache)
    assert torch.equal(got, expected)
    assert cache.length == fresh.length and torch.equal(cache.valid, fresh.valid)
    assert torch.equal(cache.positions, fresh.positions)
    with pytest.raises(ValueError, match="cannot rewind 10 slots"):
        cache.rewind(10)


def test_rewind_left_padded_batch(target):
    ids = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        fresh = target.new_cache(2, 16)
        target(ids, attention_mask=mask, cache=fresh)
        expected = target(torch.tensor([[30, 31], [40, 41]]), cache=fresh)
        cache = target.new_cache(2, 16)
        target(ids, attention_mask=mask, cache=cache)
        target(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)
        cache.rewind(3)
        assert cache.positions.tolist() == [2, 4]
        got = target(torch.tensor([[30, 31], [40, 41]]), cache=cache)
    assert torch.equal(got, expected)


# ---- identity with plain greedy decoding ---------------------------------------------------------

@pytest.fixture(scope="module")
def copier():
    """A random model made to continue a fixed chain t -> (7t + 3) mod 94: its embeddings dominate
    the residual stream and the output layer maps each token's embedding to its successor. Random
    models babble without repeating, so prompt lookup would have nothing to find."""
    model = tiny_model(6)
    succ = (torch.arange(94) * 7 + 3) % 94
    with torch.no_grad():
        e = model.model.embed_tokens.weight
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[succ] = e / e.pow(2).mean(-1, keepdim=True).sqrt()
        e.mul_(25)
    return model, succ.tolist()


def test_prompt_lookup_on_a_repeating_prompt(copier):
    model, succ = copier
    chain = [5]
    while len(chain) < 31:
        chain.append(succ[chain[-1]])
    prompt = chain + [60, 61, 62] + chain[:3]  # the model continues the chain the prompt holds
    expected = plain(model, prompt, 60)
    assert expected[:5] == chain[3:8]
    drafter = PromptLookupDrafter(max_ngram=3, num_draft_tokens=10)
    assert speculate(model, prompt, 60, drafter) == expected
    s = drafter.stats
    check_stats(s, 60)
    assert s.accepted >= 25 and s.verify_forwards <= 10, s  # drafts really were accepted, blocks at a time


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("n", [1, 2, 5, 33])
def test_prompt_lookup_on_a_prompt_without_repeats(target, k, n):
    prompt = [1, 9, 44, 70, 23, 8]
    drafter = PromptLookupDrafter(max_ngram=3, num_draft_tokens=k)
    assert speculate(target, prompt, n, drafter) == plain(target, prompt, n)
    check_stats(drafter.stats, n)


def test_draft_model_equal_to_the_target_accepts_everything(target):
    prompt = [3, 14, 15, 92, 65]
    drafter = DraftModelDrafter(target, num_draft_tokens=4)
    assert speculate(target, prompt, 41, drafter) == plain(target, prompt, 41)
    s = drafter.stats
    check_stats(s, 41)
    assert s.accepted == s.proposed == 32 and s.verify_forwards == 8 and s.plain_forwards == 0  # 5 tokens each


def test_different_draft_model_is_mostly_rejected(target, other):
    prompt = [3, 14, 15, 92, 65]
    drafter = DraftModelDrafter(other, num_draft_tokens=5)
    assert speculate(target, prompt, 40, drafter) == plain(target, prompt, 40)
    check_stats(drafter.stats, 40)
    assert drafter.stats.acceptance_rate < 0.5
    # the draft's cache is rewound and reused across steps: it never holds more than the sequence
    assert drafter.cache.length <= len(prompt) + 40


def test_drafter_always_wrong(target):
    prompt = [7, 7, 30, 2]
    expected = plain(target, prompt, 25)
    drafter = WrongDrafter(expected, num_draft_tokens=6)
    assert speculate(target, prompt, 25, drafter) == expected
    s = drafter.stats
    check_stats(s, 25)
    # one token per forward; the last step has no room for a draft (max_new_tokens caps it)
    assert s.accepted == 0 and s.verify_forwards == 23 and s.plain_forwards == 1 and s.proposed == 6 * 18 + 15


def test_drafter_reused_across_runs_resets_stats(target):
    drafter = DraftModelDrafter(target, num_draft_tokens=3)
    for prompt in ([1, 2, 3], [50, 60, 70, 80, 90]):
        assert speculate(target, prompt, 12, drafter) == plain(target, prompt, 12)
        check_stats(drafter.stats, 12)


# ---- text: eos ids and stop strings inside an accepted block -------------------------------------

@pytest.fixture(scope="module")
def tokenizer(real_gguf):
    from qwen2.checkpoint.registry import DEFAULT_MODEL, hf_dir
    from qwen2.tokenizer import Tokenizer

    return Tokenizer.from_dir(hf_dir(DEFAULT_MODEL, progress=False))


def test_eos_and_stop_inside_an_accepted_block(target, tokenizer):
    prompt = [3, 14, 15, 92, 65]
    tokens = plain(target, prompt, 40)
    full = tokenizer.decode(tokens)
    assert len(full) == 40  # one character per token
    # With the target drafting for itself and k = 10, tokens 1..11 and 12..22 each come from one
    # verify forward; pick an end token / stop string first seen at token 16, mid-block.
    at = next(i for i in range(13, 21) if tokens[i] not in tokens[:i] and full.find(full[i:i + 2]) == i)
    stop = full[at:at + 2]
    for eos_ids, stop_strings in (([tokens[at]], []), ([], [stop]), ([tokens[at]], [stop])):
        params = SamplingParams(max_new_tokens=40, stop=stop_strings)
        expected = generate_text(target, tokenizer, [prompt], params, eos_ids)
        drafter = DraftModelDrafter(target, num_draft_tokens=10)
        got = generate_text(target, tokenizer, [prompt], params, eos_ids, steps=steps_with(drafter))
        assert got == expected == [full[:at]]
        assert drafter.stats.accepted == drafter.stats.proposed > 0


# ---- the API and the CLI -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_api(tokenizer):
    """A Qwen2 object on a tiny model with the real vocabulary, so real text round-trips."""
    return Qwen2(tiny_model(3, vocab_size=151936, tie=True), tokenizer, source="tiny")


def test_api_generate_and_chat(tiny_api):
    prompt = "def f(x):\n    return x + 1\n\ndef f(x):\n    return x + 1\n"
    expected = tiny_api.generate(prompt, max_new_tokens=30)
    assert tiny_api.generate(prompt, max_new_tokens=30, speculative="prompt-lookup", num_draft_tokens=4) == expected
    assert tiny_api.generate(prompt, max_new_tokens=30, draft_model=tiny_api) == expected
    assert "".join(tiny_api.generate(prompt, max_new_tokens=30, stream=True, speculative="prompt-lookup")) == expected
    drafter = PromptLookupDrafter(max_ngram=2, num_draft_tokens=5)
    assert tiny_api.generate(prompt, max_new_tokens=30, speculative=drafter) == expected
    check_stats(drafter.stats, 30)
    messages = [{"role": "user", "content": "hi"}]
    assert tiny_api.chat(messages, max_new_tokens=12, speculative="prompt-lookup") == tiny_api.chat(messages, max_new_tokens=12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(speculative="prompt-lookup", temperature=0.7), "speculative decoding is greedy only"),
    (dict(speculative="prompt-lookup", repetition_penalty=1.1), "speculative decoding is greedy only"),
    (dict(speculative="medusa"), "unknown speculative method 'medusa'"),
    (dict(speculative=3), "speculative must be one of prompt-lookup or a Drafter"),
    (dict(speculative="prompt-lookup", num_draft_tokens=0), "num_draft_tokens must be an integer >= 1"),
    (dict(num_draft_tokens=4), "num_draft_tokens needs speculative='prompt-lookup' or a draft_model"),
    (dict(speculative="prompt-lookup", draft_model="x"), "either speculative='prompt-lookup' or draft_model"),
    (dict(draft_model=42), "draft_model must be a Qwen2 from qwen2.load"),
    (dict(speculative="prompt-lookup", max_new_tokens=300), "exceeds the model's context length of 256"),
])
def test_api_errors(tiny_api, kwargs, message):
    with pytest.raises(Qwen2Error, match=message):
        tiny_api.generate("abc " * 20, **kwargs)


def test_batch_and_vocabulary_errors(tiny_api, target, other):
    with pytest.raises(Qwen2Error, match="speculative decoding takes one prompt, not a list"):
        tiny_api.generate(["a", "b"], speculative="prompt-lookup")
    with pytest.raises(Qwen2Error, match=r"draft model's vocabulary \(151936 rows\) is larger than the target's \(94\)"):
        next(speculative_steps(target, [1, 2], SamplingParams(max_new_tokens=8), DraftModelDrafter(tiny_api.model)))
    small = tiny_model(4, context=16)
    with pytest.raises(Qwen2Error, match="exceeds the draft model's context length of 16"):
        next(speculative_steps(target, [1, 2], SamplingParams(max_new_tokens=20), DraftModelDrafter(small)))
    with pytest.raises(Qwen2Error, match="empty prompt"):
        next(speculative_steps(target, [], SamplingParams(), PromptLookupDrafter()))


# ---- drafts with fewer vocabulary rows ------------------------------------------------------------

def test_a_draft_with_fewer_vocabulary_rows_gives_the_targets_greedy_tokens():
    """Qwen2's small models pad the vocabulary to 151,936 rows, the 7B/72B to 152,064: the target here
    is a random model with 152,064 rows whose last 128 win its argmax now and then, the draft the same
    weights cut to 151,936 rows. The draft never proposes those ids and reads them as token 0 when the
    target emits them; the output is still exactly the target's greedy decode."""
    target = tiny_model(5, vocab_size=152064)
    with torch.no_grad():
        target.lm_head.weight[151936:] *= 1.3
    draft = tiny_model(5, vocab_size=151936)
    draft.load_state_dict({k: v[:151936] if v.shape[0] == 152064 else v for k, v in target.state_dict().items()})
    prompt = [5, 17, 80, 3, 9, 44]
    expected = plain(target, prompt, 40)
    assert any(t >= 151936 for t in expected)  # the target does emit ids the draft has no row for
    drafter = DraftModelDrafter(draft, num_draft_tokens=4)
    assert speculate(target, prompt, 40, drafter) == expected
    check_stats(drafter.stats, 40)
    assert drafter.stats.accepted > 0


def test_api_takes_a_draft_with_the_same_tokenizer_and_fewer_rows(tiny_api, tokenizer):
    big = tiny_model(3, vocab_size=152064, tie=True)
    big.load_state_dict({k: torch.cat([v, v[:128]]) if v.shape[0] == 151936 else v
                         for k, v in tiny_api.model.state_dict().items()}, strict=False)
    target = Qwen2(big, tokenizer, source="tiny-152064")
    expected = target.generate("def f(x):\n", max_new_tokens=20)
    assert target.generate("def f(x):\n", max_new_tokens=20, draft_model=tiny_api) == expected


# ---- the real model -------------------------------------------------------------------------------

EDIT_SOURCE = (pathlib.Path(__file__).parent / "data" / "code_edit_function.py.txt").read_text()

EDIT_MESSAGES = [{"role": "user", "content": "Rewrite this function so that it uses `logging.info` instead of "
                  "`print`. Reply with the complete updated function only.\n\n```python\n" + EDIT_SOURCE + "```"}]


@pytest.mark.real_model
def test_real_model_prompt_lookup_on_code_editing(real_model):
    prompt = real_model.tokenizer.apply_chat_template(EDIT_MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = real_model.tokenizer.encode(prompt)
    expected = plain(real_model.model, ids, 64)
    drafter = PromptLookupDrafter(max_ngram=3, num_draft_tokens=10)
    assert speculate(real_model.model, ids, 64, drafter) == expected
    s = drafter.stats
    check_stats(s, 64)
    print(f"\nprompt-lookup on the real 0.5B model: {s.accepted}/{s.proposed} draft tokens accepted "
          f"({s.acceptance_rate:.0%}), {s.target_forwards} target forwards for 64 tokens")
    assert s.accepted >= 32 and s.target_forwards <= 32


@pytest.mark.real_model
def test_real_int4_model_prompt_lookup_equals_its_plain_greedy(real_int4):
    """With quantised linears the kernel rounds activations to int8, which turns last-bit differences
    between a multi-token verify forward and one-token steps into different logits: before verify
    attended row by row (`KVCache.exact_rows`), this 512-token prompt diverged at token 78 of 128."""
    int4 = real_int4
    # a code review request with code, a table and a log (the speed benchmarks' prompt), cut at 512 tokens
    text = (pathlib.Path(__file__).parent / "data" / "review_prompt.txt").read_text(encoding="utf-8")
    ids = list(int4.tokenizer.encode(text))[:512]
    expected = plain(int4.model, ids, 128)
    drafter = PromptLookupDrafter(max_ngram=3, num_draft_tokens=10)
    assert speculate(int4.model, ids, 128, drafter) == expected
    assert drafter.stats.accepted >= 20, drafter.stats


@pytest.mark.real_model
def test_cli_speculative(real_model, monkeypatch, capsys):
    import qwen2.api

    monkeypatch.setattr(cli.model_args, "load_model", lambda args: real_model)
    monkeypatch.setattr(qwen2.api, "load", lambda source, **kw: real_model)  # --draft-model loads through it
    expected = real_model.generate("def add(a, b):", max_new_tokens=12)
    for flags in (["--speculative", "prompt-lookup"], ["--draft-model", "x", "--num-draft-tokens", "3"]):
        assert cli.main(["generate", "def add(a, b):", "--max-new-tokens", "12", *flags]) == 0
        assert capsys.readouterr().out == expected + "\n"
    assert cli.main(["chat", "hi", "--speculative", "prompt-lookup", "--temperature", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: speculative decoding is greedy only") and err.count("\n") == 1


@pytest.mark.real_model
def test_the_real_0_5b_drafts_for_the_real_1_5b_padded_to_the_7bs_vocabulary(real_gguf_1_5b, tmp_path):
    """The real Qwen2.5-Coder-0.5B (151,936 rows) drafts for the real 1.5B with its embedding and lm_head
    padded to 152,064 rows, the 7B/72B's (benchmarks/experiments/draft_vocab_padding.py, one prompt, int4):
    the padded 1.5B's greedy tokens equal the unpadded one's, speculative decoding and the API with
    draft_model= give exactly those, the draft never proposes a row it lacks, and its drafts are used."""
    from benchmarks.experiments import draft_vocab_padding as experiment

    results = experiment.main(["--prompts", "1", "--new-tokens", "12", "--out", str(tmp_path / "padding.json")])
    (row,) = results["rows"]
    assert (results["real_rows"], results["padded_rows"]) == (151936, 152064)
    assert row["padded_equals_unpadded"] and row["speculative_equals_plain"] and row["api_text_equals_plain"]
    assert 0 <= row["largest_drafted_id"] < 151936 and row["accepted"] > 0
