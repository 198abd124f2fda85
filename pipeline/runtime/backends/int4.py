"""Runtime "int4": each quantized Linear weight is dequantized on the device and turned at once into torchao INT4
(group 128); weights the INT4 kernel cannot take stay dequantized. The path of the 22 GB proof (README)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.runtime.backends.dequantize import DequantizeBackend

INT4_GROUP = 128


def int4_config(device: torch.device) -> Any:
    """Int4WeightOnlyConfig (tinygemm tile-packed) on CUDA; on the CPU, where that config has no kernel, torchao's
    IntxWeightOnlyConfig int4 per-group-128 (the same weight grid, CPU kernels)."""
    if device.type == "cuda":
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d")
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))  # type: ignore[attr-defined]


def int4_eligible(module: nn.Module, attr: str) -> bool:
    """A Linear weight whose input width is a multiple of the group (every Gemma-4 text Linear; not the tiny
    model's 320-wide inputs, which stay BF16)."""
    return (
        type(module) is nn.Linear and attr == "weight" and module.in_features % INT4_GROUP == 0
        and module.out_features % 8 == 0
    )  # fmt: skip


def to_int4(weight: torch.Tensor, ao_config: Any) -> torch.Tensor:
    """One dense weight -> a torchao INT4 weight Parameter, on the weight's device."""
    from torchao.quantization import quantize_

    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(lin, ao_config)
    return lin.weight


class Int4Backend(DequantizeBackend):
    name = "int4"

    def __init__(self, ao_config: Any):
        self.ao_config = ao_config

    def convert(self, module: nn.Module, attr: str, w: torch.Tensor) -> torch.Tensor:
        return to_int4(w, self.ao_config) if int4_eligible(module, attr) else w
