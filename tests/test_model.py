"""The decoder against transformers' Qwen2ForCausalLM on the same random weights (litgpt's
`test_against_original_*` habit), and the KV cache against a full forward."""
import pytest
import torch

from qwen2.config import Qwen2Config, named_config
from qwen2.model import KVCache, Transformer, parameter_counts

transformers = pytest.importorskip("transformers")

TINY_CONFIGS = {
    # name: (fields); vocab sizes deliberately not multiples of 64
    "tied-gqa2": dict(vocab_size=1003, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "untied-mha": dict(vocab_size=517, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa7-hs18": dict(vocab_size=999, hidden_size=126, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=7, num_key_value_heads=1, tie_word_embeddings=True),
    "hs-override-40": dict(vocab_size=777, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=3, head_dim=40, tie_word_embeddings=False,
                           rope_theta=10000.0, rms_norm_eps=1e-5),
}


def make_pair(fields):
    """Our model and transformers' with identical random weights (ours -> HF via state_dict)."""
    config = Qwen2Config(**fields, max_position_embeddings=256, bos_token_id=None, eos_token_id=None)
    ours = Transformer(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)  # larger than init so differences in the math would show
    hf_config = transformers.Qwen2Config(**config.to_hf_dict())
    theirs = transformers.Qwen2ForCausalLM(hf_config).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if config.tie_word_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    return ours, theirs


def left_padded_batch(vocab_size, lengths):
    T = max(lengths)
    ids = torch.randint(0, vocab_size, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
        ids[row, :T - n] = 0
    return ids, mask


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_against_original_padded_batch(name):
    ours, theirs = make_pair(TINY_CONFIGS[name])
    ids, mask = left_padded_batch(ours.config.vocab_size, [11, 7, 3])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF generate passes for left padding
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() <= 1e-4
    # a padded row equals the same tokens alone
    with torch.no_grad():
        alone = ours(ids[1:2, -7:])
    assert (got[1, -7:] - alone[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_against_original_unpadded(name):
    ours, theirs = make_pair(TINY_CONFIGS[name])
    ids = torch.randint(0, ours.config.vocab_size, (2, 13))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_kv_cache_incremental_equals_full_forward(name):
    ours, _ = make_pair(TINY_CONFIGS[name])
    ids, mask = left_padded_batch(ours.config.vocab_size, [9, 5])
    extra = torch.randint(0, ours.config.vocab_size, (2, 6))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        full = ours(full_ids, attention_mask=full_mask)
        cache = ours.new_cache(batch_size=2, max_len=32)
        steps = [ours(ids, attention_mask=mask, cache=cache)]
        steps.append(ours(extra[:, :2], cache=cache))  # a chunk after a cached prefix
        for t in range(2, 6):
            steps.append(ours(extra[:, t:t + 1], cache=cache))  # token by token
    incremental = torch.cat(steps, 1)
    real = full_mask.bool()
    assert cache.length == full_ids.shape[1]
    assert (incremental - full)[real].abs().max().item() <= 1e-4


def test_kv_cache_overflow_is_an_error():
    ours, _ = make_pair(TINY_CONFIGS["tied-gqa2"])
    cache = ours.new_cache(batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        ours(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_gqa_does_not_repeat_kv(monkeypatch):
    """GQA must reach SDPA with nkv heads and enable_gqa, never materialised repeats."""
    ours, _ = make_pair(TINY_CONFIGS["gqa7-hs18"])
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1], kw.get("enable_gqa")))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        ours(torch.zeros(1, 4, dtype=torch.long))
    assert seen and all(s == (7, 1, True) for s in seen)


@pytest.mark.parametrize("name, total, non_embedding", [
    ("Qwen2.5-0.5B", 0.49e9, 0.36e9), ("Qwen2.5-1.5B", 1.54e9, 1.31e9), ("Qwen2.5-7B", 7.61e9, 6.53e9)])
def test_parameter_counts_are_the_model_cards(name, total, non_embedding):
    """The Qwen2.5 model cards' counts (printed to 10M), tied (0.5B, 1.5B) and untied (7B)."""
    counts = parameter_counts(named_config(name))
    assert counts["total"] == pytest.approx(total, abs=1e7)
    assert counts["non_embedding"] == pytest.approx(non_embedding, abs=1e7)
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]


def test_parameter_counts_count_a_tied_head_once():
    config = Qwen2Config(**TINY_CONFIGS["tied-gqa2"])
    counts = parameter_counts(config)
    assert counts["total"] == sum(p.numel() for p in Transformer(config).parameters())
    assert counts["embedding"] == config.vocab_size * config.hidden_size
