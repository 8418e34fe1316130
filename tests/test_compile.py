"""torch.compile of the decode step (qwen2/compile.py): the compiled static-shape step gives the
eager model's logits and tokens, for a padded batch and for a quantised model, and a compilation
that fails falls back to eager with the reason kept."""
import pytest
import torch

from ggufs import random_model
from qwen2 import compile as C
from qwen2 import quantize as Q
from qwen2.config import Qwen2Config
from qwen2.generate import SamplingParams, decode_steps
from qwen2.model import Transformer


def _tiny(seed=0) -> Transformer:
    return random_model(Qwen2Config(vocab_size=301, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=None, eos_token_id=None), seed)


def _decode_logits(model, ids, mask, steps=6):
    """Prefill a left-padded batch, then `steps` greedy single-token steps; every step's logits."""
    out = []
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
        logits = model(ids, attention_mask=mask, cache=cache, last_only=True)
        for _ in range(steps):
            token = logits[:, -1].argmax(-1)
            out.append(logits[:, -1])
            logits = model(token[:, None], cache=cache)
    return torch.stack(out, 1)


def test_compiled_decode_equals_eager_on_a_padded_batch():
    model = _tiny()
    ids = torch.randint(0, 301, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    eager = _decode_logits(model, ids, mask)
    compiled = C.compile_decode(model)
    assert model.compiled_step is compiled
    got = _decode_logits(model, ids, mask)
    assert compiled.error is None, compiled.error
    assert compiled.compile_seconds > 0
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-4)
    # and through the generation loop, token for token
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    with_compile = torch.stack(list(decode_steps(model, prompts, params)), 1)
    model.compiled_step = None
    assert torch.equal(with_compile, torch.stack(list(decode_steps(model, prompts, params)), 1))


def test_compiled_decode_with_native_quantised_linears():
    model = Q.quantize_model(_tiny(1), "int4", group_size=32, lm_head=False)
    # Two activation digits (~16-bit) in every layer: fused fp32 arithmetic differs from eager in the
    # last bits, and with one int8 digit such a difference can flip a whole rounding step, which this
    # random 2-layer model amplifies over the steps (measured up to 1.2 % of the largest logit).
    for layer in Q.quantized_linears(model).values():
        layer.activation_digits = 2
    ids = torch.randint(0, 301, (1, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 5, dtype=torch.long)
    eager = _decode_logits(model, ids, mask)
    compiled = C.compile_decode(model)
    got = _decode_logits(model, ids, mask)
    assert compiled.error is None, compiled.error
    assert float((got - eager).abs().max()) <= 1e-3 * float(eager.abs().max())
    assert torch.equal(got.argmax(-1), eager.argmax(-1))


def test_failed_compilation_falls_back_to_eager(monkeypatch, capsys):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    model = _tiny(2)
    ids, mask = torch.randint(0, 301, (2, 4)), torch.ones(2, 4, dtype=torch.long)
    eager = _decode_logits(model, ids, mask)
    compiled = C.compile_decode(model)
    got = _decode_logits(model, ids, mask)
    assert compiled.error == "RuntimeError: no C++ compiler"
    assert "running eager (RuntimeError: no C++ compiler)" in capsys.readouterr().err
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_compiled_step_refuses_a_full_cache():
    model = _tiny(3)
    C.compile_decode(model)
    cache = model.new_cache(1, 3)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="holds 3 tokens; 3 cached \\+ 1 new do not fit"):
            model(torch.tensor([[4]]), cache=cache)
