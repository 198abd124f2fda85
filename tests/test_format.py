import json
from pathlib import Path

import pytest
import torch

from pipeline import format as fmt
from pipeline.errors import FormatError
from pipeline.quant import QuantParams, quantize
from pipeline.quant.hadamard import sign_bits, signs_to_hex
from pipeline.shards import DTYPE_NAMES, StreamingWriter


def _smooth_vector() -> torch.Tensor:
    return torch.exp(torch.linspace(-0.5, 0.5, 300)).roll(37)  # without the division cos-sim would be ~0.96


def _write_shard(
    path: Path, version: int | None = None, bits: int = 5, smooth: bool = False
) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(16, 300).to(torch.bfloat16)
    norm = torch.ones(300, dtype=torch.bfloat16)
    q = quantize(w, QuantParams(bits=bits), _smooth_vector() if smooth else None)
    layout = fmt.Layout(128, signs_to_hex(sign_bits(128, 0)), "lsq", "gaussian")
    plan = [*fmt.quantized_plan("a.weight", tuple(w.shape), bits, 128, smooth), ("b.norm", "BF16", (300,))]
    meta = fmt.shard_metadata(layout, {"a.weight": fmt.tensor_record(tuple(w.shape), w.dtype, bits, smooth)})
    if version is not None:
        body = json.loads(meta["hlwq"])
        body["format_version"] = version
        meta["hlwq"] = json.dumps(body)
    StreamingWriter(plan, meta).write(path, iter([*fmt.quantized_entries("a.weight", q), ("b.norm", norm)]))
    return {"a.weight": w, "b.norm": norm}


def test_plan_matches_what_quantize_produces():
    w = torch.randn(7, 3, 100)
    for bits in range(2, 9):
        q = quantize(w, QuantParams(bits=bits))
        entries = fmt.quantized_entries("x", q)
        plan = fmt.quantized_plan("x", tuple(w.shape), bits, 128)
        assert [(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in entries] == plan
    w2 = torch.randn(7, 300)
    q = quantize(w2, QuantParams(bits=5), torch.ones(300))
    entries = fmt.quantized_entries("x", q)
    assert [(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in entries] == fmt.quantized_plan(
        "x", (7, 300), 5, 128, True
    )
    assert entries[-1][0] == "x.hlwq_smooth"


def test_round_trip_through_a_shard(tmp_path: Path):
    src = _write_shard(tmp_path / "s.safetensors")
    r = fmt.ShardReader(tmp_path / "s.safetensors")
    assert r.names() == ["a.weight", "b.norm"]
    assert r.layout.sign_bits() == sign_bits(128, 0)
    a = r.get("a.weight")
    assert a.dtype == torch.bfloat16 and a.shape == (16, 300)
    assert torch.nn.functional.cosine_similarity(a.float().flatten(), src["a.weight"].float().flatten(), 0) > 0.998
    assert torch.equal(r.get("b.norm"), src["b.norm"])


def test_reader_refuses_unknown_version(tmp_path: Path):
    _write_shard(tmp_path / "s.safetensors", version=3)
    with pytest.raises(FormatError, match="format_version 3 is not supported"):
        fmt.ShardReader(tmp_path / "s.safetensors")


def test_version_is_1_unless_something_is_smoothed(tmp_path: Path):
    _write_shard(tmp_path / "v1.safetensors")
    _write_shard(tmp_path / "v2.safetensors", smooth=True)
    assert fmt.ShardReader(tmp_path / "v1.safetensors").version == 1
    r = fmt.ShardReader(tmp_path / "v2.safetensors")
    assert r.version == 2 and r.names() == ["a.weight", "b.norm"]  # the smooth entry is not a model tensor
    assert torch.equal(r.get_quantized("a.weight").smooth, _smooth_vector())
    layout = fmt.Layout(128, None, "lsq", "gaussian")
    assert fmt.quantization_config(layout, 5, 0, {}, [])["format_version"] == 1
    qc = fmt.quantization_config(layout, 5, 0, {}, [], True, {"alpha": 0.25}, 5.5)
    assert qc["format_version"] == 2 and qc["smooth"] == {"alpha": 0.25} and qc["target_bpw"] == 5.5


def test_smoothed_record_in_a_v1_shard_is_refused(tmp_path: Path):
    _write_shard(tmp_path / "s.safetensors", version=1, smooth=True)
    with pytest.raises(FormatError, match="needs format_version 2"):
        fmt.ShardReader(tmp_path / "s.safetensors").get("a.weight")


def test_reader_refuses_non_hlwq_shard(tmp_path: Path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FormatError, match="not an HLWQ shard"):
        fmt.ShardReader(tmp_path / "plain.safetensors")


def test_quantization_config_checks(tmp_path: Path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"quantization_config": {"quant_method": "hlwq", "format_version": 9}}))
    with pytest.raises(FormatError, match="format_version 9"):
        fmt.read_quantization_config(cfg)
    cfg.write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(FormatError, match="gptq"):
        fmt.read_quantization_config(cfg)


@pytest.mark.parametrize("smooth", [False, True], ids=["v1", "v2-smooth"])
def test_independent_decoder_from_format_md(tmp_path: Path, smooth: bool):
    """Decode a tensor following FORMAT.md step by step (no pipeline.quant code) and match the reader."""
    import math

    from safetensors import safe_open

    src = _write_shard(tmp_path / "s.safetensors", smooth=smooth)
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["hlwq"])
        codes, scales, cb = (f.get_tensor("a.weight" + s) for s in (".hlwq_codes", ".hlwq_scales", ".hlwq_codebook"))
        sm = f.get_tensor("a.weight.hlwq_smooth").double() if meta["tensors"]["a.weight"].get("smooth") else None
    assert meta["format_version"] == (2 if smooth else 1) and (sm is not None) == smooth
    b = meta["block_size"]
    raw = bytes.fromhex(meta["signs"])
    signs = torch.tensor([-1.0 if (raw[i // 8] >> (i % 8)) & 1 else 1.0 for i in range(b)])
    idx = torch.arange(b)
    parity = torch.tensor([[bin(i & j).count("1") % 2 for j in range(b)] for i in range(b)])
    h = (1 - 2 * parity).double() / math.sqrt(b)
    rows, nb = scales.shape
    blocks = codes.reshape(rows, nb, b * 5 // 8)
    nib, hb = blocks[..., :64].long(), blocks[..., 64:].long()
    code = ((nib[..., idx % 64] >> (4 * (idx // 64))) & 0xF) | (((hb[..., idx % 16] >> (idx // 16)) & 1) << 4)
    y = cb.double()[code] * scales.double().unsqueeze(-1) / math.sqrt(b)
    x = (y @ h.T) * signs.double()
    dec = x.reshape(rows, -1)[:, : meta["tensors"]["a.weight"]["shape"][1]]
    if sm is not None:  # version 2: column i divided by s_i before the cast
        dec = dec / sm
    ref = fmt.ShardReader(tmp_path / "s.safetensors").get("a.weight").double()
    cos = torch.nn.functional.cosine_similarity(dec.flatten(), src["a.weight"].double().flatten(), 0)
    assert cos > 0.99
    assert torch.allclose(dec.to(torch.bfloat16).double(), ref, atol=1e-2)
    assert (dec.to(torch.bfloat16) == ref.to(torch.bfloat16)).float().mean() > 0.99
