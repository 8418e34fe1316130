"""Optional `torch.compile` of the decode step (one new token per row through the KV cache).

Decode runs ~30 small ops per layer per token; eager PyTorch pays Python and dispatch overhead on
each. Compiled (inductor, `fullgraph=True`, static shapes), the norms, RoPE, attention glue and
residuals fuse into a few C++ loops. The traced function is `Transformer.static_decode`: it takes
the cache slot as a tensor and attends over all max_len slots under the cache's `valid` mask, so
one graph serves every step of a cache of that shape (a new batch size or cache length compiles
again). Prefill and multi-token verification (speculation) stay eager.

`compile_decode(model)` installs it; the model's forward then routes decode steps through it. The
first step compiles (tens of seconds: counted in `CompiledDecode.compile_seconds`, never in a
throughput). If compiling fails (no C++ compiler, an unsupported op), the step falls back to eager
for good, warns once, and says why in `CompiledDecode.error`.
"""
from __future__ import annotations

import sys
import time

import torch

from . import kernels
from .errors import Qwen2Error


def _register_fake_kernels() -> None:
    """Shapes of the native quantised-linear ops for tracing: y (M, N) fp32."""
    ops = kernels.ops()
    if ops is None or getattr(_register_fake_kernels, "done", False):
        return
    torch.library.register_fake("qwen2_kernels::int4_linear")(
        lambda x, q, scale, mins, group_size, digits: x.new_empty(x.shape[0], q.shape[0]))
    torch.library.register_fake("qwen2_kernels::int8_linear")(
        lambda x, q, scale, group_size, digits: x.new_empty(x.shape[0], q.shape[0]))
    for op in ("q4k_linear", "q6k_linear"):  # GGUF super-blocks kept as they are (qwen2/kquant.py)
        torch.library.register_fake(f"qwen2_kernels::{op}")(lambda x, w, digits: x.new_empty(x.shape[0], w.shape[0]))
    _register_fake_kernels.done = True


class CompiledDecode:
    """Callable (input_ids (B, 1), cache) -> logits (B, 1, V), advancing the cache like forward."""

    def __init__(self, model):
        self.model = model
        self.compiled = torch.compile(model.static_decode, fullgraph=True, dynamic=False)
        self.compile_seconds = 0.0
        self.error: str | None = None
        self._shapes: set = set()

    def __call__(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
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
            start = time.perf_counter()
            try:
                logits = self.compiled(*args)
            except Exception as error:  # noqa: BLE001 (any failure to compile: eager from now on)
                self.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                print(f"qwen2: torch.compile of the decode step failed, running eager ({self.error})",
                      file=sys.stderr, flush=True)
            else:
                if first:  # the first call of a shape is the compilation
                    self._shapes.add(key)
                    self.compile_seconds += time.perf_counter() - start
                return logits
        return self.model.static_decode(*args)


def compile_decode(model) -> CompiledDecode:
    """Route `model`'s decode steps through a compiled `static_decode`; returns the wrapper (also at
    `model.compiled_step`). Raises Qwen2Error where torch.compile cannot exist at all."""
    if not hasattr(torch, "compile"):
        raise Qwen2Error(f"torch {torch.__version__} has no torch.compile; load without compile=True")
    _register_fake_kernels()
    model.compiled_step = CompiledDecode(model)
    return model.compiled_step
