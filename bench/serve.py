"""Service under load: N concurrent streaming chat clients against a real ``enclave serve``.

By default the script starts its own server: a fresh data dir, the sample handbook ingested
(``enclave ingest run samples/docs``), a user key (``enclave keys create``), then ``enclave serve``
on a free loopback port, with the bundled model and the generation settings given on the command
line (``--max-batch-size``, ``--max-queue``, ...; they become ``ENCLAVE_GENERATION__*``). With
``--url`` and ``--key`` it drives a server that is already running instead.

Each level of concurrency (``--clients 1,8,32,64``) starts that many clients at once; each sends
``--requests`` streaming ``/v1/chat/completions`` requests one after the other (httpx, SSE),
questions taken round-robin from a list about the handbook, retrieval on (``top_k``). Per request:
time to first content token, completion tokens (from the final ``usage``), outcome:

* ``ok``: HTTP 200 and a stream that ends with ``data: [DONE]``;
* ``refused``: HTTP 503/429 with the OpenAI error body (the server's queue was full: load refused
  clearly, which the target allows);
* ``error``: anything else (other status, a stream broken off, an error event, a timeout), by kind.

Figures per level: requests/s (completed), aggregate completion tokens/s (all tokens / wall time
of the level), TTFT p50/p95, errors and refusals. Targets (PASS/FAIL): zero errors at 64 clients;
aggregate tokens/s at 32 clients >= 5x that of 1 client.

Usage::

    ENCLAVE_MODELS_DIR=/path/to/models .venv/bin/python bench/serve.py
    .venv/bin/python bench/serve.py --clients 1,32 --max-batch-size 32 --max-tokens 64
    .venv/bin/python bench/serve.py --url http://127.0.0.1:8000 --key enc_...   # an existing server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "How many days of paid annual leave do full-time employees get?",
    "How do I set up the VPN on my laptop?",
    "Where do I report a security incident?",
    "What is the policy on working from home?",
    "How do I claim travel expenses?",
    "Who do I contact about a broken laptop?",
    "年假有多少天？",
    "What should I do on my first day?",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --- the server --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``enclave ingest run`` + ``enclave keys create`` + ``enclave serve`` in a temporary data dir."""

    def __init__(self, args):
        self.dir = Path(tempfile.mkdtemp(prefix="enclave-bench-serve-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ, "ENCLAVE_DATA_DIR": str(self.dir / "var"), "HF_HUB_OFFLINE": "1",
            "ENCLAVE_GENERATION__MAX_BATCH_SIZE": str(args.max_batch_size),
            "ENCLAVE_GENERATION__MAX_QUEUE": str(args.max_queue),
            "ENCLAVE_GENERATION__QUANTIZATION": args.quantization,
        }
        if args.threads:
            self.env["ENCLAVE_GENERATION__THREADS"] = str(args.threads)
        if args.models_dir:
            self.env["ENCLAVE_MODELS_DIR"] = str(args.models_dir)
        self.enclave = [sys.executable, "-m", "app.cli.main"]
        self.ingest = [sys.executable, "-m", "app.cli.ingest_cli"]
        self.proc: subprocess.Popen | None = None

    def _cli(self, program: list[str], *argv: str) -> str:
        done = subprocess.run([*program, *argv], env=self.env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def start(self) -> str:
        self._cli(self.ingest, "run", str(REPO / "samples" / "docs"), "--json")
        key = json.loads(self._cli(self.enclave, "keys", "create", "bench-serve", "--role", "user", "--json"))["key"]
        self.log = open(self.dir / "serve.log", "w")
        self.proc = subprocess.Popen([*self.enclave, "serve", "--port", str(self.port)], env=self.env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900  # loading the model under load takes a while
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"enclave serve exited; see {self.dir / 'serve.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return key
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit("enclave serve did not become ready")

    def rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            return None
        return None

    def stop(self, keep: bool) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# --- the clients -------------------------------------------------------------------------------


async def one_request(http: httpx.AsyncClient, question: str, args) -> dict:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": question}],
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "top_k": args.top_k, "rag": not args.no_rag}
    start = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                outcome = "refused" if response.status_code in (429, 503) and '"error"' in text else "error"
                return {"outcome": outcome, "kind": f"HTTP {response.status_code}", "seconds": time.perf_counter() - start}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return {"outcome": "error", "kind": f"stream error {event['error'].get('code')}",
                            "seconds": time.perf_counter() - start}
                choice = (event.get("choices") or [{}])[0]
                if choice.get("delta", {}).get("content") and ttft is None:
                    ttft = time.perf_counter() - start
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return {"outcome": "error", "kind": type(exc).__name__, "seconds": time.perf_counter() - start}
    if not done:
        return {"outcome": "error", "kind": "stream ended without [DONE]", "seconds": time.perf_counter() - start}
    return {"outcome": "ok", "ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - start}


async def level(url: str, key: str, clients: int, args) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=httpx.Timeout(args.timeout, connect=30)) as http:
        async def client(i: int) -> list[dict]:
            return [await one_request(http, QUESTIONS[(i * args.requests + r) % len(QUESTIONS)], args)
                    for r in range(args.requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ok = [r for r in results if r["outcome"] == "ok"]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "requests": len(results), "ok": len(ok), "seconds": wall,
        "requests_per_s": len(ok) / wall, "tokens": tokens, "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "refused": dict(Counter(r["kind"] for r in results if r["outcome"] == "refused")),
        "errors": dict(Counter(r["kind"] for r in results if r["outcome"] == "error")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="drive this running server instead of starting one")
    parser.add_argument("--key", help="API key for --url")
    parser.add_argument("--models-dir", type=Path, default=os.environ.get("ENCLAVE_MODELS_DIR"))
    parser.add_argument("--clients", default="1,8,32,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=3, help="retrieved chunks per question")
    parser.add_argument("--no-rag", action="store_true", help="plain model calls (no retrieval, short prompts)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="generation.max_batch_size of the server")
    parser.add_argument("--max-queue", type=int, default=64, help="generation.max_queue of the server")
    parser.add_argument("--quantization", default="none", help="generation.quantization of the server")
    parser.add_argument("--threads", type=int, help="generation.threads of the server (default: its own)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per request")
    parser.add_argument("--keep", action="store_true", help="keep the server's data dir (and its log)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    server = None
    if args.url:
        if not args.key:
            parser.error("--url needs --key")
        url, key = args.url.rstrip("/"), args.key
    else:
        server = Server(args)
        key, url = server.start(), server.url
    try:
        asyncio.run(level(url, key, 1, argparse.Namespace(**{**vars(args), "requests": 1})))  # warm-up
        load_before = os.getloadavg()
        levels = [asyncio.run(level(url, key, c, args)) for c in args.clients]
        load_after = os.getloadavg()
        rss = server.rss_mib() if server else None
    finally:
        if server:
            server.stop(args.keep)

    by = {r["clients"]: r for r in levels}
    verdicts = []
    top = max(args.clients)
    if top >= 64 or 64 in by:
        n = by[64 if 64 in by else top]
        verdicts.append(f"{n['clients']} clients: {sum(n['errors'].values())} errors, {sum(n['refused'].values())} refused "
                        f"(target: zero errors): {'PASS' if not n['errors'] else 'FAIL'}")
    if 1 in by and 32 in by and by[1]["tokens_per_s"] > 0:
        gain = by[32]["tokens_per_s"] / by[1]["tokens_per_s"]
        verdicts.append(f"32 clients aggregate = {gain:.1f}x one client (target >= 5x): {'PASS' if gain >= 5 else 'FAIL'}")
    if args.json:
        print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load_avg": [load_before, load_after],
                          "server_peak_rss_mib": rss, "levels": levels, "verdicts": verdicts}, indent=2))
        return
    print(f"max_tokens={args.max_tokens}, requests/client={args.requests}, rag={not args.no_rag} (top_k {args.top_k}), "
          f"max_batch_size={args.max_batch_size}, max_queue={args.max_queue}, quantization={args.quantization}, threads={args.threads or 'default'}; "
          f"load average before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.1f}' for x in load_after)}" + (f"; server peak RSS {rss:.0f} MiB" if rss else ""))
    print(f"{'clients':>8}{'requests':>10}{'ok':>6}{'req/s':>8}{'tok/s':>8}{'TTFT p50 s':>12}{'TTFT p95 s':>12}  refused / errors")
    for r in levels:
        print(f"{r['clients']:>8}{r['requests']:>10}{r['ok']:>6}{r['requests_per_s']:>8.2f}{r['tokens_per_s']:>8.1f}"
              f"{r['ttft_p50_s']:>12.2f}{r['ttft_p95_s']:>12.2f}  {r['refused'] or '-'} / {r['errors'] or '-'}")
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    main()
