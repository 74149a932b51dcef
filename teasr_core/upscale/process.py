"""Process-wide settings for processes this library owns (its command line, the benchmarks).

Never applied on import: inside ComfyUI the process, its allocator and its threads are the host's.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc mallopt parameters (malloc.h)
REUSE_BELOW = 1 << 30                         # bytes
GLIBC_MMAP_MAX = 32 << 20                     # where glibc's own dynamic mmap threshold tops out


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim   # noqa: B018 -- both exist in glibc only (not in musl)
    except (OSError, AttributeError):
        return None
    return libc


def replace_pillow_size_check() -> None:
    """Turn Pillow's decompression-bomb check off here: `imageio.read_image` checks every header itself.

    Pillow's own check warns above 89 MP and ends in a DecompressionBombError traceback above 179 MP,
    naming no way past it, and it would still refuse a photo the user allowed with --max-megapixels.
    """
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None


def reuse_freed_memory(on: bool = True) -> bool:
    """on: let glibc keep freed blocks below 1 GiB for reuse; off: its usual handling of big blocks.

    By default glibc returns every freed block above 32 MiB to the kernel, and the next allocation
    page-faults fresh zeroed pages back in. The codec's activations at 1024² are 256 MiB each, so a
    whole-image upscale loses seconds to that on a 2-core CPU (`benchmarks/bench_upscale.py
    --compare-allocator` measures it). Kept blocks fragment the heap, though: the tiled path, whose
    point is bounded memory, peaked 1.1 GB higher at 12 MP with it on, so the command line turns it
    on for untiled images only. `off` restores glibc's big-block behaviour and hands kept memory back.
    Returns whether the setting took (glibc only; elsewhere nothing changes).
    """
    libc = _glibc()
    if libc is None:
        return False
    if on:
        return bool(libc.mallopt(M_MMAP_THRESHOLD, REUSE_BELOW)) and bool(libc.mallopt(M_TRIM_THRESHOLD, REUSE_BELOW))
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_MAX))
    libc.malloc_trim(0)
    return done
