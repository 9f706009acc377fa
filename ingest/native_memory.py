"""Bounds on native (C) memory during a console ingestion run.

Most of an ingestion run's peak RSS is not Python objects but native memory around the embedder's
forward passes (docs/benchmarks.md, "Ingestion", 1,000 files):

- glibc's malloc raises its mmap threshold each time a large block is freed, so after the first
  batches the multi-megabyte activation tensors come from the heap arenas, where freed space stays
  resident and fragments (one arena per embedding thread);
- oneDNN keeps up to 1,024 compiled kernels (primitives) per process, one per input shape, and chunk
  batches come in many lengths.

No library exposes these knobs for Python, so they are set here by hand through ``ctypes``:
``mallopt`` fixes the mmap threshold (blocks above it are returned to the system when freed),
``malloc_trim`` hands back freed heap pages after each stored batch, and oneDNN's cache capacity is
read from the environment when its first kernel is built. An operator's own ``MALLOC_MMAP_THRESHOLD_``
or ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` wins. On a C library other than glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import cache

# Kernels oneDNN keeps: with length-sorted batches the recent shapes repeat; 32 kept the speed of
# the default (1,024) and saved 80-380 MiB at 1,000 files.
ONEDNN_CACHE_CAPACITY = 32
# Blocks from 4 MiB up (attention scores, feed-forward activations of a 16-chunk batch) are mapped
# and unmapped; smaller ones stay in the arenas. With 4 MiB the 1,000-file run took 107-112 s against
# 108.5 s without, and peaked ~150 MiB lower than with trimming alone (lower thresholds cost 10-20%).
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "malloc_trim"):
        return None  # musl and others: no malloc_trim, different mallopt semantics
    return libc


def limit_for_console_run() -> None:
    """Process-wide limits for ``enclave ingest run``; to be called before the embedder first runs.
    Not for the server, whose generation engine shares the process."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD_BYTES))


def release_free_memory() -> None:
    """Give freed heap pages back to the system (glibc's ``malloc_trim``); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))
