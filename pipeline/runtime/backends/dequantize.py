"""Runtime "dequantize": every quantized tensor becomes its reference dequantization (pipeline.quant codec) in
the dtype of the slot it fills; the model is a plain transformers model afterwards."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipeline.quant import Quantized, dequantize
from pipeline.runtime import skeleton


def reference_weight(q: Quantized, signs: list[int] | None, smooth: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """The format's reference dequantization; with FORMAT v2 column smoothing, column i is divided by s_i (in
    float32, before the cast)."""
    if smooth is None:
        return dequantize(q, signs, dtype=dtype)
    w = dequantize(dataclasses.replace(q, smooth=None), signs, dtype=torch.float32)  # divided once, here
    return (w / smooth.to(device=w.device, dtype=torch.float32).reshape(1, -1)).to(dtype)


class DequantizeBackend(skeleton.Backend):
    name = "dequantize"

    def place_quantized(self, model: Any, name: str, q: Quantized, signs: list[int] | None,
                        smooth: torch.Tensor | None) -> str:  # fmt: skip
        module, attr = skeleton.owner(model, name)
        dtype = skeleton.target_dtype(module, attr, torch.empty(0, dtype=q.dtype))
        dense = reference_weight(q, signs, smooth, dtype)
        w = self.convert(module, attr, dense)
        skeleton.place(module, attr, w)
        return "dequantize" if w is dense else self.name

    def convert(self, module: torch.nn.Module, attr: str, w: torch.Tensor) -> torch.Tensor:
        """A subclass's hook on the dequantized weight (INT4 converts it)."""
        return w
