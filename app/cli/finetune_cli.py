"""`finetune`: LoRA fine-tuning jobs, the adapter registry, promote and rollback."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from app.cli.audit_cli import cli_actor
from app.cli.common import cli_errors, ConfigOption, console, out, set_config

app = typer.Typer(help="LoRA fine-tuning: run jobs, list adapters, promote and roll back.", no_args_is_help=True)

EXIT_LOCKED = 3  # another job is running (a scheduler may simply try again next time)


@app.callback()
def main(ctx: typer.Context, config: ConfigOption = None) -> None:
    if config is not None or ctx.obj is None:  # as `enclave finetune`, `enclave --config` already chose it
        set_config(ctx, config)


@app.command("run")
@cli_errors
def run(
    ctx: typer.Context,
    data: Annotated[list[Path] | None, typer.Option("--data", help="Curated chat JSONL to add (repeatable).")] = None,
    eval_data: Annotated[
        list[Path] | None, typer.Option("--eval-data", help="Chat JSONL held out for the gate (repeatable).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Model to adapt (default: finetune.base_model).")] = None,
    trigger: Annotated[str, typer.Option(help="Recorded in the job history: cli | schedule.")] = "cli",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary object.")] = False,
) -> None:
    """Build the dataset, train a LoRA adapter, evaluate it and promote it if it beats the active one.

    Exits 0 without training when nothing changed since the last adapter; 3 when another job runs.
    """
    from finetune.jobs import JobLocked

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    container = ctx.obj.container()
    config = container.finetune_job_config(data, eval_data, base)
    feedback = container.conversations.feedback_for_training() if container.settings.finetune.include_feedback else []

    def say(message: str) -> None:
        console.print(message, highlight=False, markup=False)

    def progress(step: int, total: int, loss: float) -> None:
        if step == 1 or step == total or step % 10 == 0:
            console.print(f"step {step}/{total} loss {loss:.4f}", highlight=False)

    try:
        outcome = container.adapters.train(cli_actor(), config, feedback=feedback,
                                           synthetic_chunks=container.finetune_synthetic_chunks(),
                                           redact=container.finetune_redact, trigger=trigger, say=say,
                                           progress=progress)  # audited there
    except JobLocked as exc:
        console.print(f"[bold yellow]busy:[/] {exc}", highlight=False)
        sys.exit(EXIT_LOCKED)
    if as_json:
        out.print_json(json.dumps({"status": outcome.status, "message": outcome.message, "version": outcome.version,
                                   "dataset": outcome.dataset, "report": str(outcome.report) if outcome.report else None,
                                   "metrics": outcome.metrics, "skipped": outcome.problems}, default=str))
        return
    out.print(outcome.message, highlight=False)
    if outcome.report:
        out.print(f"report: {outcome.report}", highlight=False)


@app.command("list")
@cli_errors
def list_adapters(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Adapters in the registry with their status and gate metrics."""
    adapters = ctx.obj.container().finetune_registry.list()
    if as_json:
        out.print_json(json.dumps([a.__dict__ for a in adapters], default=str))
        return
    if not adapters:
        out.print("no adapters yet (the base model is serving); train one with `finetune run`")
        return
    table = Table("version", "status", "base model", "dataset", "recall", "eval loss", "created", "promoted")
    for a in adapters:
        name = next((k for k in a.metrics.get("variants", {}) if k.startswith("candidate:")), None)
        v = a.metrics.get("variants", {}).get(name, {}) if name else {}
        recall = f"{v['key_fact_recall']:.1%}" if v.get("key_fact_recall") is not None else "-"
        loss = f"{v['eval_loss']:.4f}" if v.get("eval_loss") is not None else "-"
        style = {"active": "[bold green]active[/]", "retired": "[dim]retired[/]"}.get(a.status, a.status)
        table.add_row(a.version, style, a.base_model, a.dataset_hash[:12], recall, loss, str(a.created_at)[:16],
                      str(a.promoted_at or "-")[:16])
    out.print(table)


@app.command("promote")
@cli_errors
def promote(ctx: typer.Context, version: Annotated[str, typer.Argument(help="The adapter version shown by `finetune list`.")]) -> None:
    """Make VERSION the active adapter (servers switch within finetune.poll_seconds, no restart)."""
    adapter = ctx.obj.container().adapters.promote(cli_actor(), version)
    out.print(f"{adapter.version} is active (previous: {adapter.previous_version or 'base model'})", highlight=False)


@app.command("rollback")
@cli_errors
def rollback(ctx: typer.Context) -> None:
    """Retire the active adapter and re-activate the one before it (or the base model)."""
    retired, active = ctx.obj.container().adapters.rollback(cli_actor())
    out.print(f"retired {retired.version}; now serving {active.version if active else 'the base model'}",
              highlight=False)


@app.command("jobs")
@cli_errors
def jobs(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
         as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Job history, newest first."""
    rows = ctx.obj.container().finetune_registry.jobs(limit)
    if as_json:
        out.print_json(json.dumps([r.model_dump() for r in rows], default=str))
        return
    table = Table("id", "trigger", "status", "version", "started", "finished", "message")
    for r in rows:
        table.add_row(str(r.id), r.trigger, r.status, r.version or "-", str(r.started_at)[:19],
                      str(r.finished_at or "-")[:19], r.message)
    out.print(table)


if __name__ == "__main__":
    app()
