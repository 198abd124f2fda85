"""Our own loader on the CPU: the tiny artifact loads (dequantized BF16, torchao int4 and HLWQLinear modules through
the same streaming code) and generates exactly what a reference built independently from the dequantized weights
does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import runtime
from pipeline.errors import FormatError
from pipeline.format import ShardReader

NEW_TOKENS = 12
PROMPT = torch.tensor([[2, 10, 11, 12, 13, 40, 41]])


@pytest.fixture(scope="module")
def tiny(tiny_src: Path, tiny_artifact: Path) -> tuple[Path, Path]:
    """(source BF16 checkpoint, its 5-bit artifact): the session's tiny pair (tests/conftest.py)."""
    return tiny_src, tiny_artifact


def _reference(src: Path, artifact: Path) -> torch.nn.Module:
    """The source model with every weight replaced by ShardReader.get (the format's reference dequantization)."""
    from transformers import Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration.from_pretrained(src, dtype=torch.bfloat16).eval()
    state = {}
    for shard in sorted(artifact.glob("*.safetensors")):
        reader = ShardReader(shard)
        state.update({n: reader.get(n) for n in reader.names()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def _greedy(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids=PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def test_dequantized_matches_reference(tiny: tuple[Path, Path]) -> None:
    src, artifact = tiny
    model = runtime.load_dequantized(artifact)
    ref = _reference(src, artifact)
    # Same weights bit for bit, tied head included, then the same greedy tokens and logits.
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    for name, t in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    out = _greedy(model)
    assert out.shape[1] == PROMPT.shape[1] + NEW_TOKENS
    assert torch.equal(out, _greedy(ref))
    with torch.inference_mode():
        assert torch.equal(model(input_ids=PROMPT).logits, ref(input_ids=PROMPT).logits)
    # The quantization is visible: the source weights give other logits.
    from transformers import Gemma4ForConditionalGeneration

    orig = Gemma4ForConditionalGeneration.from_pretrained(src, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        assert not torch.equal(model(input_ids=PROMPT).logits, orig(input_ids=PROMPT).logits)


def test_int4_streams_like_quantizing_the_dequantized_model(tiny: tuple[Path, Path]) -> None:
    """load_int4 (CPU: IntxWeightOnlyConfig int4, group 128) equals quantize_ applied to the reference model."""
    from torchao.quantization import quantize_

    src, artifact = tiny
    model = runtime.load_int4(artifact, "cpu")
    counts = model._hlwq_counts
    assert counts["int4"] > 0 and counts["quantized"] > counts["int4"]  # 320-wide inputs stay BF16
    ref = _reference(src, artifact)
    quantize_(ref, runtime.int4_config(torch.device("cpu")),
              filter_fn=lambda m, fqn: "language_model" in fqn and runtime.int4_eligible(m, "weight"))  # fmt: skip
    with torch.inference_mode():
        assert torch.equal(model(input_ids=PROMPT).logits, ref(input_ids=PROMPT).logits)


def test_reference_runtime_keeps_codes_and_matches_dequantized(tiny: tuple[Path, Path]) -> None:
    """runtime "reference": every quantized Linear is an HLWQLinear holding the stored bytes; since its forward
    dequantizes with the same codec function into the same dtype, logits equal the dequantized model's bit for bit."""
    _, artifact = tiny
    model = runtime.load(artifact, "reference")
    deq = runtime.load_dequantized(artifact)
    hl = [m for m in model.modules() if isinstance(m, runtime.HLWQLinear)]
    assert len(hl) == model._hlwq_counts["hlwq"] == model._hlwq_counts["quantized"] > 0
    assert all(m.runtime == "reference" and m.codes.dtype == torch.uint8 for m in hl)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=PROMPT).logits, deq(input_ids=PROMPT).logits)


def test_host_embedding_unties_to_host_and_int8_head(tiny: tuple[Path, Path]) -> None:
    """host_embed moves the embedding to host RAM and makes the output layer int8; logits barely move."""
    _, artifact = tiny
    base = runtime.load_int4(artifact, "cpu")
    model = runtime.load_int4(artifact, "cpu", host_embed=True)
    assert isinstance(model.get_input_embeddings(), runtime.HostEmbedding)
    assert isinstance(model.lm_head, runtime.Int8Head) and model.lm_head.q.dtype == torch.int8
    assert not model.config.get_text_config().tie_word_embeddings
    with torch.inference_mode():
        a, b = base(input_ids=PROMPT).logits.float(), model(input_ids=PROMPT).logits.float()
    assert not torch.equal(a, b)  # the head really is a different (int8) layer
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.9999
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_context_fill_and_image_prompt(tiny: tuple[Path, Path]) -> None:
    _, artifact = tiny
    model = runtime.load_dequantized(artifact)
    ctx = runtime.fill_context(model, 160, new_tokens=8, chunk=64)
    assert ctx["context_tokens"] == 160
    # Chunked prefill gives the same continuation as one forward.
    ids = runtime.synthetic_ids(model, 152, seed=3)
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.inference_mode():
        for part in torch.split(ids[:, :-1], 64, dim=1):
            model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1)
        chunked = model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=8, min_new_tokens=8,
                                 do_sample=False)  # fmt: skip
    assert torch.equal(plain, chunked)
    answer = runtime.image_answer(model, artifact, new_tokens=4)
    assert len(answer["ids"]) == 4 and answer["prompt_tokens"] > 70  # 70 soft image tokens in the prompt
    assert runtime.TEST_IMAGE.stat().st_size < 20_000


def test_unknown_quant_method_and_missing_weights(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    _, artifact = tiny
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="quant_method"):
        runtime.load_dequantized(bad)
    cfg["quantization_config"]["quant_method"] = "hlwq"
    (bad / "config.json").write_text(json.dumps(cfg))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != first}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="lacks"):
        runtime.load_dequantized(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_check_on_gpu(tiny: tuple[Path, Path]) -> None:
    _, artifact = tiny
    fig = runtime.load_check(artifact, "int4", context_tokens=256, compiled=False)
    assert fig["peak_vram_gb"] >= fig["resident_gb"] > 0 and fig["decode_tok_s_eager"] > 0


def test_int4_rotated_loads_every_quantized_linear(tiny: tuple[Path, Path]) -> None:
    """int4-rotated takes every quantized Linear (the rotation pads 320-wide inputs to whole 128-blocks, so none
    stays BF16) and generates finite logits near the reference's."""
    src, artifact = tiny
    model = runtime.load(artifact, "int4-rotated", "cpu")
    counts = model._hlwq_counts
    assert counts["int4-rotated"] == counts["quantized"] and counts.get("int4", 0) == 0
    with torch.inference_mode():
        ref = _reference(src, artifact)(input_ids=PROMPT).logits.float()
        got = model(input_ids=PROMPT).logits.float()
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 1.0


def test_rotated_basis_is_the_same_linear_map() -> None:
    """Without the INT4 step, W_rot · rotate(x / s) equals the reference dequantization's W · x (smoothing too)."""
    from pipeline.quant import QuantParams, dequantize, quantize
    from pipeline.quant.codec import rotated_blocks
    from pipeline.quant.hadamard import sign_vector
    from pipeline.runtime.backends.int4_rotated import RotatedInt4Linear

    torch.manual_seed(0)
    w, x = torch.randn(48, 200), torch.randn(3, 200)
    smooth = torch.rand(200) + 0.5
    params = QuantParams(bits=5)
    q = quantize(w * smooth, params)
    inner = torch.nn.Linear(256, 48, bias=False)
    inner.weight.data = rotated_blocks(q).reshape(48, 256)
    layer = RotatedInt4Linear(inner, 200, sign_vector(params.sign_bits(), 128), smooth)
    ref = x @ (dequantize(q, params.sign_bits(), torch.float32) / smooth).t()
    assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5)
