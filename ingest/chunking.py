"""Split loaded documents into overlapping, sentence-aligned chunks for embedding.

Sizes are in characters (not tokens): the same setting then means roughly the same amount of
text for Chinese and English, and splitting needs no tokenizer. Each section is split on its
own, so a chunk never spans two PDF pages or two headings and can cite exactly one location.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from langchain_text_splitters import RecursiveCharacterTextSplitter

from ingest.loaders import LoadedDocument
from retrieval.text_analysis import chunk_header

__all__ = ["CHUNKER_VERSION", "Chunk", "Chunker", "SEPARATORS"]

# Bumped whenever the same file would give other chunks or other embedded text, so knowledge bases
# built before can be found (documents' index_version) and rebuilt with `ingest reindex`.
# 1 (unrecorded): one heading per section. 2: heading paths, anchored definition-list entries as
# sections of their own, the contextual header in front of the embedded text.
CHUNKER_VERSION = 2

# Tried in order: the first that occurs in an over-long piece of text splits it, and pieces that
# are still too long are split by the next ones. They are regexes (is_separator_regex=True) and
# are kept at the END of the piece before them (keep_separator="end"), so a sentence keeps its
# full stop and the next chunk starts at the start of a sentence. Must not contain capturing
# groups: the splitter wraps each in one for re.split.
SEPARATORS: list[str] = [
    r"\n\n+",  # paragraphs
    r"\n",  # lines (list items, table rows, CSV records)
    # Chinese sentence enders, with any closing quotes/brackets that follow them: 他说：“好。”
    r"[。！？]+[”’」』）》]*",
    # English sentence enders: punctuation, optional closing quote/bracket, then whitespace, so
    # "3.5" or "example.com" are not split.
    r"[.!?]+[\"'”’)\]]*\s+",
    # Clauses: semicolons (both widths), then commas (both widths, plus the Chinese list comma).
    r"；|;\s+",
    r"[，、]|,\s+",
    r"\s+",  # words
    "",  # characters: last resort for unbroken text such as long URLs or unpunctuated CJK
]


@dataclass
class Chunk:
    ordinal: int  # 0.. within the document
    text: str
    page: int | None
    heading: str | None  # the nearest heading
    # The section's heading path, outermost first, joined with " > " ("Guide > Install >
    # Upgrades"); the nearest heading alone when the format gives no levels.
    heading_path: str | None = field(default=None, compare=False)


class Chunker:
    def __init__(self, chunk_size: int = 750, chunk_overlap: int = 150, contextual_headers: bool = False):
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if not 0 <= chunk_overlap < chunk_size:
            raise ValueError("chunk_overlap must be at least 0 and smaller than chunk_size")
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.contextual_headers = contextual_headers
        self._splitter = RecursiveCharacterTextSplitter(
            separators=SEPARATORS,
            is_separator_regex=True,
            keep_separator="end",
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            length_function=len,
            strip_whitespace=True,
        )

    @property
    def version(self) -> str:
        """What this chunker produces, for a document's index_version."""
        headers = "headers" if self.contextual_headers else "plain"
        return f"chunker{CHUNKER_VERSION}/{self.chunk_size}/{self.chunk_overlap}/{headers}"

    def embedding_text(self, title: str | None, heading: str | None, text: str) -> str:
        """What is embedded for a chunk: its contextual header ("Title > Section > Entry", see
        retrieval.text_analysis.chunk_header) on the first line, then the text. The stored and
        cited text stays the chunk's own."""
        header = chunk_header(title, heading) if self.contextual_headers else ""
        return f"{header}\n\n{text}" if header else text

    def split(self, doc: LoadedDocument) -> list[Chunk]:
        """Chunks of ``doc`` in reading order; the same input always gives the same output."""
        chunks: list[Chunk] = []
        for section in doc.sections:
            path = " > ".join(section.heading_path) if section.heading_path else section.heading
            for piece in self.split_text(section.text):
                chunks.append(Chunk(len(chunks), piece, section.page, section.heading, path))
        return chunks

    def split_text(self, text: str) -> list[str]:
        pieces = (p.strip() for p in self._splitter.split_text(text))
        # A piece that is only punctuation/markup (e.g. a stray "。" after a character split)
        # carries nothing worth embedding.
        return [p for p in pieces if p and re.search(r"\w", p)]
