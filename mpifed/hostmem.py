"""Keep freed host memory in the process, so that a training step's arrays reuse pages.

A step allocates and frees the same activation-sized arrays (1 MB each for LeNet-5 at batch 64)
over and over. glibc's malloc serves such blocks by mmap and returns them to the kernel on free
(or trims the heap top), so every fresh array pays its page faults again: about a quarter of a
LeNet-5 step on one core went to the element-wise layers' first touch of new pages. Raising the
mmap and trim thresholds keeps those pages in the heap, the way PyTorch's CPU allocator caches
blocks. Only glibc has mallopt; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below it come from the heap
TRIM_THRESHOLD = 256 << 20  # free heap top kept before returning it to the kernel

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; return whether it took."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (macOS, musl without mallopt): keep the default
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
