"""Answer-quality benchmark: does the answer state the fact, cite the right page, and never invent?

Question sets (``bench/data/answers_en.jsonl``, ``answers_zh.jsonl``): real questions with short
accepted answers over two real documentation corpora that Debian ships, the same ones
``bench/retrieval.py`` uses (the Python 3.11 HTML docs; the Simplified-Chinese LibreOffice help),
each row naming the file that holds the answer; rows with ``"file": null`` have their answer in
no document (the right answer is "I don't know" / 不知道).

The corpus subset is every answering file plus other files of the corpus in sha1 order up to
``--max-files-en`` / ``--max-files-zh``, ingested with Enclave's own pipeline into a scratch data
directory (kept and reused with ``--work-dir DIR``).

Every configuration answers every question through the real chat path (``ChatService.prepare``
+ ``ChatService.answer``: retrieval, evidence scoring, compression, prompt, the bundled generator,
guards, support check, extractive fallback), with the admin principal and ``top_k`` 5:

- ``baseline``: today's default before this benchmark: the five retrieved chunks whole, no
  example, no decoding guards, no loop guard, no abstention gate, the model's answer as it is
  (policy generate);
- ``whole-plain``: the five chunks whole in the small model's plain layout ("[n] text" lines, a
  one-line task) instead of fenced blocks under the full rules (policy generate, no guards);
- ``compressed``: only the relevant sentences (the model's prompt profile, plain layout), no
  guards (policy generate);
- ``compressed+loop-guard``: plus the loop guard and the abstention gate (relevance below
  ``min_relevance``, or a name in the question that no passage mentions) (policy generate);
- ``compressed+penalties``: plus repetition penalty 1.15 and no-repeat 4-grams over the generated
  tokens (policy generate);
- ``verify``: generated sentences sent only when supported, else the extractive answer, or "I don't
  know" from the gate; ``verify-no-gate``: the same without the gate;
- ``extractive``: the extractive answer alone (no generation), the default for the bundled model;
  ``extractive-no-gate``: without the gate.

The configured default (``answer.policy``, else the model's profile) is the row the targets are
checked on.

Metrics per configuration and language (answerable questions unless named):

- correct: an accepted string occurs in the answer (case-insensitive, whitespace collapsed);
- cited-right: of the correct answers, those with a [n] that points at a source from the right file;
- abstained: the answer is "I don't know" (answer_mode abstained, or an abstention phrase);
- unsupported: answers (all questions) stating a number, version, identifier, option, quoted phrase
  or code that occurs in no retrieved block (``llm.grounding.claims``);
- looped: answers whose text repeats itself (``llm.grounding.find_loop``) or that the loop guard cut;
- unanswerable abstained: share of the no-answer questions answered "I don't know";
- page in sources: the right file among the response's sources (retrieval's share).

Quality runs with ``--concurrency`` requests at once (the engine batches them; greedy decoding,
so the text is what a lone request gets up to float rounding). Speed is measured apart, one
request at a time, on the first ``--latency-questions`` answerable questions of each language, for
the baseline, verify and extractive: answer time p50/p95, time to first token p50/p95 (first streamed
text), and decode tokens/s.

Targets (the default configuration): correct >= 70% English and >= 60% Chinese; of correct answers
>= 90% cite the right file; unsupported <= 2% of answers; looped 0; unanswerable >= 80% abstain;
time to first token p50 <= 2 s and a 120-token answer p50 <= 20 s.

Reproduce (Debian 12; nothing is installed by this script; see bench/retrieval.py for the corpora)::

    apt-get update && apt-get install -y python3.11-doc
    mkdir -p /var/tmp/enclave-bench && cd /var/tmp/enclave-bench \\
      && apt-get download libreoffice-help-zh-cn \\
      && dpkg-deb -x libreoffice-help-zh-cn_*.deb libreoffice-help-zh-cn
    HF_HUB_OFFLINE=1 .venv/bin/python bench/answers.py --work-dir var/bench-answers

Options: ``--configs verify,extractive`` (a subset), ``--speed-configs baseline,verify`` (timed one
at a time; "" for none), ``--langs en``, ``--limit N`` (questions per language), ``--max-tokens``
(120), ``--quantization int8``, ``--json FILE`` (every answer, for reading them).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))


def _load_retrieval_bench():
    """bench/retrieval.py's corpus helpers (it is named like the retrieval package: load it by path)."""
    spec = importlib.util.spec_from_file_location("bench_retrieval", REPO / "bench" / "retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rb = _load_retrieval_bench()
DATA = REPO / "bench" / "data"
TOP_K = 5
CONFIGS = ("baseline", "whole-plain", "compressed", "compressed+loop-guard", "compressed+penalties", "verify",
           "verify-no-gate", "extractive", "extractive-no-gate")
TARGETS = {"correct_en": 0.70, "correct_zh": 0.60, "cited_right": 0.90, "unsupported": 0.02, "looped": 0.0,
           "unanswerable_abstained": 0.80, "ttft_p50": 2.0, "answer_p50": 20.0}


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def load_questions(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        if {"id", "question", "file", "answers"} - row.keys():
            raise SystemExit(f"{path}: row {row.get('id')} lacks id/question/file/answers")
    return rows


def corpus_root(lang: str) -> Path:
    if lang == "en":
        root = rb.PYTHON_DOCS
    else:
        root = next((p for p in rb.LO_ZH_CANDIDATES if p.is_dir()), rb.LO_ZH_CANDIDATES[0])
    if not root.is_dir():
        raise SystemExit(f"corpus not found: {root}\ninstall it with:\n    {rb.APT_HINT}")
    return root


def options_for(config: str, base):
    """The service's AnswerOptions and policy for one benchmark configuration (``base``: the
    configured default's options: the model's profile)."""
    profile = base.profile
    no_gate = dict(min_relevance=0.0, min_relevance_zh=0.0, unknown_names=False)
    bare = dataclasses.replace(profile, repetition_penalty=1.0, no_repeat_ngram=0)
    if config in ("baseline", "whole-plain"):  # the five chunks whole: fenced + full rules / plain layout
        whole = dataclasses.replace(bare, compress=False, max_blocks=TOP_K, one_shot=False,
                                    style="fenced" if config == "baseline" else "plain")
        return dataclasses.replace(base, profile=whole, loop_guard=False, **no_gate), "generate"
    if config == "compressed":
        return dataclasses.replace(base, profile=bare, loop_guard=False, **no_gate), "generate"
    if config == "compressed+loop-guard":
        return dataclasses.replace(base, profile=bare), "generate"
    if config == "compressed+penalties":
        guarded = dataclasses.replace(profile, repetition_penalty=1.15, no_repeat_ngram=4)
        return dataclasses.replace(base, profile=guarded), "generate"
    if config == "verify":
        return base, "verify"
    if config == "verify-no-gate":
        return dataclasses.replace(base, **no_gate), "verify"
    if config == "extractive":
        return base, "extractive"
    if config == "extractive-no-gate":
        return dataclasses.replace(base, **no_gate), "extractive"
    raise SystemExit(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}")


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


async def ask(service, question: dict, kb: str, policy: str, max_tokens: int) -> dict:
    from app.services.chat import ChatInput
    from llm.engine import ChatMessage
    from security.principal import Principal

    admin = Principal(subject="bench", role="admin", groups=())
    started = time.perf_counter()
    chat = ChatInput([ChatMessage("user", question["question"])], kb, top_k=TOP_K, max_tokens=max_tokens)
    prepared = await service.prepare(chat, admin, policy=policy)
    ready = time.perf_counter()
    parts, first, last = [], None, None
    async for chunk in await service.answer(prepared):
        if chunk.text and first is None:
            first = time.perf_counter()
        parts.append(chunk.text)
        last = chunk
    done = time.perf_counter()
    outcome = last.outcome
    return {"id": question["id"], "answer": "".join(parts), "mode": outcome.mode, "grounded": outcome.grounded,
            "looped_guard": outcome.looped, "sources": [s["source"] for s in prepared.sources],
            "contexts": prepared.contexts, "completion_tokens": last.completion_tokens,
            "seconds": done - started, "ttft": (first or done) - started, "answering": done - ready, "relevance": round(prepared.relevance, 3),
            "missing": prepared.missing,
            "generated": prepared.request is not None}


def judge(question: dict, result: dict) -> dict:
    from llm.grounding import CITATION, claims, find_loop, is_abstention, occurs

    answer = result["answer"]
    text = squash(answer)
    abstained = result["mode"] == "abstained" or is_abstention(answer)
    answerable = question["file"] is not None
    # Spaces are ignored too: the LibreOffice help prints "Ctrl +Shift+F9" (Mac and PC keys together).
    bare = text.replace(" ", "")
    correct = answerable and any(squash(a) in text or squash(a).replace(" ", "") in bare for a in question["answers"])
    cited = {int(n) for n in CITATION.findall(answer)}
    cited_right = any(1 <= n <= len(result["sources"]) and result["sources"][n - 1] == question["file"] for n in cited)
    blocks = "\n".join(result["contexts"])
    invented = [c for c in claims(answer) if not occurs(c, blocks)]
    return {"correct": correct, "cited_right": cited_right, "abstained": abstained, "unsupported": bool(invented),
            "invented": invented, "looped": result["looped_guard"] or find_loop(answer) is not None,
            "page_in_sources": answerable and question["file"] in result["sources"]}


def summarize(questions: list[dict], results: list[dict]) -> dict:
    judged = [(q, r, judge(q, r)) for q, r in zip(questions, results)]
    ans = [(q, r, j) for q, r, j in judged if q["file"] is not None]
    una = [(q, r, j) for q, r, j in judged if q["file"] is None]
    correct = [j for _, _, j in ans if j["correct"]]

    def share(items, key):
        return round(sum(1 for j in items if j[key]) / len(items), 3) if items else None

    return {
        "answerable": len(ans), "unanswerable": len(una),
        "correct": share([j for *_, j in ans], "correct"),
        "cited_right": share(correct, "cited_right"),
        "abstained": share([j for *_, j in ans], "abstained"),
        "unsupported": share([j for *_, j in judged], "unsupported"),
        "looped": share([j for *_, j in judged], "looped"),
        "unanswerable_abstained": share([j for *_, j in una], "abstained"),
        "page_in_sources": share([j for *_, j in ans], "page_in_sources"),
        "modes": {m: sum(1 for _, r, _ in judged if r["mode"] == m) for m in ("generated", "extractive", "abstained")},
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 2)


def speed(results: list[dict]) -> dict:
    generated = [r for r in results if r["generated"] and r["completion_tokens"]]
    # Tokens per second of the model's whole turn (prefill included): under verify the text is sent a
    # checked sentence at a time, so the time between streamed pieces says nothing about decoding.
    rates = [r["completion_tokens"] / max(r["answering"], 1e-6) for r in generated if r["completion_tokens"] > 1]
    return {"n": len(results), "answer_p50": percentile([r["seconds"] for r in results], 0.5),
            "answer_p95": percentile([r["seconds"] for r in results], 0.95),
            "ttft_p50": percentile([r["ttft"] for r in results], 0.5),
            "ttft_p95": percentile([r["ttft"] for r in results], 0.95),
            "tokens_per_s": round(statistics.median(rates), 1) if rates else None,
            "mean_completion_tokens": round(statistics.mean(r["completion_tokens"] for r in results), 1)}


async def run_config(service, questions, kb, policy, max_tokens, concurrency) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)

    async def one(q):
        async with gate:
            return await ask(service, q, kb, policy, max_tokens)

    return list(await asyncio.gather(*(one(q) for q in questions)))


def machine() -> str:
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return f"{os.cpu_count()} CPUs, load average {' '.join(load)}"


async def main_async(args) -> int:
    from app.container import Container, answer_options
    from app.services.chat import ChatService
    from app.settings import load_settings

    work = Path(args.work_dir).resolve()
    settings = load_settings(data_dir=work / "data", models_dir=Path(args.models_dir).resolve(),
                             generation={"quantization": args.quantization})
    container = Container(settings)
    langs = [x for x in args.langs.split(",") if x]
    sets = {}
    for lang in langs:
        questions = load_questions(Path(args.questions_dir) / f"answers_{lang}.jsonl")
        if args.limit:
            answerable = [q for q in questions if q["file"]][: args.limit]
            questions = answerable + [q for q in questions if not q["file"]][: max(1, args.limit // 4)]
        labelled = [q for q in questions if q["file"]]
        root = corpus_root(lang)
        files = rb.select_files(root, [{"file": q["file"]} for q in labelled],
                                args.max_files_en if lang == "en" else args.max_files_zh)
        corpus = work / f"corpus-{lang}"
        rb.stage(root, files, corpus)
        started = time.perf_counter()
        report = container.pipeline.run(corpus, f"answers-{lang}")
        log(f"[{lang}] {len(files)} files, {report.total_chunks} chunks ({report.chunks} embedded now) "
            f"in {time.perf_counter() - started:.0f} s")
        sets[lang] = questions

    engine = container.generation_engine
    await engine.start()
    base = answer_options(settings)
    configs = [c for c in args.configs.split(",") if c]
    for config in configs + [c for c in args.speed_configs.split(",") if c]:
        options_for(config, base)  # an unknown name fails now, not after an hour
    report: dict = {"machine": machine(), "model": f"{settings.generation.model} ({args.quantization})",
                    "default": base.policy,
                    "max_tokens": args.max_tokens,
                    "quality": {}, "speed": {}, "answers": {}}
    for config in configs:
        options, policy = options_for(config, base)
        service = ChatService(container.retriever, engine, container.conversations, options=options,
                              embed=container.embed_for_evidence)
        for lang, questions in sets.items():
            started = time.perf_counter()
            results = await run_config(service, questions, f"answers-{lang}", policy, args.max_tokens, args.concurrency)
            summary = summarize(questions, results)
            summary["seconds"] = round(time.perf_counter() - started, 1)
            report["quality"].setdefault(config, {})[lang] = summary
            report["answers"].setdefault(config, {})[lang] = [
                {**{k: v for k, v in r.items() if k != "contexts"}, **judge(q, r), "question": q["question"],
                 "accepted": q["answers"], "file": q["file"]} for q, r in zip(questions, results)]
            log(f"[{config} {lang}] {json.dumps(summary, ensure_ascii=False)}  ({machine()})")

    for config in [c for c in args.speed_configs.split(",") if c]:
        options, policy = options_for(config, base)
        service = ChatService(container.retriever, engine, container.conversations, options=options,
                              embed=container.embed_for_evidence)
        for lang, questions in sets.items():
            sample = [q for q in questions if q["file"]][: args.latency_questions]
            results = [await ask(service, q, f"answers-{lang}", policy, args.max_tokens) for q in sample]
            report["speed"].setdefault(config, {})[lang] = {**speed(results), "load": machine()}
            log(f"[speed {config} {lang}] {json.dumps(report['speed'][config][lang])}")
    await engine.close()

    print_report(report, configs)
    if args.json:
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return 1 if met(report) is False else 0


def met(report: dict) -> bool | None:
    default = report["quality"].get(report["default"], {})
    if not default:
        return None  # the default configuration was not run
    ok = True
    for lang, q in default.items():
        ok &= (q["correct"] or 0) >= TARGETS[f"correct_{lang}"]
        ok &= (q["cited_right"] or 0) >= TARGETS["cited_right"]
        ok &= (q["unsupported"] or 0) <= TARGETS["unsupported"]
        ok &= (q["looped"] or 0) <= TARGETS["looped"]
        ok &= (q["unanswerable_abstained"] or 0) >= TARGETS["unanswerable_abstained"]
    for lang, s in report["speed"].get(report["default"], {}).items():
        ok &= (s["ttft_p50"] or 0) <= TARGETS["ttft_p50"] and (s["answer_p50"] or 0) <= TARGETS["answer_p50"]
    return bool(ok)


def print_report(report: dict, configs: list[str]) -> None:
    print(f"\nAnswer quality: {report['model']}, max_tokens {report['max_tokens']}, top_k {TOP_K} ({report['machine']})")
    header = ("config", "lang", "n", "correct", "cited-right", "abstained", "unsupported", "looped",
              "unans. abstained", "page in sources", "generated/extractive/abstained")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for config in configs:
        for lang, q in report["quality"].get(config, {}).items():
            m = q["modes"]
            print(f"| {config} | {lang} | {q['answerable']}+{q['unanswerable']} | {_pct(q['correct'])} | "
                  f"{_pct(q['cited_right'])} | {_pct(q['abstained'])} | {_pct(q['unsupported'])} | {_pct(q['looped'])} | "
                  f"{_pct(q['unanswerable_abstained'])} | {_pct(q['page_in_sources'])} | "
                  f"{m['generated']}/{m['extractive']}/{m['abstained']} |")
    if report["speed"]:
        print("\nSpeed, one request at a time (seconds; tokens/s of the model's turn, prefill included)")
        print("| config | lang | n | answer p50 | answer p95 | TTFT p50 | TTFT p95 | tok/s | mean tokens | load |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for config, langs in report["speed"].items():
            for lang, s in langs.items():
                print(f"| {config} | {lang} | {s['n']} | {s['answer_p50']} | {s['answer_p95']} | {s['ttft_p50']} | "
                      f"{s['ttft_p95']} | {s['tokens_per_s']} | {s['mean_completion_tokens']} | {s['load']} |")
    verdict = met(report)
    print(f"\nTargets ({report['default']}, the default): {json.dumps(TARGETS)}: "
          f"{'not measured (the default was not run)' if verdict is None else 'MET' if verdict else 'MISSED'}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=str(REPO / "var" / "bench-answers"))
    parser.add_argument("--models-dir", default=os.environ.get("ENCLAVE_MODELS_DIR", str(REPO / "var" / "models")))
    parser.add_argument("--langs", default="en,zh")
    parser.add_argument("--questions-dir", default=str(DATA))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--speed-configs", default="baseline,verify,extractive")
    parser.add_argument("--limit", type=int, default=0, help="answerable questions per language (0: all)")
    parser.add_argument("--max-files-en", type=int, default=150)
    parser.add_argument("--max-files-zh", type=int, default=250)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-questions", type=int, default=12)
    parser.add_argument("--quantization", default="none", choices=("none", "int8"), help="generation.quantization")
    parser.add_argument("--json", help="write every answer and figure to this file")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
