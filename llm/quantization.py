"""Weight quantization for the in-process engine: ``none``, ``int8``, ``int4``.

CPU (measured on the 2-core target machine with SmolLM2-135M; figures in docs/benchmarks.md):

* ``int8``: PyTorch dynamic quantization (``torch.ao.quantization.quantize_dynamic``) of every
  ``nn.Linear``, lm_head included, with **per-output-channel** weight scales. Activations are
  quantized on the fly per batch and the matmuls run in fbgemm's int8 kernels, so decoding reads a
  quarter of the weight bytes and runs ~2.5-3x faster than fp32. Chosen because it is the fastest
  option available without ``torch.compile`` (torchao's int8 configs run their int8 matmul
  through generic ops in eager mode and were slower than fp32 here), and compiling is not
  practical for a continuously changing batch shape. Per-channel scales matter: the default
  per-tensor qconfig tripled the perplexity of this model (the GGUF weights are already on a
  4-bit grid, one outlier row sets the whole tensor's scale); per-channel stays within ~1-2%.
  The API is deprecated in favour of torchao but still ships in torch 2.13; we import it lazily
  and fail with a clear message the day it is gone.
* ``int4``: refused on CPU (``EngineError``); see ``_INT4_CPU`` for what was measured.

GPU: bitsandbytes, configured at load time through ``BitsAndBytesConfig`` (``int8`` = LLM.int8,
``int4`` = NF4 with double quantization and the engine dtype for compute). bitsandbytes is
imported only on that path.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from llm.engine import EngineError

log = logging.getLogger(__name__)

METHODS = ("none", "int8", "int4")

_INT4_CPU = (
    "quantization int4 is not supported on CPU: torchao's int4 weight-only kernels need bfloat16 "
    "and were slower than int8 here, and bitsandbytes 4-bit needs a GPU. Use quantization: int8 on CPU "
    "(about 3x faster than fp32), or int4 on a CUDA device."
)


def check(method: str, device: torch.device) -> None:
    """Refuse unsupported combinations before anything is loaded."""
    if method not in METHODS:
        raise EngineError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if method == "none":
        return
    if device.type == "cpu":
        if method == "int4":
            raise EngineError(_INT4_CPU)
        if not hasattr(torch, "ao") or not hasattr(torch.ao.quantization, "quantize_dynamic"):
            raise EngineError("this torch build has no dynamic int8 quantization; use quantization: none")
        if "fbgemm" not in torch.backends.quantized.supported_engines and "x86" not in torch.backends.quantized.supported_engines:
            raise EngineError("this CPU/torch build has no int8 kernels (fbgemm/x86); use quantization: none")
        return
    if device.type == "cuda":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise EngineError(f"quantization {method} on GPU needs the 'bitsandbytes' package") from exc
        return
    raise EngineError(f"quantization {method} is not supported on {device.type}")


def load_kwargs(method: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Extra ``from_pretrained`` arguments: GPU quantization happens while loading."""
    if method == "none" or device.type != "cuda":
        return {}
    from transformers import BitsAndBytesConfig

    if method == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    # bitsandbytes quantizes while placing the weights, so the loader must place them itself.
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


def places_model(method: str, device: torch.device) -> bool:
    """Whether ``load_kwargs`` already put the model on its device."""
    return method != "none" and device.type == "cuda"


def apply(model: nn.Module, method: str, device: torch.device) -> nn.Module:
    """Quantize a loaded model in place where that happens after loading (CPU int8)."""
    if method == "none" or device.type != "cpu":
        return model
    return quantize_int8_cpu(model)


def quantize_int8_cpu(model: nn.Module) -> nn.Module:
    """Dynamic int8 (per-channel weights) for every nn.Linear except LoRA adapter matrices.

    LoRA A/B matrices stay in float: they are tiny, and keeping them unquantized keeps an attached
    adapter exact (peft calls the quantized base layer and adds the float low-rank update).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    targets = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if type(module) is nn.Linear and ".lora_" not in f".{name}"
    }
    with warnings.catch_warnings():  # the deprecation notices of torch.ao.quantization
        warnings.simplefilter("ignore")
        quantize_dynamic(model, targets, dtype=torch.qint8, inplace=True)
    # lm_head shared its weight with the input embeddings; it now holds its own int8 copy, so
    # the float table only serves embedding lookups.
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights (float parameters plus packed int8 weights), counting shared ones once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += weight.numel() * weight.element_size()
            # per-channel scales (fp64) and zero points (int64)
            if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += weight.q_per_channel_scales().numel() * 16
            if bias is not None:
                total += bias.numel() * bias.element_size()
    return total
