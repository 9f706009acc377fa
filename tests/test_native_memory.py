"""Native-memory limits of a console ingestion run (ingest/native_memory.py)."""

from __future__ import annotations

import os

import psutil
import pytest

from ingest import native_memory


def test_console_run_caps_onednn_cache_unless_operator_set_it(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    native_memory.limit_for_console_run()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(native_memory.ONEDNN_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "500")
    native_memory.limit_for_console_run()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "500"


@pytest.mark.skipif(native_memory._glibc() is None, reason="malloc_trim is glibc's")
def test_release_free_memory_returns_freed_heap_pages():
    # Freed blocks between live ones are holes that malloc keeps resident; malloc_trim gives their
    # pages back. 100 kB blocks stay below every mmap threshold in use, so they come from the heap.
    process = psutil.Process()
    blocks = [bytearray(100_000) for _ in range(2_000)]  # ~200 MB, every page touched
    keep = blocks[::10]  # every tenth block stays alive until the end, so the freed ones are holes
    del blocks
    before = process.memory_info().rss
    native_memory.release_free_memory()
    after = process.memory_info().rss
    del keep
    assert before - after > 100 * 1024 * 1024, (before, after)
