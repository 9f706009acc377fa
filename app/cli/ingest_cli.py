"""`ingest`: put folders of documents into a knowledge base, incrementally."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.text import Text
from rich.table import Table

from app.cli.audit_cli import cli_actor
from app.cli.common import cli_errors, ConfigOption, console, kb_name, out, set_config

app = typer.Typer(help="Ingest documents into a knowledge base.", no_args_is_help=True)


@app.callback()
def main(ctx: typer.Context, config: ConfigOption = None) -> None:
    set_config(ctx, config)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} files/s")


class RichProgress:
    """Live bar on a terminal: files done of total, chunks embedded, rate and ETA."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("[bold]ingest"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
            TextColumn("{task.fields[chunks]} chunks"), RateColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
            console=console, transient=True,
        )
        self.task = None
        self.chunks = 0

    def start(self, total_files: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("ingest", total=total_files, chunks=0, note="")

    def advance(self, files: int = 0, chunks: int = 0) -> None:
        self.chunks += chunks
        self.bar.update(self.task, advance=files, chunks=self.chunks)

    def note(self, text: str) -> None:
        """What a long step is doing, e.g. "OCR scan.pdf page 3/40" (the bar refreshes on its own)."""
        self.bar.update(self.task, note=text)

    def finish(self) -> None:
        self.bar.stop()


def _split_groups(groups: str | None) -> list[str] | None:
    return [g for g in (groups or "").split(",") if g.strip()] or None


@app.command("run")
@cli_errors
def run(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="Folder (or single file) to ingest.")],
    kb: Annotated[str | None, typer.Option("--kb", callback=kb_name, help="Knowledge base (default from config).")] = None,
    groups: Annotated[str | None, typer.Option("--groups", help="Comma-separated groups for files no ACL rule matches.")] = None,
    no_delete: Annotated[bool, typer.Option("--no-delete", help="Keep documents whose files disappeared.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary object.")] = False,
) -> None:
    """Ingest PATH: new and changed files are embedded, unchanged ones skipped, deleted ones removed."""
    container = ctx.obj.container()
    kb = kb or container.settings.default_kb
    progress = RichProgress() if (console.is_terminal and not as_json) else None
    report = container.documents.ingest(cli_actor(), path, kb, _split_groups(groups), delete_missing=not no_delete,
                                        progress=progress)
    if as_json:
        out.print_json(json.dumps(report.as_dict(), ensure_ascii=False))
    else:
        out.print(f"[bold]ingest[/] {report.root} -> knowledge base [bold]{kb}[/]", highlight=False)
        out.print(
            f"  files: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
            f"{report.deleted} deleted, {report.failed} failed, {report.skipped} skipped "
            f"(unsupported type, link, special file, or needs OCR that is off or missing)\n"
            f"  chunks: {report.chunks} embedded, {report.total_chunks} in the knowledge base\n"
            f"  time: {report.seconds:.1f} s",
            highlight=False,
        )
        for failure in report.failures:
            console.print(f"[yellow]failed:[/] {failure.source}: {failure.reason}", highlight=False)
        for skipped in report.skipped_files:
            console.print(f"[yellow]skipped:[/] {skipped.source}: {skipped.reason}", highlight=False)
    _warn_stale(container, kb)
    if report.failed:
        sys.exit(1)


def _warn_stale(container, kb: str) -> None:
    """Say so when documents of ``kb`` were chunked/embedded differently from the running config."""
    stale = container.kb_store.stale_documents(kb)
    if stale:
        console.print(
            f"[yellow]warning:[/] {stale} document(s) of {kb!r} were indexed with another chunker or embedder "
            f"than the current one ({container.kb_store.index_version}); unchanged files are not rebuilt "
            f"silently. Run `ingest reindex --kb {kb}` to rebuild them.", highlight=False,
        )


@app.command("reindex")
@cli_errors
def reindex_command(
    ctx: typer.Context,
    kb: Annotated[str | None, typer.Option("--kb", callback=kb_name, help="Knowledge base (default from config).")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Rebuild every document, not only the stale ones.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary object.")] = False,
) -> None:
    """Re-chunk and re-embed, from their source files, the documents indexed with another chunker or
    embedder version. Resumable: a killed run keeps what it finished; run it again to go on."""
    from ingest.native_memory import limit_for_console_run

    limit_for_console_run()  # the console process is the reindex's own, as for `ingest run`
    container = ctx.obj.container()
    kb = kb or container.settings.default_kb
    progress = RichProgress() if (console.is_terminal and not as_json) else None
    report = container.documents.reindex(cli_actor(), kb, everything=everything, progress=progress)
    if as_json:
        out.print_json(json.dumps(report.as_dict(), ensure_ascii=False))
    else:
        out.print(
            f"[bold]reindex[/] knowledge base [bold]{kb}[/] ({container.kb_store.index_version})\n"
            f"  documents: {report.updated} rebuilt, {report.failed} failed\n"
            f"  chunks: {report.chunks} embedded, {report.total_chunks} in the knowledge base\n"
            f"  time: {report.seconds:.1f} s",
            highlight=False,
        )
        for failure in report.failures:
            console.print(f"[yellow]failed:[/] {failure.source}: {failure.reason}", highlight=False)
    if report.failed:
        sys.exit(1)


@app.command("status")
@cli_errors
def status(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Knowledge bases with document/chunk counts, index version and recent ingest runs."""
    store = ctx.obj.container().kb_store
    kbs = [store.stats(name).__dict__ for name in store.list_kbs()]
    runs = [r for r in store.recent_runs(limit=10)]
    if as_json:
        out.print_json(json.dumps({"knowledge_bases": kbs, "runs": runs}, default=str))
        return
    table = Table("knowledge base", "documents", "chunks", "index version", "indexed vectors", "embedder", "stale")
    for s in kbs:
        table.add_row(s["name"], str(s["documents"]), str(s["chunks"]), str(s["index_version"] or "-"),
                      str(s["index_vectors"] if s["index_vectors"] is not None else "-"), s["embedder"],
                      str(s["stale_documents"]))
    out.print(table)
    runs_table = Table("run", "kb", "root", "started", "status", "added", "updated", "deleted", "failed")
    for r in runs:
        rep = r.get("report") or {}
        runs_table.add_row(str(r["id"]), r["kb"], r["root"], str(r["started_at"])[:19], r["status"],
                           *(str(rep.get(k, "-")) for k in ("added", "updated", "deleted", "failed")))
    out.print(runs_table)


@app.command("list")
@cli_errors
def list_documents(
    ctx: typer.Context,
    kb: Annotated[str | None, typer.Option("--kb", callback=kb_name)] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Documents of a knowledge base with their groups and chunk counts."""
    container = ctx.obj.container()
    kb = kb or container.settings.default_kb
    container.kb_store.get_kb(kb)
    docs = container.kb_store.documents(kb)
    if as_json:
        out.print_json(json.dumps([{**d.__dict__, "groups": json.loads(d.groups)} for d in docs], default=str, ensure_ascii=False))
        return
    table = Table("id", "source", "type", "title", "groups", "chunks", "ingested")
    for d in docs:
        table.add_row(str(d.id), d.source, d.file_type, (d.title or "")[:40], ",".join(json.loads(d.groups)),
                      str(d.chunk_count), str(d.ingested_at)[:19])
    out.print(table)


@app.command("remove")
@cli_errors
def remove(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="Document id, file path, or folder path.")],
    kb: Annotated[str | None, typer.Option("--kb", callback=kb_name)] = None,
) -> None:
    """Remove documents (and their chunks and vectors) from a knowledge base."""
    removed = ctx.obj.container().documents.remove(cli_actor(), target, kb)
    for d in removed:
        out.print(f"removed {d.id} {d.source} ({d.chunk_count} chunks)", highlight=False)


if __name__ == "__main__":
    app()
