"""Installed packages stay inside the ranges pyproject.toml declares.

pip honours the ranges when it resolves, but an environment can drift afterwards (a manual
`pip install -U transformers`, a GPU image that brings its own torch). llm/ and retrieval/ use
internals of torch, transformers, peft, sentence-transformers and faiss that change between minor
versions, so running outside the tested range must fail loudly here rather than oddly elsewhere.
"""

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
CAPPED = {"torch", "transformers", "peft", "sentence-transformers", "faiss-cpu"}


def _requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return [Requirement(line) for line in project["dependencies"]]


def test_libraries_with_internals_in_use_have_an_upper_bound():
    capped = {r.name.lower(): r for r in _requirements() if r.name.lower() in CAPPED}
    assert set(capped) == CAPPED
    for name, requirement in capped.items():
        assert any(spec.operator in {"<", "<=", "=="} for spec in requirement.specifier), name


@pytest.mark.parametrize("requirement", _requirements(), ids=lambda r: r.name)
def test_installed_version_is_in_the_declared_range(requirement: Requirement):
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{requirement.name} is declared but not installed")
    # A local build tag (torch 2.13.0+cpu) is the same release for the range check.
    release = Version(installed).public
    assert requirement.specifier.contains(release, prereleases=True), (
        f"{requirement.name} {installed} is outside the tested range {requirement.specifier}; "
        "run `make test` on that version and move the bound in pyproject.toml")


def test_nothing_declared_goes_unused():
    """Each runtime dependency is imported somewhere in the libraries or the app."""
    import_names = {  # distribution -> module, where they differ
        "faiss-cpu": "faiss", "pydantic-settings": "pydantic_settings",
        "pyyaml": "yaml", "python-docx": "docx", "beautifulsoup4": "bs4", "langchain-text-splitters":
        "langchain_text_splitters", "python-multipart": "multipart", "pyjwt": "jwt",
        "pystemmer": "Stemmer", "prometheus-client": "prometheus_client", "nvidia-ml-py": "pynvml",
        "python-json-logger": "pythonjsonlogger", "sentence-transformers": "sentence_transformers",
        "python-pptx": "pptx", "pillow": "PIL",
    }
    # Needed at run time without an import statement of ours: transformers loads GGUF weights
    # through gguf, FastAPI parses uploads through python-multipart, pypdf decrypts with cryptography,
    # lxml is the parser bs4 and python-docx are given by name,
    # SQLAlchemy loads psycopg from the postgresql+psycopg:// URL, torch.onnx.export writes through onnx,
    # onnxruntime's weight quantizer needs onnx-ir.
    indirect = {"gguf", "python-multipart", "lxml", "psycopg", "onnx", "onnx-ir"}
    root = PYPROJECT.parent
    sources = "\n".join(p.read_text(encoding="utf-8") for package in
                        ("app", "ingest", "retrieval", "llm", "finetune", "security")
                        for p in (root / package).rglob("*.py"))
    unused = []
    for requirement in _requirements():
        name = requirement.name.lower()
        if name in indirect:
            continue
        module = import_names.get(name, name.replace("-", "_"))
        if f"import {module}" not in sources and f"from {module}" not in sources:
            unused.append(requirement.name)
    assert not unused, f"declared but never imported: {unused}"
