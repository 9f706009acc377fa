"""Ingestion benchmark: Enclave's `ingest run` against the conventional LangChain pipeline.

One run, one real corpus, one embedding model (all-MiniLM-L6-v2 from the models directory):

1. Enclave full ingest into a fresh data dir: the real console script (``.venv/bin/ingest run
   CORPUS --json``) as a child process, with ``ENCLAVE_DATA_DIR`` / ``ENCLAVE_MODELS_DIR`` set.
2. Enclave re-run on the unchanged corpus (same data dir): every file hashed, nothing embedded.
3. The conventional LangChain pipeline in its own child process (this file, ``--_langchain``):
   ``DirectoryLoader(BSHTMLLoader)`` -> ``RecursiveCharacterTextSplitter(750, 150)`` ->
   ``HuggingFaceEmbeddings(<local model folder>, device=cpu)`` -> ``FAISS.from_documents`` ->
   ``save_local``.

Each measured thing is its own child process. Wall time is measured by this parent from spawn to
exit, so both sides pay interpreter start, imports and model load. Peak RSS and CPU time are the
child's own, read exactly from ``os.wait4`` (``ru_maxrss``), so the figures are not mixed up.

Corpus (default): every ``.html`` page of the Simplified-Chinese GIMP manual (``gimp-help-zh-cn``,
685 files, much of it still English), then the Simplified-Chinese LibreOffice help
(``libreoffice-help-zh-cn``) in path order until ``--files`` (default 1000) is reached: the memory
target is checked on a 1,000-file corpus of real, mixed Chinese/English HTML (11.6 MB). The Python
3.11 documentation (``--corpus /usr/share/doc/python3.11/html``) has far longer pages: its first
315 files alone hold ~11k chunks, over an hour per pipeline on a shared two-core machine.
The chosen files are copied into a scratch folder (only ``.html``: both pipelines see exactly the
same files). Install the corpus once (this script installs nothing)::

    apt-get update && apt-get install -y gimp-help-zh-cn
    # only the help package's files (apt-get install would pull all of LibreOffice):
    mkdir -p /var/tmp/enclave-bench && cd /var/tmp/enclave-bench \
      && apt-get download libreoffice-help-zh-cn && dpkg-deb -x libreoffice-help-zh-cn_*.deb libreoffice-help-zh-cn

Models: ``$ENCLAVE_MODELS_DIR/all-minilm-l6-v2`` (default ``var/models``, filled by
``enclave models pull``). No model hub is contacted (``HF_HUB_OFFLINE=1`` for every child).

Usage::

    HF_HUB_OFFLINE=1 ENCLAVE_MODELS_DIR=var/models .venv/bin/python bench/ingest.py
    .venv/bin/python bench/ingest.py --files 50            # quick try
    .venv/bin/python bench/ingest.py --corpus /some/html --json

Targets (printed as PASS/FAIL): Enclave full-ingest throughput (files/s) >= 2x LangChain's;
re-run >= 20x faster than the full ingest; Enclave peak RSS < 1.5 GiB on a >= 1,000-file corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "all-minilm-l6-v2"
GIMP_ZH_DOCS = Path("/usr/share/gimp/2.0/help/zh_CN")
LO_ZH_CANDIDATES = (
    Path("/usr/share/libreoffice/help/zh-CN"),  # apt-get install libreoffice-help-zh-cn
    Path("/var/tmp/enclave-bench/libreoffice-help-zh-cn/usr/share/libreoffice/help/zh-CN"),  # unpacked .deb
)
APT_HINT = ("apt-get update && apt-get install -y gimp-help-zh-cn && mkdir -p /var/tmp/enclave-bench && cd "
            "/var/tmp/enclave-bench && apt-get download libreoffice-help-zh-cn && dpkg-deb -x "
            "libreoffice-help-zh-cn_*.deb libreoffice-help-zh-cn")
CHUNK_SIZE, CHUNK_OVERLAP = 750, 150
RERUN_TARGET = 20.0
SPEEDUP_TARGET = 2.0  # full-ingest files/s against LangChain's, same files, same model, one run
RSS_TARGET_MIB = 1536.0  # 1.5 GiB
RSS_TARGET_FILES = 1000


@dataclass
class Measure:
    name: str
    files: int = 0
    chunks: int = 0
    seconds: float = 0.0  # wall, measured by the parent (spawn -> exit)
    cpu_seconds: float = 0.0  # user + sys of the child
    peak_rss_mib: float = 0.0
    returncode: int = 0
    detail: dict = field(default_factory=dict)

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data.update(files_per_s=round(self.files_per_s, 3), chunks_per_s=round(self.chunks_per_s, 3))
        data["seconds"] = round(self.seconds, 3)
        data["cpu_seconds"] = round(self.cpu_seconds, 3)
        data["peak_rss_mib"] = round(self.peak_rss_mib, 1)
        return data


# --- corpus ------------------------------------------------------------------------------------


def html_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".html", ".htm") and p.is_file())


def stage_corpus(corpora: list[Path], limit: int, dest: Path) -> tuple[int, int, list[dict]]:
    """Copy up to ``limit`` html files (corpora in order) into dest/<label>/...; (files, bytes, used)."""
    files = total = 0
    used = []
    for index, folder in enumerate(corpora):
        if files >= limit:
            break
        label = f"{index}-{folder.name or 'root'}"
        taken = 0
        for src in html_files(folder):
            if files >= limit:
                break
            target = dest / label / src.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
            size = target.stat().st_size
            files, total, taken = files + 1, total + size, taken + 1
        used.append({"folder": str(folder), "files": taken})
    return files, total, used


# --- measuring a child process -----------------------------------------------------------------


def measure(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> tuple[Measure, str]:
    """Run argv as a child; wall time, exact peak RSS and CPU from wait4; returns (measure, stdout)."""
    stdout_path, stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: keep Popen quiet
    result = Measure(
        name=name, seconds=seconds, cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mib=usage.ru_maxrss / 1024.0,  # Linux: KiB
        returncode=proc.returncode,
    )
    text = stdout_path.read_text(errors="replace")
    if proc.returncode not in (0, 1):  # `ingest run` exits 1 when some files failed, with a report
        raise SystemExit(f"{name}: exit code {proc.returncode}\n--- stderr (tail) ---\n{_tail(stderr_path)}")
    return result, text


def _tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:] if path.is_file() else ""


def parse_json(text: str, name: str, stderr_path: Path) -> dict:
    start = text.find("{")
    try:
        return json.loads(text[start:])
    except ValueError:
        raise SystemExit(f"{name}: no JSON summary on stdout:\n{text[-2000:]}\n--- stderr (tail) ---\n"
                         f"{_tail(stderr_path)}") from None


# --- the conventional LangChain pipeline (runs in its own child process) -----------------------


def langchain_pipeline(corpus: Path, model: Path, out_dir: Path, result_file: Path) -> None:
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    import warnings

    warnings.filterwarnings("ignore")
    from langchain_community.document_loaders import BSHTMLLoader, DirectoryLoader
    from langchain_community.vectorstores import FAISS
    from langchain_huggingface import HuggingFaceEmbeddings
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    t1 = time.perf_counter()
    phases["imports"] = t1 - t0
    loader = DirectoryLoader(
        str(corpus), glob="**/*.htm*", loader_cls=BSHTMLLoader, loader_kwargs={"open_encoding": "utf-8"},
        show_progress=False, use_multithreading=False,
    )
    docs = loader.load()
    t2 = time.perf_counter()
    phases["load"] = t2 - t1
    splitter = RecursiveCharacterTextSplitter(chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP)
    chunks = splitter.split_documents(docs)
    t3 = time.perf_counter()
    phases["split"] = t3 - t2
    embeddings = HuggingFaceEmbeddings(model_name=str(model), model_kwargs={"device": "cpu"})
    t4 = time.perf_counter()
    phases["model_load"] = t4 - t3
    store = FAISS.from_documents(chunks, embeddings)
    t5 = time.perf_counter()
    phases["embed_index"] = t5 - t4
    store.save_local(str(out_dir))
    phases["save"] = time.perf_counter() - t5
    result_file.write_text(json.dumps({
        "files": len({d.metadata.get("source") for d in docs}), "documents": len(docs), "chunks": len(chunks),
        "chars": sum(len(c.page_content) for c in chunks), "phases": {k: round(v, 3) for k, v in phases.items()},
    }))


# --- report ------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "platform": platform.platform()}


def print_table(rows: list[Measure]) -> None:
    header = ("run", "files", "chunks", "seconds", "files/s", "chunks/s", "CPU s", "peak RSS MiB")
    lines = [header] + [
        (m.name, str(m.files), str(m.chunks), f"{m.seconds:.1f}", f"{m.files_per_s:.2f}", f"{m.chunks_per_s:.1f}",
         f"{m.cpu_seconds:.1f}", f"{m.peak_rss_mib:.0f}")
        for m in rows
    ]
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    for n, row in enumerate(lines):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", action="append", type=Path, metavar="DIR",
                        help="HTML folder (repeatable; used in order). Default: gimp-help-zh-cn, then "
                             "libreoffice-help-zh-cn")
    parser.add_argument("--files", type=int, default=RSS_TARGET_FILES, help="cap on the number of html files "
                        "(default %(default)s)")
    parser.add_argument("--models-dir", type=Path,
                        default=Path(os.environ.get("ENCLAVE_MODELS_DIR") or REPO / "var" / "models"),
                        help="folder holding %s/ (default $ENCLAVE_MODELS_DIR or var/models)" % MODEL_NAME)
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--skip-langchain", action="store_true", help="only measure Enclave")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--json-out", type=Path, metavar="FILE", help="also write the JSON object to FILE")
    # Internal: the LangChain child.
    parser.add_argument("--_langchain", nargs=4, metavar=("CORPUS", "MODEL", "OUT", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._langchain:
        corpus, model, out_dir, result = map(Path, args._langchain)
        langchain_pipeline(corpus, model, out_dir, result)
        return 0

    corpora = args.corpus or [GIMP_ZH_DOCS, next((p for p in LO_ZH_CANDIDATES if p.is_dir()), LO_ZH_CANDIDATES[0])]
    missing = [c for c in corpora if not c.is_dir()]
    if missing:
        hint = f"\nInstall the default corpus with:\n    {APT_HINT}" if not args.corpus else ""
        parser.error(f"corpus folder not found: {', '.join(map(str, missing))}{hint}")
    model = args.models_dir / MODEL_NAME
    if not (model / "modules.json").is_file():
        parser.error(f"embedding model not found at {model}; run `enclave models pull` or set ENCLAVE_MODELS_DIR")
    ingest_bin = Path(sys.executable).parent / "ingest"
    if not ingest_bin.is_file():
        parser.error(f"{ingest_bin} not found: install the project into this environment (make venv)")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="enclave-bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus_dir, data_dir, lc_dir, logs = (workdir / n for n in ("corpus", "data", "langchain", "logs"))
    for d in (corpus_dir, data_dir, lc_dir):
        if d.exists():
            shutil.rmtree(d)
    logs.mkdir(exist_ok=True)
    try:
        n_files, n_bytes, used = stage_corpus(corpora, args.files, corpus_dir)
        if n_files == 0:
            parser.error("no .html files in the corpus")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "ENCLAVE_DATA_DIR": str(data_dir), "ENCLAVE_MODELS_DIR": str(args.models_dir)}
        env.pop("ENCLAVE_CONFIG", None)
        env.pop("ENCLAVE_DATABASE_URL", None)  # the default: SQLite in the fresh data dir
        load_before = os.getloadavg()
        if not args.json:
            print(f"corpus: {n_files} html files, {n_bytes / 1e6:.1f} MB from "
                  + ", ".join(f"{u['folder']} ({u['files']})" for u in used if u["files"]), flush=True)
            print(f"machine: {machine()['nproc']} CPUs, {machine()['cpu']}; load average {load_before[0]:.2f}",
                  flush=True)

        cmd = [str(ingest_bin), "run", str(corpus_dir), "--json"]
        rows: list[Measure] = []
        for name in ("enclave full", "enclave re-run"):
            if not args.json:
                print(f"running {name} ...", flush=True)
            m, out = measure(name.replace(" ", "_"), cmd, env, logs)
            m.name = name
            report = parse_json(out, name, logs / f"{name.replace(' ', '_')}.err")
            m.files, m.chunks = n_files, report["chunks"]
            m.detail = {k: report[k] for k in ("added", "updated", "unchanged", "deleted", "failed", "skipped",
                                               "chunks", "total_chunks", "seconds")}
            m.detail["failures"] = report.get("failures", [])[:10]
            rows.append(m)
            if not args.json:
                print(f"  {m.seconds:.1f} s, {report}" if name.endswith("re-run") else f"  {m.seconds:.1f} s",
                      flush=True)
        full, rerun = rows
        if full.detail["failed"] and not args.json:
            print(f"  note: {full.detail['failed']} file(s) failed in Enclave: {full.detail['failures'][:3]}")

        lc = None
        if not args.skip_langchain:
            if not args.json:
                print("running langchain ...", flush=True)
            result_file = logs / "langchain.json"
            lc, _ = measure("langchain", [sys.executable, str(Path(__file__).resolve()), "--_langchain",
                                          str(corpus_dir), str(model), str(lc_dir), str(result_file)], env, logs)
            if lc.returncode != 0 or not result_file.is_file():
                raise SystemExit(f"langchain pipeline failed ({lc.returncode}):\n{_tail(logs / 'langchain.err')}")
            res = json.loads(result_file.read_text())
            lc.files, lc.chunks, lc.detail = res["files"], res["chunks"], res
            rows.append(lc)
        load_after = os.getloadavg()

        ratio = full.seconds / rerun.seconds if rerun.seconds else float("inf")
        enclave_rss = max(full.peak_rss_mib, rerun.peak_rss_mib)
        targets = []
        if lc is not None:
            targets.append({
                "target": f"Enclave full-ingest files/s >= {SPEEDUP_TARGET:g}x LangChain files/s (issue 14)",
                "value": f"{full.files_per_s:.3f} vs {lc.files_per_s:.3f} files/s ({full.files_per_s / lc.files_per_s:.2f}x)",
                "pass": full.files_per_s >= SPEEDUP_TARGET * lc.files_per_s,
            })
        targets.append({"target": f"re-run >= {RERUN_TARGET:.0f}x faster than full ingest",
                        "value": f"{ratio:.1f}x ({full.seconds:.1f} s / {rerun.seconds:.2f} s)",
                        "pass": ratio >= RERUN_TARGET})
        rss_applies = n_files >= RSS_TARGET_FILES
        targets.append({"target": f"Enclave peak RSS < 1.5 GiB on a {RSS_TARGET_FILES:,}-file corpus",
                        "value": f"{enclave_rss:.0f} MiB on {n_files} files"
                                 + ("" if rss_applies else " (corpus too small: not judged)"),
                        "pass": (enclave_rss < RSS_TARGET_MIB) if rss_applies else None})

        summary = {
            "machine": machine(), "load_average_before": load_before, "load_average_after": load_after,
            "corpus": {"files": n_files, "bytes": n_bytes, "mb": round(n_bytes / 1e6, 2), "sources": used},
            "model": str(model), "chunk_size": CHUNK_SIZE, "chunk_overlap": CHUNK_OVERLAP,
            "runs": [m.as_dict() for m in rows], "rerun_speedup": round(ratio, 2), "targets": targets,
        }
        if args.json_out:
            args.json_out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        if args.json:
            print(json.dumps(summary, indent=2, ensure_ascii=False))
        else:
            print()
            print_table(rows)
            if lc is not None:
                print(f"\nLangChain phases (s): {lc.detail['phases']}")
            print(f"Enclave pipeline seconds (in-process, from its report): full {full.detail['seconds']}, "
                  f"re-run {rerun.detail['seconds']}")
            print(f"load average: before {load_before[0]:.2f}, after {load_after[0]:.2f} (shared machine)\n")
            for t in targets:
                verdict = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
                print(f"[{verdict}] {t['target']}: {t['value']}")
        return 0 if all(t["pass"] is not False for t in targets) else 1
    finally:
        if args.keep or args.workdir:
            if not args.json:
                print(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
