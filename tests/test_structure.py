"""Structure-aware chunks: heading paths from each format, anchored definition entries as sections,
terms kept with their definitions, the contextual header, and BM25's heading field."""

from __future__ import annotations

from pathlib import Path

import docx

from ingest.chunking import Chunker
from ingest.loaders import load_document
from retrieval.lexical import LexicalIndex
from retrieval.text_analysis import chunk_header, tokenize

DOCBOOK = """<html><head><title>20.5. Write Ahead Log</title></head><body>
<div class="navheader"><table><tr><td><a href="a.html">Prev</a></td><td>Up</td></tr></table></div>
<div class="sect1"><div class="titlepage"><div><div><h2 class="title">20.5. Write Ahead Log</h2></div></div></div>
<div class="sect2"><div class="titlepage"><div><div><h3 class="title">20.5.1. Settings</h3></div></div></div>
<div class="variablelist"><dl class="variablelist">
<dt id="GUC-WAL-LEVEL"><span class="term"><code>wal_level</code> (<code>enum</code>)</span></dt>
<dd><p>wal_level determines how much information is written to the WAL.</p><p>The default is replica.</p></dd>
<dt id="GUC-FSYNC"><span class="term"><code>fsync</code> (<code>boolean</code>)</span></dt>
<dd><p>If this parameter is on, the server tries to make sure updates are physically written.</p>
<div class="tip"><h3 class="title">Tip</h3><p>Turning it off is only safe for throwaway data.</p></div>
<p>Crash safety depends on it.</p></dd>
</dl></div>
<div class="note"><h3 class="title">Note</h3><p>A note after the list.</p></div>
<p>Text after the note, still under Settings.</p>
</div></div>
<div class="navfooter">Next: Replication</div>
</body></html>"""

SPHINX = """<html><head><title>json — JSON encoder and decoder — Python 3.11 documentation</title></head><body>
<section id="module-json"><h1>json — JSON encoder and decoder<a class="headerlink" href="#x">¶</a></h1>
<p>Intro.</p>
<section id="basic-usage"><h2>Basic Usage</h2>
<dl class="py function"><dt class="sig sig-object py" id="json.dumps">json.dumps(obj, *, ensure_ascii=True, **kw)</dt>
<dd><p>Serialize obj to a JSON formatted str.</p><p>If ensure_ascii is false, these characters will be output as-is.</p></dd></dl>
<p>After the entry.</p>
</section></section></body></html>"""

PARAMS = """<html><head><title>CREATE INDEX</title></head><body><h2>Parameters</h2><dl>
<dt><span class="term">UNIQUE</span></dt><dd><p>Causes the system to check for duplicate values.</p></dd>
<dt><span class="term">CONCURRENTLY</span></dt><dd><p>Build the index without locking out writes.</p><p>More.</p></dd>
</dl></body></html>"""


def sections(tmp_path: Path, name: str, html: str):
    path = tmp_path / name
    path.write_text(html, encoding="utf-8")
    return load_document(path)


def test_docbook_paths_entries_and_admonitions(tmp_path: Path):
    doc = sections(tmp_path, "wal.html", DOCBOOK)
    by_text = {s.text.split("\n")[-1 if s.text.startswith("20.5") else 0]: s.heading_path for s in doc.sections}
    first = doc.sections[0]
    assert first.text.startswith("20.5. Write Ahead Log\n\n20.5.1. Settings\n\nwal_level (enum)\nwal_level determines")
    assert first.heading_path == ("20.5. Write Ahead Log", "20.5.1. Settings", "wal_level")
    assert by_text["fsync (boolean)"] == ("20.5. Write Ahead Log", "20.5.1. Settings", "fsync")
    # An admonition's title heads its own box only; the text after it is back under its parent.
    assert by_text["Tip"] == ("20.5. Write Ahead Log", "20.5.1. Settings", "fsync", "Tip")
    assert by_text["Crash safety depends on it."] == ("20.5. Write Ahead Log", "20.5.1. Settings", "fsync")
    assert by_text["Note"][-1] == "Note"
    assert by_text["Text after the note, still under Settings."] == ("20.5. Write Ahead Log", "20.5.1. Settings")
    text = "\n".join(s.text for s in doc.sections)
    assert "Prev" not in text and "Next: Replication" not in text  # DocBook navigation bars
    # Entries are sections, not headings of the page.
    assert doc.metadata["headings"] == ["20.5. Write Ahead Log", "20.5.1. Settings", "Tip", "Note"]


def test_sphinx_entry_named_by_its_signature_and_closed_with_its_list(tmp_path: Path):
    doc = sections(tmp_path, "json.html", SPHINX)
    # (The heading-only "Basic Usage" section is folded into the entry that follows it.)
    entry = next(s for s in doc.sections if "json.dumps(" in s.text)
    assert entry.heading_path == ("json — JSON encoder and decoder", "Basic Usage", "json.dumps")
    # The signature line is directly followed by the description (no paragraph break between).
    assert "json.dumps(obj, *, ensure_ascii=True, **kw)\nSerialize obj" in entry.text
    after = next(s for s in doc.sections if s.text == "After the entry.")
    assert after.heading_path == ("json — JSON encoder and decoder", "Basic Usage")
    chunks = Chunker(200, 40).split(doc)
    assert any(c.heading_path == "json — JSON encoder and decoder > Basic Usage > json.dumps"
               and "output as-is" in c.text for c in chunks)


def test_definition_terms_stay_with_their_first_paragraph(tmp_path: Path):
    doc = sections(tmp_path, "createindex.html", PARAMS)
    chunks = Chunker(60, 0).split(doc)
    assert any(c.text.startswith("CONCURRENTLY\nBuild the index") for c in chunks), [c.text for c in chunks]


def test_markdown_rst_and_docx_paths(tmp_path: Path):
    md = tmp_path / "guide.md"
    md.write_text("# Guide\n\nIntro.\n\n## Install\n\nSteps.\n\n### Upgrades\n\nUp.\n\n## Use\n\nRun it.\n", encoding="utf-8")
    paths = [s.heading_path for s in load_document(md).sections]
    assert paths == [("Guide",), ("Guide", "Install"), ("Guide", "Install", "Upgrades"), ("Guide", "Use")]

    rst = tmp_path / "guide.rst"
    rst.write_text("Guide\n=====\n\nIntro.\n\nInstall\n-------\n\nSteps.\n\nUse\n---\n\nRun it.\n", encoding="utf-8")
    assert [s.heading_path for s in load_document(rst).sections][-2:] == [("Guide", "Install"), ("Guide", "Use")]

    document = docx.Document()
    document.add_heading("Handbook", level=1)
    document.add_paragraph("Welcome.")
    document.add_heading("Leave", level=2)
    document.add_paragraph("Fifteen days.")
    document.add_heading("Travel", level=2)
    document.add_paragraph("Trains.")
    path = tmp_path / "handbook.docx"
    document.save(path)
    assert [s.heading_path for s in load_document(path).sections][-2:] == [("Handbook", "Leave"), ("Handbook", "Travel")]


def test_contextual_header_and_embedding_text():
    # The first heading repeated in the title: the title is not said twice.
    assert chunk_header("json — JSON encoder and decoder — Python 3.11", "json — JSON encoder and decoder > Basic Usage") == (
        "json — JSON encoder and decoder > Basic Usage")
    assert chunk_header("EXPLAIN", "Parameters") == "EXPLAIN > Parameters"
    assert chunk_header("Notes", None) == "Notes"
    assert chunk_header(None, None) == ""
    assert Chunker(contextual_headers=True).embedding_text("EXPLAIN", "Parameters", "ANALYZE ...") == (
        "EXPLAIN > Parameters\n\nANALYZE ...")
    assert Chunker(contextual_headers=False).embedding_text("EXPLAIN", "Parameters", "ANALYZE ...") == "ANALYZE ..."
    assert Chunker(contextual_headers=True).version != Chunker(contextual_headers=False).version


def test_bm25_heading_field_outweighs_body():
    body = [tokenize("fsync makes sure updates reach the disk"), tokenize("checkpoints happen every few minutes")]
    heads = [tokenize("Write Ahead Log > fsync"), tokenize("Write Ahead Log > checkpoint_timeout")]
    plain, fielded = LexicalIndex(0.0), LexicalIndex(3.0)
    plain.add([1, 2], body)
    fielded.add([1, 2], body, heads)
    query = tokenize("checkpoint timeout")
    assert list(plain.search(query, 2)[1]) == [2]
    scores, ids = fielded.search(query, 2)
    assert list(ids) == [2]
    assert scores[0] > plain.search(query, 2)[0][0]  # the heading's terms count more
    # Saved and loaded with its weight (an index of another weight is rebuilt by the store).
    again = LexicalIndex.deserialize(fielded.serialize())
    assert again.field_weight == 3.0
    assert list(again.search(query, 2)[1]) == list(ids)
