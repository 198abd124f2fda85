"""The Triton attention over the compressed cache's codes (kernels.kv_attention): lean_kv.packed_attention through
its per-split partials equals the dequantize-then-attend path, on the CPU through Triton's interpreter and on the GPU
compiled, for 2-4 bits, GQA groups, an empty store and a full one, and inside a CUDA graph whose filled length
changes between replays."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from pipeline.quant import kv as kvq
from pipeline.quant import lloyd_max
from pipeline.runtime import lean_kv
from pipeline.runtime.gemma4_decode import grouped_attention
from pipeline.runtime.kernels import kv_attention

_HAS_TRITON = importlib.util.find_spec("triton") is not None
# float16 query, levels and probabilities on the tensor cores against the float32 path: ~2**-11 relative per operand
TOL = 4e-3


def _store(bits: int, hkv: int, d: int, length: int, ring: int, device: str, seed: int = 0) -> tuple[Any, ...]:
    """A PackedLayer.tensors() tuple of random keys/values quantized as the cache does."""
    gen = torch.Generator().manual_seed(seed)
    signs = kvq.kv_signs(d, 0)
    cb = lloyd_max.gaussian_codebook(bits, "cpu")
    k, v = (torch.randn(1, hkv, length, d, generator=gen) * 3 for _ in range(2))
    pk, pv = kvq.quantize_kv(k, bits, signs, "lsq", cb), kvq.quantize_kv(v, bits, signs, "lsq", cb)
    res_k, res_v = (torch.randn(1, hkv, ring, d, generator=gen) for _ in range(2))
    parts = (pk.codes, pk.scales, pv.codes, pv.scales, res_k, res_v, lean_kv.rotation_matrix(signs), cb)
    return tuple(t.to(device) for t in parts)


def _mask(length: int, ring: int, filled: int, device: str, seed: int = 0) -> torch.Tensor:
    live = torch.rand(ring, generator=torch.Generator().manual_seed(seed)) < 0.7
    live[0] = True  # the token itself
    return torch.cat([torch.arange(length) < filled, live]).to(device)


def _both(monkeypatch: Any, switch: str, fn: Any, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel path, torch path) of fn(*args): kv_attention's `switch` (supported / dense_supported) forced on, then
    off."""
    monkeypatch.setattr(kv_attention, switch, lambda *a: True)
    got = fn(*args)
    monkeypatch.setattr(kv_attention, switch, lambda *a: False)
    return got, fn(*args)


INTERPRETED_CASES = [
    (bits, *shape)
    for bits in (2, 3, 4)
    for shape in ((2, 4, 128, 80, 37), (1, 1, 256, 48, 48), (2, 8, 128, 64, 0), (1, 2, 512, 40, 17))
]


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter takes int() of a 1-element array (a loop bound read from memory); numpy 2 refuses."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def interpreted_errors() -> list[dict[str, Any]]:
    """Run in a process started with TRITON_INTERPRET=1 (Triton's own jit helpers, tl.sum and tl.cdiv among them,
    are bound to the interpreter when triton is first imported): kernel vs torch path for INTERPRETED_CASES."""
    _patch_interpreter()
    out = []
    with pytest.MonkeyPatch.context() as mp:
        for bits, hkv, group, d, length, filled in INTERPRETED_CASES:
            store = _store(bits, hkv, d, length, 24, "cpu")
            q = torch.randn(hkv * group, d, generator=torch.Generator().manual_seed(5))
            mask = _mask(length, 24, filled, "cpu")
            got, want = _both(mp, "supported", lean_kv.packed_attention, q, store, bits, mask, 0.0625)
            out.append({"case": [bits, hkv, group, d, length, filled], "shape_ok": got.shape == want.shape,
                        "err": float((got - want).abs().max()), "scale": float(want.abs().max())})  # fmt: skip
    return out


DENSE_CASES = [(2, 4, 128, 80, "prefix"), (16, 2, 256, 64, "ring"), (1, 8, 512, 48, "prefix"), (2, 1, 64, 40, "one")]


def _dense(hkv: int, d: int, length: int, kind: str, device: str, dtype: torch.dtype = torch.bfloat16,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """A static cache [1, Hkv, L, d] (keys, values) and the decode mask of one of its fillings: a prefix (global
    layer), scattered ring slots (sliding layer), or the token alone."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(1, hkv, length, d, generator=gen).to(dtype) for _ in range(2))
    if kind == "prefix":
        mask = torch.arange(length) < length * 2 // 3
    elif kind == "ring":
        mask = torch.rand(length, generator=gen) < 0.6
    else:
        mask = torch.arange(length) == 5
    return keys.to(device), values.to(device), mask.to(device)


def interpreted_dense_errors() -> list[dict[str, Any]]:
    """As interpreted_errors, for the BF16 cache's kernel (float16 operands: the interpreter's numpy has no bf16)."""
    _patch_interpreter()
    out = []
    with pytest.MonkeyPatch.context() as mp:
        for hkv, group, d, length, kind in DENSE_CASES:
            keys, values, mask = _dense(hkv, d, length, kind, "cpu", torch.float16)
            q = torch.randn(hkv * group, d, generator=torch.Generator().manual_seed(5)).half()
            got, want = _both(mp, "dense_supported", grouped_attention, q, keys[0], values[0], mask, 0.0625)
            out.append({"case": [hkv, group, d, length, kind], "shape_ok": got.shape == want.shape,
                        "err": float((got.float() - want.float()).abs().max()),
                        "scale": float(want.float().abs().max())})  # fmt: skip
    return out


def _check_interpreted(name: str, cases: list[tuple[Any, ...]]) -> None:
    """Run this module's `name` in a fresh process under TRITON_INTERPRET=1; every case within TOL of its scale."""
    code = f"import json; from tests.runtime.test_kv_attention import {name} as f; print(json.dumps(f()))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["case"] for r in rows] == [list(c) for c in cases]
    for r in rows:
        assert r["shape_ok"] and r["scale"] > 0.1, r
        assert r["err"] <= TOL * r["scale"], r


@pytest.mark.skipif(not _HAS_TRITON, reason="Triton is not installed (tests/requirements.txt)")
def test_dense_partials_are_grouped_attention_interpreted() -> None:
    """The BF16 cache's kernel on the CPU through Triton's interpreter: a global layer's prefix, a sliding ring's
    scattered slots (GQA 2, 16 KV heads), head_dim 512, a single attended position."""
    _check_interpreted("interpreted_dense_errors", DENSE_CASES)


@pytest.mark.skipif(not _HAS_TRITON, reason="Triton is not installed (tests/requirements.txt)")
def test_partials_are_the_dequantized_attention_interpreted() -> None:
    """On the CPU, through Triton's interpreter (a fresh process), 2-4 bits: GQA groups, a full store, an empty one,
    head_dim 512."""
    _check_interpreted("interpreted_errors", INTERPRETED_CASES)


def test_splits_cover_the_store_and_fill_the_gpu() -> None:
    assert kv_attention.splits_for(4352, 4) == 34  # one per 128 positions
    assert kv_attention.splits_for(40, 4) == 1
    assert kv_attention.splits_for(1 << 15, 4) == 128  # at most 512 programs: longer splits instead
    assert kv_attention.splits_for(1 << 17, 16) == 32


def test_supported_only_where_the_kernel_runs() -> None:
    q = torch.zeros(8, 512)
    assert not kv_attention.supported(q, 512, 4)  # a CPU tensor
    if torch.cuda.is_available() and _HAS_TRITON:
        qc = q.cuda()
        assert kv_attention.supported(qc, 512, 3)
        assert not kv_attention.supported(qc, 96, 3) and not kv_attention.supported(qc, 8, 3)
        assert not kv_attention.supported(qc, 512, 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not _HAS_TRITON, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_partials_on_the_gpu_at_31b_shapes(monkeypatch: pytest.MonkeyPatch, bits: int) -> None:
    """Gemma-4-31B's global layers (4 KV heads of 512, 8 query heads each), a 4k store partly filled."""
    store = _store(bits, 4, 512, 4352, 192, "cuda")
    q = torch.randn(32, 512, device="cuda")
    for filled in (0, 1, 1000, 4352):
        mask = _mask(4352, 192, filled, "cuda")
        got, want = _both(monkeypatch, "supported", lean_kv.packed_attention, q, store, bits, mask, 512**-0.5)
        assert float((got - want).abs().max()) <= TOL * float(want.abs().max()), filled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not _HAS_TRITON, reason="needs a CUDA GPU and Triton")
def test_captured_attention_follows_the_filled_length() -> None:
    """One CUDA graph, replayed as the store fills: the kernel reads packed_len from the mask on the device."""
    length, ring = 1024, 64
    store = _store(4, 4, 512, length, ring, "cuda")
    q = torch.randn(32, 512, device="cuda")
    mask = _mask(length, ring, 100, "cuda")
    lean_kv.packed_attention(q, store, 4, mask, 0.05)  # build the kernel before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lean_kv.packed_attention(q, store, 4, mask, 0.05)
    for filled in (100, 517, 1024, 3):
        mask.copy_(_mask(length, ring, filled, "cuda"))
        graph.replay()
        want = lean_kv.packed_attention(q, store, 4, mask, 0.05)
        assert torch.equal(out, want), filled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not _HAS_TRITON, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize(
    ("hkv", "group", "d", "length", "kind"),
    [(16, 2, 256, 1024, "ring"), (4, 8, 512, 4352, "prefix"), (4, 8, 512, 4352, "one")],
)
def test_dense_partials_on_the_gpu_at_31b_shapes(monkeypatch: pytest.MonkeyPatch, hkv: int, group: int, d: int,
                                                 length: int, kind: str) -> None:  # fmt: skip
    """Gemma-4-31B's sliding ring (16 KV heads of 256, a full 1024-slot window) and global store, BF16, against
    grouped_attention's own fp32-score path (which reads bf16 keys and rounds probabilities to bf16 too)."""
    keys, values, mask = _dense(hkv, d, length, kind, "cuda")
    q = torch.randn(hkv * group, d, device="cuda", dtype=torch.bfloat16)
    got, want = _both(monkeypatch, "dense_supported", grouped_attention, q, keys[0], values[0], mask, d**-0.5)
    assert got.dtype == want.dtype == torch.bfloat16
    assert float((got.float() - want.float()).abs().max()) <= 2e-2 * float(want.float().abs().max())


def test_dense_rule_takes_long_stores_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: a static store of >= DENSE_MIN_POSITIONS positions (long global layers), not a sliding ring; 0 / 1 force
    it; never on a CPU tensor (the kernel needs CUDA) nor for values or a mask the kernel cannot read in place."""
    monkeypatch.setattr(kv_attention, "_triton", lambda: object())
    q = torch.zeros(4, 512)

    def ok(store: torch.Tensor, values: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> bool:
        m = torch.ones(store.shape[-2], dtype=torch.bool) if mask is None else mask
        return kv_attention.dense_supported(q, store, store if values is None else values, m)

    long_store = torch.zeros(4, kv_attention.DENSE_MIN_POSITIONS, 512, dtype=torch.bfloat16)
    assert not ok(long_store)  # a CPU tensor
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    ring = torch.zeros(16, 1024, 256, dtype=torch.bfloat16)
    assert ok(long_store) and not ok(ring)
    assert not ok(long_store.float())  # a float32 cache keeps the torch path
    assert not ok(long_store, values=long_store.transpose(1, 2).contiguous().transpose(1, 2))
    assert not ok(long_store, mask=torch.ones(2 * long_store.shape[1], dtype=torch.bool)[::2])
    monkeypatch.setattr(kv_attention, "DENSE", "1")
    assert ok(ring)
    monkeypatch.setattr(kv_attention, "DENSE", "0")
    assert not ok(long_store)


def test_a_bad_dense_switch_is_the_runtime_error() -> None:
    """HLWQ_DENSE_ATTENTION is read at import: a typo is the runtime's one-line error class, not a bare ValueError."""
    code = "import pipeline.runtime.kernels.kv_attention"
    env = {**os.environ, "HLWQ_DENSE_ATTENTION": "yes"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "RuntimeBackendError: HLWQ_DENSE_ATTENTION must be auto, 0 or 1, not 'yes'" in proc.stderr
