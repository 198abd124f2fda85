"""`import hlwq` + transformers' from_pretrained on the tiny artifact (CPU): the same model as our own loader, bit for
bit, for every runtime; generate on text and image+text; one FormatError for a corrupted artifact; and the trap
(no import: transformers only warns and leaves the quantized Linears random) shown in a fresh process."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hlwq
from pipeline import runtime
from pipeline.errors import FormatError

PROMPT = torch.tensor([[2, 10, 11, 12, 13, 40, 41]])
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tiny_src: Path, tiny_artifact: Path) -> tuple[Path, Path]:
    """(source BF16 checkpoint, its 5-bit artifact): the session's tiny pair (tests/conftest.py)."""
    return tiny_src, tiny_artifact


def _from_pretrained(path: Path | str, **kw: Any) -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, **kw)


def _logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=PROMPT).logits  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def dequantized(tiny: tuple[Path, Path]) -> Any:
    return runtime.load_dequantized(tiny[1])


def test_reference_runtime_is_bit_identical_to_load_dequantized(tiny: tuple[Path, Path], dequantized: Any) -> None:
    """HLWQLinear's reference forward dequantizes with the codec function load_dequantized uses, into the same
    dtype, then F.linear: the logits are equal bit for bit (no tolerance needed)."""
    model = _from_pretrained(tiny[1], device_map="cpu")
    layers = [m for m in model.modules() if isinstance(m, runtime.HLWQLinear)]
    assert len(layers) == dequantized._hlwq_counts["quantized"]
    assert {m.runtime for m in layers} == {"reference"}  # "auto" without CUDA
    assert torch.equal(_logits(model), _logits(dequantized))
    assert model.config.quantization_config.quant_method == "hlwq"
    ours = dict(dequantized.named_parameters())
    kept = {n: p for n, p in model.named_parameters() if ".layers." not in n or "norm" in n}
    assert kept and all(torch.equal(p, ours[n]) for n, p in kept.items())  # kept tensors load as stored


@pytest.mark.parametrize("rt", ["dequantize", "int4"])
def test_other_runtimes_match_our_loader(tiny: tuple[Path, Path], rt: str) -> None:
    model = _from_pretrained(tiny[1], device_map="cpu", quantization_config=hlwq.HlwqConfig(runtime=rt))
    assert not any(isinstance(m, runtime.HLWQLinear) for m in model.modules())
    assert torch.equal(_logits(model), _logits(runtime.load(tiny[1], rt)))


def test_generate_text_and_image(tiny: tuple[Path, Path], dequantized: Any) -> None:
    model = _from_pretrained(tiny[1], device_map="cpu")
    with torch.inference_mode():
        kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
        assert torch.equal(model.generate(input_ids=PROMPT, **kw), dequantized.generate(input_ids=PROMPT, **kw))
    answer = runtime.image_answer(model, tiny[1], new_tokens=3)
    assert len(answer["ids"]) == 3 and answer["prompt_tokens"] > 70
    assert answer == runtime.image_answer(dequantized, tiny[1], new_tokens=3)


def test_host_embedding_through_from_pretrained(tiny: tuple[Path, Path]) -> None:
    config = hlwq.HlwqConfig(runtime="int4", host_embedding=True)
    model = _from_pretrained(tiny[1], device_map="cpu", quantization_config=config)
    assert isinstance(model.get_input_embeddings(), runtime.HostEmbedding)
    assert isinstance(model.lm_head, runtime.Int8Head)
    ours = runtime.load(tiny[1], "int4", host_embedding=True)
    assert torch.equal(_logits(model), _logits(ours))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for hosts without CUDA")
def test_native_without_cuda_falls_back_to_reference(tiny: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.runtime"):
        model = _from_pretrained(tiny[1], device_map="cpu", quantization_config=hlwq.HlwqConfig(runtime="native"))
    assert {m.runtime for m in model.modules() if isinstance(m, runtime.HLWQLinear)} == {"reference"}
    assert caplog.text.count("runtime 'native' needs a CUDA device") == 1


def test_quantizing_a_float_model_is_refused(tiny: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="pre-quantized"):
        _from_pretrained(tiny[0], quantization_config=hlwq.HlwqConfig())


# ---------------------------------------------------------------------------------------------- corrupted artifacts


def _rewrite_shard(path: Path, edit: Any) -> None:
    """Rewrite one shard after `edit(tensors, hlwq_metadata)` changed them in place."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    body = json.loads(meta["hlwq"])
    edit(tensors, body)
    meta["hlwq"] = json.dumps(body)
    save_file(tensors, str(path), metadata=meta)


def _first_quantized(body: dict[str, Any]) -> str:
    return sorted(body["tensors"])[0]


def _drop_shard(art: Path) -> None:
    index = json.loads((art / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != last}
    (art / "model.safetensors.index.json").write_text(json.dumps(index))


def _config_version(art: Path) -> None:
    cfg = json.loads((art / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (art / "config.json").write_text(json.dumps(cfg))


def _wider_mlp(art: Path) -> None:
    cfg = json.loads((art / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] += 128
    (art / "config.json").write_text(json.dumps(cfg))


def _keep_mlp(art: Path) -> None:
    cfg = json.loads((art / "config.json").read_text())
    cfg["quantization_config"]["modules_not_quantized"].append("*mlp*")
    (art / "config.json").write_text(json.dumps(cfg))


def _shard(art: Path) -> Path:
    return sorted(art.glob("*.safetensors"))[0]


CORRUPTIONS = {
    "shard missing from the index": (_drop_shard, "artifact lacks .* weights"),
    "config format_version": (_config_version, "format_version 99"),
    "shard format_version": (lambda a: _rewrite_shard(_shard(a), lambda t, b: b.update(format_version=99)),
                             "format_version 99"),
    "missing scales": (lambda a: _rewrite_shard(_shard(a), lambda t, b: t.pop(_first_quantized(b) + ".hlwq_scales")),
                       "lacks .*hlwq_scales"),
    "codes of other bits": (lambda a: _rewrite_shard(_shard(a), lambda t, b: b["tensors"][_first_quantized(b)]
                                                     .update(bits=4)), "hlwq_codes: shape"),
    "config keeps a quantized tensor": (_keep_mlp, "quantized but config.json's modules_not_quantized keeps it"),
    "config unlike the shards": (_wider_mlp, r"mlp\.\w+_proj\.weight: artifact shape .* != model shape"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_artifact_is_one_format_error(tiny: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    corrupt, message = CORRUPTIONS[case]
    art = tmp_path / "art"
    shutil.copytree(tiny[1], art)
    corrupt(art)
    with pytest.raises(FormatError, match=message):
        _from_pretrained(art, device_map="cpu")


# ---------------------------------------------------------------------------------------------- the trap


def test_without_the_import_transformers_only_warns(tiny: tuple[Path, Path]) -> None:
    """Why every snippet of ours starts with `import hlwq`: transformers 5 skips an unknown quant_method with a
    warning and initializes the quantized Linears at random. If this ever starts to raise, the trap is gone."""
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(tiny[1])!r})\n"
        "print('HLWQ_REGISTERED', 'hlwq' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HLWQ_REGISTERED False" in proc.stdout
    assert "Unknown quantization type, got hlwq" in proc.stderr and "MISSING" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rt", ["dequantize", "int4", "reference"])
def test_from_pretrained_on_gpu_matches_our_loader(tiny: tuple[Path, Path], rt: str) -> None:
    """device_map="cuda": the quantized entries are dequantized (or kept as codes) on the GPU, as our loader does."""
    model = _from_pretrained(tiny[1], device_map="cuda", quantization_config=hlwq.HlwqConfig(runtime=rt))
    ours = runtime.load(tiny[1], rt, "cuda")
    with torch.inference_mode():
        ids = PROMPT.to("cuda")
        assert torch.equal(model(input_ids=ids).logits, ours(input_ids=ids).logits)
