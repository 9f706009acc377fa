"""Uploaded files, kept under ``<data dir>/uploads/<knowledge base>/`` as the documents' sources.

An upload never costs the file it replaces: the new bytes go to a temporary name, and the stored
file is swapped only by an atomic rename, with the previous one kept under a hard link until the
ingestion succeeded; a file that cannot be ingested is removed and the previous one put back, so
the stored file and its searchable document stay as they were.

A process killed halfway leaves hidden files behind; :meth:`Uploads.recover` (at every start)
settles them: temporary files are removed, a kept previous file is put back unless the new one
was ingested (the document's sha256 says which one the knowledge base holds), and a file without
a document (its ingestion never committed) is removed. Uploads and recovery of one knowledge base
take a file lock, so a replica starting never touches another one's upload in progress.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

log = logging.getLogger("enclave.uploads")

_HIDDEN = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{16}\.(?P<kind>upload|previous)$")
_LOCK = ".lock"


@dataclass
class Recovery:
    removed_temporary: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    removed_orphans: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Uploads:
    """``documents(kb, root)`` lists the stored documents of a folder (``source``, ``content_hash``);
    ``ingest(path, kb, groups)`` runs the ingestion pipeline on one file and returns its report."""

    def __init__(self, root: Path, documents: Callable[[str, str], list[Any]],
                 ingest: Callable[[Path, str, list[str] | None], Any]):
        self.root = Path(root)
        self._documents = documents
        self._ingest = ingest

    def folder(self, kb: str) -> Path:
        return (self.root / kb).resolve()

    def _lock(self, folder: Path) -> FileLock:
        return FileLock(str(folder / _LOCK))

    def store(self, kb: str, filename: str, data: bytes, groups: list[str] | None) -> tuple[Path, Any]:
        """Write ``data`` as ``filename`` and ingest it. Returns (stored path, ingestion report); when
        the report has failures, or the file was skipped (a scan while OCR is off), the folder holds
        exactly what it held before."""
        folder = self.folder(kb)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / filename
        token = secrets.token_hex(8)
        temporary, previous = folder / f".{filename}.{token}.upload", folder / f".{filename}.{token}.previous"
        with self._lock(folder):
            _write_synced(temporary, data)
            replacing = target.is_file()
            if replacing:
                os.link(target, previous)  # the stored file stays reachable until the new one is in
            try:
                os.replace(temporary, target)
                report = self._ingest(target, kb, groups)
            except BaseException:
                self._undo(target, previous, replacing, temporary)
                raise
            if report.failed or skipped(report, filename) is not None:
                self._undo(target, previous, replacing, temporary)
            else:
                previous.unlink(missing_ok=True)
        return target, report

    @staticmethod
    def _undo(target: Path, previous: Path, replacing: bool, temporary: Path) -> None:
        temporary.unlink(missing_ok=True)
        if replacing:
            os.replace(previous, target)
        else:
            target.unlink(missing_ok=True)

    def recover(self) -> Recovery:
        """Settle what killed uploads left in every knowledge base's folder (see the module doc)."""
        done = Recovery()
        if not self.root.is_dir():
            return done
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()):
            try:
                with self._lock(folder.resolve()).acquire(timeout=0):
                    self._recover(folder.resolve(), done)
            except Timeout:
                log.info("uploads of %s: an upload is in progress elsewhere; left as it is", folder.name)
        for what, names in (("removed the temporary file", done.removed_temporary),
                            ("put back the previous file", done.restored),
                            ("removed the file without a document", done.removed_orphans)):
            for name in names:
                log.warning("uploads: %s of an interrupted upload: %s", what, name)
        return done

    def _recover(self, folder: Path, done: Recovery) -> None:
        kb = folder.name
        hashes = {d.source: d.content_hash for d in self._documents(kb, str(folder))}
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
        for path in entries:
            hidden = _HIDDEN.match(path.name)
            if hidden is None:
                continue
            name, target = hidden["name"], folder / hidden["name"]
            if hidden["kind"] == "upload":  # never swapped in
                path.unlink()
                done.removed_temporary.append(f"{kb}/{name}")
            elif name in hashes and hashes[name] == _sha256(path) and (
                    not target.is_file() or _sha256(target) != hashes[name]):
                os.replace(path, target)  # the knowledge base still holds the previous file
                done.restored.append(f"{kb}/{name}")
            else:
                path.unlink()  # the new file was ingested (or nothing holds the previous one)
        for path in entries:
            if path.exists() and not path.name.startswith(".") and path.name not in hashes:
                path.unlink()
                done.removed_orphans.append(f"{kb}/{path.name}")


def skipped(report, filename: str):
    """The reason the uploaded file itself was left unread (not one of an e-mail's attachments)."""
    return next((s for s in report.skipped_files if s.source == filename), None)
