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


PLANES = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (4, 4)}  # FORMAT.md's table


def _format_md_decode(codes, scales, codebook, meta: dict, name: str):  # type: ignore[no-untyped-def]
    """Decode one tensor following FORMAT.md step by step, in numpy float32 (no pipeline.quant, no torch math)."""
    import numpy as np

    rec, b = meta["tensors"][name], meta["block_size"]
    bits, rows, nb = rec["bits"], scales.shape[0], scales.shape[1]
    raw = bytes.fromhex(meta["signs"]) if meta["signs"] else bytes(b // 8)
    signs = np.array([-1.0 if (raw[i // 8] >> (i % 8)) & 1 else 1.0 for i in range(b)], dtype=np.float32)
    blocks = codes.reshape(rows, nb, b * bits // 8).astype(np.int64)
    code = np.zeros((rows, nb, b), dtype=np.int64)
    i, offset, shift = np.arange(b), 0, 0
    for k in PLANES[bits]:  # plane of width k: byte j, slot s holds code j + s*(B/m)
        m = 8 // k
        j, slot = i % (b // m), i // (b // m)
        code |= ((blocks[..., offset + j] >> (k * slot)) & ((1 << k) - 1)) << shift
        offset, shift = offset + b // m, shift + k
    inv = np.float32(1.0) / np.sqrt(np.float32(b))  # float32(1/sqrt(B)), correctly rounded
    y = codebook.astype(np.float32)[code] * (scales.astype(np.float32) * inv)[..., None]  # step 1
    h = 1
    while h < b:  # step 2: unnormalized butterfly, strides 1, 2, 4, ...: (a, b) -> (a + b, a - b)
        v = y.reshape(rows, nb, b // (2 * h), 2, h)
        y = np.stack([v[..., 0, :] + v[..., 1, :], v[..., 0, :] - v[..., 1, :]], axis=-2).reshape(rows, nb, b)
        h *= 2
    x = (y * inv) * signs  # then one multiply by float32(1/sqrt(B)), then the signs
    cols = int(np.prod(rec["shape"][1:]))
    return x.reshape(rows, -1)[:, :cols].reshape(rec["shape"]).astype(np.float32)


def _to_dtype_bits(x, dtype: str):  # type: ignore[no-untyped-def]
    """float32 -> the original dtype's bits, round to nearest even (numpy has no bfloat16: do it on the bits)."""
    import numpy as np

    if dtype == "BF16":
        u = x.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return x.astype({"F16": np.float16, "F32": np.float32}[dtype]).view({"F16": np.uint16, "F32": np.uint32}[dtype])


@pytest.mark.parametrize(
    ("bits", "block", "shape", "dtype"),
    [(5, 128, (16, 300), torch.bfloat16), (2, 8, (5, 3, 20), torch.float16), (3, 32, (9, 70), torch.float32),
     (4, 64, (7, 130), torch.bfloat16), (6, 256, (4, 600), torch.bfloat16), (7, 16, (3, 40), torch.float16),
     (8, 4096, (2, 5000), torch.bfloat16)],
)  # fmt: skip
def test_independent_decoder_from_format_md_is_bit_exact(bits, block, shape, dtype, tmp_path: Path):  # type: ignore[no-untyped-def]
    """FORMAT.md fixes every float32 operation of decoding: a decoder written from it alone gives our bytes."""
    import numpy as np
    from safetensors import safe_open

    torch.manual_seed(bits)
    w = (torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1))).to(dtype)
    w[0] = 0  # an all-zero row: scale 0
    q = quantize(w, QuantParams(bits=bits, block_size=block))
    layout = fmt.Layout(block, signs_to_hex(sign_bits(block, 0)), "lsq", "gaussian")
    path = tmp_path / "s.safetensors"
    meta = fmt.shard_metadata(layout, {"w": fmt.tensor_record(tuple(w.shape), w.dtype, bits)})
    StreamingWriter(fmt.quantized_plan("w", tuple(w.shape), bits, block), meta).write(
        path, iter(fmt.quantized_entries("w", q))
    )
    with safe_open(str(path), "np") as f:
        body = json.loads(f.metadata()["hlwq"])
        codes, scales, cb = (f.get_tensor("w" + s) for s in (".hlwq_codes", ".hlwq_scales", ".hlwq_codebook"))
    ours = fmt.ShardReader(path).get("w")
    dtype_name = DTYPE_NAMES[dtype]
    want = ours.contiguous().view({2: torch.int16, 4: torch.int32}[ours.element_size()]).numpy()
    got = _to_dtype_bits(_format_md_decode(codes, scales, cb, body, "w"), dtype_name)
    assert np.array_equal(got.view(want.dtype), want)
