"""Turning chat messages into prompt token ids.

The model's own chat template (``tokenizer.chat_template``) is always preferred. Some checkpoints
ship none: older ChatGLM2/ChatGLM3 revisions build their prompts in Python instead
(``build_prompt``/``build_chat_input`` in their remote code). For those families we carry the
equivalent templates here, so the engine can render a conversation without calling remote code:

* GLM-4 (glm-4-9b-chat-hf, ``GlmForCausalLM``)::

      [gMASK]<sop><|system|>\\n{system}<|user|>\\n{user}<|assistant|>\\n

* ChatGLM3::

      [gMASK]sop<|system|>\\n {system}<|user|>\\n {user}<|assistant|>

* ChatGLM2 (no roles; the tokenizer adds its ``[gMASK]sop`` prefix itself)::

      [Round 1]\\n\\n问：{user}\\n\\n答：{assistant}\\n\\n[Round 2]\\n\\n问：{user}\\n\\n答：
"""

from __future__ import annotations

from dataclasses import dataclass

from llm.engine import ChatMessage, EngineError

# GLM-4 without its tool-calling branch (tools are not part of the engine interface).
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CHATGLM3_TEMPLATE = (
    "{% for m in messages %}{% if loop.first %}[gMASK]sop{% endif %}<|{{ m['role'] }}|>\n {{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ChatGLM2 has no system role: a system message is put before the first round.
CHATGLM2_TEMPLATE = (
    "{% set ns = namespace(round=0, system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}{% set ns.round = ns.round + 1 %}"
    "{% if ns.round == 1 %}{{ ns.system }}{% endif %}[Round {{ ns.round }}]\n\n问：{{ m['content'] }}\n\n答："
    "{% else %}{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
)

# Turn-ending tokens of the GLM family: the model emits them instead of an EOS at the end of an answer.
GLM_END_OF_TURN = ("<|user|>", "<|observation|>", "<|endoftext|>")


@dataclass(frozen=True)
class ChatFormat:
    template: str
    # Whether tokenising the rendered text must add the tokenizer's own special prefix (ChatGLM2's
    # [gMASK]sop). Templates that write their prefix themselves use False, like transformers'
    # apply_chat_template does.
    add_special_tokens: bool = False
    family: str = "model"  # "model" (the checkpoint's own template), "glm4", "chatglm3", "chatglm2"


def fallback_format(model_type: str, tokenizer) -> ChatFormat | None:
    """The built-in template for a model family whose tokenizer has no chat template, else None."""
    if model_type in ("glm", "glm4"):
        return ChatFormat(GLM4_TEMPLATE, family="glm4")
    if model_type == "chatglm":  # ChatGLM2 and ChatGLM3 share the model type; ChatGLM3 has role tokens
        if _has_token(tokenizer, "<|user|>"):
            return ChatFormat(CHATGLM3_TEMPLATE, family="chatglm3")
        return ChatFormat(CHATGLM2_TEMPLATE, add_special_tokens=True, family="chatglm2")
    return None


def chat_format_for(model_type: str, tokenizer) -> ChatFormat:
    if getattr(tokenizer, "chat_template", None):
        return ChatFormat(tokenizer.chat_template)
    fmt = fallback_format(model_type, tokenizer)
    if fmt is None:
        raise EngineError(
            f"the model (type {model_type!r}) has no chat template; use an instruction-tuned checkpoint "
            "whose tokenizer_config.json defines chat_template"
        )
    return fmt


def render(tokenizer, fmt: ChatFormat, messages: list[ChatMessage]) -> str:
    """The prompt text, ending with the assistant's turn opener."""
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        chat_template=fmt.template,
        add_generation_prompt=True,
        tokenize=False,
    )


def encode(tokenizer, fmt: ChatFormat, messages: list[ChatMessage]) -> list[int]:
    if fmt.family == "chatglm3" and hasattr(tokenizer, "build_chat_input") and messages[-1].role == "user":
        # The checkpoint's own prompt builder (remote code) assembles the role tokens by id, which
        # does not depend on how its tokenizer treats special-token text; same layout as the template.
        history = [{"role": m.role, "content": m.content, "metadata": ""} for m in messages[:-1]]
        encoded = tokenizer.build_chat_input(messages[-1].content, history=history, role="user")
        return [int(t) for t in encoded["input_ids"][0]]
    text = render(tokenizer, fmt, messages)
    return list(tokenizer(text, add_special_tokens=fmt.add_special_tokens)["input_ids"])


def _has_token(tokenizer, token: str) -> bool:
    try:
        ids = tokenizer.convert_tokens_to_ids(token)
    except Exception:
        return False
    unk = getattr(tokenizer, "unk_token_id", None)
    return isinstance(ids, int) and ids >= 0 and ids != unk


def end_of_turn_ids(tokenizer, model_type: str) -> set[int]:
    """GLM-family turn-ending token ids present in the vocabulary (they end an answer like EOS)."""
    if model_type not in ("glm", "glm4", "chatglm"):
        return set()
    return {tokenizer.convert_tokens_to_ids(t) for t in GLM_END_OF_TURN if _has_token(tokenizer, t)}
