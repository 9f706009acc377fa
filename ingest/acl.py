"""Access groups of ingested documents.

Precedence, most specific first:
1. the last matching rule of the nearest ``.enclave-acl.yaml`` (searched from the file's folder up to
   the ingest root; patterns are relative to the folder holding the ACL file);
2. the ``--groups`` given to ``ingest run``;
3. the configured default groups.

A rule wins over ``--groups`` on purpose: a tree that marks ``hr/**`` as HR-only must not become
readable by everyone because the operator passed a broad ``--groups`` for the rest of the tree.

File format::

    rules:
      - pattern: "hr/**"          # '**' crosses folders, '*' and '?' stay inside one name
        groups: [hr, managers]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

import yaml

ACL_FILE = ".enclave-acl.yaml"
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")


class AclError(Exception):
    pass


def validate_groups(groups: list[str], where: str) -> list[str]:
    cleaned = [g.strip() for g in groups if g and g.strip()]
    for group in cleaned:
        if not _GROUP.fullmatch(group):
            raise AclError(f"{where}: invalid group name {group!r}")
    return sorted(set(cleaned))


@lru_cache(maxsize=512)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    # fnmatch lets '*' cross '/', which would make "*.pdf" match every PDF in the tree; this
    # translation keeps '*' inside one path segment and gives '**' the cross-folder meaning.
    if pattern.endswith("/"):
        pattern += "**"
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Rule:
    pattern: str
    groups: tuple[str, ...]

    def matches(self, relative: str) -> bool:
        pattern = self.pattern[2:] if self.pattern.startswith("./") else self.pattern
        return bool(_glob_regex(pattern).match(relative))


def read_acl_file(path: Path) -> list[Rule]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise AclError(f"{path}: cannot read ACL file: {exc}") from exc
    rules = data.get("rules", []) if isinstance(data, dict) else None
    if not isinstance(rules, list):
        raise AclError(f"{path}: expected a mapping with a 'rules' list")
    parsed = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or not isinstance(rule.get("pattern"), str) or not isinstance(rule.get("groups"), list):
            raise AclError(f"{path}: rule {i + 1} needs 'pattern' (string) and 'groups' (list)")
        groups = validate_groups([str(g) for g in rule["groups"]], f"{path} rule {i + 1}")
        if not groups:
            raise AclError(f"{path}: rule {i + 1} has no groups")
        parsed.append(Rule(rule["pattern"], tuple(groups)))
    return parsed


class AclResolver:
    """Resolves the groups of each file under one ingest root (ACL files are read once)."""

    def __init__(self, root: Path, cli_groups: list[str] | None, default_groups: list[str]):
        self.root = root
        self.cli_groups = validate_groups(cli_groups or [], "--groups")
        self.default_groups = validate_groups(default_groups, "ingest.default_groups")
        if not self.default_groups:
            raise AclError("ingest.default_groups must name at least one group")
        self._rules: dict[Path, list[Rule]] = {}

    def _rules_in(self, folder: Path) -> list[Rule]:
        if folder not in self._rules:
            acl = folder / ACL_FILE
            self._rules[folder] = read_acl_file(acl) if acl.is_file() else []
        return self._rules[folder]

    def groups_for(self, path: Path) -> list[str]:
        folder = path.parent
        while True:
            rules = self._rules_in(folder)
            relative = PurePosixPath(path.relative_to(folder)).as_posix()
            for rule in reversed(rules):
                if rule.matches(relative):
                    return list(rule.groups)
            if folder == self.root or self.root not in folder.parents:
                break
            folder = folder.parent
        return self.cli_groups or self.default_groups
