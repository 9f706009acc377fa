"""Excel, PowerPoint and e-mail loaders, tables with headers, and the loaders' defences against
zip bombs, encrypted Office files and pathologically nested HTML. Every file is generated here with
the real libraries (openpyxl, XlsxWriter, python-pptx, python-docx, the stdlib email package)."""

from __future__ import annotations

import io
import os
import zipfile
from email.message import EmailMessage
from pathlib import Path

import docx
import openpyxl
import pytest
import xlsxwriter
from bs4.element import Tag
from docx.oxml import OxmlElement
from pptx import Presentation
from pptx.util import Inches

from ingest.loaders import HTML_MAX_DEPTH, LoaderError, LoaderOptions, load_document


def text_of(doc) -> str:
    return "\n\n".join(s.text for s in doc.sections)


# --- Excel --------------------------------------------------------------------------------------


def make_workbook(path: Path) -> Path:
    book = openpyxl.Workbook()
    prices = book.active
    prices.title = "Prices"
    prices.append(["Product", "Price", "Currency"])
    prices.append(["Widget X", 12.5, "EUR"])
    prices["B2"].number_format = "0.00"
    prices.append([])  # empty rows are dropped
    prices.append(["Gasket kit", 3, "EUR"])
    prices.append(["Regional pack", 40, "EUR"])
    prices.append([None, 41, "USD"])
    prices.merge_cells("A5:A6")  # one product name spanning two rows: each row is that product
    roster = book.create_sheet("Roster")
    roster.append(["Name", "Team", "Start"])
    roster.append(["Ines Duarte", "Logistics", None])
    book.create_sheet("Blank")
    book.save(path)
    return path


def test_xlsx_every_sheet_rows_carry_sheet_and_headers(tmp_path):
    doc = load_document(make_workbook(tmp_path / "price-list.xlsx"))
    assert doc.file_type == "xlsx"
    assert doc.metadata["sheets"] == ["Prices", "Roster", "Blank"]
    assert [s.heading for s in doc.sections] == ["Prices", "Roster"]
    assert doc.sections[0].text.splitlines() == [
        "Sheet: Prices | Product: Widget X | Price: 12.50 | Currency: EUR",
        "Sheet: Prices | Product: Gasket kit | Price: 3 | Currency: EUR",
        "Sheet: Prices | Product: Regional pack | Price: 40 | Currency: EUR",
        "Sheet: Prices | Product: Regional pack | Price: 41 | Currency: USD",
    ]
    assert doc.sections[1].text == "Sheet: Roster | Name: Ines Duarte | Team: Logistics"


def test_xlsm_formulas_read_as_their_cached_values(tmp_path):
    # XlsxWriter stores a formula together with its result, as Excel does when it saves.
    target = tmp_path / "totals.xlsm"
    book = xlsxwriter.Workbook(str(target.with_suffix(".xlsx")))
    sheet = book.add_worksheet("Totals")
    sheet.write_row(0, 0, ["Item", "Net", "Gross"])
    sheet.write_row(1, 0, ["Laptop", 1000])
    sheet.write_formula(1, 2, "=B2*1.21", None, 1210)
    book.close()
    target.with_suffix(".xlsx").rename(target)
    doc = load_document(target)
    assert doc.file_type == "xlsx"
    assert text_of(doc) == "Sheet: Totals | Item: Laptop | Net: 1000 | Gross: 1210"


def test_ten_thousand_row_sheet_every_chunk_understandable_alone(tmp_path):
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Stock"
    sheet.append(["SKU", "Warehouse", "Quantity"])
    for i in range(10_000):
        sheet.append([f"SKU-{i:05d}", "Rotterdam" if i % 2 else "Portland", i])
    book.save(tmp_path / "stock.xlsx")
    doc = load_document(tmp_path / "stock.xlsx")
    lines = [line for s in doc.sections for line in s.text.splitlines()]
    assert doc.metadata["rows"] == len(lines) == 10_000
    assert lines[9_999] == "Sheet: Stock | SKU: SKU-09999 | Warehouse: Rotterdam | Quantity: 9999"
    assert all(line.startswith("Sheet: Stock | SKU: ") and "| Quantity: " in line for line in lines)


# --- PowerPoint ---------------------------------------------------------------------------------


def make_deck(path: Path) -> Path:
    deck = Presentation()
    intro = deck.slides.add_slide(deck.slide_layouts[1])
    intro.shapes.title.text = "Warehouse onboarding"
    intro.placeholders[1].text = "Safety shoes are required on the floor."
    intro.notes_slide.notes_text_frame.text = "Mention the canteen opening hours."
    table_slide = deck.slides.add_slide(deck.slide_layouts[5])
    table_slide.shapes.title.text = "Shift times"
    table = table_slide.shapes.add_table(3, 2, Inches(1), Inches(2), Inches(6), Inches(2)).table
    for r, row in enumerate([("Shift", "Hours"), ("Early", "06:00-14:00"), ("Late", "14:00-22:00")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    group = table_slide.shapes.add_group_shape()
    box = group.shapes.add_textbox(Inches(1), Inches(5), Inches(4), Inches(1))
    box.text_frame.text = "Grouped note: badges at reception."
    deck.slides.add_slide(deck.slide_layouts[6])  # a blank slide keeps the numbering honest
    last = deck.slides.add_slide(deck.slide_layouts[1])
    last.shapes.title.text = "Questions"
    last.placeholders[1].text = "Ask your team lead."
    deck.save(path)
    return path


def test_pptx_one_page_per_slide_with_titles_tables_and_notes(tmp_path):
    doc = load_document(make_deck(tmp_path / "onboarding.pptx"))
    assert doc.file_type == "pptx"
    assert doc.title == "Warehouse onboarding"
    assert [(s.page, s.heading) for s in doc.sections] == [
        (1, "Warehouse onboarding"), (2, "Shift times"), (4, "Questions")
    ]
    assert doc.sections[0].text == (
        "Warehouse onboarding\n\nSafety shoes are required on the floor.\n\n"
        "Notes: Mention the canteen opening hours."
    )
    assert doc.sections[1].text == (
        "Shift times\n\nShift: Early | Hours: 06:00-14:00\nShift: Late | Hours: 14:00-22:00\n\n"
        "Grouped note: badges at reception."
    )


# --- bad Office files ---------------------------------------------------------------------------


def office_file(kind: str, path: Path) -> Path:
    if kind == "docx":
        document = docx.Document()
        document.add_paragraph("A small, ordinary document.")
        document.save(path)
    elif kind == "xlsx":
        make_workbook(path)
    else:
        make_deck(path)
    return path


def add_member(path: Path, name: str, chunks, size_mib: int) -> None:
    """Append a member streamed in 1 MiB pieces (the bomb is never whole in memory here either)."""
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open(name, "w", force_zip64=True) as member:
            for _ in range(size_mib):
                member.write(chunks())


@pytest.mark.parametrize("kind", ["docx", "xlsx", "pptx"])
def test_zip_bomb_is_refused_before_parsing(tmp_path, kind):
    # A real bomb: a valid file plus 256 MiB of zeros that deflate to about 250 KiB (ratio ~1000:1).
    target = office_file(kind, tmp_path / f"bomb.{kind}")
    add_member(target, "customXml/item9.xml", lambda: bytes(2**20), 256)
    assert target.stat().st_size < 2 * 2**20
    with pytest.raises(LoaderError, match=rf"{kind.upper()} refused: compression ratio [\d,]+:1 > 200:1 .*zip bomb"):
        load_document(target)


def test_total_uncompressed_size_is_capped(tmp_path):
    # Incompressible data passes the ratio check; the total uncompressed size still has a cap.
    target = office_file("docx", tmp_path / "big.docx")
    add_member(target, "word/media/noise.bin", lambda: os.urandom(2**20), 40)
    with pytest.raises(LoaderError, match=r"DOCX refused: 4[01] MiB uncompressed > 32 MiB \(ingest.max_unzipped_mb"):
        load_document(target, LoaderOptions(max_unzipped_mb=32))
    assert load_document(target).sections  # under the default cap it is an ordinary document


@pytest.mark.parametrize("suffix", [".docx", ".xlsx", ".pptx"])
def test_encrypted_office_file_gets_a_clear_reason(tmp_path, suffix):
    # Office saves a password-protected file as an OLE2 compound file holding the encrypted package.
    target = tmp_path / f"locked{suffix}"
    target.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(4096))
    with pytest.raises(LoaderError, match="encrypted or password-protected"):
        load_document(target)


@pytest.mark.parametrize("suffix", [".xlsx", ".pptx"])
def test_corrupt_workbooks_and_decks(tmp_path, suffix):
    good = office_file(suffix[1:], tmp_path / f"good{suffix}").read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(LoaderError, match=rf"corrupt {suffix[1:].upper()}: not a valid zip archive"):
        load_document(truncated)
    foreign = tmp_path / f"foreign{suffix}"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("hello.txt", "not an office file")
    with pytest.raises(LoaderError, match=rf"corrupt {suffix[1:].upper()}: "):
        load_document(foreign)


# --- e-mail -------------------------------------------------------------------------------------


def docx_bytes(text: str) -> bytes:
    document = docx.Document()
    document.add_paragraph(text)
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


def make_mail(path: Path, *, html_only: bool = False, attachments: dict[str, bytes] | None = None) -> Path:
    message = EmailMessage()
    message["Subject"] = "Supplier contract renewal"
    message["From"] = "Ann Vos <ann@example.com>"
    message["To"] = "procurement@example.com"
    message["Date"] = "Tue, 01 Dec 2026 10:00:00 +0000"
    if html_only:
        message.set_content("<html><body><p>The <b>renewal</b> deadline is 15 January.</p>"
                            "<script>track()</script></body></html>", subtype="html")
    else:
        message.set_content("The renewal deadline is 15 January.\nPenalties are in the attached terms.")
        message.add_alternative("<p>HTML copy of the body</p>", subtype="html")
    for name, data in (attachments or {}).items():
        maintype, subtype = ("text", "plain") if name.endswith(".txt") else ("application", "octet-stream")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    path.write_bytes(message.as_bytes())
    return path


def test_eml_headers_body_and_attachments(tmp_path):
    mail = make_mail(tmp_path / "renewal.eml", attachments={
        "../../terms.docx": docx_bytes("The late delivery penalty is 4 percent per week."),
        "archive.zip": b"PK\x05\x06" + bytes(18),
        "broken.pdf": b"%PDF-1.4 broken",
    })
    doc = load_document(mail)
    assert doc.file_type == "eml" and doc.title == "Supplier contract renewal"
    assert doc.sections[0].text == (
        "Subject: Supplier contract renewal\nFrom: Ann Vos <ann@example.com>\nTo: procurement@example.com\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0000\nAttachments: terms.docx, archive.zip, broken.pdf"
    )
    assert doc.sections[1].text == "The renewal deadline is 15 January.\nPenalties are in the attached terms."
    # Only the attachments of types we read; a path in the name never reaches the source.
    terms, broken = doc.attachments
    assert terms.name == "terms.docx" and terms.document is not None
    assert text_of(terms.document) == "The late delivery penalty is 4 percent per week."
    assert broken.name == "broken.pdf" and broken.document is None and broken.error.startswith("corrupt PDF")


def test_eml_html_only_body_goes_through_the_html_loader(tmp_path):
    doc = load_document(make_mail(tmp_path / "html.eml", html_only=True))
    assert doc.sections[1].text == "The renewal deadline is 15 January."


def test_eml_large_attachments(tmp_path):
    big = make_mail(tmp_path / "big.eml", attachments={
        "scan-archive.bin": os.urandom(50 * 2**20),  # 50 MB, a type we do not read: listed only
        "minutes.txt": b"Minutes of the supplier meeting.\n" * 70_000,  # 2.2 MiB of text
    })
    doc = load_document(big, LoaderOptions(max_attachment_mb=2))
    assert doc.sections[0].text.endswith("Attachments: scan-archive.bin, minutes.txt")
    (minutes,) = doc.attachments
    assert minutes.document is None and minutes.error == "attachment too large (2.2 MiB > 2 MiB)"
    assert load_document(big).attachments[0].document is not None  # within the default limit


# --- tables with headers (docx, html) -----------------------------------------------------------


def test_docx_header_rows_prefix_every_cell(tmp_path):
    document = docx.Document()
    marked = document.add_table(rows=3, cols=2)  # two columns, marked "repeat as header row"
    for r, row in enumerate([("Product", "Price"), ("Widget X", "12.50"), ("Gasket kit", "3.00")]):
        for c, value in enumerate(row):
            marked.cell(r, c).text = value
    tr_pr = marked.rows[0]._tr.get_or_add_trPr()
    tr_pr.append(OxmlElement("w:tblHeader"))
    form = document.add_table(rows=2, cols=2)  # a label/value form: no header row
    for r, row in enumerate([("Name", "Ines Duarte"), ("Team", "Logistics")]):
        for c, value in enumerate(row):
            form.cell(r, c).text = value
    document.save(tmp_path / "tables.docx")
    text = text_of(load_document(tmp_path / "tables.docx"))
    assert text == (
        "Product: Widget X | Price: 12.50\nProduct: Gasket kit | Price: 3.00\n\n"
        "Name | Ines Duarte\nTeam | Logistics"
    )


def test_html_thead_and_colspan_headers(tmp_path):
    page = tmp_path / "rates.html"
    page.write_text(
        "<html><body><h1>Rates</h1><table><caption>Hotel caps</caption>"
        "<thead><tr><td>City</td><td colspan='2'>Limit</td></tr></thead>"
        "<tbody><tr><td>Paris</td><td>220</td><td>EUR</td></tr></tbody></table>"
        "<table><tr><td>Plain</td><td>row</td></tr></table></body></html>",
        encoding="utf-8",
    )
    assert load_document(page).sections[0].text == (
        "Rates\n\nHotel caps\nCity: Paris | Limit: 220 | Limit: EUR\n\nPlain | row"
    )


# --- deeply nested HTML -------------------------------------------------------------------------


def nested(levels: int) -> bytes:
    return (b"<html><body><p>Opening words.</p>" + b"<div>" * levels + b"deep text" + b"</div>" * levels
            + b"</body></html>")


def test_html_nested_beyond_the_limit_is_refused_with_its_depth(tmp_path):
    target = tmp_path / "bomb.html"
    target.write_bytes(nested(200_000))  # 2.2 MB; bs4 ran past 300 s on it
    with pytest.raises(LoaderError, match=rf"nested too deeply \(200,?00[0-9] levels > {HTML_MAX_DEPTH}\)"):
        load_document(target)


def test_html_nesting_costs_no_subtree_searches(tmp_path, monkeypatch):
    """Work is counted, not timed: bs4 answers a missing attribute (tag.decomposed on a live tag)
    with a subtree search, which made chrome removal quadratic in the depth. Below the limit a
    deep page is read in full with a constant number of searches."""
    calls = {"find": 0}
    original = Tag.find

    def counting_find(self, *args, **kwargs):
        calls["find"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Tag, "find", counting_find)
    target = tmp_path / "deep.html"
    target.write_bytes(nested(400))
    doc = load_document(target)
    assert text_of(doc) == "Opening words.\n\ndeep text"
    assert calls["find"] < 10
