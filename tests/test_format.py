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
