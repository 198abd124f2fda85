"""What a quantized tensor becomes when an artifact is loaded: one backend per runtime.

dequantize  reference-dequantized weights in the model's dtype (any device; plain nn.Linear)
int4        dequantized on the device, then torchao INT4 at once (GPU memory proof; CPU kernels for tests)
int4-rotated  torchao INT4 of the weight in the rotated basis; the activation is rotated online
native      HLWQLinear modules holding the codes; runtime "reference" (CPU, exact) or "native" (the GPU kernels)
"""

from __future__ import annotations

from pipeline.runtime.backends.dequantize import DequantizeBackend
from pipeline.runtime.backends.int4 import Int4Backend, int4_config, int4_eligible, to_int4
from pipeline.runtime.backends.native import NativeBackend

__all__ = ["DequantizeBackend", "Int4Backend", "NativeBackend", "int4_config", "int4_eligible", "to_int4"]
