"""GPU check of the in-process engine: bf16, bitsandbytes int8/int4, continuous batching.

The bundled GGUF (98 MB) cannot travel to the lent GPU (64 MiB limit), so the model is SmolLM2-135M's
exact architecture (its config and tokenizer) with random weights: speed and memory figures are those
of the real model's shapes; quality is not measured here.
"""
import asyncio, json, os, statistics, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, os.getcwd())
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from llm.engine import ChatMessage, GenerationRequest
from llm.transformers_engine import TransformersEngine

# Folder holding SmolLM2's config.json and tokenizer (save_pretrained from the bundled GGUF).
CONFIG = sys.argv[1] if len(sys.argv) > 1 else ".gpu/smol-config"
folder = "/tmp/smol-random"
cfg = AutoConfig.from_pretrained(CONFIG)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained(folder); AutoTokenizer.from_pretrained(CONFIG).save_pretrained(folder)
print("gpu", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)

PROMPT = [ChatMessage("user", "Summarise the company leave policy for a new employee in five sentences.")]
NEW = 128

async def run(engine, n):
    async def one():
        t0 = time.perf_counter(); first = None; count = 0
        async for chunk in engine.stream(GenerationRequest(messages=PROMPT, max_new_tokens=NEW)):
            if first is None and chunk.text: first = time.perf_counter() - t0
            if chunk.finish_reason: count = chunk.completion_tokens
        return first or 0.0, count
    t0 = time.perf_counter()
    res = await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in res); toks = sum(r[1] for r in res)
    return {"concurrent": n, "tokens": toks, "tok_s": round(toks / wall, 1),
            "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 1), "ttft_p95_ms": round(1000 * ttft[int(0.95 * (len(ttft) - 1))], 1)}

async def main():
    results = []
    for quant in ("none", "int8", "int4"):
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        engine = TransformersEngine(folder, name="smol-random", device="cuda", dtype="auto", quantization=quant,
                                    max_batch_size=64, max_queue=256, max_new_tokens=NEW)
        try:
            await engine.start()
        except Exception as exc:
            results.append({"quantization": quant, "error": f"{type(exc).__name__}: {exc}"[:300]}); print(results[-1], flush=True); continue
        weights = sum(p.numel() * p.element_size() for p in engine._loaded.model.parameters()) / 2**20
        await run(engine, 1)  # warm-up
        for n in (1, 4, 16, 32, 64):
            r = await run(engine, n); r.update(quantization=quant, dtype=str(next(engine._loaded.model.parameters()).dtype),
                                              weights_mib=round(weights, 1), peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1))
            results.append(r); print(json.dumps(r), flush=True)
        await engine.close()
    out = os.environ.get("OUT", ".")
    json.dump(results, open(f"{out}/gpu_results.json", "w"), indent=1)

asyncio.run(main())
