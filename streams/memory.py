"""Give the heap a process freed back to the OS.

The models and tile tables are hundreds of thousands of values of a few hundred bytes:
CPython takes those from glibc's malloc (beyond its 512-byte small-object allocator), and
glibc keeps the pages of a freed graph mapped. After an epoch change drops a whole model or
table, RSS stays at the peak of old + new. ``malloc_trim(0)`` hands the free pages back
(measured on a synthetic 100k x 720 B model swap: RSS 173 -> 119 MB for 50-150 ms of CPU), so
it is called only where a whole graph was just dropped, not on a timer.

glibc's mmap threshold slides: freeing an mmapped block raises it to that block's size (up
to 32 MB), so after one multi-MB buffer (a 15 MB model checkpoint, a full build's pipeline)
every later buffer below that size (diffs, replies, numpy temporaries of a batch) is carved
from the heap, where freed holes stay mapped: RSS ratchets up at the first epoch change and
stays there. ``fix_mmap_threshold`` pins it, so large blocks stay mmapped and go back to the
OS when freed (the SSE gateway does the same at start).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from typing import cast

# Blocks from this size up are mmapped (and returned when freed): the gateway's value.
MMAP_THRESHOLD_KB = 256
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def _glibc(name: str, *argtypes: type[ctypes.c_int | ctypes.c_size_t]) -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = getattr(libc, name)  # glibc only (musl has neither)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return cast(Callable[..., int], fn)


_TRIM = _glibc("malloc_trim", ctypes.c_size_t)
_MALLOPT = _glibc("mallopt", ctypes.c_int, ctypes.c_int)


def fix_mmap_threshold(kb: int = MMAP_THRESHOLD_KB) -> bool:
    """Pin glibc's mmap threshold at ``kb`` KiB for this process (see the module doc); False
    where the C library has no ``mallopt`` or refused the value."""
    if _MALLOPT is None or kb <= 0:
        return False
    return bool(_MALLOPT(_M_MMAP_THRESHOLD, kb * 1024))


def release_freed_memory() -> bool:
    """Collect cyclic garbage, then return free heap pages to the OS; False where the C
    library cannot (the collection still ran)."""
    gc.collect()
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
