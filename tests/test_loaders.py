"""Loaders: every format yields real text with its location; bad files fail with short reasons."""

from __future__ import annotations

import importlib.util
import io
import logging
import re
import zipfile
from pathlib import Path

import pytest
import yaml

from ingest.loaders import (
    SUPPORTED_SUFFIXES,
    LoaderError,
    UnsupportedFileType,
    file_type_for,
    load_document,
)

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "docs"


# --- helpers -----------------------------------------------------------------------------------


def make_pdf(path: Path, pages: list[str], title: str | None = None) -> Path:
    """A PDF with one page per string (lines drawn top-down), built with reportlab."""
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), invariant=1)
    if title:
        c.setTitle(title)
    for text in pages:
        y = 780
        for line in text.splitlines():
            c.drawString(72, y, line)
            y -= 16
        c.showPage()
    c.save()
    return path


def make_docx(path: Path, core_title: str = "") -> Path:
    import docx

    document = docx.Document()
    document.core_properties.title = core_title
    document.add_paragraph("Intro paragraph before any heading.")
    document.add_heading("Expense Limits", level=1)
    document.add_paragraph("Meals are reimbursed up to 45 dollars per day.")
    table = document.add_table(rows=2, cols=3)
    for cell, text in zip(table.rows[0].cells, ("City", "Hotel", "Meals")):
        cell.text = text
    for cell, text in zip(table.rows[1].cells, ("Boston", "250", "60")):
        cell.text = text
    document.add_heading("Approval", level=2)
    document.add_paragraph("Claims above 2000 dollars need CFO approval.")
    document.save(str(path))
    return path


def load_make_samples():
    spec = importlib.util.spec_from_file_location(
        "make_samples", SAMPLES.parent / "make_samples.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def all_text(doc) -> str:
    return "\n".join(s.text for s in doc.sections)


# --- file types --------------------------------------------------------------------------------


def test_supported_suffixes_and_file_types():
    assert SUPPORTED_SUFFIXES == {
        ".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".pdf", ".docx", ".csv",
        ".xlsx", ".xlsm", ".pptx", ".eml", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
    }  # fmt: skip
    assert file_type_for(Path("a/B.PDF")) == "pdf"
    assert file_type_for(Path("notes.markdown")) == "md"
    assert file_type_for(Path("page.htm")) == "html"
    assert file_type_for(Path("table.csv")) == "csv"
    assert file_type_for(Path("program.exe")) is None
    assert file_type_for(Path("Makefile")) is None


def test_unsupported_suffix_raises(tmp_path):
    target = tmp_path / "slides.key"
    target.write_bytes(b"PK\x03\x04")
    with pytest.raises(UnsupportedFileType, match=r"\.key"):
        load_document(target)


def test_missing_file_is_a_loader_error(tmp_path):
    with pytest.raises(LoaderError, match="cannot read file"):
        load_document(tmp_path / "gone.txt")


# --- plain text --------------------------------------------------------------------------------


def test_txt_title_and_whitespace_normalised(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text(
        "\n\n  Quarterly   Planning\t Notes  \nline two"
        "\r\n\r\n\r\n\r\nnext   paragraph\u3000here\n",
        encoding="utf-8",
    )
    doc = load_document(target)
    assert doc.file_type == "txt"
    assert doc.title == "Quarterly Planning Notes"
    assert [s.text for s in doc.sections] == [
        "Quarterly Planning Notes\nline two\n\nnext paragraph here"
    ]
    assert doc.sections[0].page is None and doc.sections[0].heading is None


def test_txt_long_first_line_title_is_truncated(tmp_path):
    target = tmp_path / "long.txt"
    target.write_text("word " * 100 + "\nsecond line", encoding="utf-8")
    doc = load_document(target)
    assert 100 <= len(doc.title) <= 120
    assert doc.title.startswith("word word")


def test_txt_empty_file_has_stem_title_and_no_sections(tmp_path):
    target = tmp_path / "blank-notes.txt"
    target.write_text(" \n\n \n", encoding="utf-8")
    doc = load_document(target)
    assert doc.title == "blank-notes"
    assert doc.sections == []


def test_txt_gb18030_chinese_decodes(tmp_path):
    text = "员工手册\n\n年假为每年十五天，病假须提供医院证明。"
    target = tmp_path / "handbook.txt"
    target.write_bytes(text.encode("gb18030"))
    with pytest.raises(UnicodeDecodeError):  # the fixture really is not UTF-8
        target.read_bytes().decode("utf-8")
    doc = load_document(target)
    assert doc.title == "员工手册"
    assert "年假为每年十五天" in all_text(doc)


def test_txt_utf8_bom_and_utf16_bom(tmp_path):
    bom8 = tmp_path / "bom8.txt"
    bom8.write_bytes("\ufeffHello café".encode("utf-8"))
    assert load_document(bom8).sections[0].text == "Hello café"
    bom16 = tmp_path / "bom16.txt"
    bom16.write_bytes("Grüße 你好".encode("utf-16"))
    assert load_document(bom16).sections[0].text == "Grüße 你好"


def test_binary_file_with_txt_suffix_is_rejected(tmp_path):
    png = tmp_path / "image.txt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(256)))
    with pytest.raises(LoaderError, match="not a text file") as info:
        load_document(png)
    assert "Traceback" not in str(info.value) and len(str(info.value)) < 80

    # No NUL bytes, but neither UTF-8 nor GB18030 (0x80 and 0xFF never start a GB18030 char).
    junk = tmp_path / "junk.txt"
    junk.write_bytes(bytes(range(0x80, 0x100)) * 4)
    with pytest.raises(LoaderError, match="not a text file"):
        load_document(junk)


# --- markdown ----------------------------------------------------------------------------------


def test_markdown_sections_per_heading(tmp_path):
    target = tmp_path / "guide.md"
    target.write_text(
        "Preamble line.\n\n"
        "# Travel Guide\n\nIntro to travel.\n\n"
        "## Booking *flights*\n\nUse the portal.\n\n"
        "```bash\n# not a heading, a shell comment\necho hi\n```\n\n"
        "Hotels\n------\n\nMax 200 per night.\n",
        encoding="utf-8",
    )
    doc = load_document(target)
    assert doc.file_type == "md"
    assert doc.title == "Travel Guide"
    assert doc.metadata["headings"] == ["Travel Guide", "Booking flights", "Hotels"]
    assert [s.heading for s in doc.sections] == [None, "Travel Guide", "Booking flights", "Hotels"]
    booking = doc.sections[2]
    assert booking.text.startswith("## Booking flights")  # heading line kept in the text
    assert "# not a heading, a shell comment" in booking.text  # fenced code is not split
    assert doc.sections[3].text == "## Hotels\n\nMax 200 per night."


def test_markdown_front_matter_title_and_heading_only_sections_merge(tmp_path):
    target = tmp_path / "policy.md"
    target.write_text(
        "---\ntitle: Remote Work Policy\nowner: HR\n---\n"
        "# Policy\n\n## Eligibility\n\nAfter probation.\n",
        encoding="utf-8",
    )
    doc = load_document(target)
    assert doc.title == "Remote Work Policy"
    assert "owner: HR" not in all_text(doc)
    # "# Policy" alone would be a one-word chunk; it is folded into the next section.
    assert len(doc.sections) == 1
    assert doc.sections[0].heading == "Eligibility"
    assert doc.sections[0].text == "# Policy\n\n## Eligibility\n\nAfter probation."


def test_markdown_without_heading_uses_first_line(tmp_path):
    target = tmp_path / "memo.markdown"
    target.write_text("Memo about parking\n\nSpaces are assigned monthly.\n", encoding="utf-8")
    doc = load_document(target)
    assert doc.file_type == "md"
    assert doc.title == "Memo about parking"
    assert doc.metadata["headings"] == []


# --- reStructuredText --------------------------------------------------------------------------


def test_rst_titles_and_sections(tmp_path):
    target = tmp_path / "manual.rst"
    target.write_text(
        "==========\nUser Manual\n==========\n\n"
        "Welcome text.\n\n"
        "Installation\n============\n\nRun the installer.\n\n"
        ".. note:: Needs admin rights.\n\n"
        "----\n\n"
        "Upgrades\n--------\n\nUpgrade yearly.\n\n"
        ".. _hidden-target:\n",
        encoding="utf-8",
    )
    doc = load_document(target)
    assert doc.file_type == "rst"
    assert doc.title == "User Manual"
    assert doc.metadata["headings"] == ["User Manual", "Installation", "Upgrades"]
    assert [s.heading for s in doc.sections] == ["User Manual", "Installation", "Upgrades"]
    assert doc.sections[1].text == "Installation\n\nRun the installer.\n\nNote: Needs admin rights."
    text = all_text(doc)
    assert "====" not in text and "----" not in text and "hidden-target" not in text


# --- HTML --------------------------------------------------------------------------------------

HTML_PAGE = """<!DOCTYPE html>
<html><head><title>Travel  Policy</title>
<style>.secret-style { color: red }</style>
<script>var trackingSecret = "abc";</script></head>
<body>
<header><a href="/">Intranet home</a></header>
<nav><a href="/x">Navigation link</a></nav>
<main>
<h1>Travel Policy</h1>
<p>Book trains for trips
   under <b>four</b> hours.</p>
<noscript>Enable JavaScript banner</noscript>
<template><p>Template only text</p></template>
<svg><text>Svg label</text></svg>
<h2>Hotels</h2>
<ul><li>Maximum 180 euros</li><li>Breakfast included</li></ul>
<table><tr><th>City</th><th>Limit</th></tr><tr><td>Paris</td><td>220</td></tr></table>
<div style="display: none">Hidden promo</div>
<!-- an html comment -->
</main>
<footer>Copyright footer text</footer>
<script>console.log("late script");</script>
</body></html>"""


def test_html_visible_text_only_with_title_and_headings(tmp_path):
    target = tmp_path / "travel.html"
    target.write_text(HTML_PAGE, encoding="utf-8")
    doc = load_document(target)
    assert doc.file_type == "html"
    assert doc.title == "Travel Policy"
    assert doc.metadata["headings"] == ["Travel Policy", "Hotels"]
    assert [s.heading for s in doc.sections] == ["Travel Policy", "Hotels"]
    assert doc.sections[0].text == "Travel Policy\n\nBook trains for trips under four hours."
    assert doc.sections[1].text == (
        "Hotels\n\nMaximum 180 euros\nBreakfast included\n\nCity: Paris | Limit: 220"
    )
    text = all_text(doc)
    for hidden in (
        "trackingSecret", "late script", "secret-style", "Navigation link", "Intranet home",
        "Copyright footer", "Enable JavaScript", "Template only", "Svg label", "Hidden promo",
        "an html comment",
    ):  # fmt: skip
        assert hidden not in text, hidden


def test_html_title_falls_back_to_h1_and_meta_charset_is_honoured(tmp_path):
    page = (
        '<html><head><meta charset="gb2312"></head><body>'
        "<h1>报销 制度</h1><p>餐费每天不超过两百元。</p></body></html>"
    )
    target = tmp_path / "expense.htm"
    target.write_bytes(page.encode("gb2312"))
    doc = load_document(target)
    assert doc.title == "报销 制度"
    assert "餐费每天不超过两百元。" in all_text(doc)


SPHINX_PAGE = """<!DOCTYPE html>
<html><head><title>os — Miscellaneous operating system interfaces</title></head>
<body>
<div class="related" role="navigation" aria-label="related navigation"><h3>Navigation</h3>
<ul><li><a href="genindex.html">index</a></li><li><a href="py-modindex.html">modules</a> |</li></ul></div>
<div class="document"><div class="documentwrapper"><div class="bodywrapper">
<div class="body" role="main">
<section id="module-os">
<h1><code class="xref py py-mod"><span class="pre">os</span></code> — Miscellaneous operating system interfaces<a class="headerlink" href="#module-os" title="Permalink to this heading">¶</a></h1>
<p><strong>Source code:</strong> Lib/os.py</p>
<section id="process-parameters"><h2>Process Parameters<a class="headerlink" href="#process-parameters">¶</a></h2>
<p>These functions and data items provide information about the current process.</p>
</section></section></div></div></div>
<div class="sphinxsidebar" role="navigation" aria-label="main navigation"><div class="sphinxsidebarwrapper">
<h3>Table of Contents</h3><p>Sidebar quick search</p></div></div></div>
<div class="footer">&copy; Copyright 2001-2023, Python Software Foundation.</div>
</body></html>"""


def test_html_sphinx_chrome_and_headerlinks_dropped(tmp_path):
    target = tmp_path / "os.html"
    target.write_text(SPHINX_PAGE, encoding="utf-8")
    doc = load_document(target)
    assert doc.metadata["headings"] == [
        "os — Miscellaneous operating system interfaces",
        "Process Parameters",
    ]
    text = all_text(doc)
    assert "¶" not in text
    for chrome in ("Navigation", "modules", "Table of Contents", "Sidebar quick", "Copyright"):
        assert chrome not in text, chrome
    assert "These functions and data items provide information" in text
    assert doc.sections[-1].heading == "Process Parameters"


# --- PDF ---------------------------------------------------------------------------------------


def test_pdf_one_section_per_page_with_page_numbers(tmp_path):
    target = make_pdf(
        tmp_path / "report.pdf",
        [
            "Annual Report\nRevenue grew in spring.",
            "Second page about costs.",
            "Third page: outlook.",
        ],
        title="Annual Report 2026",
    )
    doc = load_document(target)
    assert doc.file_type == "pdf"
    assert doc.title == "Annual Report 2026"
    assert doc.metadata["pages"] == 3
    assert [s.page for s in doc.sections] == [1, 2, 3]
    assert "Revenue grew in spring." in doc.sections[0].text
    assert doc.sections[1].text == "Second page about costs."
    assert "outlook" in doc.sections[2].text and "costs" not in doc.sections[2].text


def test_pdf_title_falls_back_to_first_line_and_blank_pages_are_dropped(tmp_path):
    target = make_pdf(tmp_path / "memo.pdf", ["Board Memo\nText on page one.", "", "Page three."])
    doc = load_document(target)
    assert doc.title == "Board Memo"
    assert [s.page for s in doc.sections] == [1, 3]  # page 2 has no text: no section


def test_pdf_without_text_raises(tmp_path):
    target = make_pdf(tmp_path / "scan.pdf", ["", ""])
    with pytest.raises(LoaderError, match=re.escape("no extractable text (no text layer and no scanned images)")):
        load_document(target)


@pytest.mark.parametrize(
    "content",
    [b"%PDF-1.4\nthis is not really a pdf", b"just some text", b"", "truncated"],
    ids=["garbage", "not-pdf", "empty", "truncated"],
)
def test_corrupt_pdf_raises_short_reason(tmp_path, content):
    if content == "truncated":
        good = make_pdf(tmp_path / "good.pdf", ["Some text on a page."]).read_bytes()
        content = good[: len(good) // 2]
    target = tmp_path / "broken.pdf"
    target.write_bytes(content)
    with pytest.raises(LoaderError) as info:
        load_document(target)
    message = str(info.value)
    assert message.startswith("corrupt PDF: ")
    assert "\n" not in message and len(message) <= 140


def test_encrypted_pdf_needs_password_but_empty_user_password_opens(tmp_path):
    from pypdf import PdfReader, PdfWriter

    source = make_pdf(tmp_path / "plain.pdf", ["Confidential salary table."])
    for user_password, name in (("s3cret", "locked.pdf"), ("", "permissions-only.pdf")):
        writer = PdfWriter(clone_from=PdfReader(source))
        # RC4 needs no optional crypto package, so the test runs everywhere.
        writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
        with open(tmp_path / name, "wb") as fh:
            writer.write(fh)

    with pytest.raises(LoaderError, match=r"^corrupt PDF: .*password"):
        load_document(tmp_path / "locked.pdf")
    doc = load_document(tmp_path / "permissions-only.pdf")
    assert doc.sections[0].text == "Confidential salary table."


def test_pdf_repair_warnings_are_suppressed(tmp_path, caplog):
    from pypdf import PdfReader

    good = make_pdf(tmp_path / "good.pdf", ["Recoverable text."]).read_bytes()
    broken = re.sub(rb"startxref\n\d+", b"startxref\n0", good)  # pypdf repairs this, noisily
    target = tmp_path / "repairable.pdf"
    target.write_bytes(broken)
    pypdf_logger = logging.getLogger("pypdf")
    level_before = pypdf_logger.level

    caplog.set_level(logging.WARNING)
    PdfReader(io.BytesIO(broken))  # proves the fixture makes pypdf log without our guard
    assert any(r.name.startswith("pypdf") for r in caplog.records)

    caplog.clear()
    doc = load_document(target)
    assert doc.sections[0].text == "Recoverable text."
    assert [r for r in caplog.records if r.name.startswith("pypdf")] == []
    assert pypdf_logger.level == level_before  # the guard restores the logger afterwards


# --- DOCX --------------------------------------------------------------------------------------


def test_docx_paragraphs_tables_and_heading_sections(tmp_path):
    doc = load_document(make_docx(tmp_path / "expenses.docx", core_title="Expense Handbook"))
    assert doc.file_type == "docx"
    assert doc.title == "Expense Handbook"
    assert doc.metadata["headings"] == ["Expense Limits", "Approval"]
    assert [s.heading for s in doc.sections] == [None, "Expense Limits", "Approval"]
    assert doc.sections[0].text == "Intro paragraph before any heading."
    assert doc.sections[1].text == (
        "Expense Limits\n\nMeals are reimbursed up to 45 dollars per day.\n\n"
        "City: Boston | Hotel: 250 | Meals: 60"
    )
    assert doc.sections[2].text == "Approval\n\nClaims above 2000 dollars need CFO approval."


def test_docx_title_falls_back_to_first_heading(tmp_path):
    doc = load_document(make_docx(tmp_path / "untitled.docx", core_title=""))
    assert doc.title == "Expense Limits"


def test_docx_merged_cells_printed_once(tmp_path):
    import docx

    document = docx.Document()
    table = document.add_table(rows=2, cols=3)
    table.cell(0, 0).merge(table.cell(0, 1)).text = "Region total"
    table.cell(0, 2).text = "120"
    table.cell(1, 0).text = "North"
    table.cell(1, 2).text = "45"
    document.save(str(tmp_path / "merged.docx"))
    doc = load_document(tmp_path / "merged.docx")
    assert doc.sections[0].text == "Region total | 120\nNorth | | 45"


def test_truncated_docx_raises(tmp_path):
    good = make_docx(tmp_path / "good.docx").read_bytes()
    target = tmp_path / "truncated.docx"
    target.write_bytes(good[: len(good) // 2])
    with pytest.raises(LoaderError, match=r"^corrupt DOCX: "):
        load_document(target)


def test_zip_that_is_not_a_word_document_raises(tmp_path):
    target = tmp_path / "archive.docx"
    with zipfile.ZipFile(target, "w") as zf:
        zf.writestr("hello.txt", "not a word document")
    with pytest.raises(LoaderError, match=r"^corrupt DOCX: ") as info:
        load_document(target)
    assert "\n" not in str(info.value)


# --- CSV ---------------------------------------------------------------------------------------


def test_csv_rows_rendered_and_grouped_in_whole_rows(tmp_path):
    target = tmp_path / "staff.csv"
    lines = ["name;team;extension"] + [f"Person {i};Team {i % 3};{1000 + i}" for i in range(120)]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")  # semicolons: sniffed
    doc = load_document(target)
    assert doc.file_type == "csv"
    assert doc.metadata["columns"] == ["name", "team", "extension"]
    assert doc.metadata["rows"] == 120
    assert [len(s.text.splitlines()) for s in doc.sections] == [50, 50, 20]
    assert doc.sections[0].text.splitlines()[0] == "name: Person 0; team: Team 0; extension: 1000"
    last_row = doc.sections[2].text.splitlines()[-1]
    assert last_row == "name: Person 119; team: Team 2; extension: 1119"


def test_csv_quoted_fields_empty_values_and_gb18030(tmp_path):
    target = tmp_path / "offices.csv"
    content = '城市,地址,电话\n上海,"徐汇区 虹梅路 3888 号, 18 楼",\n'
    target.write_bytes(content.encode("gb18030"))
    doc = load_document(target)
    assert doc.title == "offices"
    assert doc.sections[0].text == "城市: 上海; 地址: 徐汇区 虹梅路 3888 号, 18 楼"


# --- bundled samples ---------------------------------------------------------------------------


def sample_files() -> list[Path]:
    return sorted(p for p in SAMPLES.rglob("*") if p.is_file() and file_type_for(p))


def test_samples_cover_formats_and_stay_small():
    files = sample_files()
    assert 10 <= len(files) <= 16
    assert {file_type_for(p) for p in files} == {"md", "txt", "html", "rst", "csv", "docx", "pdf"}
    assert sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file()) < 1_000_000
    assert any(p.parent.name == "hr" for p in files)
    assert any(p.parent.name == "finance" for p in files)
    assert any(re.search(r"[\u4e00-\u9fff]", p.name) for p in files)  # Chinese documents too


@pytest.mark.parametrize("path", sample_files(), ids=lambda p: str(p.relative_to(SAMPLES)))
def test_every_sample_loads(path):
    doc = load_document(path)
    assert doc.title
    assert doc.sections and all(s.text.strip() for s in doc.sections)
    text = all_text(doc)
    if doc.file_type != "csv":  # every prose sample says it is about a made-up company
        assert "fictional" in text.lower() or "虚构" in text


def test_sample_facts_are_where_users_will_ask_for_them():
    leave = load_document(SAMPLES / "leave-policy.md")
    annual = next(s for s in leave.sections if s.heading == "Annual leave")
    assert "22 days" in annual.text

    zh_leave = load_document(SAMPLES / "请假制度.md")
    assert "158 天" in all_text(zh_leave)

    vpn = load_document(SAMPLES / "it" / "vpn-setup.md")
    assert "vpn-pdx.harborpine.example" in all_text(vpn)

    pdf = load_document(SAMPLES / "finance" / "procurement-approval-matrix.pdf")
    assert [s.page for s in pdf.sections] == [1, 2, 3]
    assert "Supplier onboarding" in pdf.sections[1].text
    assert pdf.title == "Procurement Approval Matrix"

    bands = load_document(SAMPLES / "hr" / "compensation-bands-2026.docx")
    assert "Level: L4 | Title: Senior Data Scientist / Engineer | Portland min (USD): 104,000" in all_text(bands)

    offices = load_document(SAMPLES / "office-directory.csv")
    assert "office: Rotterdam; address: Havenstraat 77" in all_text(offices)


def test_sample_acl_file_restricts_hr_and_finance():
    acl = yaml.safe_load((SAMPLES / ".enclave-acl.yaml").read_text(encoding="utf-8"))
    rules = {rule["pattern"]: rule["groups"] for rule in acl["rules"]}
    assert rules == {"hr/**": ["hr", "managers"], "finance/**": ["finance", "managers"]}


def test_make_samples_is_deterministic_and_matches_committed_content(tmp_path):
    make_samples = load_make_samples()
    for maker, committed in (
        (make_samples.make_pdf, SAMPLES / "finance" / "procurement-approval-matrix.pdf"),
        (make_samples.make_docx, SAMPLES / "hr" / "compensation-bands-2026.docx"),
    ):
        first, second = tmp_path / f"a{committed.suffix}", tmp_path / f"b{committed.suffix}"
        maker(first)
        maker(second)
        assert first.read_bytes() == second.read_bytes()
        assert load_document(first).sections == load_document(committed).sections
