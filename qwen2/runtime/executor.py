"""Executors: how a model's forwards run. Each is called like the model itself,
`decoder(input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False)`, and has
its `config`, `device`, `dtype` and `new_cache`; generation, speculation, the server and evaluation
take any of them.

    eager      the model's own forward, PyTorch ops only: the reference the others equal
    native     decode steps through the native CPU ops (qwen2/runtime/native.py), bit for bit eager's
    compiled   decode steps through torch.compile (qwen2/runtime/compile.py), over native where it applies

`make_decoder(model, executor)` builds one; "auto" is the fastest that applies to the model.
"""
from __future__ import annotations

from ..errors import Qwen2Error
from .decoder import EagerDecoder

EXECUTORS = ("auto", "native", "eager", "compiled")


def check_executor(executor: str) -> str:
    if executor not in EXECUTORS:
        raise Qwen2Error(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    return executor


def make_decoder(model, executor: str = "auto") -> EagerDecoder:
    """The executor `executor` over `model`: "auto" is native where it applies (see
    `native.unavailable_reason`), else eager. "native" where it does not apply is an error that says why."""
    from .native import NativeDecoder, unavailable_reason

    check_executor(executor)
    if executor == "eager":
        return EagerDecoder(model)
    reason = unavailable_reason(model)
    if executor == "native" and reason:
        raise Qwen2Error(f"the native executor does not apply: {reason}; use executor='eager'")
    inner = EagerDecoder(model) if reason else NativeDecoder(model)
    if executor == "compiled":
        from .compile import compile_decode
        return compile_decode(inner)
    return inner


def as_decoder(model_or_decoder) -> EagerDecoder:
    """A decoder as it is; a bare model with the fastest executor that applies to it."""
    return model_or_decoder if isinstance(model_or_decoder, EagerDecoder) else make_decoder(model_or_decoder)
