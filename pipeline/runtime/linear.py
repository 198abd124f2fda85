"""HLWQLinear: a Linear layer that keeps an HLWQ weight as stored (FORMAT v1 codes, block scales, codebook) and
computes with it. runtime "reference" dequantizes exactly (pipeline.quant codec) and calls F.linear: the CPU path
CI tests, slow but the definition. runtime "native" hands the call to the GPU kernels of pipeline.runtime.kernels
(W·x = Σ_b s_b · LUT[c_b] · (H·D·x)_b, the rotation applied to the activation). For those kernels a 4- or 5-bit
weight is repacked once, in place, into their tiled layout (tile_for_kernels); the module still reads and saves as
FORMAT v1 (quantized(), state_dict()).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.quant import Quantized, dequantize
from pipeline.quant.bitpack import packed_block_bytes
from pipeline.quant.hadamard import sign_vector
from pipeline.runtime.kernels import layout

RUNTIMES = ("reference", "native")


class HLWQLinear(nn.Module):
    """y = x · Wᵀ + b with W held as HLWQ codes.

    Buffers: codes uint8 [out, NB*B*bits/8], scales float16 [out, NB], codebook float32 [2**bits], signs float32 [B]
    (±1, the sign diagonal; not in the checkpoint, it comes from the shard metadata), smooth float32 [in] or None
    (FORMAT v2 column smoothing: W·diag(s) was quantized). bias: a Parameter or None, as nn.Linear's.
    After tile_for_kernels: tiles uint8 [ceil(out/16), NB, unit] (kernels/layout.py) holds codes and scales, which
    are then None.
    """

    codes: torch.Tensor | None
    scales: torch.Tensor | None
    tiles: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bits: int, block_size: int = 128, bias: bool = True,
                 runtime: str = "reference", smooth: bool = False, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.block_size, self.runtime = bits, block_size, runtime
        n_blocks = math.ceil(in_features / block_size)
        row_bytes = n_blocks * packed_block_bytes(bits, block_size)
        self.register_buffer("codes", torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, n_blocks, dtype=torch.float16, device=device))
        self.register_buffer("codebook", torch.empty(1 << bits, dtype=torch.float32, device=device))
        # Not persistent: the checkpoint carries the diagonal once per shard (metadata), not per tensor.
        self.register_buffer("signs", torch.ones(block_size, dtype=torch.float32, device=device), persistent=False)
        smooth_buf = torch.ones(in_features, dtype=torch.float32, device=device) if smooth else None
        self.register_buffer("smooth", smooth_buf)
        self.register_buffer("tiles", None, persistent=False)
        b = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.bias = b

    @classmethod
    def from_quantized(cls, q: Quantized, signs: list[int] | None, bias: nn.Parameter | None = None,
                       runtime: str = "reference") -> HLWQLinear:  # fmt: skip
        """A module around tensors already read (no copies), q.smooth included; `bias` is taken over as it is (it may
        still be meta). For runtime "native" the codes are tiled for the kernels at once (tile_for_kernels)."""
        if len(q.shape) != 2:
            raise ValueError(f"HLWQLinear needs a 2-D weight, got shape {q.shape}")
        out_f, in_f = q.shape
        m = cls(in_f, out_f, q.bits, q.block_size, bias=False, runtime=runtime, smooth=False, device="meta")
        m.codes, m.scales, m.codebook = q.codes, q.scales, q.codebook.to(torch.float32)
        m.signs = sign_vector(signs, q.block_size, q.codes.device)
        m.smooth = None if q.smooth is None else q.smooth.to(torch.float32)  # type: ignore[assignment]
        m.bias = bias
        if runtime == "native":
            m.tile_for_kernels()
        return m

    def sign_bits(self) -> list[int]:
        signs: torch.Tensor = self.signs  # type: ignore[assignment]
        return [int(v) for v in (signs < 0).tolist()]

    def tile_for_kernels(self) -> bool:
        """Repack codes + scales into the tensor-core kernels' layout, in place (same bytes); False where that layout
        does not hold this weight (6-bit and wider, asymmetric codebooks, other block sizes)."""
        codebook: torch.Tensor = self.codebook  # type: ignore[assignment]
        if self.tiles is not None or not layout.tileable(self.bits, self.block_size, codebook):
            return False
        assert self.codes is not None and self.scales is not None
        self.tiles = layout.to_tiles(self.codes, self.scales, self.bits)
        self.codes = None
        self.scales = None
        return True

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) in FORMAT v1, from the tiles where the module was repacked."""
        if self.tiles is not None:
            return layout.from_tiles(self.tiles, self.out_features, self.bits)
        assert self.codes is not None and self.scales is not None
        return self.codes, self.scales

    def quantized(self) -> Quantized:
        """The stored weight as the codec's record (views, no copies unless tiled), its smoothing vector included."""
        codes, scales = self.stored()
        return Quantized(codes, scales, self.codebook, (self.out_features, self.in_features),  # type: ignore[arg-type]
                         torch.bfloat16, self.bits, self.block_size, self.smooth)  # type: ignore[arg-type]  # fmt: skip

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        # A tiled module saves FORMAT v1 codes and scales, never the kernels' private layout.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiles is not None:
            destination[prefix + "codes"], destination[prefix + "scales"] = self.stored()

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The reference dequantization of W (what runtime "dequantize" would have placed), in `dtype`."""
        return dequantize(self.quantized(), self.sign_bits(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runtime == "native" and x.is_cuda:
            from pipeline.runtime.kernels import native_linear  # the lead's GPU kernels; imported only when used

            return native_linear(x, self)  # type: ignore[no-any-return]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        extra = (", smooth" if self.smooth is not None else "") + (", tiled" if self.tiles is not None else "")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"block_size={self.block_size}, bias={self.bias is not None}, runtime={self.runtime}{extra}"
        )
