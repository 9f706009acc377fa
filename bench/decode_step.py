"""Decode-step time of the scheduler: the lean step (llm/lean_decode.py) against the model's forward.

Two schedulers on the same loaded model, one with the lean step and one without, each holding the
same ``--rows`` prefilled requests; they decode ``--steps`` steps in turn, ``--repeat`` times, so
both arms see the same machine state. Prints the per-step times (ms) of every round, the medians,
and whether both arms picked the same tokens (they must: the lean step is exact).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/decode_step.py --quantization int8 --rows 1
    HF_HUB_OFFLINE=1 .venv/bin/python bench/decode_step.py --quantization none --rows 16 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from generation import MODEL, PROMPTS  # noqa: E402  (bench/generation.py: the same model and prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path,
                        default=Path(os.environ.get("ENCLAVE_MODELS_DIR") or REPO / "var" / "models"))
    parser.add_argument("--quantization", default="int8", help="none or int8")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="steps per round and arm")
    parser.add_argument("--repeat", type=int, default=6, help="rounds")
    args = parser.parse_args()

    import torch

    from llm import chat_format
    from llm.batching import BatchScheduler, Sequence
    from llm.engine import ChatMessage
    from llm.lean_decode import lean_decoder
    from llm.loading import load
    from llm.models import ModelStore

    torch.set_num_threads(args.threads)
    resolved = ModelStore(args.models_dir).resolve(MODEL)
    loaded = load(resolved.path, gguf_file=resolved.gguf_file, device="cpu", dtype="auto", quant=args.quantization)

    def scheduler(lean: bool) -> BatchScheduler:
        s = BatchScheduler(loaded.model, eos_token_ids=[], context_window=8192, max_batch_size=args.rows,
                           max_batch_tokens=1 << 22, lean_decode=lean)
        for i in range(args.rows):  # queued only: the scheduler thread is never started, steps run here
            ids = chat_format.encode(loaded.tokenizer, loaded.chat, [ChatMessage("user", PROMPTS[i % len(PROMPTS)])])
            s.submit(Sequence(ids, max_new_tokens=1 << 20, on_event=lambda *_: None))
        with torch.inference_mode():
            s._merge(s._prefill(s._admit()))
        return s

    if lean_decoder(loaded.model) is None:
        sys.exit(f"{MODEL} does not take the lean step (llm/lean_decode.py)")
    arms = {"transformers forward": scheduler(False), "lean step": scheduler(True)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    with torch.inference_mode():
        for _ in range(args.repeat):
            for name, s in arms.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    s._decode_step()
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    print(f"quantization={args.quantization} rows={args.rows} threads={args.threads} load={os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        print(f"{name:>22}: median {statistics.median(values):6.1f} ms/step  rounds " + " ".join(f"{v:.1f}" for v in values))
    same = [s.last_token for s in arms["transformers forward"]._rows] == [s.last_token for s in arms["lean step"]._rows]
    print("same tokens in both arms:", same)


if __name__ == "__main__":
    main()
