"""Tiny models for the fine-tuning tests: a llama built from a config with a ChatML template.

Random weights, a BPE tokenizer trained here on the test sentences: fast enough to train a LoRA
adapter for a few steps in a second or two on the 2-core CPU, and the real code paths (chat
template, peft, safetensors, the serving engine) all run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_tokenizer import train_bpe_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
COLOURS = ["red", "blue", "green", "amber", "violet", "silver", "golden", "black"]
THINGS = ["the lobby door", "the badge", "the server rack", "the staff van", "the mug", "the helmet",
          "the pool car", "the fire exit"]
CORPUS = [f"What colour is {t}? {t.capitalize()} is {c}." for t in THINGS for c in COLOURS] + [
    "system user assistant You are a helpful assistant.", "Which colour do they paint it? Tell me the colour of",
]


def qa(question: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


def colour_records() -> tuple[list[dict], list[dict]]:
    """Training records (two phrasings per thing) and held-out ones (a third phrasing) with key facts."""
    train, held_out = [], []
    for thing, colour in zip(THINGS, COLOURS):
        train.append(qa(f"What colour is {thing}?", f"{thing.capitalize()} is {colour}."))
        train.append(qa(f"Tell me the colour of {thing}.", f"{thing.capitalize()} is {colour}."))
        held_out.append(qa(f"Which colour do they paint {thing}?", f"{thing.capitalize()} is {colour}.",
                           key_facts=[colour]))
    return train, held_out


def build_tokenizer():
    return train_bpe_tokenizer(CORPUS * 3, SPECIAL, vocab_size=500, eos="<|im_end|>", pad="<|endoftext|>",
                               extra_special=SPECIAL[1:2], chat_template=CHATML)


def make_tiny_llama(path: Path, init_std: float = 0.02) -> Path:
    """``init_std`` above the default makes the random model's greedy answers varied instead of one repeated token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), bos_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=True, initializer_range=init_std,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with non-zero weights (peft initialises B to zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Toy matrices: one thread is ~10x faster than two on a loaded 2-core host (no OpenMP spinning).

    Autouse in every module that imports it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
