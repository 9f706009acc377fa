"""Generation benchmark: the in-process transformers engine (fp32 vs int8) and llama.cpp as reference.

One run, the bundled SmolLM2-135M-Instruct (Q4_1 GGUF), each configuration in its own child
process (this file, ``--_worker``) so peak RSS is its own. The children load in parallel, then the
parent drives them one command at a time, round-robin: every measurement (single stream, each
concurrency level, ``--repeat`` times) is taken for fp32, int8 and llama.cpp in turn, so a change of
load on a shared machine hits all of them alike; the best of the repeats is kept.

* ``transformers/<quantization>``: the model loaded from the GGUF (dequantized) exactly as the
  server does (``llm.loading.load``), then
  - weight memory (parameters + packed int8 weights),
  - perplexity on a held-out text written for this benchmark (``bench/data/heldout_en.txt``: a
    few paragraphs of original English prose, so not in any training corpus): the text's tokens go
    through the model in one pass and the lm_head is applied one position at a time, the way the
    engine computes (``logits_to_keep=1``), so the figure is the quality the engine delivers;
  - greedy answers to a few prompts (compared with fp32's),
  - single-stream decode tokens/s (one request, time after its first token),
  - 1, 4, 16 and 32 concurrent requests through the engine: aggregate generated tokens/s (all
    completion tokens / wall time from the first submit to the last token) and time to first token
    p50/p95.
* ``llama.cpp``: llama-cpp-python on the same GGUF with ``n_threads`` threads, the same prompts
  and chat template. Its Python API runs one sequence at a time, so "N concurrent" is N requests
  served in arrival order (what a single-slot server does): aggregate tokens/s stays the
  single-stream rate and the TTFT grows with the queue.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generation.py                 # CPU: none + int8 + llama.cpp
    .venv/bin/python bench/generation.py --quantization int8 --concurrency 1,16 --no-llama-cpp
    .venv/bin/python bench/generation.py --device cuda --dtype auto --quantization none,int8,int4 --no-llama-cpp
    .venv/bin/python bench/generation.py --json > figures.json

Targets (printed as PASS/FAIL, CPU only): int8 single-stream >= 2x fp32; int8 perplexity within
5% of fp32; at 16 concurrent requests aggregate >= 5x single-stream (per configuration).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m-instruct"
HELD_OUT = REPO / "bench" / "data" / "heldout_en.txt"
PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a database index is in one sentence.",
    "Write a short poem about the sea.",
    "How do I make a cup of tea?",
    "What is the difference between a virus and a bacterium?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
]
ANSWER_PROMPTS = PROMPTS[:4]
STREAM_PROMPT = "Write a short story about a lighthouse keeper."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- transformers worker ----------------------------------------------------------------------


def perplexity_engine_style(model, tokenizer, text: str) -> float:
    """Prefill-style pass over the text, lm_head one position at a time (as the engine decodes)."""
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    with torch.inference_mode():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        nll = 0.0
        for i in range(ids.shape[1] - 1):
            logits = model.lm_head(hidden[i : i + 1]).float()[0]
            nll -= float(torch.log_softmax(logits, -1)[ids[0, i + 1]])
    return math.exp(nll / (ids.shape[1] - 1))


async def timed_requests(engine, prompts: list[str], max_new: int) -> dict:
    """Submit all prompts at once; TTFT per request and aggregate completion tokens/s."""
    from llm.engine import ChatMessage, GenerationRequest

    start = time.perf_counter()

    async def one(prompt: str):
        first = None
        async for chunk in engine.stream(GenerationRequest([ChatMessage("user", prompt)], max_new_tokens=max_new)):
            if first is None:
                first = time.perf_counter() - start
            last = chunk
        return first, last.completion_tokens, time.perf_counter() - start

    results = await asyncio.gather(*(one(p) for p in prompts))
    wall = max(r[2] for r in results)
    ttft = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "requests": len(prompts), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
    }


async def single_stream(engine, prompt: str, max_new: int) -> dict:
    """Decode rate of one request alone: tokens after the first over the time after the first."""
    from llm.engine import ChatMessage, GenerationRequest

    times, last = [], None
    start = time.perf_counter()
    async for chunk in engine.stream(GenerationRequest([ChatMessage("user", prompt)], max_new_tokens=max_new)):
        times.append(time.perf_counter())
        last = chunk
    # Chunks can carry several tokens when the consumer lags; tokens are counted, not chunks.
    decode_s = times[-1] - times[0]
    return {"tokens": last.completion_tokens, "ttft_s": times[0] - start,
            "decode_tokens_per_s": (last.completion_tokens - 1) / decode_s if decode_s > 0 else float("nan")}


def transformers_worker(args):
    """Load one configuration, then answer the parent's commands (see ``serve_commands``)."""
    import torch

    from llm.loading import load
    from llm.models import ModelStore
    from llm.quantization import weight_bytes
    from llm.transformers_engine import TransformersEngine

    torch.set_num_threads(args.threads)
    resolved = ModelStore(args.models_dir).resolve(args.model)
    t0 = time.perf_counter()
    loaded = load(resolved.path, gguf_file=resolved.gguf_file, device=args.device, dtype=args.dtype,
                  quant=args._worker_quant)
    load_s = time.perf_counter() - t0
    model, tok = loaded.model, loaded.tokenizer
    info: dict = {
        "engine": f"transformers/{args._worker_quant}", "device": str(loaded.device), "dtype": str(loaded.dtype),
        "load_s": load_s, "weight_mib": weight_bytes(model) / 2**20,
        "perplexity": perplexity_engine_style(model, tok, HELD_OUT.read_text()),
    }
    engine = TransformersEngine(Path("unused"), name=args.model, max_batch_size=max(args.concurrency),
                                max_batch_tokens=1 << 20, max_queue=256, max_new_tokens=args.max_new_tokens)
    engine.start_sync(loaded)
    loop = asyncio.new_event_loop()

    async def answers():
        from llm.engine import ChatMessage, GenerationRequest

        out = []
        for p in ANSWER_PROMPTS:
            r = await engine.generate(GenerationRequest([ChatMessage("user", p)], max_new_tokens=48))
            out.append(r.text)
        await single_stream(engine, STREAM_PROMPT, 8)  # warm-up
        return out

    ops = {
        "info": lambda cmd: info,
        "answers": lambda cmd: loop.run_until_complete(answers()),
        "single": lambda cmd: loop.run_until_complete(single_stream(engine, STREAM_PROMPT, args.max_new_tokens)),
        "concurrent": lambda cmd: loop.run_until_complete(timed_requests(
            engine, [PROMPTS[i % len(PROMPTS)] for i in range(cmd["c"])], args.max_new_tokens)),
    }
    serve_commands(ops)
    loop.run_until_complete(engine.close())


def serve_commands(ops: dict) -> None:
    """Worker side: one JSON command per stdin line, one ``@@``-prefixed JSON answer per line."""
    ops = {**ops, "rss": lambda cmd: {"peak_rss_mib": peak_rss_mib()}}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        print("@@" + json.dumps(ops[cmd["op"]](cmd)), flush=True)


# --- llama.cpp worker -------------------------------------------------------------------------


def llama_cpp_worker(args):
    from llama_cpp import Llama

    from llm.models import ModelStore

    resolved = ModelStore(args.models_dir).resolve(args.model)
    t0 = time.perf_counter()
    llm = Llama(model_path=str(resolved.path / resolved.gguf_file), n_threads=args.threads, n_ctx=4096,
                n_batch=512, logits_all=True, verbose=False, seed=0)
    load_s = time.perf_counter() - t0

    def stream(prompt: str, max_new: int, start: float):
        first, n = None, 0
        for part in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_new,
                                               temperature=0.0, stream=True):
            if part["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - start
                n += 1  # llama-cpp-python streams one token per chunk
        return first, n, time.perf_counter() - start

    def answer(prompt: str) -> str:
        r = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=48, temperature=0.0)
        return r["choices"][0]["message"]["content"]

    # Perplexity the same way (one pass, log-probabilities of each next token).
    import numpy as np

    ids = llm.tokenize(HELD_OUT.read_text().encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    logz = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
    nll = -(scores[np.arange(len(ids) - 1), ids[1:]] - logz[:-1]).mean()
    info = {"engine": "llama.cpp", "device": "cpu", "dtype": "Q4_1", "load_s": load_s,
            "weight_mib": (resolved.path / resolved.gguf_file).stat().st_size / 2**20,
            "perplexity": float(math.exp(nll))}

    def answers(cmd):
        out = [answer(p) for p in ANSWER_PROMPTS]
        stream(STREAM_PROMPT, 8, time.perf_counter())  # warm-up
        return out

    def single(cmd):
        t = time.perf_counter()
        first, n, total = stream(STREAM_PROMPT, args.max_new_tokens, t)
        return {"tokens": n, "ttft_s": first, "decode_tokens_per_s": (n - 1) / (total - first)}

    def concurrent(cmd):
        # One sequence at a time (what llama-cpp-python's API and its server with one slot do).
        c, start = cmd["c"], time.perf_counter()
        results = [stream(PROMPTS[i % len(PROMPTS)], args.max_new_tokens, start) for i in range(c)]
        wall = time.perf_counter() - start
        ttft = [r[0] for r in results]
        tokens = sum(r[1] for r in results)
        return {"requests": c, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
                "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95)}

    serve_commands({"info": lambda cmd: info, "answers": answers, "single": single, "concurrent": concurrent})


# --- parent -----------------------------------------------------------------------------------


class Worker:
    """A configuration in its own child process (clean peak RSS), driven one command at a time."""

    def __init__(self, args, kind: str, quant: str | None = None):
        self.name = f"transformers/{quant}" if quant else kind
        cmd = [sys.executable, __file__, "--_worker", kind, "--models-dir", str(args.models_dir), "--model", args.model,
               "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
               "--max-new-tokens", str(args.max_new_tokens), "--concurrency", ",".join(map(str, args.concurrency))]
        if quant:
            cmd += ["--_worker-quant", quant]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.error: str | None = None

    def ask(self, op: str, **kw):
        if self.error:
            return None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
            for line in self.proc.stdout:
                if line.startswith("@@"):
                    return json.loads(line[2:])
        except (BrokenPipeError, OSError):
            pass
        self.error = f"worker exited with {self.proc.wait()} during {op!r} (its stderr is above)"
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.wait()


def run_interleaved(args, workers: list[Worker]) -> list[dict]:
    """Every measurement round-robin over the configurations, so a change of machine load hits all alike."""
    results = {w.name: {} for w in workers}
    for w in workers:  # loading happened in parallel; the info (perplexity) is measured one at a time
        results[w.name].update(w.ask("info") or {})
    for w in workers:
        results[w.name]["answers"] = w.ask("answers")
    singles: dict[str, list] = {w.name: [] for w in workers}
    for _ in range(args.single_repeat):
        for w in workers:
            singles[w.name].append(w.ask("single"))
    sweeps: dict[str, dict] = {w.name: {} for w in workers}
    for c in args.concurrency:
        runs: dict[str, list] = {w.name: [] for w in workers}
        for _ in range(args.repeat):
            for w in workers:
                runs[w.name].append(w.ask("concurrent", c=c))
        for w in workers:
            if not w.error:  # the least disturbed run on a shared machine
                sweeps[w.name][str(c)] = max(runs[w.name], key=lambda r: r["tokens_per_s"])
    out = []
    for w in workers:
        r = results[w.name]
        if not w.error:
            r["single_stream"] = max(singles[w.name], key=lambda s: s["decode_tokens_per_s"])
            r["single_stream_runs"] = [s["decode_tokens_per_s"] for s in singles[w.name]]
            r["concurrency"] = sweeps[w.name]
            r.update(w.ask("rss") or {})
        w.close()
        out.append({"engine": w.name, "error": w.error} if w.error else r)
    return out


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {cpu}, Python {platform.python_version()}"


def print_table(results: list[dict], args) -> list[str]:
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(f"{r['engine']}: FAILED\n{r['error']}\n")
    if not ok:
        return []
    conc = [str(c) for c in args.concurrency]
    print(f"{'engine':<22}{'weights MiB':>12}{'ppl':>8}{'1-stream tok/s':>16}{'TTFT s':>8}{'peak RSS MiB':>14}")
    for r in ok:
        s = r["single_stream"]
        print(f"{r['engine']:<22}{r['weight_mib']:>12.0f}{r['perplexity']:>8.2f}{s['decode_tokens_per_s']:>16.1f}"
              f"{s['ttft_s']:>8.2f}{r['peak_rss_mib']:>14.0f}")
    print()
    print(f"{'engine':<22}" + "".join(f"{'c=' + c + ' tok/s':>14}{'TTFT p50/p95 s':>17}" for c in conc))
    for r in ok:
        row = f"{r['engine']:<22}"
        for c in conc:
            x = r["concurrency"][c]
            row += f"{x['tokens_per_s']:>14.1f}{x['ttft_p50_s']:>8.2f}/{x['ttft_p95_s']:<8.2f}"
        print(row)
    print()
    ref = next((r for r in ok if r["engine"] == "transformers/none"), None)
    verdicts = []
    for r in ok:
        if ref is not None and r is not ref:
            same = sum(a == b for a, b in zip(r["answers"], ref["answers"]))
            print(f"{r['engine']}: greedy answers identical to fp32 for {same}/{len(ref['answers'])} prompts")
    for i, prompt in enumerate(ANSWER_PROMPTS):
        print(f"\nQ: {prompt}")
        for r in ok:
            print(f"  [{r['engine']}] {r['answers'][i][:160]!r}")
    print()
    if args.device == "cpu" or (args.device == "auto" and ok[0]["device"] == "cpu"):
        int8 = next((r for r in ok if r["engine"] == "transformers/int8"), None)
        if ref and int8:
            speed = int8["single_stream"]["decode_tokens_per_s"] / ref["single_stream"]["decode_tokens_per_s"]
            ppl = int8["perplexity"] / ref["perplexity"] - 1
            size = 1 - int8["weight_mib"] / ref["weight_mib"]
            verdicts.append(f"int8 single-stream {speed:.2f}x fp32 (target >= 2x): {'PASS' if speed >= 2 else 'FAIL'}")
            verdicts.append(f"int8 perplexity {ppl:+.1%} vs fp32 (target within 5%): {'PASS' if abs(ppl) <= 0.05 else 'FAIL'}")
            verdicts.append(f"int8 weights {size:.0%} smaller than fp32")
        for r in ok:
            if r["engine"].startswith("transformers") and "16" in r["concurrency"]:
                gain = r["concurrency"]["16"]["tokens_per_s"] / r["single_stream"]["decode_tokens_per_s"]
                verdicts.append(f"{r['engine']} 16 concurrent = {gain:.1f}x single-stream (target >= 5x): "
                                f"{'PASS' if gain >= 5 else 'FAIL'}")
    llama = next((r for r in ok if r["engine"] == "llama.cpp"), None)
    if llama:
        for r in ok:
            if r is llama:
                continue
            parts = [f"single-stream {r['single_stream']['decode_tokens_per_s'] / llama['single_stream']['decode_tokens_per_s']:.2f}x"]
            parts += [f"c={c} {r['concurrency'][c]['tokens_per_s'] / llama['concurrency'][c]['tokens_per_s']:.2f}x"
                      for c in conc if c in r["concurrency"] and c in llama["concurrency"]]
            print(f"{r['engine']} vs llama.cpp (tokens/s ratio): " + ", ".join(parts))
    for v in verdicts:
        print(v)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path,
                        default=Path(os.environ.get("ENCLAVE_MODELS_DIR") or REPO / "var" / "models"))
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default="none,int8", help="comma-separated: none,int8,int4")
    parser.add_argument("--concurrency", default="1,4,16,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / llama.cpp threads (1: on a 2-core host shared with other work, 2 threads "
                             "were 3x slower; see docs/benchmarks.md)")
    parser.add_argument("--single-repeat", type=int, default=5, help="single-stream runs per configuration")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is kept")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_worker-quant", dest="_worker_quant", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker == "transformers":
        transformers_worker(args)
        return
    if args._worker == "llama.cpp":
        llama_cpp_worker(args)
        return

    load_before = os.getloadavg()
    workers = [Worker(args, "transformers", q) for q in args.quantization.split(",")]
    if not args.no_llama_cpp:
        workers.append(Worker(args, "llama.cpp"))
    results = run_interleaved(args, workers)
    load_after = os.getloadavg()
    if args.json:
        print(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                          "load_avg": [load_before, load_after], "results": results}, indent=2))
        return
    print(f"machine: {machine()}; max_new_tokens={args.max_new_tokens}, threads={args.threads}, "
          f"repeat={args.repeat} (single stream {args.single_repeat}); load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, "
          f"after {'/'.join(f'{x:.1f}' for x in load_after)}\n")
    print_table(results, args)


if __name__ == "__main__":
    main()
