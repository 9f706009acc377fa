"""The console scripts as users run them: real processes, real models, the bundled sample documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLES


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    data_dir = tmp_path_factory.mktemp("cli") / "var"
    env = {**os.environ, "ENCLAVE_DATA_DIR": str(data_dir), "ENCLAVE_MODELS_DIR": str(models_dir)}
    env.pop("ENCLAVE_CONFIG", None)
    env.pop("ENCLAVE_DATABASE_URL", None)

    def run(program: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        module = {"ingest": "app.cli.ingest_cli", "enclave": "app.cli.main", "finetune": "app.cli.finetune_cli"}[program]
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == expect, f"{program} {args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    run.data_dir = data_dir
    return run


@pytest.mark.slow
def test_ingest_search_list_remove(cli):
    report = json.loads(cli("ingest", "run", str(SAMPLES), "--json").stdout)
    files = [p for p in SAMPLES.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert report["added"] == len(files) and report["failed"] == 0 and report["chunks"] > len(files)
    for key in ("added", "updated", "unchanged", "deleted", "failed", "chunks", "seconds"):
        assert key in report

    again = json.loads(cli("ingest", "run", str(SAMPLES), "--json").stdout)
    assert again["unchanged"] == len(files) and again["chunks"] == 0

    hits = json.loads(cli("enclave", "search", "How many days of annual leave do employees get?", "--json").stdout)["results"]
    assert hits and hits[0]["source"] in {"leave-policy.md", "请假制度.md"}

    # Access groups apply inside the search: HR files only for HR, the rest for everyone.
    query = "salary compensation bands and performance review ratings"
    everyone = json.loads(cli("enclave", "search", query, "--as-group", "everyone", "--top-k", "50", "--json").stdout)["results"]
    assert everyone and not any(h["source"].startswith(("hr/", "finance/")) for h in everyone)
    hr = json.loads(cli("enclave", "search", query, "--as-group", "hr", "--top-k", "50", "--json").stdout)["results"]
    assert any(h["source"].startswith("hr/") for h in hr) and not any(h["source"].startswith("finance/") for h in hr)

    docs = json.loads(cli("ingest", "list", "--json").stdout)
    assert {d["source"] for d in docs} == {p.relative_to(SAMPLES).as_posix() for p in files}
    hr_doc = next(d for d in docs if d["source"].startswith("hr/"))
    assert hr_doc["groups"] == ["hr", "managers"]

    removed = cli("ingest", "remove", str(hr_doc["id"])).stdout
    assert hr_doc["source"] in removed
    status = json.loads(cli("ingest", "status", "--json").stdout)
    (kb,) = status["knowledge_bases"]
    assert kb["documents"] == len(files) - 1 and kb["chunks"] == kb["index_vectors"]
    assert status["runs"][0]["status"] == "finished"


def test_clear_errors(cli, tmp_path: Path):
    missing = cli("ingest", "run", str(tmp_path / "nope"), expect=2)
    assert "no such file or folder" in missing.stderr and "Traceback" not in missing.stderr
    unknown = cli("enclave", "search", "anything", "--kb", "nope", expect=2)
    assert "unknown knowledge base 'nope'" in unknown.stderr
    bad_name = cli("ingest", "run", str(SAMPLES / "it"), "--kb", "../x", expect=2)
    assert "invalid knowledge base name" in bad_name.stderr
    for outside in ("../../../../etc/passwd", "../../../../etc", "a..b"):  # refused before a path is built
        refused = cli("enclave", "search", "anything", "--kb", outside, expect=2)
        assert "invalid knowledge base name" in refused.stderr and "Traceback" not in refused.stderr
    refused = cli("ingest", "list", "--kb", "../../../../etc", expect=2)
    assert "invalid knowledge base name" in refused.stderr


def _audit_records(cli, tmp_path: Path) -> list[dict]:
    export = tmp_path / "audit.jsonl"
    cli("enclave", "audit", "export", "--out", str(export))
    lines = [json.loads(line) for line in export.read_text().splitlines() if line.strip()]
    return [line for line in lines if line["type"] == "record"]


def test_cli_changes_are_audited_like_the_api(cli, tmp_path: Path):
    """ingest run / remove, search, finetune run / promote / rollback and key commands write the same started +
    outcome records as the admin API, with the operator as subject; failures are recorded too."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "note.md").write_text("# Parking\n\nVisitors park in bay C behind the north entrance.\n")
    cli("ingest", "run", str(folder), "--kb", "audited")
    found = json.loads(cli("enclave", "search", "where do visitors park", "--kb", "audited", "--json").stdout)
    cli("enclave", "search", "where do visitors park", "--kb", "nothing-here", expect=2)
    doc = next(d for d in json.loads(cli("ingest", "list", "--kb", "audited", "--json").stdout))
    cli("ingest", "remove", str(doc["id"]), "--kb", "audited")
    cli("ingest", "remove", "999999", "--kb", "audited", expect=2)
    cli("finetune", "promote", "no-such-adapter", expect=2)
    cli("finetune", "rollback", expect=2)
    from finetune.jobs import JobLock

    with JobLock(cli.data_dir / "finetune" / "job.lock"):  # a job is running: this one is refused, and recorded
        cli("finetune", "run", expect=3)
    cli("enclave", "keys", "create", "bad-role-key", "--role", "emperor", expect=2)

    records = _audit_records(cli, tmp_path)

    def trail(action: str) -> list[tuple[str, str]]:
        return [(r["status"], r.get("detail") or "") for r in records if r["action"] == action
                and r.get("knowledge_base") in (None, "audited")]

    assert all(r["subject"].startswith("cli:") for r in records if r["action"] != "audit.export")
    run = trail("ingest.run")
    assert run[-2][0] == "started" and str(folder) in run[-2][1]
    assert run[-1][0] == "ok" and "added 1" in run[-1][1]
    removed = trail("document.remove")
    assert [s for s, _ in removed[-4:]] == ["started", "ok", "started", "failed"]
    assert f"removed documents {doc['id']}" in removed[-3][1] and removed[-1][1].startswith("404 document_not_found")
    assert [s for s, _ in trail("adapter.promote")[-2:]] == ["started", "failed"]
    assert trail("adapter.promote")[-1][1].startswith("400 adapter_registry")
    assert [s for s, _ in trail("adapter.rollback")[-2:]] == ["started", "failed"]
    assert [s for s, _ in trail("finetune.run")[-2:]] == ["started", "failed"]
    assert trail("finetune.run")[-1][1].startswith("409 job_running")
    created = trail("key.create")
    assert [s for s, _ in created[-2:]] == ["started", "failed"] and created[-1][1].startswith("400 invalid_key_request")
    # A search from the CLI is audited like one through the API: one record, with what it returned.
    searches = [r for r in records if r["action"] == "search"]
    assert [(r["status"], r.get("knowledge_base")) for r in searches[-2:]] == [("ok", "audited"), ("failed", "nothing-here")]
    assert json.loads(searches[-2]["chunk_ids"]) == [h["chunk_id"] for h in found["results"]]
    assert searches[-1]["detail"].startswith("404 knowledge_base")


def test_each_invocation_has_its_own_config_and_container(tmp_path: Path):
    """No class-level or environment state: two commands in one process, each with its own
    --config, each see their own settings (before, the second reused the first's container)."""
    from typer.testing import CliRunner

    from app.cli.main import app

    runner = CliRunner()
    seen = []
    for name in ("first", "second"):
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"data_dir: {tmp_path / name}\n")
        result = runner.invoke(app, ["--config", str(config), "config", "show"])
        assert result.exit_code == 0, result.output
        seen.append(json.loads(result.stdout)["resolved"]["data_dir"])
    assert seen == [str(tmp_path / "first"), str(tmp_path / "second")]
    assert "ENCLAVE_CONFIG" not in os.environ


def test_models_list(cli):
    models = {m["name"]: m for m in json.loads(cli("enclave", "models", "list", "--json").stdout)}
    for name in ("all-minilm-l6-v2", "smollm2-135m-instruct"):
        assert models[name]["present"] and models[name]["verified"] and len(models[name]["sha256"]) == 64
