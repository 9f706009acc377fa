"""OCR with Tesseract (Debian's ``tesseract-ocr`` packages) through pytesseract, which runs the
``tesseract`` command: scanned PDF pages and images (.png .jpg .jpeg .tif .tiff) become text.

Availability is checked once per language set: a missing binary or language pack is a reason to
skip the file (reported, never an empty document). Images are measured from their header before
any pixel is decoded, so a 20,000 x 20,000 image is refused without allocating it.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from ingest.loaders import (
    FileSkipped,
    LoadedDocument,
    LoaderError,
    LoaderOptions,
    OcrNeeded,
    Section,
)

__all__ = ["ocr_image", "ocr_unavailable", "load_image", "check_pixels"]

OCR_TIMEOUT_SECONDS = 600  # one page; a hung tesseract must not hold the run forever


@functools.lru_cache(maxsize=8)
def ocr_unavailable(languages: str) -> str | None:
    """Why OCR in ``languages`` cannot run here (None: it can)."""
    import pytesseract

    try:
        pytesseract.get_tesseract_version()
        installed = set(pytesseract.get_languages(config=""))
    except pytesseract.TesseractNotFoundError:
        return "needs OCR but tesseract is not installed (run scripts/ensure-ocr.sh as root)"
    except Exception as exc:  # a broken installation
        return f"needs OCR but tesseract does not run: {' '.join(str(exc).split())[:120]}"
    missing = [lang for lang in languages.split("+") if lang and lang not in installed]
    if missing:
        packages = " ".join("tesseract-ocr-" + lang.lower().replace("_", "-") for lang in missing)
        return f"needs OCR language data {'+'.join(missing)} (install {packages})"
    return None


def ocr_gate(options: LoaderOptions, pages: int, what: str) -> None:
    """Before OCR'ing ``pages`` pages: raise FileSkipped when OCR is off or unavailable, OcrNeeded
    when the caller defers OCR; return when OCR may run now."""
    if not options.ocr:
        raise FileSkipped(f"{what}: needs OCR, which is switched off (ingest.ocr)")
    if reason := ocr_unavailable(options.ocr_languages):
        raise FileSkipped(f"{what}: {reason}")
    if options.defer_ocr:
        raise OcrNeeded(pages)


def check_pixels(width: int, height: int, options: LoaderOptions) -> None:
    megapixels = width * height / 1e6
    if megapixels > options.ocr_max_megapixels:
        raise LoaderError(
            f"image too large to OCR ({width} x {height} pixels, {megapixels:.0f} megapixels "
            f"> {options.ocr_max_megapixels:g})"
        )


# Tesseract's Chinese models put a space between every pair of characters ("仓库 安全 规程");
# Chinese is written without spaces, and BM25's jieba segmentation works best on the plain run.
_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_GAP = re.compile(f"(?<=[{_CJK}]) +(?=[{_CJK}])")


def ocr_image(image: object, languages: str) -> str:
    """The text Tesseract reads in a PIL image."""
    import pytesseract

    try:
        text = pytesseract.image_to_string(image, lang=languages, timeout=OCR_TIMEOUT_SECONDS)
        return _CJK_GAP.sub("", text)
    except RuntimeError as exc:  # pytesseract's timeout
        raise LoaderError(f"OCR failed: {exc}") from None
    except pytesseract.TesseractError as exc:
        raise LoaderError(f"OCR failed: {' '.join(str(exc.message).split())[:120]}") from None


def _open_image(data: bytes) -> object:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check size ourselves
            return Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise LoaderError(f"image too large to OCR ({_short(exc)})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise LoaderError(f"corrupt image: {_short(exc)}") from None


def _frames(image: object) -> Iterator[object]:
    from PIL import ImageSequence

    yield from ImageSequence.Iterator(image)


def load_image(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    """An image (a multi-page TIFF gives one page per frame) read by OCR."""
    image = _open_image(data)
    check_pixels(*image.size, options)
    n_frames = getattr(image, "n_frames", 1)
    ocr_gate(options, n_frames, "image")
    sections = []
    try:
        for number, frame in enumerate(_frames(image), start=1):
            check_pixels(*frame.size, options)
            text = ocr_image(_prepared(frame), options.ocr_languages)
            sections.append(Section(text, page=number))
            _report(options.on_ocr_page, number, n_frames)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged pixel data
        raise LoaderError(f"corrupt image: {_short(exc)}") from None
    if not any(s.text.strip() for s in sections):
        raise LoaderError("no text found by OCR")
    return LoadedDocument(
        title=path.stem, sections=sections, file_type="image",
        metadata={"pages": n_frames, "ocr_pages": list(range(1, n_frames + 1))},
    )


def ocr_pdf_page(page: object, options: LoaderOptions) -> str:
    """OCR of the images drawn on one PDF page (a scanner stores each page as one image, or a
    few strips). Sizes are read from the image dictionaries before any pixel is decoded."""
    texts = []
    resources = page.get("/Resources") or {}
    xobjects = resources.get("/XObject") or {}
    for name in list(xobjects):
        obj = xobjects[name].get_object()
        if obj.get("/Subtype") == "/Image":
            check_pixels(int(obj.get("/Width", 0)), int(obj.get("/Height", 0)), options)
    for image_file in page.images:
        texts.append(ocr_image(_prepared(image_file.image), options.ocr_languages))
    return "\n\n".join(texts)


def pdf_page_has_images(page: object) -> bool:
    try:
        resources = page.get("/Resources") or {}
        xobjects = resources.get("/XObject") or {}
        return any(xobjects[n].get_object().get("/Subtype") == "/Image" for n in xobjects) or bool(
            page.inline_images
        )
    except Exception:
        return False


def _prepared(image: object) -> object:
    """Grayscale for Tesseract (palette, CMYK and alpha images otherwise read worse)."""
    return image if image.mode in ("L", "1") else image.convert("L")


def _report(callback: Callable[[int, int], None] | None, done: int, total: int) -> None:
    if callback is not None:
        callback(done, total)


def _short(exc: BaseException, limit: int = 120) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"
