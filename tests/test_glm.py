"""The GLM family: GLM-4 through transformers' native GlmForCausalLM, ChatGLM2/3 templates.

No GLM checkpoint is available offline, so the GLM-4 path runs on a tiny randomly initialised
GlmForCausalLM (glm-4-9b-chat-hf's architecture at toy size) saved as an ordinary HF folder with a
small BPE tokenizer trained here and the GLM-4 chat template. Its answers are gibberish; what is
checked is that the engine loads, templates, batches, quantizes and adapts it correctly.

ChatGLM2/3 need their remote modelling code (trust_remote_code), which ships only inside real
checkpoints: their load itself cannot run offline; their prompt templates are checked here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from llm.chat_format import (
    CHATGLM2_TEMPLATE,
    CHATGLM3_TEMPLATE,
    GLM4_TEMPLATE,
    ChatFormat,
    encode,
    fallback_format,
    render,
)
from llm.engine import ChatMessage, EngineError, GenerationRequest
from llm.loading import load, quantized_copy
from llm.transformers_engine import TransformersEngine
from tests.tiny_tokenizer import train_bpe_tokenizer

SPECIAL = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
           "<|assistant|>", "<|observation|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Enclave answers questions about documents that never leave the building.",
    "你好，世界。今天天气很好。",
    "Retrieval augmented generation combines search with a language model.",
] * 4
CONVERSATION = [
    ChatMessage("system", "You are a helpful assistant"),
    ChatMessage("user", "Hello"),
    ChatMessage("assistant", "Hi there"),
    ChatMessage("user", "Who are you"),
]


def run(coro):
    return asyncio.run(coro)


def build_tokenizer():
    return train_bpe_tokenizer(CORPUS, SPECIAL, vocab_size=400, eos="<|endoftext|>", pad="<|endoftext|>",
                               extra_special=SPECIAL[1:], chat_template=GLM4_TEMPLATE)


@pytest.fixture(scope="session")
def glm_dir(tmp_path_factory) -> Path:
    """A glm-4-9b-chat-hf-shaped checkpoint folder at toy size (random weights)."""
    from transformers import GlmConfig, GlmForCausalLM

    path = tmp_path_factory.mktemp("glm4-tiny")
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = GlmConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        pad_token_id=ids("<|endoftext|>"),
        eos_token_id=[ids("<|endoftext|>"), ids("<|user|>"), ids("<|observation|>")],
    )
    torch.manual_seed(0)
    GlmForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def glm(glm_dir):
    return load(glm_dir, device="cpu", dtype="float32")


def engine_on(loaded, **kw) -> TransformersEngine:
    engine = TransformersEngine(Path("unused"), name="glm4-tiny", **kw)
    engine.start_sync(loaded)
    return engine


def ask(text: str, **kw) -> GenerationRequest:
    return GenerationRequest([ChatMessage("user", text)], **kw)


def test_glm4_loads_natively_with_its_template(glm):
    assert type(glm.model).__name__ == "GlmForCausalLM"
    assert glm.model_type == "glm"
    tok = glm.tokenizer
    ids = encode(tok, glm.chat, CONVERSATION)
    assert ids[:2] == [tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids("<sop>")]
    assert render(tok, glm.chat, CONVERSATION) == (
        "[gMASK]<sop><|system|>\nYou are a helpful assistant<|user|>\nHello<|assistant|>\nHi there"
        "<|user|>\nWho are you<|assistant|>\n"
    )
    # <|user|> and <|observation|> end an answer like EOS does.
    for token in ("<|endoftext|>", "<|user|>", "<|observation|>"):
        assert tok.convert_tokens_to_ids(token) in glm.eos_token_ids
    assert glm.max_context == 512


def test_glm4_generates_through_the_engine_and_batches_exactly(glm):
    engine = engine_on(glm, max_batch_size=4)
    prompts = ["Hello there", "Who are you", "你好", "Tell me about retrieval"]
    try:
        alone = [run(engine.generate(ask(p, max_new_tokens=16))) for p in prompts]

        async def together():
            return await asyncio.gather(*(engine.generate(ask(p, max_new_tokens=16)) for p in prompts))

        batched = run(together())
    finally:
        run(engine.close())
    for a, b in zip(alone, batched):
        assert a.finish_reason in ("stop", "length") and a.completion_tokens >= 1
        assert (a.text, a.completion_tokens) == (b.text, b.completion_tokens)


def last_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits[0, -1].float()


def test_glm4_int8(glm):
    int8 = quantized_copy(glm, "int8")
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
    ref, q = last_logits(glm.model, glm.tokenizer), last_logits(int8.model, glm.tokenizer)
    assert torch.nn.functional.cosine_similarity(ref, q, dim=0) > 0.99
    engine = engine_on(int8)
    try:
        result = run(engine.generate(ask("Hello", max_new_tokens=8)))
    finally:
        run(engine.close())
    assert result.completion_tokens >= 1


@pytest.fixture(scope="session")
def lora_dir(glm_dir, tmp_path_factory) -> Path:
    """A LoRA adapter for the tiny GLM with non-zero weights (peft initialises B to zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(glm_dir, local_files_only=True)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    path = tmp_path_factory.mktemp("glm4-lora")
    peft_model.save_pretrained(path)
    return path


def test_glm4_lora_attach(glm, glm_dir, lora_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapted = load(glm_dir, device="cpu", dtype="float32", lora_adapter=lora_dir)
    assert any("lora_A" in name for name, _ in adapted.model.named_modules())
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(glm_dir), lora_dir).eval()
    got = last_logits(adapted.model, adapted.tokenizer)
    assert torch.allclose(got, last_logits(expected, glm.tokenizer), atol=1e-5)
    assert not torch.allclose(got, last_logits(glm.model, glm.tokenizer), atol=1e-3)  # the adapter does something
    # int8 with the adapter: base layers quantized, LoRA matrices kept in float.
    int8 = load(glm_dir, device="cpu", dtype="float32", lora_adapter=lora_dir, quant="int8")
    lora_linears = [m for n, m in int8.model.named_modules() if ".lora_A." in n and type(m) is torch.nn.Linear]
    assert lora_linears
    assert torch.nn.functional.cosine_similarity(last_logits(int8.model, glm.tokenizer), got, dim=0) > 0.99
    engine = engine_on(adapted)
    try:
        assert run(engine.generate(ask("Hello", max_new_tokens=6))).completion_tokens >= 1
    finally:
        run(engine.close())


def test_chatglm3_template(glm):
    fmt = ChatFormat(CHATGLM3_TEMPLATE, family="chatglm3")
    assert render(glm.tokenizer, fmt, CONVERSATION) == (
        "[gMASK]sop<|system|>\n You are a helpful assistant<|user|>\n Hello<|assistant|>\n Hi there"
        "<|user|>\n Who are you<|assistant|>"
    )


def test_chatglm2_template(glm):
    fmt = ChatFormat(CHATGLM2_TEMPLATE, add_special_tokens=True, family="chatglm2")
    assert render(glm.tokenizer, fmt, CONVERSATION[1:]) == (
        "[Round 1]\n\n问：Hello\n\n答：Hi there\n\n[Round 2]\n\n问：Who are you\n\n答："
    )
    # No system role in ChatGLM2: the system text goes before the first round.
    assert render(glm.tokenizer, fmt, CONVERSATION[:2]) == (
        "You are a helpful assistant\n\n[Round 1]\n\n问：Hello\n\n答："
    )


def test_fallback_templates_by_family(glm):
    class NoRoleTokens:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0

    assert fallback_format("glm", glm.tokenizer).family == "glm4"
    assert fallback_format("chatglm", glm.tokenizer).family == "chatglm3"  # has <|user|>
    chatglm2 = fallback_format("chatglm", NoRoleTokens())
    assert chatglm2.family == "chatglm2" and chatglm2.add_special_tokens
    assert fallback_format("llama", glm.tokenizer) is None


def test_glm_tokenizer_without_template_uses_the_fallback(glm_dir, tmp_path):
    import json
    import shutil

    copy = tmp_path / "glm-no-template"
    shutil.copytree(glm_dir, copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    loaded = load(copy, device="cpu", dtype="float32")
    assert loaded.chat.family == "glm4"
    assert render(loaded.tokenizer, loaded.chat, CONVERSATION[1:2]) == "[gMASK]<sop><|user|>\nHello<|assistant|>\n"


def test_remote_code_checkpoint_without_trust_is_refused(tmp_path):
    """A ChatGLM-style folder whose code ships in the checkpoint: refused unless trust_remote_code is on."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    }))
    with pytest.raises(EngineError, match="trust_remote_code"):
        load(tmp_path, device="cpu", dtype="float32")
