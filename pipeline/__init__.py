"""HLWQ: Hadamard-Lloyd weight quantization, an offline, resumable BF16 -> 5-bit conversion pipeline."""

__version__ = "0.1.0"
