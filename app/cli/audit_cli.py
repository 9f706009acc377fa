"""`enclave audit`: verify the chain, export it off the box, sign a checkpoint now."""

from __future__ import annotations

import getpass
import json
import secrets
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import cli_errors, out

audit_app = typer.Typer(help="Tamper-evident audit log (hash chain, signed checkpoints).", no_args_is_help=True)


def cli_actor():
    """CLI commands act as the operator logged in on the server."""
    from app.services.audit import Actor

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor(request_id=f"cli-{secrets.token_hex(8)}", subject=f"cli:{user}", role="admin")


def record(container, action: str, **fields) -> None:
    """Append one record for a CLI action (raises AuditUnavailable: the command fails)."""
    container.audit.record(cli_actor(), action, **fields)


@audit_app.command("verify")
@cli_errors
def verify(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Option("--file", help="Verify an export (JSONL) instead of the database.")] = None,
    public_key: Annotated[
        Path | None, typer.Option("--public-key", help="PEM public key obtained independently (with --file).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
) -> None:
    """Recompute every hash and link, check the sequence for gaps and every checkpoint signature.
    Exit code 0: OK; 1: the chain is broken (the first broken sequence number is printed)."""
    from security.audit import load_public_key, verify_export

    if file is not None:
        keys = [load_public_key(public_key.read_bytes())] if public_key else None
        with open(file, encoding="utf-8") as handle:
            report = verify_export(handle, keys)
    else:
        report = ctx.obj.container().audit_log.verify()
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    elif report.ok:
        span = f"seq {report.first_seq}..{report.last_seq}" if report.records else "empty"
        out.print(f"audit chain OK: {report.records} records ({span}), {report.checkpoints} signed checkpoints, "
                  f"last signed seq {report.last_checkpoint_seq or '-'}", highlight=False)
        if file is not None and public_key is None:
            out.print("note: checked with the public key inside the export; pass --public-key to also prove its origin",
                      highlight=False)
    else:
        out.print(f"[bold red]audit chain BROKEN[/]: first broken sequence number {report.first_broken_seq}", highlight=False)
        if report.gaps:
            out.print("missing: " + ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in report.gaps), highlight=False)
        if report.bad_signatures:
            out.print("bad checkpoint signatures at seq " + ", ".join(map(str, report.bad_signatures)), highlight=False)
        for problem in report.problems:
            out.print(f"  - {problem}", highlight=False)
    if not report.ok:
        sys.exit(1)


def _since(value: str, log) -> int:
    if value.isdigit():
        return max(int(value), 1)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter("--since takes a sequence number or an ISO date/time, e.g. 2026-12-01T00:00:00Z") from None
    return log.first_seq_since(when if when.tzinfo else when.replace(tzinfo=timezone.utc))


@audit_app.command("export")
@cli_errors
def export(
    ctx: typer.Context,
    since: Annotated[str, typer.Option("--since", help="First sequence number, or an ISO date/time.")] = "1",
    out_file: Annotated[Path | None, typer.Option("--out", help="Write to this file (default: standard output).")] = None,
) -> None:
    """JSON lines: the public key(s), the records from --since on, and the checkpoints covering them.
    Copy it off the box and check it there with `enclave audit verify --file FILE --public-key PEM`."""
    from app.private import open_private
    from security.audit import canonical_json

    log = ctx.obj.container().audit_log
    first = _since(since, log)
    handle = open_private(out_file) if out_file else sys.stdout  # the chain holds questions and answers
    count = 0
    try:
        for item in log.export(first):
            handle.write(canonical_json(item).decode() + "\n")
            count += item["type"] == "record"
    finally:
        if out_file:
            handle.close()
    record(ctx.obj.container(), "audit.export", detail=f"from seq {first}; {count} records")
    if out_file:
        out.print(f"exported {count} records from seq {first} to {out_file}", highlight=False)


@audit_app.command("checkpoint")
@cli_errors
def checkpoint(ctx: typer.Context) -> None:
    """Sign the newest record now (an Ed25519 checkpoint)."""
    cp = ctx.obj.container().audit_log.checkpoint()
    if cp is None:
        out.print("the audit chain is empty: nothing to sign")
        return
    out.print(f"checkpoint signed at seq {cp['seq']} (hash {cp['hash'][:16]}…, key {cp['key_id']})", highlight=False)
