"""E-mail messages (.eml, RFC 822/MIME) through the standard library's ``email`` package.

The message becomes one document: subject (its title), from/to/cc/date, the text body (an HTML-only
body goes through the HTML loader), and the names of its attachments. Attachments whose type we
read become documents of their own (``Attachment``); the pipeline stores them as
``mail.eml#name`` with the message's groups.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path, PurePosixPath

from ingest.loaders import (
    Attachment,
    FileSkipped,
    LoadedDocument,
    LoaderError,
    LoaderOptions,
    OcrNeeded,
    Section,
    UnsupportedFileType,
    _short,
    file_type_for,
    load_bytes,
)

__all__ = ["load_eml"]

_HEADERS = ("From", "To", "Cc", "Date")


def load_eml(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    try:
        message = email.message_from_bytes(data, policy=email.policy.default)
    except Exception as exc:  # the parser is lenient; this is for truly broken input
        raise LoaderError(f"corrupt e-mail: {_short(exc)}") from None
    if not isinstance(message, EmailMessage) or not (message.keys() or message.get_payload()):
        raise LoaderError("corrupt e-mail: no headers or body")

    subject = _header(message, "Subject")
    lines = [f"Subject: {subject}"] if subject else []
    lines += [f"{name}: {value}" for name in _HEADERS if (value := _header(message, name))]
    body = _body_text(message, path, options)

    attachments: list[Attachment] = []
    names: list[str] = []
    for part in message.iter_attachments() if message.is_multipart() else ():
        name = _unique(_attachment_name(part, len(names) + 1), names)
        names.append(name)
        if file_type_for(Path(name)) is None:  # listed in the message, not ingested
            continue
        attachments.append(_load_attachment(part, name, options))
    if names:
        lines.append("Attachments: " + ", ".join(names))

    sections = [Section("\n".join(lines))]
    if body.strip():
        sections.append(Section(body))
    return LoadedDocument(
        title=subject or path.stem, sections=sections, file_type="eml",
        metadata={"attachments": names}, attachments=attachments,
    )


def _header(message: EmailMessage, name: str) -> str:
    try:
        value = message.get(name)
    except Exception:  # a malformed header (bad encoded-word, address syntax) reads as absent
        return ""
    return " ".join(str(value).split()) if value is not None else ""


def _body_text(message: EmailMessage, path: Path, options: LoaderOptions) -> str:
    """The plain-text body, else the HTML body rendered by the HTML loader."""
    try:
        part = message.get_body(preferencelist=("plain", "html"))
    except Exception:
        part = None
    if part is None:
        return ""
    try:
        content = part.get_content()
    except Exception:  # unknown charset or broken transfer encoding: the raw bytes decoded leniently
        payload = part.get_payload(decode=True) or b""
        content = payload.decode("utf-8", errors="replace")
    if part.get_content_subtype() == "html":
        doc = load_bytes(content.encode("utf-8"), path.with_suffix(".html"), options)
        return "\n\n".join(s.text for s in doc.sections)
    return content


def _attachment_name(part: EmailMessage, index: int) -> str:
    name = part.get_filename() or ""
    # Only the last path component: a name such as "../../x.pdf" must not shape the source path.
    name = PurePosixPath(name.replace("\\", "/")).name.strip().replace("#", "_")
    return name or f"attachment-{index}"


def _unique(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    stem, dot, suffix = name.rpartition(".")
    n = 2
    while (candidate := f"{stem}-{n}.{suffix}" if dot else f"{name}-{n}") in taken:
        n += 1
    return candidate


def _load_attachment(part: EmailMessage, name: str, options: LoaderOptions) -> Attachment:
    try:
        payload = part.get_payload(decode=True) or b""
    except Exception as exc:
        return Attachment(name, 0, error=f"undecodable attachment: {_short(exc)}")
    attachment = Attachment(name, len(payload))
    limit = options.max_attachment_mb * 2**20
    if len(payload) > limit:
        attachment.error = f"attachment too large ({len(payload) / 2**20:.1f} MiB > {options.max_attachment_mb:g} MiB)"
        return attachment
    try:
        attachment.document = load_bytes(payload, Path(name), options)
    except FileSkipped as exc:
        attachment.skipped = str(exc)
    except (LoaderError, UnsupportedFileType) as exc:
        attachment.error = str(exc)
    except OcrNeeded:
        raise  # the whole message waits for the OCR pass
    except Exception as exc:  # a parser bug on one attachment must not lose the message
        attachment.error = f"{type(exc).__name__}: {_short(exc)}"
    del payload
    return attachment
