"""Chunker: bounded sizes, overlap, sentence-aligned Chinese/English splits, stable output."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.chunking import Chunk, Chunker
from ingest.loaders import LoadedDocument, Section, load_document

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "docs"

ENGLISH = " ".join(
    f"Rule {i} says that every traveller keeps the receipts for item number {i}."
    + (f" Ask finance about case {i} if unsure!" if i % 4 == 0 else "")
    + (f" Is a taxi allowed after midnight on day {i}?" if i % 5 == 0 else "")
    for i in range(40)
)
CHINESE = "".join(
    f"第{i}条员工出差期间应当妥善保管全部票据并按时提交报销申请{'。！？'[i % 3]}" for i in range(40)
)


def doc_of(*sections: Section) -> LoadedDocument:
    return LoadedDocument(title="t", sections=list(sections), file_type="txt", metadata={})


def test_chunk_sizes_respect_chunk_size():
    chunker = Chunker(chunk_size=200, chunk_overlap=40)
    chunks = chunker.split(doc_of(Section(ENGLISH), Section(CHINESE)))
    assert len(chunks) > 10
    assert all(0 < len(c.text) <= 200 for c in chunks)
    assert all(c.text == c.text.strip() for c in chunks)


def test_defaults_are_750_and_150():
    chunker = Chunker()
    assert (chunker.chunk_size, chunker.chunk_overlap) == (750, 150)
    chunks = chunker.split(doc_of(Section(ENGLISH * 3)))
    assert all(len(c.text) <= 750 for c in chunks)
    assert max(len(c.text) for c in chunks) > 500  # chunks are packed, not one per sentence


def test_consecutive_chunks_overlap():
    chunker = Chunker(chunk_size=200, chunk_overlap=100)
    chunks = chunker.split(doc_of(Section(ENGLISH)))
    assert len(chunks) > 5
    for prev, nxt in zip(chunks, chunks[1:]):
        # The next chunk starts with a whole sentence that also ended the previous chunk.
        first_sentence = nxt.text.split(". ")[0].split("! ")[0].split("? ")[0]
        assert first_sentence in prev.text, (prev.text, nxt.text)


def test_no_overlap_when_overlap_is_zero():
    chunks = Chunker(chunk_size=200, chunk_overlap=0).split(doc_of(Section(ENGLISH)))
    joined = " ".join(c.text for c in chunks)
    assert joined == ENGLISH  # nothing repeated, nothing lost


def test_chinese_splits_after_sentence_enders():
    chunks = Chunker(chunk_size=100, chunk_overlap=0).split(doc_of(Section(CHINESE)))
    assert len(chunks) > 5
    for chunk in chunks:
        assert chunk.text[-1] in "。！？", chunk.text  # punctuation stays with its sentence
        assert chunk.text[0] == "第", chunk.text  # and the next chunk starts a fresh sentence
    assert "".join(c.text for c in chunks) == CHINESE


def test_chinese_closing_quote_stays_with_sentence():
    text = "".join(f"经理说：“第{i}项报销需要在三十天内提交完毕。”" for i in range(12))
    chunks = Chunker(chunk_size=60, chunk_overlap=0).split(doc_of(Section(text)))
    assert len(chunks) > 2
    assert all(c.text.endswith("。”") for c in chunks)


def test_english_splits_at_sentence_ends():
    chunks = Chunker(chunk_size=160, chunk_overlap=30).split(doc_of(Section(ENGLISH)))
    assert len(chunks) > 5
    for chunk in chunks:
        assert chunk.text[-1] in ".!?", chunk.text
        assert chunk.text[0].isupper(), chunk.text


def test_paragraph_boundaries_preferred():
    # Two short lines, then three: packing lines greedily would put the first line of the second
    # paragraph into the first chunk; splitting at the blank line first keeps paragraphs whole.
    line = "A line of about sixty characters for the paragraph test."
    para1, para2 = "\n".join([line] * 2), "\n".join([line] * 3)
    chunks = Chunker(chunk_size=200, chunk_overlap=0).split(doc_of(Section(f"{para1}\n\n{para2}")))
    assert [c.text for c in chunks] == [para1, para2]


def test_unbroken_text_still_split_within_limit():
    text = "https://intra.example/" + "x" * 500
    chunks = Chunker(chunk_size=100, chunk_overlap=10).split(doc_of(Section(text)))
    assert all(len(c.text) <= 100 for c in chunks)
    assert chunks[0].text.startswith("https://intra.example/")


def test_chunks_never_cross_pages_and_carry_location():
    doc = doc_of(
        Section("Page one ends mid thought and", page=1, heading="Intro"),
        Section("continues on page two. " * 20, page=2, heading="Intro"),
        Section("Short last page.", page=3, heading="Outlook"),
    )
    chunks = Chunker(chunk_size=120, chunk_overlap=30).split(doc)
    assert chunks[0] == Chunk(0, "Page one ends mid thought and", 1, "Intro")
    assert chunks[-1] == Chunk(len(chunks) - 1, "Short last page.", 3, "Outlook")
    by_page = {s.page: s.text for s in doc.sections}
    for chunk in chunks:
        assert chunk.text in by_page[chunk.page]
    assert {c.page for c in chunks} == {1, 2, 3}


def test_ordinals_consecutive_and_empty_sections_skipped():
    doc = doc_of(Section(ENGLISH), Section("   \n\n "), Section(CHINESE), Section("。"))
    chunks = Chunker(chunk_size=150, chunk_overlap=30).split(doc)
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert all(c.text.strip() and c.text != "。" for c in chunks)
    assert Chunker().split(doc_of()) == []


def test_output_is_deterministic():
    doc = doc_of(Section(ENGLISH, page=1), Section(CHINESE, page=2, heading="规定"))
    first = Chunker(300, 60).split(doc)
    assert first == Chunker(300, 60).split(doc)
    assert first == Chunker(300, 60).split(doc)  # and stable across repeated calls


def test_invalid_settings_rejected():
    with pytest.raises(ValueError):
        Chunker(chunk_size=100, chunk_overlap=100)
    with pytest.raises(ValueError):
        Chunker(chunk_size=0, chunk_overlap=0)
    with pytest.raises(ValueError):
        Chunker(chunk_size=100, chunk_overlap=-1)


def test_sample_documents_chunk_cleanly():
    chunker = Chunker()
    for path in (SAMPLES / "报销流程.md", SAMPLES / "office-directory.csv"):
        doc = load_document(path)
        chunks = chunker.split(doc)
        assert chunks and all(len(c.text) <= 750 for c in chunks)
        assert [c.heading for c in chunks if c.heading] == [
            s.heading for s in doc.sections for _ in chunker.split_text(s.text) if s.heading
        ]
    # CSV rows are never cut: every chunk line is a complete "column: value" record.
    offices = chunker.split(load_document(SAMPLES / "office-directory.csv"))
    for chunk in offices:
        assert all(line.startswith("office: ") for line in chunk.text.splitlines())
