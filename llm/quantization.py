"""Weight quantization for the in-process engine: ``none``, ``int8``, ``int4``.

CPU (measured on the 2-core target machine with SmolLM2-135M; figures in docs/benchmarks.md):

* ``int8``: PyTorch dynamic quantization (``torch.ao.quantization.quantize_dynamic``, fbgemm
  kernels) of every ``nn.Linear``, lm_head included, with per-output-channel weight scales, made
  accurate by two additions (``quantize_int8_cpu``): a SmoothQuant calibration pass at load time
  (outlier channels) and per-token activation ranges (outlier tokens). Decoding reads a quarter of
  the Linear weight bytes; on SmolLM2-135M held-out perplexity stays within ~1.5% of fp32 and
  single-stream decoding is ~2x faster (docs/benchmarks.md). Chosen because it is the fastest
  option available without ``torch.compile``: torchao's int8 configs run their per-token int8
  matmul through generic eager ops and were slower than fp32 here, ``torch._int_mm`` has no fast
  CPU kernel, and compiling is not practical for a continuously changing batch shape. The
  torch.ao API is deprecated in favour of torchao but still ships in torch 2.13; we import it
  lazily and fail with a clear message the day it is gone.
* ``int4``: refused on CPU (``EngineError``); see ``_INT4_CPU`` for what was measured.

GPU: bitsandbytes, configured at load time through ``BitsAndBytesConfig`` (``int8`` = LLM.int8,
``int4`` = NF4 with double quantization and the engine dtype for compute). bitsandbytes is
imported only on that path.
"""

from __future__ import annotations

import functools
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
    "(about 2x faster than fp32), or int4 on a CUDA device."
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


def apply(
    model: nn.Module, method: str, device: torch.device, calibration_ids: torch.Tensor | None = None,
    model_type: str | None = None,
) -> nn.Module:
    """Quantize a loaded model in place where that happens after loading (CPU int8)."""
    if method == "none" or device.type != "cpu":
        return model
    return quantize_int8_cpu(model, calibration_ids, model_type)


# SmoothQuant's migration strength: alpha = 0.5 splits each input channel's range evenly between
# the activation and the weight (0.3, 0.5 and 0.7 were measured on SmolLM2-135M: +4.4%, +2.2%,
# +3.9% perplexity; docs/benchmarks.md).
SMOOTH_ALPHA = 0.5
# Decoder layouts whose norms compute ``weight * normalized(x)`` (so a per-channel factor can move
# from the norm into the next Linear): the model types SmoothQuant is applied to.
_SMOOTHABLE = {"llama", "mistral", "qwen2", "qwen3", "glm", "glm4"}


def quantize_int8_cpu(
    model: nn.Module, calibration_ids: torch.Tensor | None = None, model_type: str | None = None
) -> nn.Module:
    """Dynamic int8 (per-channel weights, activations quantized at run time) for every nn.Linear.

    fbgemm quantizes a Linear's input with ONE scale per call, 7-bit (``reduce_range``: CPUs
    without VNNI would overflow int16 accumulators with 8 bits; measured: perplexity x136). LLM
    activations defeat that in two ways, and plain ``quantize_dynamic`` of all Linears raised the
    held-out perplexity of SmolLM2-135M by 163% (30.0 -> 79.0):

    * outlier *channels*: after each RMSNorm a few channels are far larger than the rest for every
      token. SmoothQuant (Xiao et al. 2023) divides each input channel j by
      s_j = max|X_j|^a / max|W_j|^(1-a), measured on ``calibration_ids``, and multiplies the
      weight's column j by s_j, which leaves the product unchanged; the division is folded into
      the preceding norm's weight (q/k/v, gate/up, lm_head) or into up_proj's rows (down_proj).
      Applied to the decoder layouts in ``_SMOOTHABLE``; the calibrated model is checked to give
      the same logits before anything is quantized.
    * outlier *tokens* ("massive activations"): the first token and some delimiters carry values
      hundreds of times larger than the others; in a prefill, or a batch of decode rows, one such
      token would set the scale of every other row and flatten it to zero (measured: +50%
      perplexity even after smoothing). ``token_scaled_int8_linear`` gives every row its own scale.

    Measured on SmolLM2-135M (docs/benchmarks.md): both together keep the perplexity within ~2%
    of fp32 (per-token scales alone: +10%); a single decoding row takes the plain fbgemm path.
    Without calibration ids, or for other layouts, only the per-token part applies.

    Before quantizing, q/k/v and gate/up are fused into one Linear each (``llm/fusion.py``): every
    fbgemm call has a fixed cost, and fusing cuts them from seven to four per layer.

    LoRA A/B matrices stay in float: they are tiny, and keeping them unquantized keeps an attached
    adapter exact (peft calls the quantized base layer and adds the float update).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from llm.fusion import fuse_projections

    if calibration_ids is not None and model_type in _SMOOTHABLE:
        smooth(model, calibration_ids)
    # After smoothing (which scales q/k/v and gate/up as separate Linears), before quantizing.
    fuse_projections(model)
    targets = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if type(module) is nn.Linear and ".lora_" not in f".{name}"
    }
    with warnings.catch_warnings():  # the deprecation notices of torch.ao.quantization
        warnings.simplefilter("ignore")
        quantize_dynamic(model, targets, mapping={nn.Linear: token_scaled_int8_linear()}, dtype=torch.qint8, inplace=True)
    log.info("int8: %d Linear layers quantized", len(targets))
    return model


@functools.cache
def token_scaled_int8_linear() -> type:
    """The class below, defined on first use: torch.ao is imported only when int8 is asked for."""
    from torch.ao.nn.quantized.dynamic import Linear

    return type("TokenScaledInt8Linear", (_TokenScaledMixin, Linear), {})


class _TokenScaledMixin:
    """torch's dynamic int8 Linear with one activation range per token (row) instead of per call.

    fbgemm's dynamic linear quantizes the whole input with one (asymmetric) range. A Linear
    commutes with a per-row affine map: with m = the row's midrange and c = its half-range,
    x = c x' + m, so W x = c (W x') + m (W 1). Each row is mapped onto [-1, 1] before the call
    (every row then uses the whole shared 7-bit range, as if it had its own scale and zero point)
    and the output rows are mapped back with the weight's row sums: per-token quantization at the
    price of a few elementwise passes, still one fbgemm call. A single row (one request decoding)
    needs none of it. Written by hand because fbgemm has no per-token mode, and per-token int8
    through eager PyTorch (torchao, or ``torch._int_mm``, which has no fast CPU kernel) was many
    times slower than fp32 here.
    """

    _float_bias: torch.Tensor | None = None
    _weight_sums: torch.Tensor | None = None

    def set_weight_bias(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        super().set_weight_bias(w, b)
        # Kept beside the packed copy: unpacking it on every call would cost more than the matmul.
        self._float_bias = None if b is None else b.detach().float().clone()
        self._weight_sums = w.dequantize().sum(dim=1)  # W 1, of the weights fbgemm actually uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_params._packed_params
        if x.numel() == x.shape[-1]:
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True).to(x.dtype)
        # amax + amin, not aminmax: the fused op was 3-6x slower on these shapes (torch 2.13 CPU).
        low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        mid, half = (high + low) / 2, ((high - low) / 2).clamp_(min=1e-6)
        y = torch.ops.quantized.linear_dynamic((x - mid) / half, packed, reduce_range=True).to(x.dtype)
        if self._float_bias is not None:
            y = y.sub_(self._float_bias)
        y = y.mul_(half).addcmul_(mid, self._weight_sums.to(x.dtype))
        if self._float_bias is not None:
            y = y.add_(self._float_bias)
        return y


def _input_peaks(model: nn.Module, linears: dict[str, nn.Linear], ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-input-channel max |x| of each Linear over the calibration text, and the model's logits."""
    peaks: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0)
            peaks[name] = torch.maximum(peaks[name], x) if name in peaks else x
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids.reshape(1, -1).to(next(model.parameters()).device)).logits.float()
    finally:
        for h in handles:
            h.remove()
    return peaks, logits


def smooth(model: nn.Module, ids: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> bool:
    """SmoothQuant the Linear inputs of a Llama-style decoder in place; False (and unchanged) if not applicable."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        return False
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    name_of = {id(m): n for n, m in linears.items()}
    # (producer, how it scales, consumers): "norm" divides a norm weight, "rows" a Linear's output rows.
    groups: list[tuple[nn.Module, str, slice | None, list[nn.Linear]]] = []
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        qkv = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        if all(isinstance(m, nn.Linear) for m in qkv) and hasattr(layer, "input_layernorm"):
            groups.append((layer.input_layernorm, "norm", None, qkv))
        if hasattr(mlp, "gate_up_proj") and hasattr(mlp, "down_proj"):  # GLM: one fused matrix, gate then up
            half = mlp.gate_up_proj.out_features // 2
            groups.append((layer.post_attention_layernorm, "norm", None, [mlp.gate_up_proj]))
            groups.append((mlp.gate_up_proj, "rows", slice(half, 2 * half), [mlp.down_proj]))
        elif all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            groups.append((layer.post_attention_layernorm, "norm", None, [mlp.gate_proj, mlp.up_proj]))
            groups.append((mlp.up_proj, "rows", None, [mlp.down_proj]))
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and hasattr(inner, "norm"):
        groups.append((inner.norm, "norm", None, [head]))
    if not groups or any(not isinstance(getattr(p, "weight", None), torch.Tensor) for p, *_ in groups):
        return False

    peaks, reference = _input_peaks(model, linears, ids)
    if isinstance(head, nn.Linear) and head.weight is getattr(inner, "embed_tokens", head).weight:
        # Tied to the input embeddings: the head gets its own copy (it is quantized into one anyway).
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    applied = []
    with torch.no_grad():
        for producer, kind, part, consumers in groups:
            x = peaks[name_of[id(consumers[0])]].clamp(min=1e-5)
            w = torch.stack([c.weight.detach().abs().amax(dim=0).float() for c in consumers]).amax(dim=0).clamp(min=1e-5)
            s = (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5).to(consumers[0].weight.dtype)
            _scale_producer(producer, kind, part, 1 / s)
            for c in consumers:
                c.weight.mul_(s)
            applied.append((producer, kind, part, consumers, s))
        _, after = _input_peaks(model, {}, ids)
        drift = float((after - reference).abs().max() / reference.abs().max())
        if drift > 1e-3:  # a norm that does not compute weight * x: undo, quantize without smoothing
            for producer, kind, part, consumers, s in reversed(applied):
                _scale_producer(producer, kind, part, s)
                for c in consumers:
                    c.weight.div_(s)
            log.warning("int8: SmoothQuant changed the model's output (%.2g); not applied", drift)
            return False
    log.info("int8: SmoothQuant applied to %d Linear inputs (alpha %.2f)", len(groups), alpha)
    return True


def _scale_producer(producer: nn.Module, kind: str, part: slice | None, factor: torch.Tensor) -> None:
    if kind == "norm":
        producer.weight.mul_(factor)
        if getattr(producer, "bias", None) is not None:
            producer.bias.mul_(factor)
        return
    rows = producer.weight if part is None else producer.weight[part]
    rows.mul_(factor[:, None])
    if producer.bias is not None:
        (producer.bias if part is None else producer.bias[part]).mul_(factor)


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
