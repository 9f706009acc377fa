"""Regenerate the binary sample documents (.docx and .pdf) in samples/docs/.

    .venv/bin/python samples/make_samples.py

Output is byte-for-byte reproducible, so re-running it leaves git clean: the PDF is written
with reportlab's ``invariant=1`` (no timestamps or random document id), and the .docx zip is
rewritten with fixed member timestamps and fixed core properties (python-docx would stamp the
current time on both). Needs python-docx and reportlab (the ``test`` extra).
"""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent / "docs"
FIXED_TIME = dt.datetime(2026, 1, 5, 9, 0, 0, tzinfo=dt.timezone.utc)
NOTE = (
    "Sample document for a fictional company (Harbor & Pine Analytics), created for the Enclave "
    "demo. All names and figures are made up."
)


# --- HR: compensation bands (.docx) ------------------------------------------------------------

BANDS = [
    ("L1", "Analyst", "58,000", "72,000", "CNY 180,000 - 240,000", "none"),
    ("L2", "Senior Analyst", "70,000", "88,000", "CNY 230,000 - 300,000", "none"),
    ("L3", "Data Scientist / Engineer", "86,000", "108,000", "CNY 290,000 - 380,000", "5%"),
    ("L4", "Senior Data Scientist / Engineer", "104,000", "132,000", "CNY 360,000 - 470,000", "8%"),
    ("L5", "Lead / Manager", "128,000", "160,000", "CNY 450,000 - 580,000", "10%"),
    ("L6", "Principal / Senior Manager", "155,000", "195,000", "CNY 560,000 - 720,000", "15%"),
    ("L7", "Director", "190,000", "240,000", "CNY 700,000 - 900,000", "20%"),
]


def make_docx(path: Path) -> None:
    import docx

    document = docx.Document()
    props = document.core_properties
    props.title = "Compensation Bands 2026"
    props.author = "People Team"
    props.last_modified_by = "People Team"
    props.created = props.modified = FIXED_TIME.replace(tzinfo=None)
    props.revision = 1

    document.add_paragraph("Compensation Bands 2026", style="Title")
    document.add_paragraph(NOTE + " Confidential: HR and managers only.")

    document.add_heading("Purpose", level=1)
    document.add_paragraph(
        "These bands set the base salary range for each job level from 1 July 2026 until "
        "30 June 2027. Offers above the band maximum need approval from the Head of People "
        "and the CFO; offers below the band minimum are not allowed."
    )

    document.add_heading("Salary bands by level", level=1)
    document.add_paragraph(
        "Portland figures are annual base salary in US dollars. Rotterdam uses the Portland band "
        "multiplied by 0.82 and paid in euros. Shanghai bands are set separately in CNY."
    )
    table = document.add_table(rows=1, cols=6)
    header = (
        "Level", "Title", "Portland min (USD)", "Portland max (USD)", "Shanghai band",
        "Bonus target",
    )  # fmt: skip
    for cell, text in zip(table.rows[0].cells, header):
        cell.text = text
    for band in BANDS:
        for cell, text in zip(table.add_row().cells, band):
            cell.text = text

    document.add_heading("Bonus", level=1)
    document.add_paragraph(
        "The annual bonus target is a percentage of base salary (see the table). The payout "
        "ranges from 0% to 150% of target depending on company results and the individual "
        "rating, and is paid with the July salary. Employees who joined after 1 January receive "
        "a pro-rated bonus."
    )

    document.add_heading("Allowances", level=1)
    for line in (
        "Home-office allowance: USD 600 / EUR 500 / CNY 3,000 once, for new hires.",
        "Learning budget: USD 1,500 per employee per fiscal year (conferences, courses, books).",
        "Phone allowance: USD 40 per month for employees on the on-call rota.",
        "Shanghai housing fund (住房公积金): company contribution 7% of base salary.",
    ):
        document.add_paragraph(line, style="List Bullet")

    document.add_heading("Band reviews", level=2)
    document.add_paragraph(
        "The People team benchmarks the bands every February against two salary surveys and "
        "proposes changes to the executive team in March."
    )

    buf = io.BytesIO()
    document.save(buf)
    path.write_bytes(_stable_zip(buf.getvalue()))


def _stable_zip(data: bytes) -> bytes:
    """Rewrite a zip with every member stamped at the same fixed time, keeping member order."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=FIXED_TIME.timetuple()[:6])
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = 0o644 << 16
            dst.writestr(fixed, src.read(info.filename))
    return out.getvalue()


# --- Finance: procurement approval matrix (.pdf) -----------------------------------------------


def make_pdf(path: Path) -> None:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import PageBreak, Paragraph, SimpleDocTemplate, Table, TableStyle

    styles = getSampleStyleSheet()
    h1, h2, body = styles["Title"], styles["Heading2"], styles["BodyText"]
    grid = TableStyle(
        [
            ("GRID", (0, 0), (-1, -1), 0.5, colors.grey),
            ("BACKGROUND", (0, 0), (-1, 0), colors.lightgrey),
            ("FONTSIZE", (0, 0), (-1, -1), 9),
        ]
    )
    story = [
        Paragraph("Procurement Approval Matrix", h1),
        Paragraph(NOTE + " Internal: finance team and managers only. Policy FIN-PRC-002, "
                  "effective 1 April 2026.", body),  # fmt: skip
        Paragraph("1. Approval thresholds", h2),
        Paragraph(
            "Every purchase order is approved in PineProcure before the supplier is engaged. "
            "Amounts are per order excluding VAT; splitting an order to stay under a threshold "
            "is a disciplinary offence.",
            body,
        ),
        Table(
            [
                ["Order value (USD)", "Approvers", "Quotes required"],
                ["up to 5,000", "Budget holder", "1"],
                ["5,001 - 25,000", "Budget holder + Finance business partner", "2"],
                ["25,001 - 100,000", "Department head + Financial controller", "3"],
                ["100,001 - 500,000", "CFO", "3 + tender memo"],
                ["over 500,000", "CFO + CEO; reported to the board", "formal tender"],
            ],
            style=grid,
        ),
        Paragraph("2. Corporate cards", h2),
        Paragraph(
            "Corporate cards have a standard monthly limit of USD 3,000 (managers USD 8,000). "
            "Single card transactions above USD 1,500 need a purchase order. Cards may not be "
            "used for cash withdrawals. Statements are reconciled in PineExpense by the 5th "
            "working day of the following month; a card is suspended after two late "
            "reconciliations in a row.",
            body,
        ),
        PageBreak(),
        Paragraph("3. Supplier onboarding", h2),
        Paragraph(
            "New suppliers are onboarded by Accounts Payable, never by the requester. Checks: "
            "sanctions screening, bank account verification by call-back to a number taken from "
            "an independent source, and a signed data-processing agreement when the supplier "
            "will see client data. Changes to a supplier's bank details are frozen for 48 hours "
            "and confirmed by call-back before the next payment.",
            body,
        ),
        Paragraph("4. Payment terms", h2),
        Paragraph(
            "Standard payment terms are 30 days from invoice receipt. Small suppliers (annual "
            "spend below USD 50,000) are paid in 14 days. Payment runs happen every Tuesday and "
            "Thursday; urgent payments outside a run need the Financial controller's approval.",
            body,
        ),
        PageBreak(),
        Paragraph("5. Software and cloud purchases", h2),
        Paragraph(
            "Any software, SaaS subscription or cloud service requires a security review by the "
            "CISO office before the order, whatever its value. Cloud spend is tracked monthly; "
            "a project exceeding its cloud budget by more than 15% is escalated to the "
            "Department head.",
            body,
        ),
        Paragraph("6. Contacts", h2),
        Paragraph(
            "Procurement desk: procurement@harborpine.example, extension 6050. Financial "
            "controller: Idris Okonkwo's office, extension 6001.",
            body,
        ),
    ]
    doc = SimpleDocTemplate(
        str(path),
        pagesize=A4,
        title="Procurement Approval Matrix",
        author="Finance Team",
        invariant=1,  # no creation date or random file id: byte-stable output
    )
    doc.build(story)


def main() -> None:
    make_docx(DOCS / "hr" / "compensation-bands-2026.docx")
    make_pdf(DOCS / "finance" / "procurement-approval-matrix.pdf")
    print("wrote hr/compensation-bands-2026.docx and finance/procurement-approval-matrix.pdf")


if __name__ == "__main__":
    main()
