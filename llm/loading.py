"""Loading a generation model and its tokenizer, once per process.

Sources: a local Hugging Face folder, or a GGUF file inside a folder (``gguf_file=``: transformers
dequantizes it to ``dtype``). Nothing is ever fetched: loading runs with ``local_files_only``.
``trust_remote_code`` runs the modelling code shipped inside the checkpoint folder (ChatGLM2/3);
it is off unless the operator turns it on for that model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llm import chat_format, quantization
from llm.chat_format import ChatFormat, chat_format_for, end_of_turn_ids
from llm.engine import ChatMessage, EngineError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    chat: ChatFormat
    model_type: str
    eos_token_ids: frozenset[int]
    max_context: int  # from the model config
    device: torch.device
    dtype: torch.dtype
    quantization: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"generation.device is {device!r} but no CUDA device is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory and uses tensor cores on GPUs; CPUs without AMX run bf16 matmuls slower than fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise EngineError(f"unknown generation.dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


_lock = threading.Lock()
_loaded: dict[tuple, LoadedModel] = {}


def load(
    path: Path,
    *,
    gguf_file: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quant: str = "none",
    trust_remote_code: bool = False,
    lora_adapter: Path | None = None,
    shared: bool = True,
) -> LoadedModel:
    """Load (or reuse) a model; the same arguments return the same objects for the whole process.

    ``shared=False`` loads a private copy that is not cached (fine-tuning changes its modules).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not shared:
        return _load(Path(path), gguf_file, dev, dt, quant, trust_remote_code, lora_adapter)
    key = (str(path), gguf_file, str(dev), str(dt), quant, trust_remote_code, str(lora_adapter))
    with _lock:
        if key not in _loaded:
            _loaded[key] = _load(Path(path), gguf_file, dev, dt, quant, trust_remote_code, lora_adapter)
        return _loaded[key]


def _load(path, gguf_file, device, dtype, quant, trust_remote_code, lora_adapter) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantization.check(quant, device)
    common = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, **common, **quantization.load_kwargs(quant, device, dtype)
        )
    except EngineError:
        raise
    except Exception as exc:
        hint = " (ChatGLM checkpoints need generation.trust_remote_code: true)" if not trust_remote_code else ""
        raise EngineError(f"cannot load the generation model from {path}: {exc}{hint}") from exc
    if not quantization.places_model(quant, device):
        model.to(device)
    model.eval()
    if lora_adapter is not None:
        attach_lora(model, lora_adapter)

    config = model.config
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", "")
    chat = chat_format_for(model_type, tokenizer)
    if quant != "none" and not quantization.places_model(quant, device):
        model = quantization.apply(model, quant, device, calibration_ids(tokenizer, chat), model_type)
    eos = _eos_ids(model, tokenizer, model_type)
    if not eos:
        raise EngineError("the model defines no end-of-sequence token; cannot tell when an answer ends")
    max_context = (
        getattr(text_config, "max_position_embeddings", None)
        or getattr(text_config, "seq_length", None)  # ChatGLM configs
        or 2048
    )
    log.info("loaded %s (%s, %s, %s, quantization=%s)", path, model_type, device, dtype, quant)
    return LoadedModel(
        model=model, tokenizer=tokenizer, chat=chat, model_type=model_type,
        eos_token_ids=frozenset(eos), max_context=int(max_context), device=device, dtype=dtype, quantization=quant,
    )


def quantized_copy(loaded: LoadedModel, quant: str) -> LoadedModel:
    """A quantized copy of an already loaded (unquantized, CPU) model, without reading the files again.

    For benchmarks and tests that compare fp32 and int8 in one process; a server loads once with
    its configured quantization instead.
    """
    if loaded.quantization != "none":
        raise EngineError("quantized_copy needs an unquantized model")
    quantization.check(quant, loaded.device)
    if quantization.places_model(quant, loaded.device):
        raise EngineError("GPU quantization happens while loading: call load(..., quant=...) instead")
    calibration = calibration_ids(loaded.tokenizer, loaded.chat)
    model = quantization.apply(copy.deepcopy(loaded.model), quant, loaded.device, calibration, loaded.model_type)
    return dataclasses.replace(loaded, model=model, quantization=quant)


# A short chat in the model's own format for the int8 calibration pass (llm/quantization.py): the
# template's special tokens, English and Chinese prose and a list, as the engine's prompts have.
_CALIBRATION = [
    ChatMessage("system", "You are a helpful assistant. Answer from the documents below and cite them."),
    ChatMessage("user", "What does the travel policy say about booking trains? 你好，请用中文回答。"),
]
_CALIBRATION_ANSWER = (
    "According to the policy, employees book second-class train tickets at least seven days ahead.\n\n"
    "1. Use the company portal.\n2. Keep the receipt. 根据政策，员工应提前七天预订二等座火车票。"
)


def calibration_ids(tokenizer, chat: ChatFormat) -> torch.Tensor:
    ids = chat_format.encode(tokenizer, chat, _CALIBRATION)
    ids += tokenizer(_CALIBRATION_ANSWER, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids)


def _eos_ids(model, tokenizer, model_type: str) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids | end_of_turn_ids(tokenizer, model_type)


def attach_lora(model: torch.nn.Module, adapter: Path, adapter_name: str = "default") -> None:
    """Attach a peft LoRA adapter, unmerged (it can be disabled or swapped later) via transformers' peft integration."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise EngineError("LoRA adapters need the 'peft' package (pip install peft)") from exc
    try:
        model.load_adapter(str(adapter), adapter_name=adapter_name)
    except Exception as exc:
        raise EngineError(f"cannot attach the LoRA adapter {adapter}: {exc}") from exc


def add_lora(model: torch.nn.Module, adapter: Path, adapter_name: str) -> None:
    """Load one more peft LoRA adapter beside those already attached, under ``adapter_name``.

    transformers' ``load_adapter`` maps the weights of a second adapter wrongly with the newest
    peft available here (it needs a newer peft: the weights come up "MISSING"), so this uses peft's
    own functional API: inject the LoRA layers, then load the state dict under the new name.
    The model's active adapter is not changed.
    """
    try:
        from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
        from peft.utils import load_peft_weights
    except ImportError as exc:
        raise EngineError("LoRA adapters need the 'peft' package (pip install peft)") from exc
    try:
        config = PeftConfig.from_pretrained(str(adapter))
        device = next(model.parameters()).device
        weights = load_peft_weights(str(adapter), device=str(device))
        prefix = "base_model.model."
        weights = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}
        configs = getattr(model, "peft_config", None) if getattr(model, "_hf_peft_config_loaded", False) else None
        active = None
        if configs:
            from peft.tuners.tuners_utils import BaseTunerLayer

            active = next((m.active_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
        with warnings.catch_warnings():  # "multiple adapters in the model": exactly what is intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
        model.peft_config = {**(configs or {}), adapter_name: config}
        model._hf_peft_config_loaded = True
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]
        missing = [k for k in result.missing_keys if f".{adapter_name}." in k and "lora_" in k]
        if unexpected or missing:
            raise EngineError(f"adapter weights do not fit the model ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected, e.g. {(missing + unexpected)[0]})")
        if active is not None:  # injecting activates the new adapter: keep serving the old one
            from peft.tuners.tuners_utils import BaseTunerLayer

            for m in model.modules():
                if isinstance(m, BaseTunerLayer):
                    m.set_adapter(active)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"cannot attach the LoRA adapter {adapter}: {exc}") from exc
