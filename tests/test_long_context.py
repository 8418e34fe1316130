"""Long context (qwen2/long_context.py; qwen2/model/yarn.py, rope.py, dca.py, masks.py): YaRN against
transformers' YaRN, dynamic YaRN against plain RoPE and static YaRN, sliding-window attention against transformers, and Dual Chunk Attention
against a slow reference that builds the full query/key position matrices explicitly."""
import dataclasses
import json
import math

import pytest
import torch

import qwen2
from qwen2 import long_context as lc
from qwen2.model import cache as cache_module
from qwen2.model import dca as DCA
from qwen2.model.yarn import rope_frequencies
from qwen2.cli import build_parser
from qwen2.config import Qwen2Config
from qwen2.errors import Qwen2Error
from qwen2.model import RotaryEmbedding, StaticKV, Transformer, apply_rope

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

TINY = dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=None,
            eos_token_id=None)


def tiny_config(**changes) -> Qwen2Config:
    return Qwen2Config(**{**TINY, "max_position_embeddings": 64, **changes})


def random_weights(model: Transformer, seed: int = 0) -> Transformer:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def ours_with(config: Qwen2Config, seed: int = 0) -> Transformer:
    return random_weights(Transformer(config), seed)


def hf_twin(ours: Transformer):
    theirs = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**ours.config.to_hf_dict())).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return theirs


def yarn(factor, original, **more) -> dict:
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original, **more}


# --- YaRN -------------------------------------------------------------------------------------
YARN_CASES = [
    # (head_dim, theta, rope_scaling, max_position_embeddings)
    (64, 1e6, yarn(4.0, 32768), 131072),  # the Qwen2.5 model cards' setting
    (64, 1e6, {"type": "yarn", "factor": 2, "original_max_position_embeddings": 32768}, 32768),  # legacy key, int
    (128, 1e6, yarn(8.0, 4096, beta_fast=16, beta_slow=2), 32768),
    (40, 1e4, yarn(3.5, 64, truncate=False), 224),
    (18, 1e4, yarn(4.0, 16, attention_factor=1.25), 64),
    (64, 1e6, yarn(16.0, 2048, mscale=0.9, mscale_all_dim=0.6), 32768),
    (64, 1e6, yarn(1.0, 32768), 32768),  # factor 1: no interpolation, attention factor 1
]


@pytest.mark.parametrize("hs,theta,scaling,context", YARN_CASES)
def test_yarn_inv_freq_and_attention_factor_equal_transformers(hs, theta, scaling, context):
    config = Qwen2Config(hidden_size=hs * 2, num_attention_heads=2, num_key_value_heads=1, rope_theta=theta,
                         max_position_embeddings=context, rope_scaling=dict(scaling))
    inv_freq, factor = rope_frequencies(config)
    hf_config = transformers.Qwen2Config(**config.to_hf_dict())
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    assert inv_freq.shape == hf_inv_freq.shape == (hs // 2,)
    assert (inv_freq - hf_inv_freq).abs().max().item() <= 1e-5 * hf_inv_freq.abs().max().item()
    assert float(factor) == pytest.approx(float(hf_factor), abs=1e-6)  # floats: pytest 9.2's approx takes no 0-d tensor
    plain, _ = rope_frequencies(config, scaled=False)
    if scaling["factor"] > 1:
        # high frequencies kept, the lowest divided by the factor: the NTK-by-parts shape
        assert inv_freq[0] == plain[0]
        assert inv_freq[-1].item() == pytest.approx(plain[-1].item() / scaling["factor"], rel=1e-5)
    if "attention_factor" not in scaling and "mscale" not in scaling:
        assert factor == pytest.approx(0.1 * math.log(scaling["factor"]) + 1 if scaling["factor"] > 1 else 1.0)


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_yarn_logits_equal_transformers(factor):
    original = 16
    ours = ours_with(tiny_config(max_position_embeddings=int(original * factor), rope_scaling=yarn(factor, original)))
    theirs = hf_twin(ours)
    assert ours.rope.attention_factor == pytest.approx(0.1 * math.log(factor) + 1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))  # beyond the original 16 positions
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
        # ... and through the KV cache, token by token after a prefill
        cache = ours.new_cache(2, 40)
        steps = [ours(ids[:, :20], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(20, 40)]
        assert (torch.cat(steps, 1) - theirs(ids).logits).abs().max().item() <= 1e-4
    plain = ours_with(tiny_config())
    with torch.no_grad():
        assert (plain(ids) - ours(ids)).abs().max().item() > 1e-2  # the scaling does change the numbers


def test_dynamic_yarn_is_plain_rope_within_the_trained_length_and_yarn_beyond():
    original, factor = 24, 4.0
    plain = ours_with(tiny_config(max_position_embeddings=original))
    static = ours_with(tiny_config(rope_scaling=yarn(factor, original)))
    dynamic = ours_with(tiny_config(rope_scaling=yarn(factor, original, dynamic=True)))
    short = torch.randint(0, TINY["vocab_size"], (2, original))
    long = torch.randint(0, TINY["vocab_size"], (2, original + 9))
    with torch.no_grad():
        assert torch.equal(dynamic(short), plain(short))
        assert torch.equal(dynamic(long), static(long))
        assert (static(short) - plain(short)).abs().max().item() > 1e-2  # static YaRN changes short inputs
        # With a cache, its length decides once for the whole sequence: keys are cached rotated.
        for max_len, reference in ((original, plain), (original + 9, static)):
            cache = dynamic.new_cache(2, max_len)
            ids = long[:, :max_len]
            steps = [dynamic(ids[:, :5], cache=cache)]
            steps += [dynamic(ids[:, t:t + 1], cache=cache) for t in range(5, max_len)]
            assert (torch.cat(steps, 1) - reference(ids)).abs().max().item() <= 1e-4
            # the compiled decode step's eager twin picks the same frequencies
            cos, sin = dynamic.rope(torch.tensor([[3]]), torch.float32, span=max_len)
            ref_cos, _ = reference.rope(torch.tensor([[3]]), torch.float32)
            assert torch.equal(cos, ref_cos)


# --- sliding window ---------------------------------------------------------------------------
SLIDING = dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)


def test_sliding_window_layers_follow_transformers():
    config = tiny_config(**SLIDING)
    hf = transformers.Qwen2Config(**config.to_hf_dict())
    ours = [("sliding_attention" if i in lc.sliding_layers(config) else "full_attention")
            for i in range(config.num_hidden_layers)]
    assert ours == hf.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert list(lc.sliding_layers(tiny_config(sliding_window=5, max_window_layers=1))) == []  # off unless used


def test_sliding_window_logits_equal_transformers():
    ours = ours_with(tiny_config(**SLIDING))
    theirs = hf_twin(ours)
    ids = torch.randint(0, TINY["vocab_size"], (2, 17))  # more than 3 windows long
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (ours(ids) - expected).abs().max().item() <= 1e-4
        full = ours_with(tiny_config())
        assert (full(ids) - expected).abs().max().item() > 1e-2  # the window matters at this length
        # KV cache: a prefill shorter and one longer than the window, then token by token. The cache
        # keeps every key; the mask restricts.
        for prefill in (3, 8):
            cache = ours.new_cache(2, 17)
            steps = [ours(ids[:, :prefill], cache=cache)]
            steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(prefill, 17)]
            assert (torch.cat(steps, 1) - expected).abs().max().item() <= 1e-4
        # transformers decoding token by token with its own (sliding) cache agrees too
        out = theirs(ids[:, :8], use_cache=True)
        logits, past = [out.logits], out.past_key_values
        for t in range(8, 17):
            out = theirs(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            logits.append(out.logits)
            past = out.past_key_values
        assert (torch.cat(logits, 1) - expected).abs().max().item() <= 1e-4


def test_sliding_window_left_padded_batch_and_static_decode_equal_transformers():
    ours = ours_with(tiny_config(**SLIDING))
    theirs = hf_twin(ours)
    lengths = [13, 6]
    ids = torch.randint(1, TINY["vocab_size"], (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :13 - lengths[1]] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
        assert (got - expected)[mask.bool()].abs().max().item() <= 1e-4
        # the compiled decode step's function (run eager here) restricts to the window too
        cache = ours.new_cache(2, 16)
        ours(ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
        slot = cache.length
        cache.valid[:, slot] = True
        step = ours(ids[:, -1:], cache=StaticKV(cache.k, cache.v, cache.valid, cache.positions, torch.tensor([slot])))
        assert (step[:, 0] - expected[:, -1]).abs().max().item() <= 1e-4


# --- Dual Chunk Attention: the slow, obviously correct reference -------------------------------
def rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """x (..., hs) rotated by RoPE ("rotate half" pairing) at integer positions pos (...), float64."""
    angles = pos[..., None].double() * inv_freq.double()  # (..., hs/2)
    cos, sin = angles.cos() * factor, angles.sin() * factor
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def reference_dca(q, k, v, chunk_size, local_size, inv_freq, factor):
    """One row, no padding: q (nh, T, hs), k/v (nkv, T, hs) unrotated. Builds the full T×T matrices of
    query positions and key positions the issue defines, rotates every (query, key) pair at them,
    and takes one causal softmax in float64."""
    nh, T, hs = q.shape
    L = chunk_size - local_size
    p = torch.arange(T)[:, None].expand(T, T)  # query position
    j = torch.arange(T)[None, :].expand(T, T)  # key position
    qn, kn = p // L, j // L
    query_pos = torch.full_like(p, chunk_size)  # earlier chunks
    query_pos = torch.where(kn == qn - 1, (L + p % L).clamp(max=chunk_size), query_pos)  # the previous chunk
    query_pos = torch.where(kn == qn, p % L, query_pos)  # its own chunk
    key_pos = j % L
    # the relative positions DCA shows the model: never beyond chunk_size, exact within a chunk
    relative = (query_pos - key_pos)[j <= p]
    assert relative.min() >= 0 and relative.max() <= chunk_size
    assert torch.equal((query_pos - key_pos)[(j <= p) & (kn == qn)], (p - j)[(j <= p) & (kn == qn)])
    group = nh // k.shape[0]
    out = torch.empty(nh, T, hs, dtype=torch.float64)
    for h in range(nh):
        qh = rotate(q[h][:, None, :].expand(T, T, hs), query_pos, inv_freq, factor)  # (T, T, hs) per pair
        kh = rotate(k[h // group][None].expand(T, T, hs), key_pos, inv_freq, factor)
        scores = (qh * kh).sum(-1) / math.sqrt(hs)
        scores = scores.masked_fill(j > p, -math.inf)
        out[h] = scores.softmax(-1) @ v[h // group].double()
    return out


def dca_rope(hs: int, scaling: dict | None = None) -> RotaryEmbedding:
    config = Qwen2Config(hidden_size=hs * 2, num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0,
                         max_position_embeddings=64, rope_scaling=scaling)
    rope = RotaryEmbedding(config)
    rope.config = config
    return rope


def use_tiled_attention(monkeypatch) -> None:
    """DCA's parts through the tiled PyTorch-ops attention (what runs off the CPU), not the flash kernel."""
    monkeypatch.setattr(DCA, "attention_with_lse", lambda q, k, v, causal, key_tile=DCA.DCA_KEY_TILE:
                        DCA._tiled_attention_with_lse(q, k, v, causal, key_tile))


@pytest.mark.parametrize("chunk_size,local_size", [(8, 2), (10, 3), (7, 0), (12, 5)])
@pytest.mark.parametrize("nh,nkv", [(6, 2), (3, 3)])
@pytest.mark.parametrize("scaling", [None, yarn(4.0, 16)], ids=["rope", "yarn"])
@pytest.mark.parametrize("kernel", ["flash", "tiled"])
def test_dca_equals_the_explicit_position_matrix_reference(chunk_size, local_size, nh, nkv, scaling, kernel,
                                                           monkeypatch):
    if kernel == "tiled":
        use_tiled_attention(monkeypatch)
    hs, T = 16, 37  # 37 is no multiple of any L here
    rope = dca_rope(hs, scaling)
    q = torch.randn(2, nh, T, hs)
    k, v = torch.randn(2, nkv, T, hs), torch.randn(2, nkv, T, hs)
    positions = torch.arange(T).expand(2, T)
    L = chunk_size - local_size
    cos, sin = rope(positions % L, torch.float32)
    k_rotated = apply_rope(k, cos, sin)  # keys are stored rotated at p mod L
    real = torch.ones(2, T, dtype=torch.bool)
    # The reference rotates with RoPE's textbook frequencies, or transformers' YaRN ones; not ours.
    inv_freq, factor = 1.0 / 10000.0 ** (torch.arange(0, hs, 2).double() / hs), 1.0
    if scaling:
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.Qwen2Config(**rope.config.to_hf_dict()), "cpu")
    for query_block, key_tile in ((3, 4), (DCA.DCA_QUERY_BLOCK, DCA.DCA_KEY_TILE)):
        got = DCA.dual_chunk_attention(q, k_rotated, v, positions, real, rope, chunk_size, local_size,
                                      query_block=query_block, key_tile=key_tile)
        for b in range(2):
            expected = reference_dca(q[b], k[b], v[b], chunk_size, local_size, inv_freq, factor)
            assert (got[b].double() - expected).abs().max().item() <= 1e-5


def test_dca_within_one_chunk_is_ordinary_attention():
    config = tiny_config()
    plain = ours_with(config)
    dca = ours_with(dataclasses.replace(config, dual_chunk_attention_config={"chunk_size": 24, "local_size": 4}))
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))  # L = 20: one chunk
    with torch.no_grad():
        assert (dca(ids) - plain(ids)).abs().max().item() <= 1e-5
        longer = torch.randint(0, TINY["vocab_size"], (2, 45))
        assert (dca(longer) - plain(longer)).abs().max().item() > 1e-3  # beyond one chunk it differs


DCA_MODEL = dict(dual_chunk_attention_config={"chunk_size": 10, "local_size": 3}, max_position_embeddings=256)


@pytest.mark.parametrize("scaling", [None, yarn(2.0, 16)], ids=["rope", "yarn"])
def test_dca_decode_with_the_cache_equals_the_full_forward(scaling):
    model = ours_with(tiny_config(**DCA_MODEL, rope_scaling=scaling))
    ids = torch.randint(0, TINY["vocab_size"], (2, 38))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 38)  # span 38 for both: the same frequencies (dynamic or not)
        steps = [model(ids[:, :9], cache=cache), model(ids[:, 9:16], cache=cache)]  # chunked prefill across L=7
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(16, 38)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


def test_dca_left_padded_batch_equals_rows_alone():
    model = ours_with(tiny_config(**DCA_MODEL))
    lengths = [23, 9, 16]
    T = max(lengths)
    ids = torch.randint(1, TINY["vocab_size"], (3, T))
    mask = torch.zeros(3, T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    extra = torch.randint(1, TINY["vocab_size"], (3, 5))
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        cache = model.new_cache(3, T + 5)
        model(ids, attention_mask=mask, cache=cache)
        decoded = torch.cat([model(extra[:, t:t + 1], cache=cache) for t in range(5)], 1)
        for row, n in enumerate(lengths):
            alone = model(torch.cat([ids[row:row + 1, T - n:], extra[row:row + 1]], 1))
            assert (batch[row, T - n:] - alone[0, :n]).abs().max().item() <= 1e-4
            assert (decoded[row] - alone[0, n:]).abs().max().item() <= 1e-4


def test_dca_memory_stays_linear(monkeypatch):
    """No T×T matrix or position table: the largest allocation of any op DCA runs grows with T, not
    T² (flash kernel: its buffers included); the tiled path's largest tensor is a score tile of
    nh × query block × key tile, whatever the length. A model forward builds no T×S mask either."""
    from torch.profiler import ProfilerActivity, profile

    rope = dca_rope(16)

    def dca(T: int, chunk_size: int = 40, query_block: int = 16) -> None:
        q, k, v = torch.randn(1, 4, T, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
        DCA.dual_chunk_attention(q, k, v, torch.arange(T)[None], torch.ones(1, T, dtype=torch.bool), rope,
                                chunk_size, 8, query_block=query_block, key_tile=32)

    for chunk_size, query_block in ((40, 16), (4096, 2048)):  # many chunks; one chunk, one causal block
        largest = {}
        for T in (256, 2048):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                dca(T, chunk_size, query_block)
            largest[T] = max(e.self_cpu_memory_usage for e in prof.events())
        assert largest[2048] <= 8 * largest[256] and largest[2048] < 2048 * 2048 * 4, (chunk_size, largest)

    tiles = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        tiles.append(out.numel())
        return out

    use_tiled_attention(monkeypatch)
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    for T in (64, 512):
        tiles.clear()
        dca(T)
        assert max(tiles) <= 4 * 16 * 32 < T * T
    monkeypatch.undo()
    model = ours_with(tiny_config(**DCA_MODEL))
    monkeypatch.setattr(cache_module, "padded_causal_mask", lambda *a: pytest.fail("DCA must not build a T×S mask"))
    with torch.no_grad():
        model(torch.randint(0, TINY["vocab_size"], (1, 30)))


# --- config, API, CLI -------------------------------------------------------------------------
@pytest.mark.parametrize("changes,message", [
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling type 'linear' is not supported"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "type 'dynamic' is not supported"),
    (dict(rope_scaling=yarn(0.5, 32)), "factor must be a number >= 1"),
    (dict(rope_scaling=yarn(2.0, "32")), "original_max_position_embeddings must be a positive integer"),
    (dict(rope_scaling=yarn(2.0, 32, betta_fast=3)), "unknown key"),
    (dict(rope_scaling="yarn"), "rope_scaling must be a JSON object"),
    (dict(use_sliding_window=True, sliding_window=0), "sliding_window must be a positive integer"),
    (dict(max_window_layers=-1), "max_window_layers must be an integer >= 0"),
    (dict(dual_chunk_attention_config={"chunk_size": 8, "local_size": 8}), "0 <= local_size < chunk_size"),
    (dict(dual_chunk_attention_config={"chunk_size": 8}), "0 <= local_size < chunk_size"),
    (dict(dual_chunk_attention_config={"chunk_size": 8, "local_size": 2, "sparse": 1}), "unknown key"),
    (dict(dual_chunk_attention_config={"chunk_size": 8, "local_size": 2}, use_sliding_window=True,
          sliding_window=4), "cannot both be on"),
])
def test_bad_long_context_config_is_a_one_line_error(changes, message):
    with pytest.raises(Qwen2Error, match=message) as e:
        tiny_config(**changes)
    assert "\n" not in str(e.value)


def test_default_rope_scaling_still_works_and_long_context_fields_round_trip(tmp_path):
    plain = ours_with(tiny_config())
    ids = torch.randint(0, TINY["vocab_size"], (1, 9))
    for scaling in (None, {"type": "default"}, {"rope_type": "default"}):
        with torch.no_grad():
            assert torch.equal(ours_with(tiny_config(rope_scaling=scaling))(ids), plain(ids))
    cfg = tiny_config(bos_token_id=1, eos_token_id=2, rope_scaling=yarn(4.0, 16, dynamic=True),
                      dual_chunk_attention_config={"chunk_size": 16, "local_size": 2,
                                                   "original_max_position_embeddings": 16})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    assert Qwen2Config.from_json_file(path) == cfg
    assert Qwen2Config.from_hf_dict(transformers.Qwen2Config(**cfg.to_hf_dict()).to_dict()) == cfg


def test_extend_config_options_and_context():
    base = tiny_config(max_position_embeddings=32)
    cfg = lc.extend_config(base, rope_scaling="yarn:4")
    assert cfg.rope_scaling == yarn(4.0, 32) and cfg.max_position_embeddings == 128
    assert lc.extend_config(base, rope_scaling="dynamic-yarn:2").rope_scaling == yarn(2.0, 32, dynamic=True)
    assert lc.extend_config(base, rope_scaling="yarn:2:16").rope_scaling == yarn(2.0, 16)
    assert lc.extend_config(base, rope_scaling="none").rope_scaling is None
    dca = lc.extend_config(base, dca=True)
    assert dca.dual_chunk_attention_config == {"chunk_size": 32, "local_size": 1,
                                               "original_max_position_embeddings": 32}
    assert dca.max_position_embeddings == 4 * 32
    assert lc.extend_config(base, dca=16).dual_chunk_attention_config["chunk_size"] == 16
    # the model cards' preset, on the real 32K context: YaRN ×4 to 131072 and DCA over 32K chunks
    card = lc.extend_config(Qwen2Config(), preset=True)
    assert card.rope_scaling == yarn(4.0, 32768) and card.max_position_embeddings == 131072
    assert card.dual_chunk_attention_config == {"chunk_size": 32768, "local_size": 1024,
                                                "original_max_position_embeddings": 32768}
    # a config.json that adds YaRN but keeps max_position_embeddings 32768 (the model cards' recipe)
    assert lc.context_length(Qwen2Config(rope_scaling=yarn(4.0, 32768))) == 131072
    for bad in ("yarn", "yarn:x", "ntk:4", "yarn:4:5:6"):
        with pytest.raises(Qwen2Error, match="not understood"):
            lc.extend_config(base, rope_scaling=bad)
    with pytest.raises(Qwen2Error, match="DCA chunk size"):
        lc.extend_config(base, dca=1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, real_gguf) -> str:
    """A tiny random model directory with the real tokenizer and a 32-token context."""
    from ggufs import real_tokenizer_metadata, save_random_model_dir
    from qwen2.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(real_tokenizer_metadata(real_gguf))
    config = Qwen2Config(**{**TINY, "vocab_size": 151936, "max_position_embeddings": 32})
    return save_random_model_dir(tmp_path_factory.mktemp("long") / "tiny-32", tokenizer, config)


PROMPT = "def add(a, b):\n    return a + b\n" * 3  # 36 tokens: more than the 32-token context


def test_load_options_extend_the_usable_context(tiny_dir, capsys):
    plain = qwen2.load(tiny_dir, progress=False)
    assert len(plain.tokenizer.encode(PROMPT)) > 32
    with pytest.raises(Qwen2Error, match="context length of 32 tokens"):
        plain.generate(PROMPT, max_new_tokens=4)
    for options, context in ((dict(rope_scaling="yarn:4"), 128), (dict(rope_scaling="dynamic-yarn:2"), 64),
                             (dict(dca=8), 128), (dict(long_context=True), 128)):
        m = qwen2.load(tiny_dir, progress=False, **options)
        assert m.config.max_position_embeddings == context
        assert isinstance(m.generate(PROMPT, max_new_tokens=4), str)
    m = qwen2.load(tiny_dir, progress=False, long_context=True)
    assert m.config.rope_scaling == yarn(4.0, 32)
    assert m.config.dual_chunk_attention_config == {"chunk_size": 32, "local_size": 1,
                                                    "original_max_position_embeddings": 32}
    # the greedy text with DCA equals a batch's (left padding, positions skip it)
    alone = m.generate(PROMPT, max_new_tokens=6)
    assert m.generate(["hi", PROMPT], max_new_tokens=6)[1] == alone
    with pytest.raises(Qwen2Error, match="compile=True does not apply"):
        qwen2.load(tiny_dir, progress=False, dca=True, compile=True)
    with pytest.raises(Qwen2Error, match="not understood"):
        qwen2.load(tiny_dir, progress=False, rope_scaling="yarn:four")


def test_cli_long_context_flags(tiny_dir, capsys):
    from qwen2.cli import main

    args = build_parser().parse_args(["generate", "x", "--rope-scaling", "dynamic-yarn:4", "--dca", "--long-context"])
    assert (args.rope_scaling, args.dca, args.long_context) == ("dynamic-yarn:4", True, True)
    assert build_parser().parse_args(["chat", "--dca", "4096"]).dca == 4096
    capsys.readouterr()
    assert main(["generate", PROMPT, "--model", tiny_dir, "--max-new-tokens", "3", "--long-context"]) == 0
    assert main(["generate", PROMPT, "--model", tiny_dir, "--max-new-tokens", "3"]) == 1
    assert capsys.readouterr().err.startswith("error: prompt (")
    assert main(["generate", "x", "--model", tiny_dir, "--rope-scaling", "ntk:2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: rope scaling 'ntk:2' not understood") and err.count("\n") == 1


# ---- extrapolation past the trained length (the settings the report compares) ---------------------

def _trained_at_256() -> Qwen2Config:
    """A small model trained at context 256 (the extrapolation experiment's)."""
    return Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rope_theta=10_000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                       torch_dtype="float32", name="extrapolation-4x256")


def test_extrapolation_settings_are_what_they_say():
    base = _trained_at_256()
    plain = lc.extrapolation_config(base, "rope", 4096)
    assert plain.rope_scaling is None and plain.dual_chunk_attention_config is None
    yarn = lc.extrapolation_config(base, "yarn", 2048)
    assert yarn.rope_scaling["factor"] == 8 and lc.trained_length(yarn) == 256
    assert lc.extrapolation_config(base, "yarn", 256).rope_scaling is None  # factor 1 is plain RoPE
    both = lc.extrapolation_config(base, "yarn+dca", 1024)
    assert both.rope_scaling["factor"] == 4
    assert both.dual_chunk_attention_config == {"chunk_size": 256, "local_size": 8, "original_max_position_embeddings": 256}
    assert lc.extrapolation_config(base, "yarn4+dca", 256).rope_scaling["factor"] == 4
    for setting in lc.EXTRAPOLATION_SETTINGS:  # every setting runs the longest evaluation length
        assert lc.context_length(lc.extrapolation_config(base, setting, 4096)) >= 4096
    with pytest.raises(Qwen2Error, match="unknown extrapolation setting 'ntk'"):
        lc.extrapolation_config(base, "ntk", 4096)


def test_extrapolation_model_round_trip_and_dca_within_one_chunk(tmp_path):
    from qwen2.checkpoint.build import build_model
    from qwen2.checkpoint.hf import load_hf_dir, save_hf_dir
    from qwen2.eval.perplexity import perplexity

    torch.manual_seed(0)
    config = _trained_at_256()
    model = Transformer(config).eval()
    save_hf_dir(str(tmp_path / "model"), config, model.state_dict())
    loaded_config, state_dict, _, _ = load_hf_dir(str(tmp_path / "model"))
    loaded = build_model(loaded_config, state_dict)
    ids = torch.randint(0, config.vocab_size, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
        # DCA with chunk 256 leaves a sequence shorter than L = 248 exactly as plain RoPE has it
        dca = Transformer(lc.extrapolation_config(loaded_config, "dca", 512)).eval()
        dca.load_state_dict(loaded.state_dict())
        torch.testing.assert_close(dca(ids), model(ids), rtol=0, atol=1e-4)
    result = perplexity(model, ids[0].tolist(), context=100, stride=100)  # consecutive windows of 100
    assert result.windows == 2 and result.perplexity > 1
