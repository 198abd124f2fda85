"""The HLWQ runtime: load an artifact into a transformers model and run it.

    from pipeline.runtime import load
    model = load("ORG/repo-or-folder", runtime="auto", device="cuda")

Rooms: skeleton (config -> meta-device model, shard streaming), backends/ (what a quantized tensor becomes:
dequantize, int4, native), linear (HLWQLinear), hf_quantizer (the transformers `from_pretrained` integration;
`import hlwq` registers it), embedding (host-RAM embedding, int8 head), probes / measure / check (load_check
figures), loading (load and its two historical shorthands). What runs them: kernels/ (the GPU kernels, imported
lazily), decode (lean decode loop), kv_cache, engine (chat).
"""

from pipeline.runtime.backends import int4_config, int4_eligible, to_int4
from pipeline.runtime.check import load_and_measure, load_check
from pipeline.runtime.embedding import HostEmbedding, Int8Head, host_embedding
from pipeline.runtime.hf_quantizer import HlwqConfig, register
from pipeline.runtime.linear import HLWQLinear
from pipeline.runtime.loading import RUNTIMES, load, load_dequantized, load_int4
from pipeline.runtime.measure import Memory, compiled_decode, decode_speed, fill_context, measure, versions
from pipeline.runtime.probes import TEST_IMAGE, image_answer, synthetic_ids, text_answer
from pipeline.runtime.skeleton import build_skeleton, model_class, read_config, resolve

register()  # whoever uses our runtime can also from_pretrained an artifact (quant_method "hlwq")

__all__ = [
    "RUNTIMES",
    "TEST_IMAGE",
    "HLWQLinear",
    "HlwqConfig",
    "HostEmbedding",
    "Int8Head",
    "Memory",
    "build_skeleton",
    "compiled_decode",
    "decode_speed",
    "fill_context",
    "host_embedding",
    "image_answer",
    "int4_config",
    "int4_eligible",
    "load",
    "load_and_measure",
    "load_check",
    "load_dequantized",
    "load_int4",
    "measure",
    "model_class",
    "read_config",
    "register",
    "resolve",
    "synthetic_ids",
    "text_answer",
    "to_int4",
    "versions",
]
