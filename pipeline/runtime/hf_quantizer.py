"""The transformers integration: quant_method "hlwq" as a registered quantization config and quantizer, so that

    import hlwq
    model = AutoModelForImageTextToText.from_pretrained("ORG/model-HLWQ-Q5", device_map="cuda")

loads an artifact the way people load models (device_map, generate, processors, chat templates keep working).

Before any weight is read, the quantizer reads the shards' safetensors headers: format version, sign diagonal, per
tensor bits and shapes, which entries exist. Every quantized entry is checked against the model there, so a
corrupted artifact raises one FormatError instead of leaving random weights. Then, by runtime:
  reference / native  each quantized nn.Linear becomes an HLWQLinear; `W.hlwq_codes|scales|codebook[|smooth]` are
                      renamed onto its buffers (`codes`, `scales`, `codebook`, `smooth`): the bytes as stored
  dequantize / int4   the three entries are collected per weight and dequantized on the device (then torchao INT4
                      where the kernel takes the shape): a plain transformers model afterwards
After loading, a weight the checkpoint did not provide (transformers would initialize it at random) is a FormatError.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from pipeline import format as fmt
from pipeline.errors import FormatError
from pipeline.quant import Quantized, dequantize

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "reference", "native", "int4", "dequantize")
_REGISTERED = False


def _shard_headers(files: Iterable[str]) -> tuple[fmt.Layout, dict[str, dict[str, Any]], dict[str, list[int]]]:
    """(layout, quantized records by tensor name, every stored entry's shape) from the safetensors headers alone."""
    from safetensors import safe_open

    layout, records, stored = None, {}, {}  # type: ignore[var-annotated]
    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored |= {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        name = str(path).rsplit("/", 1)[-1]
        if fmt.METADATA_KEY not in meta:
            raise FormatError(f"{name}: not an HLWQ shard (no '{fmt.METADATA_KEY}' metadata)")
        try:
            body = json.loads(meta[fmt.METADATA_KEY])
        except json.JSONDecodeError:
            raise FormatError(f"{name}: corrupt '{fmt.METADATA_KEY}' metadata") from None
        fmt.check_version(body.get("format_version"), name)
        this = fmt.Layout(body["block_size"], body["signs"], body["scale"], body["codebook"])
        if layout is not None and (layout.block_size, layout.signs_hex) != (this.block_size, this.signs_hex):
            raise FormatError(f"{name}: block size or sign diagonal differs from the other shards")
        layout = this
        records.update(body["tensors"])
    if layout is None:
        raise FormatError("the artifact has no safetensors shards")
    return layout, records, stored


def _check_entries(records: dict[str, dict[str, Any]], stored: dict[str, list[int]], block_size: int) -> None:
    """Every quantized record has its three entries, in the shapes its bits and shape imply."""
    for name, rec in records.items():
        for entry, _, shape in fmt.quantized_plan(name, tuple(rec["shape"]), rec["bits"], block_size):
            if entry not in stored:
                raise FormatError(f"artifact lacks {entry} (quantized tensor {name})")
            if tuple(stored[entry]) != tuple(shape):
                raise FormatError(f"{entry}: shape {tuple(stored[entry])}, expected {tuple(shape)} for "
                                  f"{rec['bits']}-bit {tuple(rec['shape'])}")  # fmt: skip


class HlwqConfig(QuantizationConfigMixin):
    """config.json's quantization_config (FORMAT.md) plus the load-time choices runtime and host_embedding."""

    def __init__(self, runtime: str = "auto", host_embedding: bool = False, format_version: int = 1,
                 bits: int = 5, block_size: int = 128, modules_not_quantized: list[str] | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        self.quant_method = fmt.QUANT_METHOD  # type: ignore[assignment]
        self.runtime, self.host_embedding = runtime, host_embedding
        self.format_version, self.bits, self.block_size = format_version, bits, block_size
        self.modules_not_quantized = list(modules_not_quantized or [])
        for k, v in kwargs.items():  # the rest of the block (signs, scale, codebook, bits_overrides, ...)
            setattr(self, k, v)
        if runtime not in RUNTIMES:
            raise FormatError(f"HLWQ runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
        fmt.check_version(format_version, "config.json quantization_config")

    def get_loading_attributes(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "host_embedding": self.host_embedding}

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for k in ("runtime", "host_embedding"):  # load-time choices, not part of the artifact
            out.pop(k, None)
        return out


class HlwqDequantize(ConversionOps):
    """The three entries of one weight -> its reference dequantization (then INT4 where the runtime says)."""

    def __init__(self, hf_quantizer: Any):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str] | None = None,
                target_patterns: list[str] | None = None, full_layer_name: str | None = None,
                model: Any = None, **kwargs: Any) -> dict[str, Any]:  # fmt: skip
        assert full_layer_name is not None and model is not None
        return {full_layer_name: self.hf_quantizer.dequantize_entries(model, full_layer_name, input_dict)}


class HlwqHfQuantizer(HfQuantizer):
    requires_calibration = True  # loads HLWQ artifacts only; quantizing is `hlwq convert`'s job
    quantization_config: HlwqConfig

    def __init__(self, quantization_config: HlwqConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.records: dict[str, dict[str, Any]] = {}
        self.layout: fmt.Layout | None = None
        self.module_runtime = "reference"
        self.device = torch.device("cpu")
        self.ao_config: Any = None

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        self.device = _main_device(device_map)

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return dtype or torch.bfloat16

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        return False

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:  # fmt: skip
        from pipeline.runtime.backends.int4 import int4_config
        from pipeline.runtime.backends.native import module_runtime
        from pipeline.runtime.linear import HLWQLinear

        self.layout, self.records, stored = _shard_headers(checkpoint_files or [])
        _check_entries(self.records, stored, self.layout.block_size)
        runtime = self.quantization_config.runtime
        hlwq_modules = runtime not in ("int4", "dequantize")
        self.module_runtime = module_runtime(runtime, self.device) if hlwq_modules else runtime
        if runtime == "int4":
            self.ao_config = int4_config(self.device)
        kept = self.quantization_config.modules_not_quantized
        for name, rec in self.records.items():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in kept):
                raise FormatError(f"{name} is quantized but config.json's modules_not_quantized keeps it")
            module = _module_of(model, name)
            if type(module) is not nn.Linear:
                if hlwq_modules:
                    raise FormatError(f"{name}: quantized but not a Linear weight; load it with runtime "
                                      "'dequantize'")  # fmt: skip
                continue
            if tuple(rec["shape"]) != (module.out_features, module.in_features):
                raise FormatError(f"{name}: artifact shape {tuple(rec['shape'])} != model shape "
                                  f"{(module.out_features, module.in_features)}")  # fmt: skip
            if hlwq_modules:
                new = HLWQLinear(module.in_features, module.out_features, rec["bits"], self.layout.block_size,
                                 bias=module.bias is not None, runtime=self.module_runtime,
                                 smooth=name + fmt.SMOOTH in stored, device="meta",
                                 dtype=module.weight.dtype)  # fmt: skip
                parent, _, child = name.removesuffix(".weight").rpartition(".")
                model.get_submodule(parent).register_module(child, new)

    # `model` unused; optional because transformers 5.17 calls this hook with the conversions alone
    def update_weight_conversions(self, weight_conversions: list[Any], model: Any = None) -> list[Any]:
        if self.quantization_config.runtime in ("int4", "dequantize"):
            sources = [fmt.CODES, fmt.SCALES, fmt.CODEBOOK, fmt.SMOOTH]
            collect = WeightConverter([r"\.weight" + s.replace(".", r"\.") + "$" for s in sources], ".weight",
                                      [HlwqDequantize(self)])  # fmt: skip
            return [*weight_conversions, collect]
        ours = [WeightRenaming(r"\.weight" + s.replace(".", r"\.") + "$", "." + buf)
                for s, buf in ((fmt.CODES, "codes"), (fmt.SCALES, "scales"), (fmt.CODEBOOK, "codebook"),
                               (fmt.SMOOTH, "smooth"))]  # fmt: skip
        return [*ours, *weight_conversions]

    def dequantize_entries(self, model: Any, name: str, entries: dict[str, Any]) -> torch.Tensor:
        from pipeline.runtime.backends.int4 import int4_eligible, to_int4

        def one(suffix: str) -> torch.Tensor | None:
            for pattern, tensors in entries.items():
                if suffix.replace(".", r"\.") in pattern:
                    return tensors[0] if isinstance(tensors, list) else tensors
            return None

        rec, layout = self.records[name], self.layout
        assert layout is not None
        codes, scales, codebook = one(fmt.CODES), one(fmt.SCALES), one(fmt.CODEBOOK)
        if codes is None or scales is None or codebook is None:
            raise FormatError(f"artifact lacks an entry of quantized tensor {name}")
        q = Quantized(codes, scales, codebook, tuple(rec["shape"]), fmt.DTYPES[rec["dtype"]], rec["bits"],
                      layout.block_size, one(fmt.SMOOTH))  # fmt: skip
        module = _module_of(model, name)
        w = dequantize(q, layout.sign_bits(), module.weight.dtype)  # type: ignore[arg-type]
        if self.ao_config is not None and int4_eligible(module, "weight"):
            return to_int4(w, self.ao_config)
        return w

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from pipeline.quant.hadamard import sign_vector
        from pipeline.runtime.embedding import host_embedding
        from pipeline.runtime.linear import HLWQLinear

        assert self.layout is not None
        for m in model.modules():
            if isinstance(m, HLWQLinear):
                codes: torch.Tensor = m.codes  # type: ignore[assignment]
                m.signs = sign_vector(self.layout.sign_bits(), m.block_size, codes.device)
                if self.module_runtime == "native":
                    m.tile_for_kernels()
        _refuse_unloaded(model)
        if self.quantization_config.host_embedding:
            host_embedding(model, _head_device(model))
        return model

    def is_serializable(self) -> bool:
        return False  # save_pretrained would not write FORMAT v1; `hlwq convert` writes artifacts

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _module_of(model: Any, name: str) -> nn.Module:
    try:
        return model.get_submodule(name.removesuffix(".weight"))  # type: ignore[no-any-return]
    except AttributeError:
        raise FormatError(f"artifact tensor {name} has no place in {type(model).__name__}") from None


def _main_device(device_map: Any) -> torch.device:
    """The device the quantized linears compute on: the accelerator in the device_map if there is one."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        values = [torch.device(v if not isinstance(v, int) else f"cuda:{v}") for v in device_map.values()
                  if v != "disk"]  # fmt: skip
        cuda = [d for d in values if d.type == "cuda"]
        return cuda[0] if cuda else torch.device("cpu")
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")


def _head_device(model: Any) -> torch.device:
    return next(model.get_output_embeddings().parameters()).device  # type: ignore[no-any-return]


def _refuse_unloaded(model: Any) -> None:
    """transformers only logs missing weights and initializes them at random; here that is an error."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [
        n
        for n, t in model.state_dict(keep_vars=True).items()
        if n not in tied and not getattr(t, "_is_hf_initialized", False)
    ]
    if missing:
        raise FormatError(f"artifact lacks {len(missing)} weights of the model, e.g. {missing[0]}")


def register() -> None:
    """Register quant_method "hlwq" with transformers (idempotent). `import hlwq` calls it."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers import auto

    if fmt.QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(fmt.QUANT_METHOD)(HlwqConfig)
    if fmt.QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(fmt.QUANT_METHOD)(HlwqHfQuantizer)
    # runtime / host_embedding passed to from_pretrained must win over the artifact's config: transformers merges
    # such "loading attributes" only for the config types in this tuple (its own GPTQ, AWQ, FP8, ...).
    if HlwqConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, HlwqConfig)  # type: ignore[assignment]
    # ... and it then warns that it did what was asked; only for our attribute names.
    warnings.filterwarnings("ignore", message=r"(?s)You passed `quantization_config`.*\['runtime', 'host_embedding'\]")
    _REGISTERED = True
