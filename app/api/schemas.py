"""The base of every JSON request body: text must be text.

JSON may spell a lone UTF-16 surrogate (``"\\ud800"``); Python decodes it into a ``str`` that no
encoder accepts, so it would fail later, deep inside (the audit record's UTF-8, a database
driver) as a 500. It is refused here, for every field of every body, as a 400 naming the field.
Hand-written because neither pydantic nor the json module has an option that refuses them.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, model_validator

_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value: Any) -> str | None:
    """The path (``messages.0.content``) of a string or key holding a surrogate, or None.
    Iterative: a deeply nested body must not exhaust the interpreter's stack here."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where or "body"
            continue
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in children:
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", path)  # printable
            stack.append((path, child))
    return None


class RequestBody(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _text_is_text(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:
            raise ValueError(f"{where[:200]}: not valid Unicode text (a lone surrogate such as \\ud800); send UTF-8 text")
        return data
