"""Knowledge-base names: the one rule every name must meet before a path, a query or a record is
built from it (index folders and upload folders are named after knowledge bases).

Letters, digits, '-', '_' and '.', starting with a letter or digit, at most 128 characters, and no
'..': no separator, no NUL, no way out of the data directory, and nothing a file system or
PostgreSQL refuses, so a name that cannot be a knowledge base is refused for what it is, never
looked up (a lookup would tell files apart by the error it raised).
"""

from __future__ import annotations

import re

KB_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
KB_NAME_RULE = "1-128 letters, digits, '-', '_' or '.', starting with a letter or digit, without '..'"
_KB_NAME = re.compile(KB_NAME_PATTERN)


def is_kb_name(name: object) -> bool:
    return isinstance(name, str) and _KB_NAME.fullmatch(name) is not None and ".." not in name
