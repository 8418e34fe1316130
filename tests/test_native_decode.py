"""The native decode path: the decode attention (qwen2/kernels/decode_attention.cpp: RoPE, cache
write and attention of one-token steps in one call) against the PyTorch ops it replaces, and the
exactness it promises (a left-padded row equals the row alone bit for bit, a T-query call equals T
one-query calls); the decode block (qwen2/kernels/decode_block.cpp) bit for bit the eager block; the
native executor (qwen2/runtime/native.py) that runs them."""
import pytest
import torch
import torch.nn.functional as F

from ggufs import random_model
from qwen2 import kernels
from qwen2 import model as M
from qwen2 import quant as Q
from qwen2.runtime import native as N
from qwen2.runtime.executor import make_decoder
from qwen2.config import Qwen2Config


@pytest.fixture(scope="module")
def ops():
    ops = kernels.ops()
    assert ops is not None, f"the native kernels are expected on this machine: {kernels.status()}"
    return ops


def rope_tables(B, T, hs, gen):
    angles = torch.rand(B, T, hs // 2, generator=gen) * 50
    angles = torch.cat((angles, angles), -1)
    return angles.cos() * 1.1, angles.sin() * 1.1  # a YaRN-like attention factor folded in


def reference(q, k, v, cos, sin, cache_k, cache_v, start, key_mask):
    """What the eager path computes: RoPE, the cache write, SDPA over the slots each query may see."""
    B, T = q.shape[:2]
    q, k = M.apply_rope(q.transpose(1, 2), cos, sin), M.apply_rope(k.transpose(1, 2), cos, sin)
    cache_k[:, :, start:start + T], cache_v[:, :, start:start + T] = k, v.transpose(1, 2)
    S = start + T
    mask = torch.ones(T, S, dtype=torch.bool).tril(start)  # query t at slot start + t
    if key_mask is not None:
        mask = mask & key_mask[:, None, :, :S]
    return F.scaled_dot_product_attention(q, cache_k[:, :, :S], cache_v[:, :, :S], attn_mask=mask,
                                          enable_gqa=True)


@pytest.mark.parametrize("B,nh,nkv,T,start,hs,masked", [
    (1, 14, 2, 1, 600, 64, False),  # the 0.5B model's heads, one decode step
    (2, 12, 2, 1, 37, 128, True),  # the 1.5B model's, a padded batch
    (1, 4, 4, 3, 9, 16, False),  # MHA, speculative verification of 3 tokens
    (3, 6, 2, 2, 5, 32, True),
    (1, 2, 1, 1, 0, 16, False),  # the first token: attends to itself only
])
def test_equals_rope_cache_write_and_sdpa(ops, B, nh, nkv, T, start, hs, masked):
    gen = torch.Generator().manual_seed(B * 100 + start)
    q, k, v = (torch.randn(B, T, n, hs, generator=gen) for n in (nh, nkv, nkv))
    cos, sin = rope_tables(B, T, hs, gen)
    max_len = start + T + 5
    # the cache as the model holds it: one layer of an (L, B, nkv, max_len, hs) tensor
    cache = torch.randn(2, 2, B, nkv, max_len, hs, generator=gen)
    expected_k, expected_v = cache[0, 1].clone(), cache[1, 1].clone()
    key_mask = None
    if masked:
        key_mask = torch.rand(B, T, max_len, generator=gen) > 0.3
        key_mask[..., start:] = True  # the new tokens are real
    expected = reference(q, k, v, cos, sin, expected_k, expected_v, start, key_mask)
    got = ops.decode_attention(q, k, v, cos, sin, cache[0, 1], cache[1, 1], torch.full((B,), start), key_mask,
                               hs ** -0.5)
    assert got.shape == (B, nh, T, hs)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    # the cached keys are bit for bit those the eager path writes (prefill writes its keys that way)
    assert torch.equal(cache[0, 1], expected_k) and torch.equal(cache[1, 1], expected_v)


def test_a_padded_row_equals_the_row_alone_bit_for_bit(ops):
    gen = torch.Generator().manual_seed(0)
    nh, nkv, hs, n, pad = 6, 2, 32, 23, 9
    keys, values = torch.randn(nkv, n, hs, generator=gen), torch.randn(nkv, n, hs, generator=gen)
    q, k, v = torch.randn(1, 1, nh, hs, generator=gen), torch.randn(1, 1, nkv, hs, generator=gen), \
        torch.randn(1, 1, nkv, hs, generator=gen)
    cos, sin = rope_tables(1, 1, hs, gen)
    alone_k, alone_v = torch.zeros(1, nkv, n + 1, hs), torch.zeros(1, nkv, n + 1, hs)
    alone_k[0, :, :n], alone_v[0, :, :n] = keys, values
    alone = ops.decode_attention(q, k, v, cos, sin, alone_k, alone_v, torch.tensor([n]), None, hs ** -0.5)
    padded_k, padded_v = torch.randn(1, nkv, pad + n + 1, hs), torch.randn(1, nkv, pad + n + 1, hs)  # junk in the pad
    padded_k[0, :, pad:pad + n], padded_v[0, :, pad:pad + n] = keys, values
    mask = torch.ones(1, 1, pad + n + 1, dtype=torch.bool)
    mask[..., :pad] = False
    padded = ops.decode_attention(q, k, v, cos, sin, padded_k, padded_v, torch.tensor([pad + n]), mask, hs ** -0.5)
    assert torch.equal(padded, alone)


def test_t_queries_equal_t_one_query_calls_bit_for_bit(ops):
    gen = torch.Generator().manual_seed(1)
    nh, nkv, hs, start, T = 4, 2, 64, 11, 5
    q, k, v = (torch.randn(1, T, n, hs, generator=gen) for n in (nh, nkv, nkv))
    cos, sin = rope_tables(1, T, hs, gen)
    cache = torch.randn(2, 1, nkv, start + T, hs, generator=gen)
    stepped = cache.clone()
    together = ops.decode_attention(q, k, v, cos, sin, cache[0], cache[1], torch.tensor([start]), None, 0.125)
    steps = [ops.decode_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1],
                                  stepped[0], stepped[1], torch.tensor([start + t]), None, 0.125) for t in range(T)]
    assert torch.equal(together, torch.cat(steps, 2)) and torch.equal(cache, stepped)


def test_bad_input_is_refused(ops):
    q, kv = torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 2, 16)
    cos = torch.zeros(1, 1, 16)
    cache = torch.zeros(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="do not fit the cache"):
        ops.decode_attention(q, kv, kv, cos, cos, cache, cache.clone(), torch.tensor([8]), None, 0.25)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.decode_attention(q[..., :8], kv[..., :8], kv[..., :8], cos[..., :8], cos[..., :8], cache[..., :8],
                             cache[..., :8].clone(), torch.tensor([0]), None, 0.25)


# ---- in the model --------------------------------------------------------------------------------

def tiny(seed=0, intermediate_size=96):
    return random_model(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=intermediate_size,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, bos_token_id=None, eos_token_id=None), seed)


def decode(model, ids, mask=None, steps=5):
    """Prefill, then `steps` greedy steps; each step's logits (B, steps, V)."""
    out = []
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
        logits = model(ids, attention_mask=mask, cache=cache, last_only=True)
        for _ in range(steps):
            out.append(logits[:, -1])
            logits = model(logits[:, -1].argmax(-1)[:, None], cache=cache)
    return torch.stack(out, 1)


def count_native_calls(monkeypatch) -> list:
    calls = []
    real = N.NativeDecoder.takes

    def spy(self, input_ids, cache):
        calls.append(real(self, input_ids, cache))
        return calls[-1]
    monkeypatch.setattr(N.NativeDecoder, "takes", spy)
    return calls


def test_model_decode_takes_the_native_path_and_equals_the_pytorch_one(monkeypatch):
    model = tiny()
    ids = torch.randint(0, 300, (2, 9))
    calls = count_native_calls(monkeypatch)
    native = decode(make_decoder(model, "native"), ids)
    # every decode step, once for both layers (the executor asks, then runs them all); the prefill not
    assert calls.count(True) == 5 and calls.count(False) == 1
    torch.testing.assert_close(native, decode(model, ids), rtol=0, atol=1e-5)  # the model itself: PyTorch ops


def test_model_padded_batch_decodes_bit_for_bit_as_each_row_alone():
    # quantised: the native linears compute each row alone too (fp32 GEMMs may round a 2-row batch
    # differently from one row)
    quantised = Q.quantize_model(tiny(1, intermediate_size=128), "int4")
    assert all(layer.kernel_ok for layer in Q.quantized_linears(quantised).values())
    model = make_decoder(quantised, "native")
    ids = torch.randint(0, 300, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    batch = decode(model, ids, mask)
    # the prefill (SDPA over a padded batch) may differ in the last bit; compare from the cache on
    with torch.inference_mode():
        for row, start in ((0, 0), (1, 3)):
            cache = model.new_cache(2, 16)
            cache_alone = model.new_cache(1, 16)
            model(ids, attention_mask=mask, cache=cache, last_only=True)
            model(ids[row:row + 1, start:], cache=cache_alone, last_only=True)
            # give both the same cached prefix (the batch's), then decode the same tokens
            cache_alone.k[:, 0, :, :8 - start] = cache.k[:, row, :, start:8]
            cache_alone.v[:, 0, :, :8 - start] = cache.v[:, row, :, start:8]
            tokens = batch[row].argmax(-1)
            for t in range(tokens.shape[0]):
                together = model(tokens[t].expand(2)[:, None], cache=cache)[row, -1]
                alone = model(tokens[t].view(1, 1), cache=cache_alone)[0, -1]
                assert torch.equal(together, alone)


def test_grad_and_compile_keep_the_pytorch_path():
    model = tiny()
    decoder = make_decoder(model, "native")
    cache = model.new_cache(1, 8)
    step = torch.zeros(1, 1, dtype=torch.long)
    with torch.enable_grad():
        assert not decoder.takes(step, cache)  # autograd: the native op has no backward
    with torch.no_grad():
        assert decoder.takes(step, cache)
        assert not decoder.takes(torch.zeros(1, 3, dtype=torch.long), cache)  # a prefill chunk
        cache.exact_rows = True
        assert decoder.takes(torch.zeros(1, 3, dtype=torch.long), cache)  # verification rows
    narrow = random_model(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None))
    assert "head_dim 8" in N.unavailable_reason(narrow)  # head_dim 8: the ops take multiples of 16
    assert make_decoder(narrow).name == "eager"


# ---- the whole block in one call ------------------------------------------------------------------

def spy_ops(decoder) -> dict:
    """Count the native ops `decoder` calls from now on."""
    counts = {"decode_layers": 0, "decode_block": 0, "decode_attention": 0}
    real = decoder.ops

    class Counting:
        def __getattr__(self, name):
            op = getattr(real, name)
            if name not in counts:
                return op

            def call(*args):
                counts[name] += 1
                return op(*args)
            return call
    decoder.ops = Counting()
    return counts


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_native_layers_and_blocks_equal_the_eager_blocks_bit_for_bit(monkeypatch, mode):
    model = tiny(3, intermediate_size=128)
    if mode:
        model = Q.quantize_model(model, mode)
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # a padded row: the mask reaches the block's attention
    decoder = make_decoder(model, "native")
    layers = spy_ops(decoder)
    all_layers = decode(decoder, ids, mask)
    assert layers["decode_layers"] == 5  # every decode step: both layers in one decode_layers call
    monkeypatch.setattr(N.NativeDecoder, "one_call", lambda self, x, weights, masks: False)
    decoder = make_decoder(model, "native")
    blocks = spy_ops(decoder)
    block_by_block = decode(decoder, ids, mask)
    assert blocks["decode_block"] == 5 * 2  # every decode step of both layers: decode_block
    monkeypatch.setattr(N, "block_weights", lambda block, rows: None)  # no native block: its own modules
    decoder = make_decoder(model, "native")
    attention_only = spy_ops(decoder)
    eager = decode(decoder, ids, mask)
    assert attention_only["decode_attention"] == 5 * 2 and attention_only["decode_block"] == 0
    assert torch.equal(all_layers, eager) and torch.equal(block_by_block, eager)


def test_quantised_linear_layout_follows_its_settings():
    """The native layout a quantised linear keeps for decode is rebuilt when a setting changes."""
    layer = Q.quantize_model(tiny(6, intermediate_size=128), "int4").model.layers[0].self_attn.q_proj
    kind, group_size, digits, tensors = N.native_linear(layer, 1)
    assert (group_size, digits) == (32, 2) and tensors[0] is layer.weight
    assert N.native_linear(layer, layer.gemm_rows) is None  # a prefill: forward dequantises
    layer.activation_digits = 1
    assert N.native_linear(layer, 1)[2] == 1
    layer.backend = "kernel"
    assert N.native_linear(layer, layer.gemm_rows) is not None
    layer.backend = "reference"
    assert N.native_linear(layer, 1) is None
    layer.backend = "auto"
    layer.weight = layer.weight.clone()
    assert N.native_linear(layer, 1)[3][0] is layer.weight


def test_native_block_verifies_speculation_rows_as_steps(monkeypatch):
    """exact_rows: T new tokens through the block give each one's one-token step, bit for bit."""
    model = make_decoder(Q.quantize_model(tiny(4, intermediate_size=128), "int4"), "native")
    ids = torch.randint(0, 300, (1, 12))
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        model(ids[:, :8], cache=cache)
        cache.exact_rows = True
        together = model(ids[:, 8:], cache=cache)
        cache.rewind(4)
        cache.exact_rows = False
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(8, 12)], 1)
    assert torch.equal(together, steps)


def test_native_block_steps_aside_where_it_does_not_apply():
    model = Q.quantize_model(tiny(5, intermediate_size=128), "int4")
    decoder = make_decoder(model, "native")
    block = model.model.layers[0]
    cache = model.new_cache(1, 8)
    with torch.inference_mode():
        assert N.block_weights(block, 1) is not None
        assert not decoder.takes(torch.zeros(1, 3, dtype=torch.long), cache)  # prefill
        Q.set_backend(model, "reference")  # a linear off its native kernel: the eager block
        assert N.block_weights(block, 1) is None
        Q.set_backend(model, "auto")
        block.mlp.up_proj = torch.nn.Sequential(block.mlp.up_proj)  # a wrapper (LoRA-like) it cannot see into
        assert N.block_weights(block, 1) is None
