"""Native CPU kernels (`quant_linear.cpp`: quantised linears for a few rows of x; `quant_gemm.cpp`: the same for
many rows (prefill); `decode_attention.cpp`: the decode
step's attention; `decode_block.cpp`: a decoder block, or all of them, of a decode step in one call), compiled on
first use and cached.

Why at first use and not at `pip install`: an install-time build runs in pip's isolated build
environment, which would download its own torch to compile against and tie the binary to it. Here the
source is compiled against the torch that is running (C++ only, no Python bindings: the ops register
with the dispatcher as `torch.ops.qwen2_kernels.*`), for this CPU (`-march=native`), in 10-60 s on 2 cores, once:
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

from ..errors import Qwen2Error
from ..fileio import cache_dir
from ..progress import notice

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_linear.cpp")
SOURCES = [SOURCE] + [os.path.join(os.path.dirname(SOURCE), name) for name in ("quant_gemm.cpp", "decode_attention.cpp", "decode_block.cpp")]
HEADERS = [os.path.join(os.path.dirname(SOURCE), name) for name in ("layer_kinds.h", "int8_blocks.h")]  # included by the sources: part of the build's key
CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for splits work only when compiled with it
LDFLAGS = ["-fopenmp"]
# QWEN2_KERNELS_ISA=avx2 builds, on an AVX-512 CPU too, the 256-bit kernels that AVX2-only CPUs run (no
# AVX-512, no VNNI), so one machine can test and time both builds; "native" (default) takes all this CPU has.
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f", "-mno-avxvnni"]}


def cflags() -> list[str]:
    isa = os.environ.get("QWEN2_KERNELS_ISA", "native")
    if isa not in ISA_FLAGS:
        raise Qwen2Error(f"QWEN2_KERNELS_ISA={isa!r} is not a kernel build; use one of {', '.join(ISA_FLAGS)}")
    return CFLAGS + ISA_FLAGS[isa]

_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build_dir() -> str:
    key = hashlib.sha256()
    sources = [open(source, "rb").read() for source in SOURCES + HEADERS]
    # the sources' paths too: torch's build files name them, so two checkouts sharing one directory
    # would each rebuild it on every load
    for part in (*sources, *(os.path.abspath(s).encode() for s in SOURCES), torch.__version__.encode(),
                 " ".join(cflags()).encode(), _cpu_flags().encode(), sys.version.encode()):
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
        notice("compiling the CPU kernels for this machine (once, 10-60 s)...")
    try:
        load(name="qwen2_kernels", sources=SOURCES, extra_cflags=cflags(), extra_ldflags=LDFLAGS,
             build_directory=build_dir, is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 (no compiler, a failed build: fall back, say why)
        first = str(error).strip().splitlines()
        names = ", ".join(map(os.path.basename, SOURCES))
        return None, f"building {names} failed: {first[0] if first else type(error).__name__}"
    return torch.ops.qwen2_kernels, None


def ops():
    """`torch.ops.qwen2_kernels`, built if need be, or None when unavailable (see `status()`)."""
    if "reason" in _state:  # decided (set last, after "ops"): no lock, which torch.compile cannot trace
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            _state["ops"], _state["reason"] = _build()
            if _state["reason"]:
                notice(f"native CPU kernels unavailable ({_state['reason']}); quantised linears take the "
                       "slower pure-PyTorch path")
        return _state["ops"]


def status() -> str:
    """'available' or why not."""
    return "available" if ops() is not None else _state["reason"]
