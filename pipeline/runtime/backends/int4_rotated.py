"""Runtime "int4-rotated": torchao INT4 of the weight *in the rotated basis*, with the activation rotated online.

Runtime "int4" dequantizes (un-rotates) the 5-bit weight and re-quantizes it to INT4, stacking a second rounding on
a basis where the first one left structured error. Here the INT4 grid is laid over the rotated blocks the 5-bit codes
live in (levels × scale; group 128 = one rotation block), and y = INT4(W_rot) · (H·D·x): the same rotation the native
kernels apply to the activation, so the only new error is INT4's on near-Gaussian rotated values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.quant import Quantized, hadamard
from pipeline.quant.codec import rotated_blocks
from pipeline.runtime import skeleton
from pipeline.runtime.backends.dequantize import DequantizeBackend
from pipeline.runtime.backends.int4 import INT4_GROUP, to_int4


def rotate_activation(x: torch.Tensor, signs: torch.Tensor, inv_smooth: torch.Tensor | None) -> torch.Tensor:
    """[..., padded in] -> float32 H·D·(x / s) per block: the native kernel on CUDA, the codec's butterfly elsewhere."""
    if x.is_cuda:
        from pipeline.runtime.kernels import ops  # noqa: F401  (registers torch.ops.hlwq.rotate)

        return torch.ops.hlwq.rotate(x, signs, inv_smooth)
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if inv_smooth is not None:
        x2 = x2 * inv_smooth
    return hadamard.rotate(x2, signs).reshape(x.shape)


class RotatedInt4Linear(nn.Module):
    """y = INT4(W_rot) · rotate(pad(x) / s) + b; `inner` is an nn.Linear whose weight torchao converted."""

    def __init__(self, inner: nn.Linear, in_features: int, signs: torch.Tensor, smooth: torch.Tensor | None):
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = in_features, inner.out_features
        self.register_buffer("signs", signs.to(torch.float32))
        self.register_buffer("inv_smooth", None if smooth is None else (1.0 / smooth.to(torch.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = self.inner.in_features
        inv: torch.Tensor | None = self.inv_smooth  # type: ignore[assignment]
        if padded != x.shape[-1]:
            x = nn.functional.pad(x, (0, padded - x.shape[-1]))
            inv = None if inv is None else nn.functional.pad(inv, (0, padded - inv.numel()), value=1.0)
        signs: torch.Tensor = self.signs  # type: ignore[assignment]
        return self.inner(rotate_activation(x, signs, inv).to(x.dtype))  # type: ignore[no-any-return]


class Int4RotatedBackend(DequantizeBackend):
    name = "int4-rotated"

    def __init__(self, ao_config: Any):
        self.ao_config = ao_config

    def place_quantized(self, model: Any, name: str, q: Quantized, signs: list[int] | None) -> str:
        module, attr = skeleton.owner(model, name)
        padded = q.scales.shape[1] * q.block_size
        eligible = (type(module) is nn.Linear and attr == "weight" and len(q.shape) == 2
                    and padded % INT4_GROUP == 0 and q.shape[0] % 8 == 0)  # fmt: skip
        if not eligible:
            return super().place_quantized(model, name, q, signs)
        dtype = skeleton.target_dtype(module, attr, torch.empty(0, dtype=q.dtype))
        assert isinstance(module, nn.Linear)
        inner = nn.Linear(padded, q.shape[0], bias=module.bias is not None, device="meta")
        inner.weight = to_int4(rotated_blocks(q).reshape(q.shape[0], padded).to(dtype), self.ao_config)
        inner.bias = module.bias
        sign_vec = hadamard.sign_vector(signs, q.block_size, q.codes.device)
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        new = RotatedInt4Linear(inner, module.in_features, sign_vec, q.smooth)
        model.get_submodule(parent).register_module(child, new)
        return self.name
