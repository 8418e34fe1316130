"""Native CPU kernels (`quant_linear.cpp`: quantised linears; `decode_attention.cpp`: the decode
step's attention; `decode_block.cpp`: a decoder block, or all of them, of a decode step in one call), compiled on
first use and cached.

Why at first use and not at `pip install`: an install-time build runs in pip's isolated build
environment, which would download its own torch to compile against and tie the binary to it. Here the
source is compiled against the torch that is running (C++ only, no Python bindings: the ops register
with the dispatcher as `torch.ops.qwen2_kernels.*`), for this CPU (`-march=native`), in ~10 s, once:
the build directory is keyed by the source, the torch version, the compiler flags and the CPU's
feature flags, under the qwen2 cache (`QWEN2_CACHE`, default ~/.cache/qwen2).

`ops()` returns the op namespace, or None when the kernels cannot be had (not x86 with AVX2, no C++
compiler, `QWEN2_KERNELS=0`); callers then take their pure-PyTorch path. The reason is in `status()`.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_linear.cpp")
SOURCES = [SOURCE] + [os.path.join(os.path.dirname(SOURCE), name) for name in ("decode_attention.cpp", "decode_block.cpp")]
CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for splits work only when compiled with it
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build_dir() -> str:
    from ..checkpoint.registry import cache_dir
    key = hashlib.sha256()
    sources = [open(source, "rb").read() for source in SOURCES]
    for part in (*sources, torch.__version__.encode(), " ".join(CFLAGS).encode(), _cpu_flags().encode(),
                 sys.version.encode()):
        key.update(part)
    return os.path.join(cache_dir(), "kernels", key.hexdigest()[:16])


def _unavailable_reason() -> str | None:
    if os.environ.get("QWEN2_KERNELS", "1") == "0":
        return "disabled by QWEN2_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are written for x86-64, this is {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the kernels need AVX2; this CPU (as PyTorch sees it) has {torch.backends.cpu.get_cpu_capability()}"
    return None


def _build():
    reason = _unavailable_reason()
    if reason:
        return None, reason
    if hasattr(torch.ops, "qwen2_kernels") and hasattr(torch.ops.qwen2_kernels, "decode_layers"):
        return torch.ops.qwen2_kernels, None  # already loaded in this process
    from torch.utils.cpp_extension import load
    build_dir = _build_dir()
    os.makedirs(build_dir, exist_ok=True)
    built = os.path.exists(os.path.join(build_dir, "qwen2_kernels.so"))
    if not built:
        print("qwen2: compiling the CPU kernels for this machine (once, ~10 s)...", file=sys.stderr, flush=True)
    try:
        load(name="qwen2_kernels", sources=SOURCES, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
             build_directory=build_dir, is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 (no compiler, a failed build: fall back, say why)
        first = str(error).strip().splitlines()
        names = ", ".join(map(os.path.basename, SOURCES))
        return None, f"building {names} failed: {first[0] if first else type(error).__name__}"
    return torch.ops.qwen2_kernels, None


def ops():
    """`torch.ops.qwen2_kernels`, built if need be, or None when unavailable (see `status()`)."""
    with _lock:
        if "ops" not in _state:
            _state["ops"], _state["reason"] = _build()
            if _state["reason"]:
                print(f"qwen2: native CPU kernels unavailable ({_state['reason']}); quantised linears take the "
                      "slower pure-PyTorch path", file=sys.stderr, flush=True)
        return _state["ops"]


def status() -> str:
    """'available' or why not."""
    return "available" if ops() is not None else _state["reason"]
