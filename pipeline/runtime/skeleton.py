"""An artifact folder -> a transformers model skeleton with parameters on the meta device, then every tensor
streamed onto the target device one at a time. What a quantized tensor becomes is the backend's choice
(pipeline.runtime.backends): dequantized BF16, torchao INT4, or an HLWQLinear holding the codes.

Host RAM holds one tensor at a time and device memory the final model plus one weight's working set.
transformers never sees `quantization_config` here (this path does not need the registered quantizer).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import format as fmt
from pipeline.errors import FormatError
from pipeline.quant import Quantized


def resolve(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local artifact folder as is; anything else is taken as a Hub repo id and downloaded (cached)."""
    p = Path(path_or_repo)
    if p.is_dir():
        return p
    if p.exists() or str(path_or_repo).count("/") != 1:
        raise FormatError(f"{path_or_repo}: not an artifact folder nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_repo), revision=revision))


def read_config(folder: Path) -> tuple[Any, dict[str, Any]]:
    """(transformers config without quantization_config, the HLWQ quantization_config)."""
    from transformers import AutoConfig

    qc = fmt.read_quantization_config(folder / "config.json")
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("quantization_config", None)  # this path places the tensors itself
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise FormatError(f"{folder / 'config.json'}: no model_type")
    return AutoConfig.for_model(model_type, **raw), qc


def model_class(config: Any) -> type[nn.Module]:
    """The class named in config.architectures when transformers has it, else the Auto mapping (never remote code)."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    )

    for mapping in (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING):
        if type(config) in mapping:
            return mapping[type(config)]  # type: ignore[return-value]
    raise FormatError(f"no transformers model class for model_type {config.model_type!r}")


@contextlib.contextmanager
def _params_on_meta(dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created on the meta device (no memory, no init cost); buffers stay real, on the CPU, because
    some (rotary frequencies, embedding scales) are computed at construction and are not in the checkpoint."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)

    old_dtype = torch.get_default_dtype()
    nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
        torch.set_default_dtype(old_dtype)


def build_skeleton(config: Any, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    cls = model_class(config)
    with _params_on_meta(dtype):
        model = cls(config)
    return model.eval()


def shard_files(folder: Path) -> list[Path]:
    index = folder / fmt.INDEX_NAME
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not names:
        raise FormatError(f"{folder}: no safetensors shards")
    return [folder / n for n in names]


def owner(model: Any, name: str) -> tuple[nn.Module, str]:
    """The module and attribute name an artifact tensor belongs to; FormatError when the model has no such slot."""
    mod_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name)
    except AttributeError:
        raise FormatError(f"artifact tensor {name} has no place in {type(model).__name__}") from None
    if attr not in module._parameters and attr not in module._buffers:
        raise FormatError(f"artifact tensor {name} has no place in {type(model).__name__}")
    return module, attr


def place(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        old = module._parameters[attr]
        if old is not None and old.shape != value.shape:
            raise FormatError(f"{attr}: artifact shape {tuple(value.shape)} != model shape {tuple(old.shape)}")
        module._parameters[attr] = (
            value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        )
    else:
        module._buffers[attr] = value


def target_dtype(module: nn.Module, attr: str, value: torch.Tensor) -> torch.dtype:
    """The skeleton's dtype for that slot (what from_pretrained would cast to); non-float tensors keep theirs."""
    old = module._parameters.get(attr, module._buffers.get(attr))
    if old is None or not value.is_floating_point() or not old.is_floating_point():
        return value.dtype
    return old.dtype


class Backend:
    """What a quantized tensor becomes. `place_quantized` puts it into the model and returns the kind it placed
    ("dequantize" where it kept a dequantized weight, else its own name: the keys of the counts)."""

    name = "base"

    def place_quantized(self, model: Any, name: str, q: Quantized, signs: list[int] | None) -> str:
        """`q` carries its FORMAT v2 smoothing vector (q.smooth) when it has one."""
        raise NotImplementedError


def stream(model: Any, folder: Path, device: torch.device, backend: Backend) -> dict[str, int]:
    """Materialize every artifact tensor in place, one at a time. Returns counts by kind."""
    counts: dict[str, int] = {"quantized": 0, "kept": 0, backend.name: 0}
    for shard in shard_files(folder):
        reader = fmt.ShardReader(shard)
        signs = reader.layout.sign_bits()
        for name in reader.names():  # a quantized tensor's smoothing vector comes with it (q.smooth)
            if name in reader.quantized:
                q = reader.get_quantized(name, device)
                kind = backend.place_quantized(model, name, q, signs)
                counts["quantized"] += 1
                counts[kind] = counts.get(kind, 0) + 1
            else:
                module, attr = owner(model, name)
                t = reader.get(name, device)
                place(module, attr, t.to(target_dtype(module, attr, t)))
                counts["kept"] += 1
        del reader
    return counts


def finish(model: Any, device: torch.device) -> nn.Module:
    """Move the constructed buffers, re-tie tied weights, and refuse a model with a weight the artifact lacked."""
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
        model.config.get_text_config(), "tie_word_embeddings", False
    ):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise FormatError(f"artifact lacks {len(missing)} weights of the model, e.g. {missing[0]}")
    return model
