"""OCR benchmark: character accuracy and pages/s of Enclave's OCR (Tesseract through
``ingest.ocr``) on scanned pages rendered from known English and Chinese text, and the peak memory
of the loaders on the bad inputs of issue 16.

Pages: ``tests/scan_fixtures.py`` renders each text (DejaVu Sans / WenQuanYi Micro Hei, 44 px at
300 dpi, A4 width) into a grayscale image and wraps it in a PDF with no text layer, as a scanner
would; the real loader (``load_document``) reads it back. Accuracy is 1 - (character edit
distance / reference length), whitespace removed on both sides (Tesseract's line breaks and the
spaces it puts between Chinese characters are layout, not text). Pages/s is pages over the wall
time of the loads, with the load average printed beside it: the machine is shared.

Bad inputs: each file is loaded in a fresh child process and its peak RSS (``ru_maxrss``) read
there: a 10,000-row sheet, a zip bomb .docx (256 MiB of zeros), an e-mail with a 50 MB attachment,
a 20,000 x 20,000 pixel image. Target: peak RSS < 1.5 GiB each.

Usage::

    .venv/bin/python bench/ocr.py            # OCR languages from the default eng+chi_sim
    .venv/bin/python bench/ocr.py --pages 10 --json

Targets (printed as PASS/FAIL): accuracy >= 95% English, >= 90% Chinese on these clean renders.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from rapidfuzz.distance import Levenshtein  # noqa: E402

from ingest.loaders import LoaderError, LoaderOptions, load_document  # noqa: E402
from tests.scan_fixtures import CHINESE_LINES, ENGLISH_LINES, render_page, scanned_pdf  # noqa: E402

# More known text than the tests use, so that each page is a realistic paragraph block.
ENGLISH_EXTRA = [
    "All pallets above two metres are wrapped before they are moved.",
    "The first aid kit is checked on the first Monday of every month.",
    "Temperature in cold store C must stay between 2 and 6 degrees.",
    "Keep fire exits clear; blocked exits are reported to facilities.",
    "Night shift handover takes place at 22:00 in the control room.",
]
CHINESE_EXTRA = [
    "两米以上的托盘搬运前必须缠绕包装。",
    "急救箱在每月第一个星期一检查。",
    "冷库丙的温度必须保持在二到六度之间。",
    "消防通道保持畅通，堵塞须报告后勤部门。",
    "夜班交接于二十二点在控制室进行。",
]
TARGETS = {"English": 0.95, "Chinese": 0.90}


def accuracy(reference: str, found: str) -> float:
    ref, hyp = "".join(reference.split()), "".join(found.split())
    return 1 - Levenshtein.distance(ref, hyp) / len(ref)


def ocr_language(name: str, lines: list[str], cjk: bool, pages: int, folder: Path, options: LoaderOptions) -> dict:
    files = []
    for i in range(pages):
        page_lines = lines[i % len(lines):] + lines[: i % len(lines)]  # vary the page content
        files.append((scanned_pdf(folder / f"{name}-{i}.pdf", [render_page(page_lines, cjk=cjk)]), "\n".join(page_lines)))
    scores = []
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    for path, reference in files:
        doc = load_document(path, options)
        scores.append(accuracy(reference, "\n".join(s.text for s in doc.sections)))
    seconds = time.perf_counter() - started
    return {
        "language": name, "pages": pages, "accuracy": round(sum(scores) / len(scores), 4),
        "worst_page": round(min(scores), 4), "pages_per_s": round(pages / seconds, 2),
        "load_average": round((load_before + os.getloadavg()[0]) / 2, 2),
        "target": TARGETS[name], "pass": sum(scores) / len(scores) >= TARGETS[name],
    }


# --- bad inputs: peak RSS per load, each in a fresh process ------------------------------------


def _bad_inputs(folder: Path) -> dict[str, Path]:
    import zipfile
    from email.message import EmailMessage

    import docx
    import openpyxl
    from PIL import Image

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["SKU", "Warehouse", "Quantity", "Note"])
    for i in range(10_000):
        sheet.append([f"SKU-{i:05d}", "Rotterdam", i, "restock after the quarterly count"])
    book.save(folder / "rows.xlsx")

    document = docx.Document()
    document.add_paragraph("small")
    document.save(folder / "bomb.docx")
    with zipfile.ZipFile(folder / "bomb.docx", "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("customXml/item9.xml", "w", force_zip64=True) as member:
            for _ in range(256):
                member.write(bytes(2**20))

    mail = EmailMessage()
    mail["Subject"] = "Scans"
    mail.set_content("See the attached archive and the price list.")
    mail.add_attachment(os.urandom(50 * 2**20), maintype="application", subtype="pdf", filename="scans.pdf")
    (folder / "big.eml").write_bytes(mail.as_bytes())

    Image.new("1", (20_000, 20_000), 1).save(folder / "poster.png")
    return {"10,000-row sheet": folder / "rows.xlsx", "zip bomb .docx (256 MiB inside)": folder / "bomb.docx",
            "e-mail with a 50 MB attachment": folder / "big.eml", "20,000 x 20,000 image": folder / "poster.png"}


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the
    forking parent's size through exec, which would blame the parent's memory on the load."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(path: str, queue: mp.Queue) -> None:
    baseline = _peak_rss_mib()  # the interpreter and the loaders' imports
    started = time.perf_counter()
    try:
        doc = load_document(Path(path))
        outcome = f"loaded: {sum(len(s.text) for s in doc.sections):,} characters"
        if doc.attachments:
            outcome += "; attachments: " + ", ".join(f"{a.name} ({a.error or 'loaded'})" for a in doc.attachments)
    except LoaderError as exc:
        outcome = f"refused: {exc}"
    queue.put({"outcome": outcome, "peak_rss_mib": round(_peak_rss_mib()), "before_load_mib": round(baseline),
               "seconds": round(time.perf_counter() - started, 2)})


def bad_inputs(folder: Path) -> list[dict]:
    rows = []
    ctx = mp.get_context("spawn")  # a fresh interpreter: its peak is this load's alone (plus imports)
    for name, path in _bad_inputs(folder).items():
        queue = ctx.Queue()
        child = ctx.Process(target=_measure, args=(str(path), queue))
        child.start()
        result = queue.get()
        child.join()
        rows.append({"input": name, "file_mib": round(path.stat().st_size / 2**20, 1), **result,
                     "pass": result["peak_rss_mib"] < 1536})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=10, help="pages per language")
    parser.add_argument("--languages", default="eng+chi_sim", help="Tesseract languages (ingest.ocr_languages)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    options = LoaderOptions(ocr_languages=args.languages)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ocr_rows = [
            ocr_language("English", ENGLISH_LINES + ENGLISH_EXTRA, False, args.pages, folder, options),
            ocr_language("Chinese", CHINESE_LINES + CHINESE_EXTRA, True, args.pages, folder, options),
        ]
        bad_rows = bad_inputs(folder)
    if args.json:
        print(json.dumps({"ocr": ocr_rows, "bad_inputs": bad_rows}, ensure_ascii=False, indent=2))
    else:
        print(f"OCR ({args.languages}), {os.cpu_count()} CPUs")
        for r in ocr_rows:
            print(f"  {r['language']:8s} accuracy {r['accuracy']:.2%} (worst page {r['worst_page']:.2%}), "
                  f"{r['pages_per_s']} pages/s, load average {r['load_average']}: "
                  f"{'PASS' if r['pass'] else 'FAIL'} (target >= {r['target']:.0%})")
        print("Bad inputs (peak RSS of a fresh process loading the file; target < 1.5 GiB)")
        for r in bad_rows:
            print(f"  {r['input']:34s} {r['file_mib']:7.1f} MiB file  peak {r['peak_rss_mib']:5d} MiB  "
                  f"(before load {r['before_load_mib']} MiB)  {r['seconds']:6.2f} s  {'PASS' if r['pass'] else 'FAIL'}  {r['outcome'][:110]}")
    return 0 if all(r["pass"] for r in ocr_rows + bad_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
