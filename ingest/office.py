"""Excel workbooks (.xlsx, .xlsm) through openpyxl and PowerPoint decks (.pptx) through python-pptx.

Both are zip archives of XML: ``check_office_zip`` refuses encrypted files and zip bombs before
either library parses anything.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import warnings
from pathlib import Path
from typing import Any

from ingest.loaders import (
    LoadedDocument,
    LoaderError,
    LoaderOptions,
    Section,
    _short,
    _table_lines,
    check_office_zip,
)

__all__ = ["load_xlsx", "load_pptx", "XLSX_ROWS_PER_SECTION", "XLSX_READ_ONLY_FROM_MB"]

XLSX_ROWS_PER_SECTION = 50
# Workbooks whose XML is bigger than this are streamed with openpyxl's read-only mode (constant
# memory, but merged ranges are not available there: a merged block's value then stays in its
# first cell). Smaller ones are loaded whole, so merged cells can be filled in.
XLSX_READ_ONLY_FROM_MB = 20.0


# --- Excel -------------------------------------------------------------------------------------


def load_xlsx(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    """Every sheet; each row one line that repeats its sheet and column headers:
    "Sheet: Prices | Product: X | Price: 12.50", so any chunk is understandable on its own."""
    import openpyxl

    check_office_zip(data, "XLSX", options)
    read_only = _unzipped_size(data) > XLSX_READ_ONLY_FROM_MB * 2**20
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Data Validation extension is not supported", ...
            # data_only: a formula cell gives the value Excel cached when it last saved the file.
            book = openpyxl.load_workbook(io.BytesIO(data), read_only=read_only, data_only=True)
    except Exception as exc:  # InvalidFileException, KeyError for missing parts, XML errors, ...
        raise LoaderError(f"corrupt XLSX: {_short(exc)}") from None

    sections: list[Section] = []
    sheets: list[str] = []
    rows_total = 0
    try:
        for sheet in book.worksheets:
            sheets.append(sheet.title)
            lines = _sheet_lines(sheet, read_only)
            rows_total += len(lines)
            # Whole rows per section, so a chunk boundary never cuts a record in half.
            for i in range(0, len(lines), XLSX_ROWS_PER_SECTION):
                sections.append(Section("\n".join(lines[i : i + XLSX_ROWS_PER_SECTION]), heading=sheet.title))
        title = (book.properties.title or "").strip() if book.properties else ""
    except LoaderError:
        raise
    except Exception as exc:
        raise LoaderError(f"corrupt XLSX: {_short(exc)}") from None
    finally:
        if read_only:
            book.close()
    return LoadedDocument(
        title=title or path.stem, sections=sections, file_type="xlsx",
        metadata={"sheets": sheets, "rows": rows_total},
    )


def _unzipped_size(data: bytes) -> int:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return sum(m.file_size for m in archive.infolist())


def _sheet_lines(sheet: Any, read_only: bool) -> list[str]:
    merged: dict[tuple[int, int], Any] = {}
    if not read_only:
        # Every cell of a merged range reads as the range's value (a "Region" cell spanning five
        # rows belongs to each of them).
        for rng in sheet.merged_cells.ranges:
            value = sheet.cell(rng.min_row, rng.min_col).value
            for row in range(rng.min_row, rng.max_row + 1):
                for col in range(rng.min_col, rng.max_col + 1):
                    merged[(row, col)] = value
    header: list[str] | None = None
    lines: list[str] = []
    for row_number, row in enumerate(sheet.iter_rows(), start=1):
        values = []
        for col_number, cell in enumerate(row, start=1):
            value = merged.get((row_number, col_number), getattr(cell, "value", None))
            values.append(_cell_text(value, getattr(cell, "number_format", "General")))
        if not any(values):  # empty rows carry nothing
            continue
        if header is None:
            header = [v or _column_letter(i) for i, v in enumerate(values)]
            continue
        body = _table_lines([values], header)
        if body:
            lines.append(f"Sheet: {sheet.title} | {body[0]}")
    if header is not None and not lines:  # a sheet holding one row: keep it as it is
        lines.append(f"Sheet: {sheet.title} | " + " | ".join(h for h in header))
    return lines


def _column_letter(index: int) -> str:
    from openpyxl.utils import get_column_letter

    return f"column {get_column_letter(index + 1)}"


_DECIMALS = re.compile(r"0\.(0+)")


def _cell_text(value: Any, number_format: str) -> str:
    """A cell value as the sheet shows it, closely enough for search: fixed decimals kept
    ("12.50"), percentages, dates without a midnight time, whole floats without ".0"."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        fmt = number_format or "General"
        if "%" in fmt:
            match = _DECIMALS.search(fmt)
            return f"{value * 100:.{len(match.group(1)) if match else 0}f}%"
        if match := _DECIMALS.search(fmt):
            return f"{value:,.{len(match.group(1))}f}" if "," in fmt else f"{value:.{len(match.group(1))}f}"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)
    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time() else value.isoformat(sep=" ")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return " ".join(str(value).split())


# --- PowerPoint --------------------------------------------------------------------------------


def load_pptx(data: bytes, path: Path, options: LoaderOptions) -> LoadedDocument:
    """One section per slide, cited as its page: title, text frames, tables and speaker notes."""
    from pptx import Presentation

    check_office_zip(data, "PPTX", options)
    try:
        deck = Presentation(io.BytesIO(data))
    except Exception as exc:  # PackageNotFoundError, KeyError, XML errors, ...
        raise LoaderError(f"corrupt PPTX: {_short(exc)}") from None

    sections: list[Section] = []
    titles: list[str] = []
    try:
        for number, slide in enumerate(deck.slides, start=1):
            title_shape = slide.shapes.title
            title = " ".join(title_shape.text_frame.text.split()) if title_shape is not None else ""
            parts = [title] if title else []
            for shape in slide.shapes:
                if title_shape is not None and shape.shape_id == title_shape.shape_id:
                    continue
                parts.extend(_shape_texts(shape))
            if slide.has_notes_slide:
                notes = slide.notes_slide.notes_text_frame
                if notes is not None and notes.text.strip():
                    parts.append("Notes: " + notes.text.strip())
            titles.append(title)
            sections.append(Section("\n\n".join(p for p in parts if p.strip()), page=number, heading=title or None))
        core_title = (deck.core_properties.title or "").strip()
    except Exception as exc:
        raise LoaderError(f"corrupt PPTX: {_short(exc)}") from None
    first_title = next((t for t in titles if t), None)
    return LoadedDocument(
        title=core_title or first_title or path.stem, sections=sections, file_type="pptx",
        metadata={"pages": len(sections), "slide_titles": titles},
    )


def _shape_texts(shape: Any) -> list[str]:
    """Text of a shape, a group's members in order, or a table's rows (first row as header)."""
    from pptx.enum.shapes import MSO_SHAPE_TYPE

    if shape.shape_type == MSO_SHAPE_TYPE.GROUP:
        return [t for member in shape.shapes for t in _shape_texts(member)]
    if getattr(shape, "has_table", False) and shape.has_table:
        rows = [[" ".join(cell.text.split()) for cell in row.cells] for row in shape.table.rows]
        rows = [r for r in rows if any(r)]
        header = rows[0] if len(rows) >= 2 and shape.table.first_row else None
        return ["\n".join(_table_lines(rows[1:] if header else rows, header))]
    if getattr(shape, "has_text_frame", False) and shape.has_text_frame:
        return [shape.text_frame.text]
    return []
