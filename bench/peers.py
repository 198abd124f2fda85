"""Peer weight quantizers for the quality bench, each as weight -> (dequantized weight, stored bits).

Groups run along the input dimension (rows of the weight). When the row length is not a multiple of the group
(SmolLM2's 576 = 4 x 128 + 64), the last group of each row is shorter and pays its own scale: nothing is padded,
and the stored bits count every group's scale/zero. HQQ keeps its own behaviour (groups over the flattened tensor).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Dequantized = tuple[torch.Tensor, int]  # (weight in float32, bits a real format stores for it)


def _segments(cols: int, group: int) -> list[tuple[int, int]]:
    """[start, end) column ranges: full groups, then a shorter last one if the row needs it."""
    full = cols // group * group
    segs = [(0, full)] if full else []
    return [*segs, (full, cols)] if full < cols else segs


def _per_segment(w: torch.Tensor, group: int, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    out = torch.empty_like(w, dtype=torch.float32)
    for a, b in _segments(w.shape[1], group):
        out[:, a:b] = fn(w[:, a:b].float(), min(group, b - a))
    return out


def _n_groups(w: torch.Tensor, group: int) -> int:
    return w.shape[0] * -(-w.shape[1] // group)


def rtn_symmetric(w: torch.Tensor, bits: int, group: int = 128) -> Dequantized:
    """Symmetric absmax round-to-nearest: scale = absmax / (2^(b-1) - 1) in fp16, codes in [-2^(b-1), 2^(b-1) - 1]."""
    qmax = 2 ** (bits - 1) - 1

    def one(x: torch.Tensor, g: int) -> torch.Tensor:
        xg = x.reshape(x.shape[0], -1, g)
        scale = (xg.abs().amax(-1, keepdim=True) / qmax).half().float()
        q = torch.where(scale > 0, xg / scale, torch.zeros_like(xg)).round().clamp(-qmax - 1, qmax)
        return (q * scale).reshape(x.shape)

    return _per_segment(w, group, one), w.numel() * bits + _n_groups(w, group) * 16


def asym_minmax_int4(w: torch.Tensor, group: int = 128) -> Dequantized:
    """torchao Int4WeightOnly's math (tinygemm affine, float zero point, bf16 scale and zero), via torchao itself."""
    from torchao.quantization.utils import (
        get_groupwise_affine_qparams,
        groupwise_affine_dequantize_tensor_from_qparams,
        groupwise_affine_quantize_tensor_from_qparams,
    )

    def one(x: torch.Tensor, g: int) -> torch.Tensor:
        xb = x.to(torch.bfloat16)  # torchao quantizes the BF16 checkpoint weight
        scales, zeros = get_groupwise_affine_qparams(xb, 4, g, dtype=torch.bfloat16)
        q = groupwise_affine_quantize_tensor_from_qparams(xb, scales, zeros, 4, g)
        return groupwise_affine_dequantize_tensor_from_qparams(q, scales, zeros, 4, g).float()

    return _per_segment(w, group, one), w.numel() * 4 + _n_groups(w, group) * 32


def rotated_int4(w: torch.Tensor, block: int = 128, seed: int = 0) -> Dequantized:
    """INT4 laid over HLWQ's rotated basis (runtime "int4-rotated"): rotate each 128-block of a row (the signed
    Hadamard, seed 0), torchao's asymmetric int4 with one group per rotation block, rotate back. Applied to an HLWQ
    artifact's weights this is the rotated-INT4 runtime's weight (up to the BF16 rounding of the dequantized weight
    it starts from); the activation rotation it implies is exact."""
    from pipeline.quant import hadamard

    signs = hadamard.sign_vector(hadamard.sign_bits(block, seed), block)
    rows, cols = w.shape
    y = hadamard.rotate(w.float(), signs).reshape(rows, -1)
    q, _ = asym_minmax_int4(y, block)
    out = hadamard.unrotate(q.reshape(rows, -1, block), signs, cols)
    return out, y.numel() * 4 + _n_groups(y, block) * 32


def hqq(w: torch.Tensor, bits: int, group: int = 128) -> Dequantized:
    """HQQ (half-quadratic proximal optimization of zero/scale, calibration-free), axis=1, fp16 scale and zero."""
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)["weight_quant_params"]
    wq, meta = Quantizer.quantize(w.float(), device="cpu", compute_dtype=torch.float32, **cfg)
    meta["scale"] = meta["scale"].half().float()  # what an fp16 checkpoint of it would hold
    meta["zero"] = meta["zero"].half().float()
    deq = Quantizer.dequantize(wq, meta).reshape(w.shape).float()
    return deq, w.numel() * bits + (w.numel() // group) * 32


GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def gguf_quant(w: torch.Tensor, qtype: str) -> Dequantized:
    """llama.cpp block formats through the `gguf` package's numpy reference quantizers (block 32)."""
    from gguf import GGMLQuantizationType, quants

    t = GGMLQuantizationType[qtype]
    packed = quants.quantize(w.float().numpy(), t)
    deq = quants.dequantize(packed, t)
    return torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)).reshape(w.shape), int(packed.nbytes) * 8
