"""Access-group assignment from .enclave-acl.yaml files, --groups and the default group."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.acl import AclError, AclResolver


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_rules_cli_groups_and_default(tmp_path: Path):
    write(tmp_path / ".enclave-acl.yaml", 'rules:\n  - pattern: "hr/**"\n    groups: [hr]\n  - pattern: "*.pdf"\n    groups: [legal]\n')
    resolver = AclResolver(tmp_path, ["staff"], ["everyone"])
    assert resolver.groups_for(write(tmp_path / "hr" / "a" / "pay.md")) == ["hr"]
    assert resolver.groups_for(write(tmp_path / "contract.pdf")) == ["legal"]
    # '*' stays inside one folder name: a PDF below a folder is not matched by "*.pdf".
    assert resolver.groups_for(write(tmp_path / "sub" / "contract.pdf")) == ["staff"]
    assert resolver.groups_for(write(tmp_path / "readme.md")) == ["staff"]
    assert AclResolver(tmp_path, None, ["everyone"]).groups_for(tmp_path / "readme.md") == ["everyone"]


def test_later_rules_and_nearer_files_win(tmp_path: Path):
    write(tmp_path / ".enclave-acl.yaml", 'rules:\n  - pattern: "**"\n    groups: [staff]\n  - pattern: "board/**"\n    groups: [board]\n')
    write(tmp_path / "board" / ".enclave-acl.yaml", 'rules:\n  - pattern: "public/*"\n    groups: [everyone]\n')
    resolver = AclResolver(tmp_path, None, ["everyone"])
    assert resolver.groups_for(write(tmp_path / "x.md")) == ["staff"]
    assert resolver.groups_for(write(tmp_path / "board" / "minutes.md")) == ["board"]
    assert resolver.groups_for(write(tmp_path / "board" / "public" / "press.md")) == ["everyone"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("rules: {}", "'rules' list"),
        ('rules:\n  - pattern: "a/**"\n', "needs 'pattern'"),
        ('rules:\n  - pattern: "a/**"\n    groups: ["bad group!"]\n', "invalid group name"),
        ('rules:\n  - pattern: "a/**"\n    groups: []\n', "has no groups"),
        ("rules: [unclosed", "cannot read ACL file"),
    ],
)
def test_bad_acl_files_are_rejected_clearly(tmp_path: Path, content: str, message: str):
    write(tmp_path / ".enclave-acl.yaml", content)
    resolver = AclResolver(tmp_path, None, ["everyone"])
    with pytest.raises(AclError, match=message):
        resolver.groups_for(write(tmp_path / "a" / "b.md"))


def test_bad_cli_groups(tmp_path: Path):
    with pytest.raises(AclError, match="--groups"):
        AclResolver(tmp_path, ["ok", "not ok"], ["everyone"])
