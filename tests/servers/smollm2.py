"""SmolLM2-135M-Instruct for tests: its tokenizer, and a real OpenAI-compatible server.

The server is ``transformers serve`` (the CLI that ships with transformers 5) run as a subprocess on
127.0.0.1. It cannot load the bundled GGUF directly (the GGUF config names no architecture), so
:func:`hf_checkpoint` saves a dequantized copy as an ordinary checkpoint folder once and caches it
(keyed by the GGUF's pinned sha256) where pytest keeps its cache, so later sessions start in seconds.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from llm.models import BUNDLED

MODEL = BUNDLED["smollm2-135m-instruct"]
GGUF_FILE = MODEL.gguf_file
GGUF_SHA = MODEL.local_files()[GGUF_FILE]


@functools.cache
def gguf_tokenizer(model_folder: str):
    """The tokenizer read out of the GGUF (with its chat template): slow to build, so built once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder, gguf_file=GGUF_FILE)


def hf_checkpoint(model_folder: Path, cache_root: Path) -> Path:
    """A dequantized HF copy of the GGUF (bf16 safetensors + tokenizer), built once and cached."""
    target = cache_root / f"smollm2-135m-instruct-{GGUF_SHA[:16]}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_folder, gguf_file=GGUF_FILE)
    model.hf_quantizer = None  # the weights are plain tensors once dequantized: nothing to keep
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.to(torch.bfloat16)  # half the disk; the server is told to run in float32
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_root))
    model.save_pretrained(staging)
    gguf_tokenizer(str(model_folder)).save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent session may have won the race, which is fine
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the test process dies without tearing it down (kill -9)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TransformersServer:
    """``transformers serve <checkpoint>`` on a free local port, pinned to that one model."""

    def __init__(self, checkpoint: Path, log_path: Path) -> None:
        self.model = str(checkpoint)  # a pinned server answers to the name it was given
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        cli = Path(sys.executable).with_name("transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self._log = open(log_path, "wb")
        self.log_path = log_path
        self.process = subprocess.Popen(
            [str(cli), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
             "--device", "cpu", "--dtype", "float32", "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
        )

    def wait_ready(self, max_wait: float = 600.0) -> None:
        """Poll /health until it answers (bounded; generous for a busy machine)."""
        deadline = time.monotonic() + max_wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"transformers serve not ready after {max_wait:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
