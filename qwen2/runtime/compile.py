"""Optional `torch.compile` of the decode step (one new token per row through the KV cache).

The traced function is `CompiledDecoder.static_step`, a forward through a `StaticKV` cache (inductor,
`fullgraph=True`, static shapes): it takes the cache slot as a tensor and the cache's `valid` mask, so
one graph serves every step of a cache of that shape (a new batch size or cache length compiles
again). Prefill and multi-token verification (speculation) stay eager.

The compiled step computes the eager step's logits bit for bit, so greedy decoding gives the same
tokens. Where decode runs natively (the native executor, `qwen2/kernels/decode_block.cpp`: every
block in one call, its attention skipping the keys a query may not see), the graph calls those very
ops, opaque to inductor; RoPE's cos/sin and the final RMSNorm run as ATen computes them
(`model.compiled_ops.aten_when_compiled`);
what inductor still fuses (the embedding lookup, RoPE's angles: one fp32 product, the masks) rounds
as ATen does. Why so strict: traced as PyTorch ops, the attention (a softmax over every masked
slot), inductor's cos/sin and its RMSNorm (another summation order) each differ from eager in the
last bits (cos/sin by 1 ulp, the first layer's attention output by ~4e-6), and the int4 model's
activations rounded to one int8 digit (MLP, lm_head) grow that to 0.3-0.6 in the 0.5B model's
logits, past the near-ties greedy decoding meets (top-2 gaps of 0.001-0.007 within 8 tokens): 2 of
6 texts differed. int8 mode (two digits everywhere) stayed within ~1e-3 and fp32 within ~2e-5, and
their tokens held. Where the native ops do not apply (bf16, no kernels), inductor fuses the PyTorch
path and compiled logits may differ from eager's in the last bits.

`make_decoder(model, "compiled")` (or `qwen2.load(..., executor="compiled")`) makes the executor. The
first step compiles (tens of seconds: counted in `CompiledDecode.compile_seconds`, never in a
throughput). If compiling fails (no C++ compiler, an unsupported op), the step falls back to eager
for good, warns once, and says why in `CompiledDecode.error`.
"""
from __future__ import annotations

import time

import torch

from .. import kernels
from ..errors import Qwen2Error
from ..model.cache import KVCache
from ..model.static_cache import StaticKV
from ..progress import notice
from ..quant.kinds import LAYER_KINDS
from .decoder import EagerDecoder


def _register_fake_kernels() -> None:
    """Shapes of the native ops for tracing: the quantised linears' y (M, N) fp32; the decode
    attention's (B, nh, T, hs), a transposed (B, T, nh, hs) as the kernel returns it; a decoder
    block's (or all of them) x (B, T, C). The cache they write is declared mutated by their schemas."""
    ops = kernels.ops()
    if ops is None or getattr(_register_fake_kernels, "done", False):
        return
    for kind in LAYER_KINDS:  # each quantised layout's own op: y (M, N) for x (M, K), weight rows (N, ...)
        if kind.linear_op:
            torch.library.register_fake(f"qwen2_kernels::{kind.linear_op}")(
                lambda x, weight, *layout: x.new_empty(x.shape[0], weight.shape[0]))
    torch.library.register_fake("qwen2_kernels::decode_attention")(
        lambda q, k, v, cos, sin, cache_k, cache_v, slots, key_mask, scale: q.new_empty(q.shape).transpose(1, 2))
    for op in ("decode_block", "decode_layers"):  # qwen2/kernels/decode_block.cpp
        torch.library.register_fake(f"qwen2_kernels::{op}")(lambda x, *args: torch.empty_like(x))
    _register_fake_kernels.done = True


def _inductor_options() -> dict:
    """Inductor's vector width pinned to the one it picks in this process anyway. Why: it picks by
    ATEN_CPU_CAPABILITY (=avx2 on an AVX-512 CPU emulates an AVX2-only one), but its on-disk graph
    cache is not keyed by it, and a cached graph's C++ is rebuilt for the width of the process that
    loads it: code generated for 16 lanes then stores 8 of every 16 floats (NaN logits), code for 8
    stores 16 at every step of 8 (past its buffers: heap corruption). `cpp.simdlen` is in the key."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:  # a torch without it: inductor's own choice, unkeyed
        return {}
    return {"cpp.simdlen": pick_vec_isa().bit_width()}


class CompiledDecoder(EagerDecoder):
    """An executor whose decode steps (one new token per row through a `KVCache`) run compiled; every
    other forward runs through `inner` (native or eager), which the compiled step also traces."""

    name = "compiled"

    def __init__(self, inner: EagerDecoder):
        super().__init__(inner.model)
        self.inner = inner
        self.compiled = torch.compile(self.static_step, fullgraph=True, dynamic=False, options=_inductor_options())
        self.compile_seconds = 0.0
        self.error: str | None = None
        self._shapes: set = set()

    def static_step(self, input_ids, k, v, valid, positions, slot) -> torch.Tensor:
        """What is traced: one step with every shape fixed by the cache (see `StaticKV`)."""
        return self.inner(input_ids, cache=StaticKV(k, v, valid, positions, slot))

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False):
        if not (isinstance(cache, KVCache) and input_ids.shape[1] == 1 and attention_mask is None
                and position_ids is None):
            return self.inner(input_ids, attention_mask, position_ids, cache, last_only)
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {cache.length} cached + 1 new do not fit")
        slot = cache.length
        cache.valid[:, slot] = True
        args = (input_ids, cache.k, cache.v, cache.valid, cache.positions,
                torch.tensor([slot], device=input_ids.device))
        logits = self._run(args, key=(tuple(input_ids.shape), tuple(cache.k.shape)))
        cache.length += 1
        cache.positions += 1
        return logits

    def _run(self, args, key) -> torch.Tensor:
        if self.error is None:
            first = key not in self._shapes
            if first:  # tens of seconds without output would look like a hang
                notice(f"compiling the decode step for batch {key[0][0]} and a {key[1][3]}-token cache "
                       "(torch.compile, once per shape)...")
            start = time.perf_counter()
            try:
                logits = self.compiled(*args)
            except Exception as error:  # noqa: BLE001 (any failure to compile: eager from now on)
                self.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                notice(f"torch.compile of the decode step failed, running eager ({self.error})")
            else:
                if first:  # the first call of a shape is the compilation
                    self._shapes.add(key)
                    self.compile_seconds += time.perf_counter() - start
                return logits
        return self.static_step(*args)


def compile_decode(inner: EagerDecoder) -> CompiledDecoder:
    """A compiled executor over `inner` (native or eager: `make_decoder(model, "compiled")` picks it).
    Raises Qwen2Error where torch.compile cannot exist at all, or for Dual Chunk Attention."""
    if not hasattr(torch, "compile"):
        raise Qwen2Error(f"torch {torch.__version__} has no torch.compile; load without compile=True")
    check_compilable(inner.config.dual_chunk_attention_config is not None)
    _register_fake_kernels()
    return CompiledDecoder(inner)


def check_compilable(dual_chunk_attention: bool) -> None:
    """Raise Qwen2Error where a compiled decode step is asked for a model with Dual Chunk Attention."""
    if dual_chunk_attention:
        raise Qwen2Error("compile=True does not apply with Dual Chunk Attention (its decode step runs eager); "
                         "drop one of them")
