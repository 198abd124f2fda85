"""Pure HLWQ math over torch tensors (CPU or CUDA): no I/O, no logging, no config objects."""

from pipeline.quant.codec import Quantized, QuantParams, dequantize, quantize

__all__ = ["QuantParams", "Quantized", "dequantize", "quantize"]
