"""The data directory holds every document's text, key hashes, conversations and the audit chain:
everything Enclave writes there is private to the service account (directories 0700, files 0600),
whatever umask the process was started with.

Two layers: each entry point (the console scripts, the server) sets the umask to 077, so files that
third-party code writes (peft, safetensors, uvicorn's uploads) are private too; and the places that
create sensitive folders and files give them explicit modes, so an embedding application with a
permissive umask gets the same result.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600


def use_private_umask() -> int:
    """Set the process umask to 077; returns the previous one."""
    return os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents with mode 0700 (Path.mkdir gives parents the
    umask's default, and its own ``mode`` is masked by the umask)."""
    missing = []
    path = Path(path)
    here = path
    while not here.exists():
        missing.append(here)
        here = here.parent
    for folder in reversed(missing):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(folder, DIR_MODE)
    return path


def make_private(root: Path) -> None:
    """chmod a tree: folders 0700, files 0600 (links are neither followed nor changed)."""
    root = Path(root)
    if root.is_symlink():
        return
    if root.is_file():
        os.chmod(root, FILE_MODE)
        return
    os.chmod(root, DIR_MODE)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), DIR_MODE)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, FILE_MODE)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty and 0600 if it does not exist; an existing file is not opened at all.

    For SQLite databases: closing any descriptor of a database file drops every POSIX lock this
    process holds on it (its open connections' locks included), so an existing one is left alone."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass


def open_private(path: Path, mode: str = "w", encoding: str | None = "utf-8"):
    """open() for writing a new or truncated file that is 0600 from its first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # an existing file keeps its mode through O_CREAT
    return os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None)


def exposed(paths: list[Path]) -> list[str]:
    """One line per existing path that its group or other users may read, write or enter."""
    lines = []
    for path in paths:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            wanted = DIR_MODE if path.is_dir() else FILE_MODE
            lines.append(f"{path} has mode {mode:04o}: other accounts on this host may read it "
                         f"(documents, key hashes, conversations); run `chmod {'-R ' if path.is_dir() else ''}"
                         f"go-rwx {path}` (wanted {wanted:04o})")
    return lines
