"""Runtimes "reference" and "native": each quantized Linear weight stays as stored and its nn.Linear becomes an
HLWQLinear (codes, scales, codebook on the device); other quantized tensors (none in Gemma-4) are dequantized."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import nn

from pipeline.errors import FormatError
from pipeline.quant import Quantized
from pipeline.runtime import skeleton
from pipeline.runtime.backends.dequantize import DequantizeBackend
from pipeline.runtime.linear import HLWQLinear

log = logging.getLogger(__name__)


def module_runtime(runtime: str, device: torch.device | str) -> str:
    """Runtime "native" needs the CUDA kernels; on another device it falls back to the exact "reference" path, said once
    in the log. "auto": native on CUDA where the kernels are installed, reference elsewhere."""
    dev = torch.device(device)
    if runtime == "auto":
        kernels = importlib.util.find_spec("pipeline.runtime.kernels") is not None
        return "native" if dev.type == "cuda" and kernels else "reference"
    if runtime == "native" and dev.type != "cuda":
        log.warning("runtime 'native' needs a CUDA device; %s computes with the reference path (exact, slow)", dev)
        return "reference"
    return runtime


class NativeBackend(skeleton.Backend):
    name = "hlwq"

    def __init__(self, runtime: str = "reference"):
        self.runtime = runtime
        self.fallback = DequantizeBackend()

    def place_quantized(self, model: Any, name: str, q: Quantized, signs: list[int] | None) -> str:
        module, attr = skeleton.owner(model, name)
        if type(module) is not nn.Linear or attr != "weight":
            return self.fallback.place_quantized(model, name, q, signs)
        if tuple(q.shape) != (module.out_features, module.in_features):
            raise FormatError(f"{name}: artifact shape {tuple(q.shape)} != model shape "
                                       f"{(module.out_features, module.in_features)}")  # fmt: skip
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        new = HLWQLinear.from_quantized(q, signs, module.bias, self.runtime)  # type: ignore[arg-type]
        model.get_submodule(parent).register_module(child, new)
        return self.name
