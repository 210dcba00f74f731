"""Frozen bases quantized through diffusers' quantization configs (low-VRAM students, QLoRA-style π-ID).

The base transformer is loaded quantized once; the LoRA student and the teacher share it (the teacher is the same
module with adapters disabled, so it costs no second copy). What the student trains or saves is never quantized:
LoRA factors (PEFT wraps the quantized layers), the policy head (initialised from the dequantized ``proj_out``) and
the student's own final norm (a float copy of ``norm_out``). Checkpoints and adapters therefore have the same
format as on a float base, and load onto either.

Backends (``backend=``):
* ``"torchao-int8"``: TorchAO int8 weight-only (`TorchAoConfig(Int8WeightOnlyConfig())`); runs on CPU and GPU.
* ``"bnb-nf4"`` / ``"bnb-int8"``: bitsandbytes 4-bit NF4 (compute dtype bf16) / LLM.int8; diffusers loads these only
  on a CUDA machine.
* GGUF files: `load_quantized_transformer(..., gguf_file=...)` (diffusers' ``from_single_file`` with
  `GGUFQuantizationConfig`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

BACKENDS = ("torchao-int8", "bnb-nf4", "bnb-int8")
CUDA_ONLY_BACKENDS = ("bnb-nf4", "bnb-int8")          # diffusers loads bitsandbytes weights only on a CUDA machine


def quantization_config(backend: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The diffusers quantization config of `backend` (one of `BACKENDS`)."""
    if backend == "torchao-int8":
        from diffusers import TorchAoConfig
        try:
            from torchao.quantization import Int8WeightOnlyConfig
        except ImportError as error:  # pragma: no cover - optional dependency
            raise ImportError("backend 'torchao-int8' needs `pip install torchao`") from error
        return TorchAoConfig(Int8WeightOnlyConfig())
    if backend in CUDA_ONLY_BACKENDS:
        from diffusers import BitsAndBytesConfig

        if backend == "bnb-int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def load_quantized_transformer(path: Union[str, Path], backend: Optional[str] = None, subfolder: Optional[str] =
                               "transformer", dtype: torch.dtype = torch.bfloat16, gguf_file: Optional[str] = None,
                               transformer_class: Optional[str] = None):
    """A frozen, quantized FLUX/Qwen-Image/SD3 transformer from a diffusers pipeline folder (or Hub id) `path`.

    `backend`: one of `BACKENDS` (weights from safetensors only); or `gguf_file`: a ``.gguf`` checkpoint, read
    with the transformer config of `path`/`subfolder`. `transformer_class` defaults to the class named in the
    folder's config.json."""
    import diffusers

    if (backend is None) == (gguf_file is None):
        raise ValueError(f"give exactly one of backend (one of {BACKENDS}) and gguf_file")
    cls = getattr(diffusers, transformer_class or _transformer_class(path, subfolder))
    if gguf_file is not None:
        from diffusers import GGUFQuantizationConfig

        model = cls.from_single_file(str(gguf_file), config=str(path), subfolder=subfolder,
                                     quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                                     torch_dtype=dtype)
    else:
        model = cls.from_pretrained(path, subfolder=subfolder, quantization_config=quantization_config(
            backend, dtype), torch_dtype=dtype, use_safetensors=True)
    return model.eval().requires_grad_(False)


def _transformer_class(path: Union[str, Path], subfolder: Optional[str]) -> str:
    from diffusers.models import AutoModel

    config = AutoModel.load_config(path, subfolder=subfolder)
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ValueError(f"{path}/{subfolder or ''}: config.json names no _class_name; pass transformer_class=")
    return config["_class_name"]


def is_quantized(weight: torch.Tensor) -> bool:
    """True for a quantized weight (a tensor subclass of TorchAO, bitsandbytes or GGUF, or integer storage)."""
    return type(weight) not in (torch.Tensor, nn.Parameter) or not weight.dtype.is_floating_point


def base_parameter(module: nn.Module) -> torch.Tensor:
    """A frozen floating-point parameter of `module`: its compute dtype and device (a quantized base's packed
    integer weights and a student's trainable LoRA factors say neither)."""
    for param in module.parameters():
        if not param.requires_grad and not is_quantized(param):
            return param
    return next(module.parameters())


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The float weight of a (possibly quantized) linear layer, detached."""
    weight = linear.weight
    if not is_quantized(weight):
        return weight.detach()
    if getattr(weight, "quant_state", None) is not None:                   # bitsandbytes 4-bit
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    if getattr(weight, "SCB", None) is not None:                           # bitsandbytes LLM.int8
        return weight.data.float() * weight.SCB.float()[:, None] / 127
    if type(weight).__name__ == "GGUFParameter":
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        return dequantize_gguf_tensor(weight).detach()
    if hasattr(weight, "dequantize"):                                      # TorchAO tensor subclasses
        return weight.dequantize().detach()
    raise TypeError(f"cannot dequantize a {type(weight).__name__} weight (layer {type(linear).__name__})")


def float_linear(linear: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """A plain `nn.Linear` with the (dequantized) weights of `linear`; `linear` itself if it is not quantized."""
    if not is_quantized(linear.weight):
        return linear
    weight = dequantized_weight(linear)
    dtype = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
    bias = getattr(linear, "bias", None)
    plain = nn.Linear(linear.in_features, linear.out_features, bias=bias is not None, device=weight.device,
                      dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(weight.reshape(plain.weight.shape))
        if bias is not None:
            plain.bias.copy_(bias.detach())
    return plain


def float_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose quantized linear layers are plain float `nn.Linear`s (trainable, saveable).
    Quantized weights are never deep-copied (GGUF parameters cannot be)."""
    if isinstance(module, nn.Linear) and is_quantized(module.weight):
        return float_linear(module)
    replacements = {id(child): float_linear(child) for child in module.modules()
                    if isinstance(child, nn.Linear) and is_quantized(child.weight)}
    return copy.deepcopy(module, memo=replacements)
