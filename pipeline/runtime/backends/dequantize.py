"""Runtime "dequantize": every quantized tensor becomes its reference dequantization (pipeline.quant codec) in
the dtype of the slot it fills; the model is a plain transformers model afterwards."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.quant import Quantized, dequantize
from pipeline.runtime import skeleton


class DequantizeBackend(skeleton.Backend):
    name = "dequantize"

    def place_quantized(self, model: Any, name: str, q: Quantized, signs: list[int] | None) -> str:
        module, attr = skeleton.owner(model, name)
        dtype = skeleton.target_dtype(module, attr, torch.empty(0, dtype=q.dtype))
        dense = dequantize(q, signs, dtype=dtype)  # FORMAT v2: divides column i by q.smooth[i]
        w = self.convert(module, attr, dense)
        skeleton.place(module, attr, w)
        return "dequantize" if w is dense else self.name

    def convert(self, module: torch.nn.Module, attr: str, w: torch.Tensor) -> torch.Tensor:
        """A subclass's hook on the dequantized weight (INT4 converts it)."""
        return w
