"""OCR of images and scanned PDF pages with the real Tesseract (scripts/ensure-ocr.sh), on pages
rendered from known English and Chinese text (tests/scan_fixtures.py)."""

from __future__ import annotations

import shutil

import pytest
import pytesseract
from PIL import Image

from ingest import ocr
from ingest.loaders import FileSkipped, LoaderError, LoaderOptions, OcrNeeded, load_document
from tests.scan_fixtures import CHINESE_LINES, ENGLISH_LINES, png_bytes, render_page, scanned_pdf

pytestmark = pytest.mark.skipif(
    shutil.which("tesseract") is None, reason="tesseract missing: run scripts/ensure-ocr.sh (make test does)"
)


def compact(text: str) -> str:
    return "".join(text.split())


def test_png_english_page(tmp_path):
    target = tmp_path / "safety.png"
    target.write_bytes(png_bytes(render_page(ENGLISH_LINES)))
    doc = load_document(target)
    assert doc.file_type == "image" and doc.metadata["ocr_pages"] == [1]
    assert [s.page for s in doc.sections] == [1]
    assert "Forklift drivers must renew their licence every 24 months." in doc.sections[0].text


def test_multi_page_tiff_keeps_page_numbers(tmp_path):
    first, second = render_page(ENGLISH_LINES[:2]), render_page(["Second page: the canteen opens at 07:15."])
    target = tmp_path / "fax.tiff"
    first.save(target, save_all=True, append_images=[second], compression="tiff_lzw")
    doc = load_document(target)
    assert [s.page for s in doc.sections] == [1, 2]
    assert "canteen opens at 07:15" in doc.sections[1].text


def test_scanned_chinese_pdf_without_spaces_between_characters(tmp_path):
    target = scanned_pdf(tmp_path / "规程.pdf", [render_page(CHINESE_LINES, cjk=True)])
    doc = load_document(target)
    assert doc.metadata["ocr_pages"] == [1]
    text = doc.sections[0].text
    assert "液压油泄漏必须立即报告值班组长" in text  # no "液压 油 泄漏" spacing left
    assert "访客须穿黄色背心" in text


def test_mixed_pdf_is_read_page_by_page(tmp_path):
    target = scanned_pdf(tmp_path / "mixed.pdf", [
        "Page one has a real text layer about travel allowances.",
        render_page(ENGLISH_LINES),
        "Page three is text again.",
    ])
    doc = load_document(target)
    assert doc.metadata["ocr_pages"] == [2]
    assert [s.page for s in doc.sections] == [1, 2, 3]
    assert "travel allowances" in doc.sections[0].text
    assert "loading dock at Gate 4 closes at 18:30" in doc.sections[1].text

    # With OCR off the text pages are kept and the scanned one is named, never silently empty.
    off = load_document(target, LoaderOptions(ocr=False))
    assert [s.page for s in off.sections] == [1, 3]
    assert off.metadata["pages_not_read"] == [2]
    assert "switched off" in off.metadata["skipped_reason"]


def test_ocr_off_or_unavailable_skips_with_the_reason(tmp_path, monkeypatch):
    scan = scanned_pdf(tmp_path / "scan.pdf", [render_page(ENGLISH_LINES)])
    image = tmp_path / "photo.jpg"
    render_page(ENGLISH_LINES).save(image, format="JPEG")
    for target, what in ((scan, "scanned PDF"), (image, "image")):
        with pytest.raises(FileSkipped, match=rf"^{what}: needs OCR, which is switched off \(ingest.ocr\)$"):
            load_document(target, LoaderOptions(ocr=False))
        with pytest.raises(FileSkipped, match=r"needs OCR language data deu \(install tesseract-ocr-deu\)"):
            load_document(target, LoaderOptions(ocr_languages="eng+deu"))
        with pytest.raises(OcrNeeded):
            load_document(target, LoaderOptions(defer_ocr=True))
    # No tesseract binary where pytesseract looks for it: the situation on a machine without the package.
    ocr.ocr_unavailable.cache_clear()
    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", str(tmp_path / "no-tesseract-here"))
    try:
        with pytest.raises(FileSkipped, match=r"tesseract is not installed \(run scripts/ensure-ocr.sh"):
            load_document(scan)
    finally:
        ocr.ocr_unavailable.cache_clear()


def test_huge_image_is_refused_before_decoding(tmp_path):
    # 20,000 x 20,000 pixels (400 MP). Mode "1" keeps the fixture at 50 MB while it is written;
    # decoding it for OCR as grayscale would take 400 MB, and Tesseract several times that.
    target = tmp_path / "poster.png"
    Image.new("1", (20_000, 20_000), 1).save(target, optimize=False)
    with pytest.raises(LoaderError, match=r"image too large to OCR"):
        load_document(target)
    small = tmp_path / "wide.png"
    Image.new("L", (9_000, 8_000), 255).save(small)
    with pytest.raises(LoaderError, match=r"image too large to OCR \(9000 x 8000 pixels, 72 megapixels > 60\)"):
        load_document(small)


def test_corrupt_image(tmp_path):
    good = png_bytes(render_page(ENGLISH_LINES[:1]))
    target = tmp_path / "cut.png"
    target.write_bytes(good[: len(good) // 2])
    with pytest.raises(LoaderError, match=r"^corrupt image: "):
        load_document(target)
    blank = tmp_path / "blank.png"
    blank.write_bytes(png_bytes(Image.new("L", (800, 600), 255)))
    with pytest.raises(LoaderError, match="no text found by OCR"):
        load_document(blank)
