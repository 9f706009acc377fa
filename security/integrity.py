"""Content hashing shared by model provisioning (pinned weights) and ingestion (change detection)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks (bounded memory for large files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
