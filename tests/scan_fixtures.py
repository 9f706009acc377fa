"""Scanned pages for the OCR tests and bench/ocr.py: known text rendered with Pillow into a
grayscale image (300 dpi, A4 width), and PDFs whose pages are only such images (reportlab), like a
scanner's output. Fonts come from Debian (fonts-dejavu-core, fonts-wqy-microhei; installed by
scripts/ensure-ocr.sh)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_LATIN = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
FONT_CJK = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")

ENGLISH_LINES = [
    "Warehouse safety procedure, revision 7.",
    "Forklift drivers must renew their licence every 24 months.",
    "The loading dock at Gate 4 closes at 18:30 on weekdays.",
    "Report every spill of hydraulic oil to the shift lead at once.",
    "Visitors wear a yellow vest and stay inside the marked walkways.",
]
CHINESE_LINES = [
    "仓库安全规程第七版。",
    "叉车司机每二十四个月必须更新一次驾驶证。",
    "四号门装卸平台工作日十八点三十分关闭。",
    "液压油泄漏必须立即报告值班组长。",
    "访客须穿黄色背心并在标记的通道内行走。",
]

PAGE_WIDTH = 2480  # A4 at 300 dpi
DPI = 300


def render_page(lines: list[str], *, cjk: bool = False, size: int = 44) -> Image.Image:
    """Black text on white, one line of the list per line of the page."""
    font = ImageFont.truetype(str(FONT_CJK if cjk else FONT_LATIN), size)
    height = 200 + len(lines) * int(size * 2.0)
    image = Image.new("L", (PAGE_WIDTH, height), 255)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((150, 120 + i * int(size * 2.0)), line, font=font, fill=0)
    return image


def scanned_pdf(path: Path, pages: list[Image.Image | str]) -> Path:
    """A PDF with one page per item: an image is drawn full-width (a scanned page, no text
    layer); a string becomes a normal text page."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), pagesize=A4)
    width, height = A4
    for page in pages:
        if isinstance(page, str):
            text = pdf.beginText(72, height - 72)
            for line in page.split("\n"):
                text.textLine(line)
            pdf.drawText(text)
        else:
            buf = io.BytesIO()
            page.save(buf, format="PNG")
            buf.seek(0)
            draw_height = width * page.height / page.width
            pdf.drawImage(ImageReader(buf), 0, height - draw_height, width=width, height=draw_height)
        pdf.showPage()
    pdf.save()
    return path


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", dpi=(DPI, DPI))
    return buf.getvalue()
