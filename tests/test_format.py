import json
from pathlib import Path

import pytest
import torch

from pipeline import format as fmt
from pipeline.errors import FormatError
from pipeline.quant import QuantParams, quantize
from pipeline.quant.hadamard import sign_bits, signs_to_hex
from pipeline.shards import DTYPE_NAMES, StreamingWriter


def _write_shard(path: Path, version: int = fmt.FORMAT_VERSION, bits: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(16, 300).to(torch.bfloat16)
    norm = torch.ones(300, dtype=torch.bfloat16)
    q = quantize(w, QuantParams(bits=bits))
    layout = fmt.Layout(128, signs_to_hex(sign_bits(128, 0)), "lsq", "gaussian")
    plan = [*fmt.quantized_plan("a.weight", tuple(w.shape), bits, 128), ("b.norm", "BF16", (300,))]
    meta = fmt.shard_metadata(layout, {"a.weight": fmt.tensor_record(tuple(w.shape), w.dtype, bits)})
    if version != fmt.FORMAT_VERSION:
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
    _write_shard(tmp_path / "s.safetensors", version=2)
    with pytest.raises(FormatError, match="format_version 2 is not supported"):
        fmt.ShardReader(tmp_path / "s.safetensors")


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


def test_independent_decoder_from_format_md(tmp_path: Path):
    """Decode a tensor following FORMAT.md step by step (no pipeline.quant code) and match the reader."""
    import math

    from safetensors import safe_open

    _write_shard(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["hlwq"])
        codes, scales, cb = (f.get_tensor("a.weight" + s) for s in (".hlwq_codes", ".hlwq_scales", ".hlwq_codebook"))
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
    ref = fmt.ShardReader(tmp_path / "s.safetensors").get("a.weight").double()
    assert torch.allclose(dec.to(torch.bfloat16).double(), ref, atol=1e-2)
    assert (dec.to(torch.bfloat16) == ref.to(torch.bfloat16)).float().mean() > 0.99
