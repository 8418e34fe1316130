"""Functions the compiled decode step must compute exactly as eager mode does (see `aten_when_compiled`)."""
from __future__ import annotations

import functools

import torch


def aten_when_compiled(name: str, fake):
    """Decorator: the function runs as written in eager mode, and, traced by torch.compile for inference,
    as one opaque op `qwen2::<name>` that runs these very ATen kernels, not the code inductor would
    generate for them (`fake` gives its output shapes). Why: the compiled decode step must compute the
    eager step's logits bit for bit (qwen2/runtime/compile.py), and inductor's fused cos/sin (SLEEF; ATen's
    are MKL's, a third of them 1 ulp apart) and RMSNorm (its own order of summing the squares) differ from
    ATen's in the last bit; the int4 model's int8 activations turn such bits into visible logit
    differences (0.3-0.6 on the 0.5B model)."""
    def wrap(fn):
        op = torch.library.custom_op(f"qwen2::{name}", fn, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args):
            # inference only: the op has no backward (a compiled training step keeps inductor's code)
            return op(*args) if torch.compiler.is_compiling() and not torch.is_grad_enabled() else fn(*args)
        return call
    return wrap
