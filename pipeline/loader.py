"""The companion loader: an HLWQ artifact -> a transformers model, either reference-dequantized (any device; the
model card's snippet) or as torchao INT4 on a GPU, streamed shard by shard; plus `load_check`, the figures the
load_check stage records (peak GPU memory with a filled KV cache, resident memory, decode tok/s).

The model skeleton is built from the artifact's config with its parameters on the meta device (nothing allocated),
then every tensor is materialized straight onto the target device: a quantized weight is dequantized there and, for
INT4, converted at once, so peak memory is the final model plus one weight's working set and host RAM holds one
tensor at a time. transformers never sees `quantization_config` (quant_method "hlwq" is unknown to it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import format as fmt
from pipeline.errors import FormatError
from pipeline.quant import dequantize

log = logging.getLogger(__name__)
INT4_GROUP = 128
ASSETS = Path(__file__).parent / "assets"
TEST_IMAGE = ASSETS / "test_image.png"
TEXT_PROMPT = "Describe the Eiffel Tower in one sentence."
IMAGE_PROMPT = "Describe this image."


# ---------------------------------------------------------------------------------------------------------------
# Building the skeleton


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
    raw.pop("quantization_config", None)  # transformers would look for a quantizer named "hlwq"
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


def _owner(model: Any, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name)
    except AttributeError:
        raise FormatError(f"artifact tensor {name} has no place in {type(model).__name__}") from None
    if attr not in module._parameters and attr not in module._buffers:
        raise FormatError(f"artifact tensor {name} has no place in {type(model).__name__}")
    return module, attr


def _place(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        old = module._parameters[attr]
        if old is not None and old.shape != value.shape:
            raise FormatError(f"{attr}: artifact shape {tuple(value.shape)} != model shape {tuple(old.shape)}")
        module._parameters[attr] = (
            value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        )
    else:
        module._buffers[attr] = value


def _target_dtype(module: nn.Module, attr: str, value: torch.Tensor) -> torch.dtype:
    """The skeleton's dtype for that slot (what from_pretrained would cast to); non-float tensors keep theirs."""
    old = module._parameters.get(attr, module._buffers.get(attr))
    if old is None or not value.is_floating_point() or not old.is_floating_point():
        return value.dtype
    return old.dtype


Converter = Callable[[nn.Module, str, torch.Tensor], torch.Tensor]


def _stream(model: Any, folder: Path, device: torch.device, convert: Converter | None) -> dict[str, int]:
    """Materialize every artifact tensor in place, one at a time; `convert` turns a dequantized weight into what
    the module keeps (INT4). Returns counts by kind."""
    counts = {"quantized": 0, "int4": 0, "kept": 0}
    for shard in shard_files(folder):
        reader = fmt.ShardReader(shard)
        signs = reader.layout.sign_bits()
        for name in reader.names():
            module, attr = _owner(model, name)
            if name in reader.quantized:
                q = reader.get_quantized(name, device)
                w = dequantize(q, signs, dtype=_target_dtype(module, attr, torch.empty(0, dtype=q.dtype)))
                del q
                counts["quantized"] += 1
                if convert is not None:
                    new = convert(module, attr, w)
                    counts["int4"] += new is not w
                    w = new
                _place(module, attr, w)
            else:
                t = reader.get(name, device)
                _place(module, attr, t.to(_target_dtype(module, attr, t)))
                counts["kept"] += 1
        del reader
    return counts


def _finish(model: Any, device: torch.device) -> nn.Module:
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
    if missing:
        raise FormatError(f"artifact lacks {len(missing)} weights of the model, e.g. {missing[0]}")
    return model


def load_dequantized(path_or_repo: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.bfloat16) -> nn.Module:  # fmt: skip
    """The model with the reference-dequantized weights (format.ShardReader.get), in `dtype`, on `device`."""
    folder = resolve(path_or_repo)
    config, _ = read_config(folder)
    dev = torch.device(device)
    model = build_skeleton(config, dtype)
    counts = _stream(model, folder, dev, None)
    log.info("loaded %s dequantized: %d quantized tensors, %d kept", folder.name, counts["quantized"], counts["kept"])
    return _finish(model, dev)


# ---------------------------------------------------------------------------------------------------------------
# torchao INT4


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


class HostEmbedding(nn.Module):
    """The token embedding kept in host RAM: each step gathers a few rows on the CPU and sends them to `device`.
    With a 262k vocabulary this frees 2.8 GB of GPU memory for a copy of a few KB per token."""

    def __init__(self, inner: nn.Module, device: torch.device):
        super().__init__()
        self.inner = inner.to("cpu")
        self.target = device

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight  # type: ignore[return-value]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids.to("cpu")).to(self.target)


class Int8Head(nn.Module):
    """An output layer stored as per-row symmetric int8 (float32 row scales): half the bytes of BF16. Computed in
    vocabulary chunks so the BF16 view of the weight never exists whole."""

    def __init__(self, weight: torch.Tensor, device: torch.device, chunk: int = 16384):
        super().__init__()
        w = weight.detach().to("cpu", torch.float32)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("q", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).to(device))
        self.register_buffer("scale", scale.to(device))
        self.chunk = chunk
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q: torch.Tensor = self.q  # type: ignore[assignment]
        scale: torch.Tensor = self.scale  # type: ignore[assignment]
        parts = [
            nn.functional.linear(x, q[a : a + self.chunk].to(x.dtype)) * scale[a : a + self.chunk].to(x.dtype)
            for a in range(0, self.out_features, self.chunk)
        ]
        return torch.cat(parts, dim=-1)


def host_embedding(model: Any, device: torch.device) -> nn.Module:
    """Untie the embedding from the output layer: the embedding moves to host RAM, the output layer becomes an
    int8 copy of it on `device` (saves 1.4 GB on Gemma-4-31B; the int8 error per logit is ~0.4% of a row's scale)."""
    emb = model.get_input_embeddings()
    model.set_input_embeddings(HostEmbedding(emb, device))  # BF16 copy leaves the GPU before the int8 one arrives
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model.lm_head = Int8Head(emb.weight, device)  # type: ignore[assignment]
    for cfg in (model.config, model.config.get_text_config()):
        cfg.tie_word_embeddings = False
    return model


def load_int4(path: str | Path, device: str | torch.device = "cuda", ao_config: Any = None,
              host_embed: bool = False) -> nn.Module:  # fmt: skip
    """The artifact as torchao INT4: each quantized Linear weight is dequantized on `device` and converted at once;
    kept tensors (embeddings, norms, the vision tower) are placed as stored. Linears whose shapes the INT4 kernel
    cannot take stay dequantized BF16."""
    folder = resolve(path)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cfg = ao_config if ao_config is not None else int4_config(dev)
    config, _ = read_config(folder)
    model = build_skeleton(config, torch.bfloat16)

    def convert(module: nn.Module, attr: str, w: torch.Tensor) -> torch.Tensor:
        return to_int4(w, cfg) if int4_eligible(module, attr) else w

    counts = _stream(model, folder, dev, convert)
    log.info("loaded %s as INT4: %d of %d quantized weights INT4, %d kept", folder.name, counts["int4"],
             counts["quantized"], counts["kept"])  # fmt: skip
    model = _finish(model, dev)
    if host_embed:
        host_embedding(model, dev)
    model._hlwq_counts = counts  # type: ignore[assignment]
    return model


# ---------------------------------------------------------------------------------------------------------------
# load_check: figures


def _gb(n: float) -> float:
    return round(n / 1e9, 3)


class _Memory:
    """Peak and current device memory above what was allocated when it was made (other models may be resident)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base = torch.cuda.memory_allocated(device) if self.cuda else 0
        self.device = device

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> float | None:
        return _gb(torch.cuda.max_memory_allocated(self.device) - self.base) if self.cuda else None

    def now(self) -> float | None:
        return _gb(torch.cuda.memory_allocated(self.device) - self.base) if self.cuda else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: Any) -> torch.device:
    """Where the model computes: the output layer's device (the embedding may live in host RAM)."""
    head = model.get_output_embeddings()
    ref = next(iter(head.buffers()), None) if isinstance(head, Int8Head) else None
    return ref.device if ref is not None else next(p.device for p in model.parameters())


def _text_config(model: Any) -> Any:
    return model.config.get_text_config(decoder=True)


def _safe_token_range(model: Any) -> tuple[int, int]:
    """Token ids for synthetic prompts: below every special multimodal id that sits inside the vocabulary."""
    vocab = _text_config(model).vocab_size
    keys = ("boi_token_id", "image_token_id", "eoi_token_id", "video_token_id", "audio_token_id", "boa_token_id")
    specials = [getattr(model.config, k, None) for k in keys]
    high = min([vocab, *[s for s in specials if isinstance(s, int) and 16 < s < vocab]])
    return 16, high


def synthetic_ids(model: Any, n: int, seed: int = 0) -> torch.Tensor:
    lo, hi = _safe_token_range(model)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (1, n), generator=g)


def _greedy(model: Any, new_tokens: int, **inputs: Any) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          top_p=None, top_k=None, temperature=None)  # fmt: skip


def _tokenizer(folder: Path) -> Any | None:
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def text_answer(model: Any, folder: Path, new_tokens: int = 16) -> dict[str, Any]:
    dev = _device_of(model)
    tok = _tokenizer(folder)
    if tok is not None:
        ids = tok(TEXT_PROMPT, return_tensors="pt").input_ids
    else:  # no tokenizer shipped (a synthetic artifact): a fixed token prompt
        ids = synthetic_ids(model, 16, seed=1)
    out = _greedy(model, new_tokens, input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev))
    new = out[0, ids.shape[1] :].tolist()
    return {"prompt": TEXT_PROMPT if tok is not None else None, "ids": new,
            "text": tok.decode(new, skip_special_tokens=True) if tok is not None else None}  # fmt: skip


def _image_inputs(model: Any, folder: Path, image: Any) -> dict[str, torch.Tensor]:
    """Prompt + image through the artifact's processor when it ships one; else the model's own image processor
    settings and a hand-built token layout (bos, text, boi, image tokens, eoi)."""
    cfg = model.config
    if (folder / "processor_config.json").exists() or (folder / "preprocessor_config.json").exists():
        from transformers import AutoProcessor

        with contextlib.suppress(Exception):  # a processor that cannot be built falls through to the manual layout
            proc = AutoProcessor.from_pretrained(folder)
            text = f"{proc.tokenizer.bos_token or ''}{IMAGE_PROMPT} {proc.image_token}"
            return dict(proc(text=[text], images=[image], return_tensors="pt"))
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    vc = cfg.vision_config
    proc = Gemma4ImageProcessorPil(patch_size=vc.patch_size, pooling_kernel_size=vc.pooling_kernel_size,
                                   max_soft_tokens=280 if vc.hidden_size >= 512 else 70)  # fmt: skip
    px = proc(images=[image], return_tensors="pt")
    n = int(px["num_soft_tokens_per_image"][0])
    bos = _text_config(model).bos_token_id
    prompt = synthetic_ids(model, 8, seed=2)[0].tolist()
    ids = torch.tensor([[bos, *prompt, cfg.boi_token_id, *[cfg.image_token_id] * n, cfg.eoi_token_id, *prompt[:3]]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": px["pixel_values"],
        "image_position_ids": px["image_position_ids"],
        "mm_token_type_ids": (ids == cfg.image_token_id).long(),
    }


def image_answer(model: Any, folder: Path, new_tokens: int = 16) -> dict[str, Any]:
    from PIL import Image

    dev = _device_of(model)
    with Image.open(TEST_IMAGE) as im:
        image = im.convert("RGB")
    inputs = _image_inputs(model, folder, image)
    dtype = model.get_input_embeddings().weight.dtype
    inputs = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()
              if isinstance(v, torch.Tensor)}  # fmt: skip
    inputs.pop("num_soft_tokens_per_image", None)
    out = _greedy(model, new_tokens, **inputs)
    tok = _tokenizer(folder)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return {"image": TEST_IMAGE.name, "prompt_tokens": int(inputs["input_ids"].shape[1]), "ids": new,
            "text": tok.decode(new, skip_special_tokens=True) if tok is not None else None}  # fmt: skip


def _cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def fill_context(model: Any, context_tokens: int, new_tokens: int = 32, chunk: int | None = 512,
                 seed: int = 3) -> dict[str, Any]:  # fmt: skip
    """Prefill a (context_tokens - new_tokens)-token prompt, then greedy-generate new_tokens: the KV cache ends
    holding context_tokens positions. chunk: prefill in chunks of that many tokens (None: one forward, as plain
    `generate` does). Only the last position's logits are ever computed."""
    from transformers import DynamicCache

    dev = _device_of(model)
    prompt = max(1, context_tokens - new_tokens)
    ids = synthetic_ids(model, prompt, seed).to(dev)
    cache = DynamicCache(config=_text_config(model))
    t0 = time.perf_counter()
    if chunk is not None:
        # All but the last prompt token go in chunks; generate then feeds the last one and decodes.
        for part in torch.split(ids[:, :-1], chunk, dim=1):
            model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1)
    out = _greedy(model, new_tokens, input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache)
    _sync(dev)
    return {"context_tokens": int(out.shape[1]), "prefill_chunk": chunk, "seconds": round(time.perf_counter() - t0, 3),
            "kv_cache_gb": _gb(_cache_bytes(cache))}  # fmt: skip


def decode_speed(model: Any, tokens: int = 64, prompt: int = 32, static: bool = False,
                 repeats: int = 3) -> dict[str, Any]:  # fmt: skip
    """Batch-1 greedy decode tok/s: (t(8 + tokens) - t(8)) over `tokens`, so prefill cancels out; median of repeats.
    static: HF's static cache, whose decode step `generate` compiles (torch.compile, CUDA graphs)."""
    dev = _device_of(model)
    ids = synthetic_ids(model, prompt, seed=4).to(dev)
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if static:
        kw["cache_implementation"] = "static"
    t_warm = time.perf_counter()
    for _ in range(2 if static else 1):  # warm-up: compilation (static) and kernel autotuning happen here
        _greedy(model, 8 + tokens, **kw)
    _sync(dev)
    warmup = time.perf_counter() - t_warm

    def timed(n: int) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        _greedy(model, n, **kw)
        _sync(dev)
        return time.perf_counter() - t0

    rates = []
    for _ in range(repeats):
        short, long = timed(8), timed(8 + tokens)
        rates.append(tokens / max(long - short, 1e-9))
    return {"tok_s": round(statistics.median(rates), 2), "runs": [round(r, 2) for r in rates],
            "warmup_s": round(warmup, 1), "tokens": tokens, "prompt_tokens": prompt}  # fmt: skip


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "torchao", "hlwq", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if out["hlwq"] is None:  # a source checkout that was not pip-installed
        from pipeline import __version__

        out["hlwq"] = __version__
    out["cuda"] = torch.version.cuda
    return out


def measure(model: Any, folder: Path, memory: _Memory, context_tokens: int = 4096, compiled: bool = True,
            chunk: int | None = 512, deadline: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Figures for a loaded model: answers, peak memory without and with a filled KV cache, decode speed."""
    fig: dict[str, Any] = {"resident_gb": memory.now()}
    memory.reset_peak()
    fig["text_answer"] = text_answer(model, folder)
    if getattr(model.config, "vision_config", None) is not None:
        fig["image_answer"] = image_answer(model, folder)
    fig["peak_vram_no_cache_gb"] = memory.peak()
    memory.reset_peak()
    fig["context"] = fill_context(model, context_tokens, chunk=chunk)
    fig["peak_vram_context_gb"] = memory.peak()
    eager = decode_speed(model, tokens=32, repeats=2, static=False)
    fig["decode_eager"] = eager
    fig["decode_tok_s_eager"] = eager["tok_s"]
    fig["decode_tok_s"], fig["decode_mode"] = eager["tok_s"], "eager (HF generate, dynamic cache)"
    if compiled:
        compiled_decode(model, fig, deadline)
    return fig


def compiled_decode(model: Any, fig: dict[str, Any], deadline: float | None = None) -> None:
    """Adds HF's compiled static-cache decode speed to `fig` (CUDA only; a failure or no time is recorded)."""
    if _device_of(model).type != "cuda":
        fig["decode_compiled"] = {"error": "skipped: no CUDA device"}
    elif deadline is not None and time.monotonic() > deadline:
        fig["decode_compiled"] = {"error": "skipped: out of time budget before the compile warm-up"}
    else:
        try:
            comp = decode_speed(model, static=True)
            fig["decode_compiled"] = comp
            fig["decode_tok_s"], fig["decode_mode"] = comp["tok_s"], "HF static cache, compiled (CUDA graphs)"
        except Exception as e:  # a compile failure is a figure to report, not a failed check
            fig["decode_compiled"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log.warning("compiled decode failed: %s", fig["decode_compiled"]["error"])


def load_and_measure(artifact_dir: str | Path, runtime: str = "int4", context_tokens: int = 4096, *,
                     device: str | torch.device | None = None, compiled: bool = True, chunk: int | None = 512,
                     deadline: float | None = None,
                     host_embed: bool = False) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """load_check's work, returning the loaded model too (the 31B bench measures more on it)."""
    folder = resolve(artifact_dir)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = _Memory(dev)
    memory.reset_peak()
    t0 = time.perf_counter()
    model = load_int4(folder, dev, host_embed=host_embed) if runtime == "int4" else load_dequantized(folder, dev)
    _sync(dev)
    load_s = time.perf_counter() - t0
    fig: dict[str, Any] = {"runtime": runtime, "host_embedding": host_embed and runtime == "int4",
                           "load_s": round(load_s, 2), "peak_vram_load_gb": memory.peak()}  # fmt: skip
    fig.update(measure(model, folder, memory, context_tokens, compiled, chunk, deadline))
    if memory.cuda:
        fig["peak_vram_gb"] = max(fig["peak_vram_load_gb"], fig["peak_vram_no_cache_gb"], fig["peak_vram_context_gb"])
        fig["peak_vram_no_cache_gb"] = max(fig["peak_vram_load_gb"], fig["peak_vram_no_cache_gb"])
    else:
        fig["peak_vram_gb"] = None
    fig["int4_weights"] = getattr(model, "_hlwq_counts", {}).get("int4")
    fig["gpu"] = torch.cuda.get_device_name(dev) if memory.cuda else None
    fig["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    fig["versions"] = versions()
    fig["params"] = sum(math.prod(p.shape) for p in model.parameters())
    return model, fig


def load_check(artifact_dir: str | Path, runtime: str = "int4", context_tokens: int = 4096, *,
               device: str | torch.device | None = None, compiled: bool = True, chunk: int | None = 512,
               deadline: float | None = None, host_embed: bool = False) -> dict[str, Any]:  # fmt: skip
    """Load the artifact (INT4 or dequantized BF16) and measure it; peak_vram_gb covers the load and a generate
    that fills a context_tokens KV cache (torch.cuda.max_memory_allocated, above what was allocated before)."""
    model, fig = load_and_measure(artifact_dir, runtime, context_tokens, device=device, compiled=compiled,
                                  chunk=chunk, deadline=deadline, host_embed=host_embed)  # fmt: skip
    del model
    return fig
