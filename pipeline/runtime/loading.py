"""Our own loader: build the skeleton, stream the shards through one backend, finish. The transformers route
(`from_pretrained` through the registered quantizer, hf_quantizer.py) gives the same modules."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import FormatError
from pipeline.runtime import skeleton
from pipeline.runtime.backends import DequantizeBackend, Int4Backend, NativeBackend, int4_config
from pipeline.runtime.backends.int4_rotated import Int4RotatedBackend
from pipeline.runtime.backends.native import module_runtime
from pipeline.runtime.embedding import host_embedding as untie_to_host

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "reference", "native", "int4", "int4-rotated", "dequantize")
ALIASES = {"bf16": "dequantize"}  # the manifest's load_check.runtime name for dequantized BF16


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def load(path_or_repo: str | Path, runtime: str = "auto", device: str | torch.device = "cpu", *,
         host_embedding: bool = False, dtype: torch.dtype = torch.bfloat16, ao_config: Any = None,
         revision: str | None = None) -> nn.Module:  # fmt: skip
    """An HLWQ artifact (folder or Hub repo id) as a transformers model on `device`.

    runtime: "reference" / "native" (HLWQLinear modules holding the codes; native = the GPU kernels, on another
    device it falls back to reference with a log line), "auto" (native on CUDA where the kernels are installed,
    else reference), "int4" (torchao INT4 of the dequantized weight), "int4-rotated" (torchao INT4 of the weight in
    the rotated basis, activations rotated online), "dequantize" (plain Linears, reference-dequantized weights).
    host_embedding: the token embedding in host RAM and an int8 output layer (see embedding.py).
    """
    runtime = ALIASES.get(runtime, runtime)
    if runtime not in RUNTIMES:
        raise FormatError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    folder = skeleton.resolve(path_or_repo, revision)
    dev = _device(device)
    backend: skeleton.Backend
    if runtime == "dequantize":
        backend = DequantizeBackend()
    elif runtime == "int4":
        backend = Int4Backend(ao_config if ao_config is not None else int4_config(dev))
    elif runtime == "int4-rotated":
        backend = Int4RotatedBackend(ao_config if ao_config is not None else int4_config(dev))
    else:
        backend = NativeBackend(module_runtime(runtime, dev))
    config, _ = skeleton.read_config(folder)
    model = skeleton.build_skeleton(config, dtype)
    counts = skeleton.stream(model, folder, dev, backend)
    log.info("loaded %s (%s): %s", folder.name, runtime, ", ".join(f"{v} {k}" for k, v in counts.items()))
    model = skeleton.finish(model, dev)
    if host_embedding:
        untie_to_host(model, dev)
    model._hlwq_counts = counts  # type: ignore[assignment]
    return model


def load_dequantized(path_or_repo: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.bfloat16) -> nn.Module:  # fmt: skip
    """The model with the reference-dequantized weights (format.ShardReader.get), in `dtype`, on `device`."""
    return load(path_or_repo, "dequantize", device, dtype=dtype)


def load_int4(path: str | Path, device: str | torch.device = "cuda", ao_config: Any = None,
              host_embed: bool = False) -> nn.Module:  # fmt: skip
    """The artifact as torchao INT4: each quantized Linear weight is dequantized on `device` and converted at once;
    kept tensors (embeddings, norms, the vision tower) are placed as stored. Linears whose shapes the INT4 kernel
    cannot take stay dequantized BF16."""
    return load(path, "int4", device, host_embedding=host_embed, ao_config=ao_config)
