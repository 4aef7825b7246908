"""Keep freed CPU memory in the process, so that every training iteration does not fault in fresh pages.

glibc's ``malloc`` serves every request above 32 MB (the most ``M_MMAP_THRESHOLD`` can be) with a fresh
``mmap`` and returns it to the OS on ``free``. A stage-2 step at B=8, M=20 allocates and frees dozens of
such tensors (one 32-channel map of G's last block over the 160 folded rows is 335 MB), so the kernel maps
and zeroes millions of pages per iteration: about as much system time as arithmetic. With
:func:`retain_freed_memory` those tensors come from malloc's heap, whose freed pages stay resident and are
reused by the next iteration. PyTorch has no CPU caching allocator of its own to switch on (its CUDA one
does this on the GPU), and preloading jemalloc or tcmalloc needs the process to be restarted, so this
sets glibc's documented ``mallopt`` switches at run time.

The cost: memory freed after the peak is not handed back to the OS until the process ends, and the
resident size can grow by fragmentation (measured in docs/performance.md). It changes only this
process, only from the call on; on a C library other than glibc it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["retain_freed_memory"]

logger = logging.getLogger(__name__)

# mallopt parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: the largest trim threshold it accepts
_INT_MAX = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory(enabled: bool = True) -> bool:
    """Serve large CPU allocations from malloc's heap and keep freed memory resident.

    Sets glibc's ``M_MMAP_MAX`` to 0 (no allocation gets its own ``mmap``) and ``M_TRIM_THRESHOLD`` to its
    maximum (about 2 GB of free memory at the top of the heap is kept rather than returned).

    Args:
        enabled: ``False`` does nothing (so that a config can switch it off with one key).

    Returns:
        Whether the allocator was changed: ``False`` when disabled or when the C library is not glibc.
    """
    if not enabled:
        return False
    libc = _glibc()
    if libc is None:
        logger.warning("retain_freed_memory: the C library is not glibc; the allocator is left as it is")
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if not ok:
        logger.warning("retain_freed_memory: glibc refused mallopt; the allocator is left as it is")
    return ok
