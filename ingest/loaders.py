"""Document loaders: turn a file on disk into titled, located runs of plain text.

Every loader returns a :class:`LoadedDocument` whose sections carry where their text came from
(page for PDFs, nearest heading for structured formats) so that chunks and citations can point
back into the source. Loaders never leak library exceptions: anything unreadable becomes a
:class:`LoaderError` whose message is short enough to show to an operator as-is.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Attachment",
    "FileSkipped",
    "LoadedDocument",
    "LoaderError",
    "LoaderOptions",
    "OcrNeeded",
    "Section",
    "UnsupportedFileType",
    "file_type_for",
    "load_document",
]


@dataclass
class Section:
    """A run of text with its location."""

    text: str
    page: int | None = None  # 1-based page (PDF page, slide, image frame), else None
    heading: str | None = None  # nearest heading (html/md/rst/docx), else None
    # Headings from the outermost to the nearest (the last is ``heading``): "Guide > Install >
    # Upgrades". Empty when the format has no heading levels or the section has no heading.
    heading_path: tuple[str, ...] = ()


@dataclass
class LoadedDocument:
    title: str | None
    sections: list[Section]
    file_type: str  # a value of _SUFFIX_TYPES: "txt", "md", ..., "xlsx", "pptx", "eml", "image"
    metadata: dict[str, object] = field(default_factory=dict)
    # Files carried inside this one (e-mail attachments), each ingested as its own document.
    attachments: list[Attachment] = field(default_factory=list)


@dataclass
class Attachment:
    """A file inside another (an e-mail attachment): loaded, or the reason it could not be."""

    name: str  # unique within its container; the document's source is "<container>#<name>"
    size: int
    document: LoadedDocument | None = None
    error: str | None = None  # set instead of document when the attachment is unreadable
    skipped: str | None = None  # set instead of document when it is deliberately not read


@dataclass(frozen=True)
class LoaderOptions:
    """Settings the loaders receive from their caller (the library never reads configuration)."""

    ocr: bool = True  # OCR scanned PDF pages and images with Tesseract
    ocr_languages: str = "eng+chi_sim"  # Tesseract language codes joined with "+"
    # Pipeline's first pass: raise OcrNeeded instead of running OCR, so slow OCR work can wait until
    # every other file of the run is done.
    defer_ocr: bool = False
    ocr_max_megapixels: float = 60.0  # larger images are refused (20,000 x 20,000 = 400 MP)
    # Zip-based formats (docx, xlsx, xlsm, pptx) are checked before parsing: total uncompressed size
    # and compression ratio, so that a small zip bomb never reaches the XML parser.
    max_unzipped_mb: float = 512.0
    max_zip_ratio: float = 200.0
    max_attachment_mb: float = 100.0
    # Called after each OCR'd page with (pages done, pages to OCR) for progress display.
    on_ocr_page: Callable[[int, int], None] | None = None


class UnsupportedFileType(Exception):
    """The file's suffix is not one we can load."""


class LoaderError(Exception):
    """The file is corrupt or unreadable; ``str(e)`` is a short human-readable reason."""


class FileSkipped(Exception):
    """The file is deliberately not read (e.g. it needs OCR, which is off or not installed).

    Not an error of the file: ``str(e)`` says why, and the file is reported as skipped."""


class OcrNeeded(Exception):
    """Raised instead of running OCR when ``LoaderOptions.defer_ocr`` is set."""

    def __init__(self, pages: int):
        super().__init__(f"{pages} page(s) need OCR")
        self.pages = pages


_SUFFIX_TYPES: dict[str, str] = {
    ".txt": "txt",
    ".md": "md",
    ".markdown": "md",
    ".rst": "rst",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
    ".csv": "csv",
    ".xlsx": "xlsx",
    ".xlsm": "xlsx",
    ".pptx": "pptx",
    ".eml": "eml",
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".tif": "image",
    ".tiff": "image",
}
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(_SUFFIX_TYPES)

_TITLE_MAX = 120  # characters kept of a first line used as a title
CSV_ROWS_PER_SECTION = 50


def file_type_for(path: Path) -> str | None:
    """The loader type for ``path`` by suffix (case-insensitive), or None when unsupported."""
    return _SUFFIX_TYPES.get(Path(path).suffix.lower())


def load_document(path: Path, options: LoaderOptions | None = None) -> LoadedDocument:
    """Load one file. Raises UnsupportedFileType (by suffix), LoaderError (unreadable),
    FileSkipped (not read, with the reason) or OcrNeeded (only with ``options.defer_ocr``)."""
    path = Path(path)
    if file_type_for(path) is None:
        raise UnsupportedFileType(f"unsupported file type: {path.suffix or '(no suffix)'}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoaderError(f"cannot read file: {exc.strerror or exc}") from None
    return load_bytes(data, path, options or LoaderOptions())


def load_bytes(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    """Load a file's content; ``path`` gives its type (suffix) and fallback title (stem)."""
    file_type = file_type_for(path)
    if file_type is None:
        raise UnsupportedFileType(f"unsupported file type: {path.suffix or '(no suffix)'}")
    doc = _LOADERS[file_type](data, path, options)
    doc.title = " ".join(doc.title.split()) if doc.title else path.stem
    doc.sections = _merge_heading_only(
        [s for s in (_clean_section(s) for s in doc.sections) if s.text]
    )
    return doc


# --- shared text helpers ---------------------------------------------------------------------

# Horizontal whitespace including no-break and ideographic (full-width) spaces and zero-width
# characters that editors and PDF extractors sprinkle into text.
_HSPACE = re.compile(r"[ \t\f\v\u00a0\u1680\u2000-\u200b\u202f\u205f\u3000\ufeff]+")
# C0/C1 control characters other than tab/newline: never meaningful in text we index.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def normalise_whitespace(text: str) -> str:
    """Collapse space runs, strip lines, and keep paragraph breaks as exactly one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub(" ", text)
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _clean_section(section: Section) -> Section:
    heading = normalise_whitespace(section.heading) if section.heading else None
    path = tuple(p for p in (" ".join(h.split()) for h in section.heading_path) if p)
    return Section(normalise_whitespace(section.text), section.page, heading or None, path)


def _merge_heading_only(sections: list[Section]) -> list[Section]:
    """Fold a section that is nothing but its heading into the next one.

    ``# Handbook`` directly followed by ``## Leave`` would otherwise become a chunk holding one
    word; prefixed to the next section it gives that section's chunks their context instead.
    """
    out: list[Section] = []
    carry = ""
    for i, sec in enumerate(sections):
        text = f"{carry}\n\n{sec.text}" if carry else sec.text
        carry = ""
        nxt = sections[i + 1] if i + 1 < len(sections) else None
        if nxt is not None and nxt.page == sec.page and _is_heading_only(sec):
            carry = text
            continue
        out.append(Section(text, sec.page, sec.heading, sec.heading_path))
    return out


def _is_heading_only(sec: Section) -> bool:
    if not sec.heading:
        return False
    rest = sec.text.replace(sec.heading, "", 1)
    return not any(ch.isalnum() for ch in rest)  # only markup such as "#" or "====" left


class _HeadingStack:
    """The open headings above the current text, by level: a level-2 heading closes the previous
    level-2 (and deeper) ones, so ``path`` reads "Title > Section > Subsection"."""

    def __init__(self) -> None:
        self._open: list[tuple[float, str]] = []

    def push(self, level: float, text: str) -> tuple[str, ...]:
        while self._open and self._open[-1][0] >= level:
            self._open.pop()
        self._open.append((level, text))
        return self.path

    def pop_to(self, depth: int) -> tuple[str, ...]:
        del self._open[depth:]
        return self.path

    def snapshot(self) -> list[tuple[float, str]]:
        return list(self._open)

    def restore(self, saved: list[tuple[float, str]]) -> tuple[str, ...]:
        self._open[:] = saved
        return self.path

    def __len__(self) -> int:
        return len(self._open)

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(text for _, text in self._open)


def _table_row(cells: list[str]) -> str:
    """Cells joined with " | "; inner empty cells keep their column, trailing ones are dropped."""
    while cells and not cells[-1]:
        cells = cells[:-1]
    return " | ".join(cells)


def _table_lines(rows: list[list[str]], header: list[str] | None) -> list[str]:
    """Table rows as lines; with a header, each cell as "Header: value" (empty cells dropped)."""
    if header is None:
        return [line for line in (_table_row(cells) for cells in rows) if line]
    lines = []
    for cells in rows:
        parts = []
        for i, value in enumerate(cells):
            if value:
                name = header[i] if i < len(header) else ""
                parts.append(f"{name}: {value}" if name and name != value else value)
        if parts:
            lines.append(" | ".join(parts))
    return lines


def _first_line_title(text: str) -> str | None:
    for line in text.splitlines():
        line = _HSPACE.sub(" ", line).strip()
        if line:
            return line if len(line) <= _TITLE_MAX else line[: _TITLE_MAX - 1].rstrip() + "…"
    return None


def decode_text(data: bytes) -> str:
    """Decode a text file: UTF-8 (BOM optional), UTF-16 with BOM, else GB18030.

    GB18030 is the usual encoding of Chinese office files; it is a superset of GBK/GB2312 and of
    ASCII, so it is the natural second guess. Binary data is rejected rather than decoded into
    mojibake (GB18030 accepts many byte sequences, so "it decoded" proves little by itself).
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 carries NULs, so check it first
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise LoaderError("not a text file (invalid UTF-16)") from None
    if b"\x00" in data:
        raise LoaderError("not a text file (binary content)")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if _looks_binary(text):
            break
        return text
    raise LoaderError("not a text file (cannot decode as UTF-8 or GB18030)")


_BINARY_HINTS = frozenset(chr(c) for c in range(32)) - set("\t\n\r\f")


def _looks_binary(text: str) -> bool:
    sample = text[:20000]
    if not sample:
        return False
    # Control characters and private-use code points (where GB18030 maps unassigned byte
    # pairs) are rare in human text but common when binary data is decoded as text.
    odd = sum(1 for ch in sample if ch in _BINARY_HINTS or "\ue000" <= ch <= "\uf8ff")
    return odd / len(sample) > 0.02


# --- plain text, markdown, reStructuredText -------------------------------------------------


def _load_txt(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    text = decode_text(data)
    return LoadedDocument(
        title=_first_line_title(text) or path.stem,
        sections=[Section(text)],
        file_type="txt",
        metadata={},
    )


_MD_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_MD_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_MD_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_MD_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.S)


def _md_inline(text: str) -> str:
    """Heading text without emphasis/code markers and with links reduced to their label."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[*_`]+", "", text).strip()


def _load_md(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    text = decode_text(data).replace("\r\n", "\n").replace("\r", "\n")
    front_title = None
    if m := _MD_FRONT_MATTER.match(text):  # YAML front matter: metadata, not content
        if t := re.search(r"^title:[ \t]*(.+?)[ \t]*$", m.group(1), re.M):
            front_title = t.group(1).strip("'\"") or None
        text = text[m.end() :]

    lines = text.split("\n")
    sections: list[Section] = []
    headings: list[str] = []
    title = front_title
    buf: list[str] = []
    heading: str | None = None
    in_fence: str | None = None
    stack, path = _HeadingStack(), ()

    def flush() -> None:
        sections.append(Section("\n".join(buf), heading=heading, heading_path=path))

    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _MD_FENCE.match(line)
        if fence and (in_fence is None or fence.group(1) == in_fence):
            in_fence = fence.group(1) if in_fence is None else None
        elif in_fence is None:
            level, found = 0, None
            if m := _MD_ATX.match(line):
                level, found = len(m.group(1)), _md_inline(m.group(2) or "")
            elif (
                i + 1 < len(lines)
                and line.strip()
                and (s := _MD_SETEXT.match(lines[i + 1]))
                and not _MD_SETEXT.match(line)
            ):
                # "Title\n=====" is a level-1 heading, "Title\n-----" level 2; keep one line.
                level, found = (1 if s.group(1)[0] == "=" else 2), _md_inline(line)
                i += 1
            if found:
                flush()
                buf, heading, path = [], found, stack.push(level, found)
                headings.append(found)
                if title is None and level == 1:
                    title = found
                line = "#" * level + " " + found
        buf.append(line)
        i += 1
    flush()
    return LoadedDocument(
        title=title or _first_line_title(text) or path.stem,
        sections=sections,
        file_type="md",
        metadata={"headings": headings},
    )


# An adornment line: one punctuation character repeated (at least 3 times, tolerating the
# mismatched lengths that double-width CJK titles produce).
_RST_ADORN = re.compile(r"^([=\-`:'\"~^_*+#<>])\1{2,}\s*$")


_RST_DIRECTIVE = re.compile(r"^\.\.(?:\s+([\w-]+)::|\s|$)(.*)$")
_RST_ADMONITIONS = {
    "note", "tip", "hint", "important", "warning", "caution", "attention", "danger", "error",
}  # fmt: skip


def _load_rst(data: bytes, file: Path, options: LoaderOptions) -> LoadedDocument:
    lines = decode_text(data).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    stack, path, styles = _HeadingStack(), (), {}
    sections: list[Section] = []
    headings: list[str] = []
    title: str | None = None
    buf: list[str] = []
    heading: str | None = None

    def is_adorn(idx: int) -> bool:
        return 0 <= idx < len(lines) and bool(_RST_ADORN.match(lines[idx]))

    i = 0
    while i < len(lines):
        line = lines[i]
        text_line = line.strip()
        # Title shapes: "===\nTitle\n===" (overline + underline) or "Title\n===" (underline).
        overlined = is_adorn(i) and i + 2 < len(lines) and lines[i + 1].strip() and is_adorn(i + 2)
        underlined = (
            text_line and not is_adorn(i) and not line[:1].isspace() and is_adorn(i + 1)
        )
        if overlined or underlined:
            found = lines[i + 1].strip() if overlined else text_line
            sections.append(Section("\n".join(buf), heading=heading, heading_path=path))
            # reST has no fixed levels: each adornment style is one level deeper than the styles
            # seen before it in the document.
            style = (lines[i + 2 if overlined else i + 1].strip()[:1], bool(overlined))
            level = styles.setdefault(style, len(styles))
            buf, heading, path = [found], found, stack.push(level, found)
            headings.append(found)
            title = title or found
            i += 3 if overlined else 2
            continue
        if is_adorn(i):  # a transition (horizontal rule): markup, not text
            i += 1
            continue
        if directive := _RST_DIRECTIVE.match(line):
            # ".. note:: text" reads as "Note: text"; other directive lines (image, code-block,
            # link targets, comments) are markup, but an indented body below them is kept.
            name, rest = directive.group(1), directive.group(2).strip()
            if name and name.lower() in _RST_ADMONITIONS:
                buf.append(f"{name.capitalize()}: {rest}".rstrip())
            i += 1
            continue
        buf.append(line)
        i += 1
    sections.append(Section("\n".join(buf), heading=heading, heading_path=path))
    return LoadedDocument(
        title=title or _first_line_title("\n".join(lines)) or file.stem,
        sections=sections,
        file_type="rst",
        metadata={"headings": headings},
    )


# --- HTML ------------------------------------------------------------------------------------

_HTML_DROP_TAGS = [
    "script", "style", "noscript", "template", "svg", "head", "iframe", "object", "canvas",
    "button", "nav",
]  # fmt: skip
_HTML_CHROME_ROLES = {"navigation", "banner", "contentinfo", "search"}
# Sphinx/Read the Docs page furniture; "headerlink" is the pilcrow anchor after each heading.
_HTML_CHROME_CLASSES = {
    "sphinxsidebar", "related", "footer", "headerlink", "skip-link", "rst-footer-buttons",
    "navheader", "navfooter",  # DocBook's Prev/Up/Next bars (the PostgreSQL manual)
}  # fmt: skip
_HTML_BLOCKS = {
    "address", "article", "aside", "blockquote", "caption", "details", "div", "dl", "fieldset",
    "figcaption", "figure", "footer", "form", "header", "hr", "main", "ol",
    "p", "pre", "section", "summary", "table", "ul",
}  # fmt: skip
_HTML_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
# Deeper element nesting is refused before BeautifulSoup builds its tree. Real pages stay well
# under 100 levels; a file nesting 200,000 <div>s is an attack on the parser (building and walking
# such a tree costs minutes and recursion), not a document.
HTML_MAX_DEPTH = 512


class _DepthProbe:
    """lxml parser target that only measures element nesting: one linear pass, no tree built."""

    def __init__(self) -> None:
        self.depth = 0
        self.max_depth = 0

    def start(self, tag: str, attrib: dict) -> None:
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)

    def end(self, tag: str) -> None:
        self.depth -= 1

    def data(self, data: str) -> None:
        pass

    def close(self) -> int:
        return self.max_depth


def html_depth(data: bytes) -> int:
    """The deepest element nesting of an HTML document, as lxml (BeautifulSoup's parser) sees it."""
    from lxml import etree

    # Same parser and recovery as BeautifulSoup's "lxml" builder, so the depth is the tree's.
    return etree.fromstring(data, etree.HTMLParser(target=_DepthProbe(), huge_tree=True)) or 0


def _is_html_chrome(tag: Any, in_content: bool) -> bool:
    """Site furniture, hidden elements and heading anchors: not part of the page's text."""
    classes = set(tag.get("class") or ())
    return bool(
        tag.get("role") in _HTML_CHROME_ROLES
        or classes & _HTML_CHROME_CLASSES
        or tag.has_attr("hidden")
        or tag.get("aria-hidden") == "true"
        or re.search(r"display\s*:\s*none", tag.get("style") or "")
        # Page-level header/footer is site chrome; inside an article it holds real content.
        or (tag.name in ("header", "footer") and not in_content)
        or (tag.name == "a" and tag.get_text(strip=True) == "¶")
    )


def _load_html(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    from bs4 import BeautifulSoup, Tag, XMLParsedAsHTMLWarning
    from bs4.element import NavigableString, PreformattedString

    try:
        depth = html_depth(data)
    except Exception:  # nothing lxml can parse at all: BeautifulSoup below says so
        depth = 0
    if depth > HTML_MAX_DEPTH:
        raise LoaderError(f"unreadable HTML: elements nested too deeply ({depth} levels > {HTML_MAX_DEPTH})")

    # Bytes, not str: BeautifulSoup honours <meta charset> (e.g. gb2312 pages) and BOMs.
    try:
        with warnings.catch_warnings():
            # XHTML pages (DocBook output such as the GIMP manual) start with <?xml ...?>; lxml's
            # HTML parser reads them correctly, the warning would only flood the ingest log.
            warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)
            soup = BeautifulSoup(data, "lxml")
    except Exception as exc:  # lxml rarely fails, but a loader must never leak a traceback
        raise LoaderError(f"unreadable HTML: {_short(exc)}") from None

    title = None
    if soup.title and soup.title.get_text(strip=True):
        title = soup.title.get_text(" ", strip=True)

    for tag in soup.find_all(_HTML_DROP_TAGS):
        tag.decompose()

    sections: list[Section] = []
    headings: list[str] = []
    buf: list[str] = []
    state: dict[str, Any] = {"heading": None, "h1": None, "path": (), "dl": 0, "body": False, "glue": False}
    stack = _HeadingStack()

    def flush() -> None:
        sections.append(Section("".join(buf), heading=state["heading"], heading_path=state["path"]))
        buf.clear()

    def open_heading(level: float, text: str) -> None:
        flush()
        state["heading"], state["path"] = text, stack.push(level, text)
        state["body"] = False  # no text under this heading yet

    # Chrome is skipped while walking (one pass over the tree). Removing it beforehand needed a
    # "was this already removed with an ancestor?" test per tag, and bs4 answers an attribute it
    # lacks by searching the subtree (Tag.__getattr__ -> find): quadratic in the nesting depth.
    def walk(node: Tag, out: list[str], pre: bool = False, in_content: bool = False) -> None:
        for child in node.children:
            if isinstance(child, PreformattedString):  # comments, CDATA, doctype, <?pi?>
                continue
            if isinstance(child, NavigableString):
                # Source newlines inside a paragraph are just spaces; <pre> keeps its lines.
                out.append(str(child) if pre else re.sub(r"\s+", " ", str(child)))
                if child.strip():
                    state["glue"] = False
                    if out is buf:
                        state["body"] = True
                continue
            if not isinstance(child, Tag) or _is_html_chrome(child, in_content):
                continue
            name = child.name
            inner = in_content or name in ("article", "main", "section")
            if name in _HTML_HEADINGS and out is buf:
                text = inline_text(child, inner)
                if text:
                    # Inside a definition list (an admonition in a parameter's description) a
                    # heading nests under the entry instead of closing it and its section.
                    level = int(name[1]) if not state["dl"] else 6.5 + state["dl"]
                    open_heading(level, text)
                    headings.append(text)
                    if name == "h1" and state["h1"] is None:
                        state["h1"] = text
                    buf.append(text + "\n\n")
                continue
            if name == "dl" and out is buf:
                # A definition list whose terms are anchored entries (<dt id=...>: Sphinx API
                # signatures, DocBook configuration parameters) is a list of small sections: each
                # entry's text goes under its own heading, so it is chunked on its own and its
                # chunks carry the entry's name. The entries end with the list.
                depth = len(stack)
                state["dl"] += 1
                out.append("\n\n")
                walk(child, out, pre, inner)
                out.append("\n\n")
                state["dl"] -= 1
                if len(stack) > depth:
                    flush()
                    state["path"] = stack.pop_to(depth)
                    state["heading"] = state["path"][-1] if state["path"] else None
                continue
            if name == "dt" and out is buf and child.get("id") and (label := entry_label(child, inner)):
                open_heading(6 + state["dl"], label)
            if name == "br":
                out.append("\n")
            elif name == "table":
                out.append("\n\n" + table_text(child, inner) + "\n\n")
            elif name == "tr":  # a row outside any <table> (broken markup)
                cells = [inline_text(c, inner) for c in child.find_all(["td", "th"], recursive=False)]
                out.append("\n" + _table_row(cells))
            elif name in ("li", "dt", "dd"):
                # Items start a new line; the enclosing list/table adds the paragraph break
                # after the last one, so items stay on consecutive lines.
                out.append("\n")
                # A description's first paragraph follows its term on the next line instead of
                # after a paragraph break, so the chunker (which cuts at paragraph breaks first)
                # keeps "CONCURRENTLY" with what it means: the first block inside <dd> opens with
                # no break of its own (cleared by the first text).
                state["glue"] = name == "dd"
                walk(child, out, pre, inner)
                state["glue"] = False
            elif name in _HTML_BLOCKS or name in _HTML_HEADINGS:
                saved = stack.snapshot()
                if not state["glue"]:
                    out.append("\n\n")
                walk(child, out, pre or name == "pre", inner)
                out.append("\n\n")
                if stack.snapshot() != saved and state["body"] and out is buf:
                    # A heading opened inside this element, followed by text, ends with it: a
                    # <section> of a Sphinx page, a DocBook <div class="sect2">, an admonition's
                    # "Tip" title. A wrapper holding only its heading (DocBook's titlepage,
                    # <header><h1>) does not end it: the text after the wrapper belongs to it.
                    flush()
                    state["path"] = stack.restore(saved)
                    state["heading"] = state["path"][-1] if state["path"] else None
            else:
                walk(child, out, pre, inner)

    def entry_label(dt: Tag, in_content: bool) -> str:
        """An anchored term's name: its text up to any parameter list ("json.dumps(obj, ...)" ->
        "json.dumps"), or its anchor id when that is still long."""
        text = inline_text(dt, in_content).split("(", 1)[0].strip()
        return text if 0 < len(text) <= 80 else str(dt.get("id"))[:80]

    def inline_text(tag: Tag, in_content: bool) -> str:
        """A heading's or table cell's text on one line, rendered like body text."""
        tmp: list[str] = []
        walk(tag, tmp, in_content=in_content)
        return _HSPACE.sub(" ", "".join(tmp).replace("\n", " ")).strip()

    def table_text(table: Tag, in_content: bool) -> str:
        """Caption, then one line per row; under a header row (all <th>, or in <thead>) every
        cell is prefixed with its column's header, so a row read alone still says what it is."""
        caption = table.find("caption", recursive=False)
        rows: list[list[str]] = []
        header: list[str] | None = None
        for part in table.children:
            if not isinstance(part, Tag):
                continue
            trs = [part] if part.name == "tr" else (
                [r for r in part.children if isinstance(r, Tag) and r.name == "tr"]
                if part.name in ("thead", "tbody", "tfoot") else []
            )
            for tr in trs:
                if _is_html_chrome(tr, in_content):
                    continue
                cells = [c for c in tr.find_all(["td", "th"], recursive=False) if not _is_html_chrome(c, in_content)]
                texts = [inline_text(c, in_content) for c in cells]
                is_header = bool(cells) and (part.name == "thead" or all(c.name == "th" for c in cells))
                if header is None and not rows and is_header:
                    # A header cell spanning columns names each of them.
                    header = [t for c, t in zip(cells, texts) for _ in range(_colspan(c))]
                    continue
                rows.append(texts)
        lines = [inline_text(caption, in_content)] if caption else []
        if header is not None and not rows:
            lines.append(_table_row(header))
        lines.extend(_table_lines(rows, header))
        return "\n".join(line for line in lines if line)

    try:
        walk(soup.body or soup, buf)
    except RecursionError:  # pathological nesting that slipped past the depth check
        raise LoaderError("unreadable HTML: elements nested too deeply") from None
    flush()
    if title is None:  # no <title>: the first heading, preferring an <h1>
        title = state["h1"] or (headings[0] if headings else path.stem)
    return LoadedDocument(
        title=title, sections=sections, file_type="html", metadata={"headings": headings}
    )


def _colspan(cell: Any) -> int:
    try:
        return max(1, min(int(cell.get("colspan") or 1), 64))
    except ValueError:
        return 1


# --- PDF -------------------------------------------------------------------------------------

_pypdf_quiet_lock = threading.Lock()
_pypdf_quiet_depth = 0
_pypdf_saved_level = logging.NOTSET


@contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """Silence pypdf's per-object warnings ("Ignoring wrong pointing object ...") for one load.

    pypdf reports the robustness fixes it applies to broken files through loggers under
    ``pypdf``; a large ingest of real-world PDFs would otherwise flood the console. The level is
    reference-counted so concurrent loads in threads restore the original level correctly.
    """
    global _pypdf_quiet_depth, _pypdf_saved_level
    logger = logging.getLogger("pypdf")
    with _pypdf_quiet_lock:
        if _pypdf_quiet_depth == 0:
            _pypdf_saved_level = logger.level
            logger.setLevel(logging.ERROR + 10)  # pypdf also logs recoverable issues as ERROR
        _pypdf_quiet_depth += 1
    try:
        yield
    finally:
        with _pypdf_quiet_lock:
            _pypdf_quiet_depth -= 1
            if _pypdf_quiet_depth == 0:
                logger.setLevel(_pypdf_saved_level)


def _short(exc: BaseException, limit: int = 120) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


# Titles that PDF producers write when the author gave none (reportlab writes "untitled").
_PDF_PLACEHOLDER_TITLES = {"untitled", "untitled document", "unknown", "anonymous", "none"}


# A page with fewer word characters than this that draws an image is taken as scanned (a scan
# often carries a stamped page number or Bates label in a thin text layer).
PDF_OCR_BELOW_CHARS = 16


def _page_list(pages: list[int]) -> str:
    return ", ".join(map(str, pages[:10])) + (f" and {len(pages) - 10} more" if len(pages) > 10 else "")


def _load_pdf(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    from ingest import ocr

    with _quiet_pypdf():
        try:
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted:
                # Many PDFs are "encrypted" only to set permissions, with an empty user password.
                try:
                    ok = reader.decrypt("")
                except DependencyError:
                    raise LoaderError(
                        "encrypted PDF: decrypting it needs the 'cryptography' package"
                    ) from None
                if not ok:
                    raise LoaderError("corrupt PDF: encrypted and needs a password")
            n_pages = len(reader.pages)
            info_title = None
            try:
                info_title = (reader.metadata or {}).get("/Title")
            except Exception:  # a broken Info dictionary should not cost us the text
                info_title = None
        except LoaderError:
            raise
        except Exception as exc:  # pypdf raises many types (PdfReadError, KeyError, ...)
            raise LoaderError(f"corrupt PDF: {_short(exc)}") from None

        sections: list[Section] = []
        failed: list[int] = []
        scanned: list[int] = []  # pages without a text layer that carry images: OCR reads them
        for number in range(1, n_pages + 1):
            try:
                page = reader.pages[number - 1]
                text = page.extract_text() or ""
            except Exception:  # one damaged page content stream: keep the other pages
                failed.append(number)
                continue
            if len(re.findall(r"\w", text)) < PDF_OCR_BELOW_CHARS and ocr.pdf_page_has_images(page):
                scanned.append(number)
            sections.append(Section(text, page=number))
        metadata: dict[str, object] = {"pages": n_pages}
        if scanned:
            has_text = any(s.text.strip() for s in sections if s.page not in scanned)
            what = "scanned PDF pages " + _page_list(scanned) if has_text else "scanned PDF"
            try:
                ocr.ocr_gate(options, len(scanned), what)
            except FileSkipped as exc:
                if not has_text:
                    raise
                # A mixed PDF keeps its text pages; the operator learns which pages were not read.
                metadata["pages_not_read"] = scanned
                metadata["skipped_reason"] = str(exc)
            else:
                by_page = {s.page: s for s in sections}
                for done, number in enumerate(scanned, start=1):
                    try:
                        ocr_text = ocr.ocr_pdf_page(reader.pages[number - 1], options)
                    except LoaderError:
                        raise
                    except Exception as exc:  # damaged image data on this page
                        raise LoaderError(f"corrupt PDF: page {number} image: {_short(exc)}") from None
                    by_page[number].text = (by_page[number].text + "\n\n" + ocr_text).strip()
                    if options.on_ocr_page is not None:
                        options.on_ocr_page(done, len(scanned))
                metadata["ocr_pages"] = scanned

    if not any(s.text.strip() for s in sections):
        if failed and len(failed) == n_pages:
            raise LoaderError("corrupt PDF: no page could be read")
        raise LoaderError("no extractable text (no text layer and no scanned images)")

    title = str(info_title).strip() if info_title else ""
    title = re.sub(r"^Microsoft (Word|PowerPoint|Excel) - ", "", title)  # print-driver prefix
    if title.lower() in _PDF_PLACEHOLDER_TITLES:
        title = ""
    if not title:
        title = next((t for s in sections if (t := _first_line_title(s.text))), None) or path.stem
    if failed:
        metadata["unreadable_pages"] = failed
    return LoadedDocument(title=title, sections=sections, file_type="pdf", metadata=metadata)


# --- zip-based office formats ----------------------------------------------------------------

# OLE2 compound file: what Office writes for password-protected (encrypted) .docx/.xlsx/.pptx,
# and the legacy .doc/.xls/.ppt formats.
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_RATIO_FROM_BYTES = 16 * 2**20  # below this much uncompressed data the ratio is not checked


def check_office_zip(data: bytes, kind: str, options: LoaderOptions) -> None:
    """Refuse an Office file before any XML is parsed when it is encrypted, not a zip, or a zip
    bomb: the sizes the archive declares (summed over its members) are checked against
    ``max_unzipped_mb`` and ``max_zip_ratio``. zipfile verifies each member's declared size while
    extracting, so a lying header fails on read instead of inflating past the limit."""
    if data.startswith(_OLE_MAGIC):
        raise LoaderError(f"encrypted or password-protected {kind} (or a legacy binary Office file): cannot be read")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        raise LoaderError(f"corrupt {kind}: not a valid zip archive") from None
    unzipped = sum(m.file_size for m in members)
    limit = options.max_unzipped_mb * 2**20
    if unzipped > limit:
        raise LoaderError(
            f"{kind} refused: {unzipped / 2**20:,.0f} MiB uncompressed > {options.max_unzipped_mb:g} MiB "
            f"(ingest.max_unzipped_mb; a zip bomb?)"
        )
    ratio = unzipped / max(len(data), 1)
    if unzipped > _ZIP_RATIO_FROM_BYTES and ratio > options.max_zip_ratio:
        raise LoaderError(
            f"{kind} refused: compression ratio {ratio:,.0f}:1 > {options.max_zip_ratio:g}:1 "
            f"(ingest.max_zip_ratio; a zip bomb?)"
        )


# --- DOCX ------------------------------------------------------------------------------------

# Built-in heading styles are stored as "heading N" whatever the UI language; python-docx shows
# them as "Heading N". Custom Chinese templates sometimes name them "标题 N".
_DOCX_HEADING = re.compile(r"^(heading|标题)\s*\d", re.I)
_DOCX_TITLE_STYLES = {"title", "标题"}


def _load_docx(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    import docx
    from docx.text.paragraph import Paragraph

    check_office_zip(data, "DOCX", options)
    try:
        document = docx.Document(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise LoaderError("corrupt DOCX: not a valid zip archive") from None
    except Exception as exc:  # missing parts, wrong content type, malformed XML, ...
        raise LoaderError(f"corrupt DOCX: {_short(exc)}") from None

    sections: list[Section] = []
    headings: list[str] = []
    buf: list[str] = []
    heading: str | None = None
    first_title: str | None = None
    first_h1: str | None = None
    stack, path = _HeadingStack(), ()

    try:
        for block in document.iter_inner_content():
            if not isinstance(block, Paragraph):  # the only other kind is a Table
                buf.append(_docx_table_text(block))
                continue
            text = block.text.strip()
            if not text:
                continue
            style = (block.style.name if block.style is not None else "") or ""
            is_title = style.strip().lower() in _DOCX_TITLE_STYLES
            if is_title or _DOCX_HEADING.match(style):
                sections.append(Section("\n\n".join(buf), heading=heading, heading_path=path))
                digits = re.search(r"\d+", style)
                level = 0 if is_title else int(digits.group()) if digits else 1
                buf, heading, path = [], text, stack.push(level, text)
                headings.append(text)
                if is_title:
                    first_title = first_title or text
                elif re.sub(r"\s+", "", style.lower()) in ("heading1", "标题1"):
                    first_h1 = first_h1 or text
            buf.append(text)
        sections.append(Section("\n\n".join(buf), heading=heading, heading_path=path))
        core_title = (document.core_properties.title or "").strip()
    except Exception as exc:
        raise LoaderError(f"corrupt DOCX: {_short(exc)}") from None

    all_text = "\n".join(s.text for s in sections)
    title = core_title or first_title or first_h1 or _first_line_title(all_text) or path.stem
    return LoadedDocument(
        title=title, sections=sections, file_type="docx", metadata={"headings": headings}
    )


def _docx_table_text(table: Any) -> str:
    """A Word table as text: one line per row, cells joined with " | "; under a header row each
    cell is prefixed with its column's header (see _docx_header_row)."""
    rows: list[list[str]] = []
    for row in table.rows:
        cells: list[str] = []
        seen: set[object] = set()  # lxml elements hash and compare by identity
        for cell in row.cells:
            # A merged cell is returned once per grid column it spans; print it once.
            if cell._tc in seen:
                continue
            seen.add(cell._tc)
            cells.append(" ".join(cell.text.split()))
        rows.append(cells)
    rows = [r for r in rows if any(r)]
    if len(rows) >= 2 and _docx_header_row(table, rows[0]):
        return "\n".join(_table_lines(rows[1:], rows[0]))
    return "\n".join(_table_lines(rows, None))


_W_NS = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def _docx_header_row(table: Any, first: list[str]) -> bool:
    """Whether a table's first row names its columns.

    Word has no semantic header cell. The first row counts as one when the author marked it
    "Repeat as header row" (w:tblHeader), or when every cell of it holds words without figures
    and the table has three or more columns or a bold first row. Two-column tables without those
    marks are usually label/value forms ("Name | Alice"), whose first row is data.
    """
    try:
        tr = table.rows[0]._tr
    except IndexError:
        return False
    if tr.find(f"{_W_NS}trPr/{_W_NS}tblHeader") is not None:
        return True
    if not first or not all(cell and not any(ch.isdigit() for ch in cell) for cell in first):
        return False
    if len(first) >= 3:
        return True
    runs = [run for cell in table.rows[0].cells for p in cell.paragraphs for run in p.runs if run.text.strip()]
    return bool(runs) and all(run.bold for run in runs)


# --- CSV -------------------------------------------------------------------------------------


def _load_csv(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    text = decode_text(data)
    sample = text[:64 * 1024]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:  # a single column or too little text to tell: plain comma CSV
        dialect = csv.excel
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), dialect))
    except csv.Error as exc:
        raise LoaderError(f"malformed CSV: {_short(exc)}") from None

    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        return LoadedDocument(path.stem, [], "csv", {"columns": [], "rows": 0})
    header = [h.strip() or f"column {i + 1}" for i, h in enumerate(rows[0])]
    lines = []
    for row in rows[1:]:
        parts = []
        for i, value in enumerate(row):
            value = " ".join(value.split())
            if value:
                name = header[i] if i < len(header) else f"column {i + 1}"
                parts.append(f"{name}: {value}")
        lines.append("; ".join(parts))
    # Whole rows per section, so a chunk boundary never cuts a record in half.
    sections = [
        Section("\n".join(lines[i : i + CSV_ROWS_PER_SECTION]))
        for i in range(0, len(lines), CSV_ROWS_PER_SECTION)
    ]
    return LoadedDocument(
        title=path.stem,
        sections=sections,
        file_type="csv",
        metadata={"columns": header, "rows": len(lines)},
    )


def _load_xlsx(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    from ingest.office import load_xlsx

    return load_xlsx(data, path, options)


def _load_pptx(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    from ingest.office import load_pptx

    return load_pptx(data, path, options)


def _load_eml(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    from ingest.email_loader import load_eml

    return load_eml(data, path, options)


def _load_image(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    from ingest.ocr import load_image

    return load_image(data, path, options)


_LOADERS: dict[str, Callable[[bytes, Path, LoaderOptions], LoadedDocument]] = {
    "txt": _load_txt,
    "md": _load_md,
    "rst": _load_rst,
    "html": _load_html,
    "pdf": _load_pdf,
    "docx": _load_docx,
    "csv": _load_csv,
    "xlsx": _load_xlsx,
    "pptx": _load_pptx,
    "eml": _load_eml,
    "image": _load_image,
}
