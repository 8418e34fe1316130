"""Memory of quantised weights: giving back the pages of memory-mapped fp32 weights once quantised, and
moving the quantised buffers into 2 MB pages, which decode streams faster."""
from __future__ import annotations

import ctypes
import mmap
import os

import torch
import torch.nn as nn

from .linear import quantized_linears


# --------------------------------------------------------------------------------------------------
# Giving back the pages of memory-mapped fp32 weights
# --------------------------------------------------------------------------------------------------

def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of regular files (Linux; empty elsewhere)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/") and "(deleted)" not in parts[5]:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((start, end))
    except OSError:
        pass
    return spans


_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the whole pages under `t` from this process when they belong to a file mapping (a
    memory-mapped checkpoint): re-reading them would fetch the file's bytes again, so nothing else
    can lose data; anonymous memory is never touched (it is freed when its last tensor goes)."""
    if not mapped or t.device.type != "cpu":
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not any(a <= start and end <= b for a, b in mapped):
        return
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last <= first:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(_MADV_DONTNEED))
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------------
# The quantised weights in 2 MB pages
# --------------------------------------------------------------------------------------------------

_HUGE_PAGE = 2 << 20


def into_huge_pages(model: nn.Module) -> int:
    """Move every quantised linear's buffers (weights, scales, mins, bias) into one private anonymous
    mapping advised for transparent huge pages (`MADV_HUGEPAGE`), in the model's order; returns the
    bytes placed there (0 where the OS has no such advice: the buffers stay where they are).

    Why: a decode step streams all of them from memory once per token, and with 4 KB pages a core
    reads memory markedly slower here (`torch.ones(2**28).sum()`: 11.9 GB/s on one thread with 4 KB
    pages, 15.0 with 2 MB ones); int4 decode steps took 25.2 instead of 27.9 ms on the 0.5B model and
    57.8 instead of 59.5 on the 1.5B (`benchmarks/speed/bench_native_decode.py`, alternating). Where
    the kernel hands out no huge pages (THP "never"), the copy is all that happens. The copy is one
    buffer at a time, each old one freed as its module takes the new and its memory handed back to
    the OS every 32 MB (malloc keeps freed blocks for reuse otherwise: resident memory would grow by
    the whole quantised model, 240 MB on the 0.5B), so memory grows by ~32 MB plus the largest buffer.
    Cost: the first touch of fresh 2 MB pages, ~0.9 s for the 0.5B model's 367 MB on this VM."""
    # (module, name, bytes) only: holding the tensors here would keep every old buffer alive to the end
    buffers = [(module, name, t.numel() * t.element_size()) for module in quantized_linears(model).values()
               for name, t in module.named_buffers(recurse=False) if t.device.type == "cpu" and t.numel() > 0]
    if not buffers or in_one_arena([getattr(module, name) for module, name, _ in buffers]):
        return 0  # none, or already built in place (qwen2/checkpoint/quantized.py)
    views = huge_page_arena([size for _, _, size in buffers])
    if views is None:
        return 0
    unreturned = 0
    for (module, name, size), view in zip(buffers, views):
        old = getattr(module, name)
        setattr(module, name, view.view(old.dtype).view(old.shape).copy_(old))
        del old
        unreturned += size
        if unreturned >= 32 << 20:
            return_freed_memory()
            unreturned = 0
    return_freed_memory()
    return sum(-(-size // 64) * 64 for _, _, size in buffers)


def huge_page_arena(sizes: list[int]) -> list[torch.Tensor] | None:
    """One uint8 view per size, in order, each from a 64-byte boundary (the first from a 2 MB one), in one
    private anonymous mapping advised for transparent huge pages: where `into_huge_pages` moves buffers,
    or where buffers are made in place to begin with (their first touch then faults in 2 MB pages: ~10x
    fewer faults than 4 KB ones, and no copy later). None where the OS has no such advice."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    padded = [-(-size // 64) * 64 for size in sizes]  # each cache-line aligned
    region = mmap.mmap(-1, sum(padded) + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without THP
        region.close()
        return None
    arena = torch.frombuffer(region, dtype=torch.uint8)  # its views keep `region` alive
    offset = -arena.data_ptr() % _HUGE_PAGE  # from a 2 MB boundary: the first page can be huge too
    views = []
    for size, step in zip(sizes, padded):
        views.append(arena[offset:offset + size])
        offset += step
    return views


def anonymous_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of fresh zeroed memory (uint8) in a private anonymous mapping of its own, like
    `torch.empty` of a large size: its pages are returned to the OS when the last tensor on it goes
    (not kept by malloc for reuse)."""
    region = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]  # the view keeps `region` alive


def in_one_arena(tensors: list[torch.Tensor]) -> bool:
    """Whether these tensors lie in one storage, in this order, each from a 64-byte boundary and the first from a 2 MB one:
    as `huge_page_arena` places them (a model built in place needs no move)."""
    if not tensors or len({t.untyped_storage().data_ptr() for t in tensors}) != 1:
        return False
    starts = [t.data_ptr() for t in tensors]
    return starts == sorted(starts) and all(p % 64 == 0 for p in starts) and starts[0] % _HUGE_PAGE == 0


def return_freed_memory() -> None:
    """Hand the pages of freed heap blocks back to the OS (glibc's malloc_trim; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_HEAP_BLOCK = 32 << 20  # glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
_KEPT_FREE = 256 << 20  # freed heap kept for reuse before any is handed back


def keep_heap_blocks() -> None:
    """Have glibc's malloc serve blocks up to 32 MB from its heap and keep up to 256 MB of freed heap
    (`mallopt`; elsewhere nothing). Why: a prefill allocates and frees activations and dequantised
    weight chunks of 10-20 MB per op, several alive at once (the 0.5B model at 512 tokens), and with
    malloc's starting thresholds (128 KB, rising only when a block that large has been freed, with
    freed heap over twice that handed back) each is a fresh mapping or a trimmed heap, its pages
    faulted in again on every op: ~200,000 page faults and +25 % time per 512-token int4 prefill on
    AVX-512 (bf16 chunks); with fp32 chunks (AVX2) trimming at 64 MB still cost 330,000 faults and
    +11 %. The peak memory is unchanged: only memory a prefill already used stays mapped."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(_HEAP_BLOCK))
        libc.mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(_KEPT_FREE))
    except (OSError, AttributeError):
        pass
