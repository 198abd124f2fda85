"""LeanDecoder with the compressed KV cache (pipeline.runtime.lean_kv): the same greedy tokens and logits as
transformers' forward with the streaming HLWQ cache (make_cache) configured the same way, the codes in its static
buffers bit-exact, the refused combination, and the bytes it holds."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.errors import RuntimeBackendError
from pipeline.quant import kv as kvq
from pipeline.runtime.decode import LeanDecoder
from pipeline.runtime.kv_cache import KVCacheConfig, make_cache
from pipeline.runtime.lean_kv import packed_count, ring_slots
from tests.runtime.test_decode import _tiny_model
from tests.runtime.test_kv_cache import tiny_gemma_kv_shared, tiny_llama

# Gemma-4's k_eq_v layers: the lean cache stores their keys, so the reference stores them too.
KV4 = KVCacheConfig(bits=4, residual=8, block=8, sliding="bf16", keys_from_values=False)
KV2 = KVCacheConfig(bits=2, residual=0, block=4, sliding="bf16", keys_from_values=False)


@pytest.mark.parametrize("d", [64, 96, 512])
def test_rotation_matrix_is_the_rotation(d: int) -> None:
    """x @ M per block is kv.rotate (96: three blocks of 32), y @ Mᵀ is kv.unrotate."""
    from pipeline.runtime.lean_kv import _blockwise, rotation_matrix

    signs = kvq.kv_signs(d, 3)
    x = torch.randn(5, 7, d, generator=torch.Generator().manual_seed(0))
    m = rotation_matrix(signs)
    assert m.shape == (kvq.rotation_block(d),) * 2
    torch.testing.assert_close(_blockwise(x, m), kvq.rotate(x, signs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_blockwise(kvq.rotate(x, signs), m.T), x, atol=1e-5, rtol=1e-5)
    assert float((_blockwise(x, m) - x).abs().max()) > 0.1  # not the identity


def _ids(n: int) -> torch.Tensor:
    return torch.randint(16, 200, (1, n), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _hf_chunked(model, ids: torch.Tensor, new: int, kv: KVCacheConfig, chunk: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and logits of transformers' forward with make_cache, the prompt fed in the lean decoder's chunks
    (a later chunk attends an earlier one's flushed tokens as codes: chunking is part of the cache's semantics)."""
    cache = make_cache(model, kv)
    ids = ids.to(next(model.parameters()).device)
    for s in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    toks, logits = [], []
    for _ in range(new):
        lg = out.logits[:, -1].float()
        tok = lg.argmax(-1, keepdim=True)
        toks.append(int(tok))
        logits.append(lg)
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return toks, torch.cat(logits).cpu()


@torch.inference_mode()
def _teacher_forced(dec: LeanDecoder, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits of the decode steps fed `tokens` (flushing between steps as generate does)."""
    dec.generate(ids, 1)
    n, out = ids.shape[1], []
    for t, tok in enumerate(tokens):
        if dec.packed is not None:
            dec.packed.settle(n + t)
        ids_t, pos = torch.tensor([[tok]], device=dec.device), torch.tensor([n + t], device=dec.device)
        out.append(dec._forward(ids_t, pos, decode=True))
    return torch.cat(out).cpu()


@pytest.mark.parametrize(
    ("build", "kv", "chunk", "prompt", "new", "fused"),
    [
        (lambda: _tiny_model(window=16), KV4, 8, 40, 24, True),
        (lambda: _tiny_model(window=16), KV4, 8, 40, 24, False),
        (lambda: _tiny_model(window=16), KV2, 16, 37, 24, True),
        (tiny_gemma_kv_shared, KV4, 8, 40, 24, False),  # per-layer inputs, KV sharing: transformers' layers
        (tiny_llama, KVCacheConfig(bits=3, residual=16, block=16), 16, 50, 30, False),
    ],
    ids=["gemma4-fused", "gemma4-transformers-layers", "gemma4-2bit-no-residual", "gemma4-kv-shared", "llama"],
)
def test_same_tokens_and_logits_as_the_streaming_cache(build, kv, chunk, prompt, new, fused) -> None:
    """fused: the full layers' decode steps run gemma4_decode's packed step; else transformers' layers, which read
    the store dequantized (and, KV sharing, hand it on to the layers that reuse it)."""
    model = build()
    ids = _ids(prompt)
    want, ref = _hf_chunked(model, ids, new, kv, chunk)
    dec = LeanDecoder(model, max_len=prompt + new, prefill_chunk=chunk, kv_cache=kv, fused=fused)
    assert dec.generate(ids, new).tokens == want
    assert dec.packed is not None and dec.packed.packed_host == packed_count(prompt + new - 2, kv) > 0
    covered = set(dec.decode_layers.plans) if dec.decode_layers is not None else set()
    assert bool(covered & set(dec.packed.layers)) == fused
    got = _teacher_forced(dec, ids, want[:-1])
    assert float((got - ref[1:]).abs().max()) < 1e-4  # measured <= 2.2e-5 (float32; summation order differs)
    # the codes matter: the BF16 cache's logits are further off than that
    plain = _teacher_forced(LeanDecoder(model, max_len=prompt + new, prefill_chunk=chunk, fused=fused), ids, want[:-1])
    assert float((plain - ref[1:]).abs().max()) > 1e-3


def test_compiled_packed_step_same_tokens_and_logits() -> None:
    """compile_layers: the packed step through torch.compile (its fused-reduction branch; Inductor's CPU backend
    here) gives the streaming cache's tokens, and logits within 1e-4 (measured 4.3e-5)."""
    torch.manual_seed(0)
    model = _tiny_model(window=16)
    ids = _ids(40)
    want, ref = _hf_chunked(model, ids, 24, KV4, 8)
    dec = LeanDecoder(model, max_len=64, prefill_chunk=8, kv_cache=KV4, compile_layers=True)
    assert dec.generate(ids, 24).tokens == want
    got = _teacher_forced(dec, ids, want[:-1])
    assert float((got - ref[1:]).abs().max()) < 1e-4


def test_same_tokens_as_generate_with_make_cache() -> None:
    """The issue's check: greedy tokens = transformers' generate with make_cache (one prefill chunk, as generate
    prefills; the 64-token window slides during decode)."""
    torch.manual_seed(0)
    model = _tiny_model()
    ids = _ids(50)
    dec = LeanDecoder(model, max_len=80, kv_cache=KV4)
    got = dec.generate(ids, 30).tokens
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=make_cache(model, KV4),
                          max_new_tokens=30, min_new_tokens=30, do_sample=False)[0, 50:].tolist()  # fmt: skip
    assert got == want
    assert dec.generate(ids, 30).tokens == want  # a second sequence: buffers reused, state reset


def test_packed_buffers_hold_the_quantizers_codes() -> None:
    """After prefill + decode steps the static buffers hold exactly quantize_kv's codes and scales of the K/V the
    model computed (taken from a BF16-cache decoder fed the same tokens: the full layer is the last one, so its
    inputs do not depend on the cache), the ring exactly the newest states, and nothing past what was packed."""
    torch.manual_seed(0)
    model = _tiny_model(window=16)
    kv = KVCacheConfig(bits=3, residual=8, block=8, sliding="bf16", keys_from_values=False)
    ids, new, max_len = _ids(37), 20, 64
    dec = LeanDecoder(model, max_len=max_len, prefill_chunk=8, kv_cache=kv)
    tokens = dec.generate(ids, new).tokens
    assert dec.packed is not None and list(dec.packed.layers) == [5]
    plain = LeanDecoder(model, max_len=max_len, prefill_chunk=8)
    _teacher_forced(plain, ids, tokens[:-1])
    stored = ids.shape[1] + new - 1  # positions written (the last token is not fed back)
    packed = packed_count(stored - 1, kv)  # the last settle was before the last step
    assert dec.packed.packed_host == packed == 40
    layer = dec.packed.layers[5]
    signs = kvq.kv_signs(128, kv.sign_seed)
    pairs = ((plain.cache.keys[5], layer.k_codes, layer.k_scales, layer.res_k),
             (plain.cache.values[5], layer.v_codes, layer.v_scales, layer.res_v))  # fmt: skip
    for states, codes, scales, ring in pairs:
        want = kvq.quantize_kv(states[:, :, :packed], 3, signs, kv.scale)
        assert torch.equal(codes[:, :, :packed], want.codes) and torch.equal(scales[:, :, :packed], want.scales)
        assert not codes[:, :, packed:].any() and not scales[:, :, packed:].any()
        slots = torch.arange(packed, stored) % ring_slots(kv)
        assert torch.equal(ring.index_select(2, slots), states[:, :, packed:stored])
    assert codes.shape == (1, 1, max_len, 128 * 3 // 8)


def test_stream_and_a_sequence_too_short_to_pack() -> None:
    """stream flushes between steps as generate does (same tokens); a sequence shorter than residual + block packs
    nothing (its decode steps attend a fully masked store and the ring alone): the BF16 cache's tokens."""
    torch.manual_seed(0)
    model = _tiny_model(window=16)
    dec = LeanDecoder(model, max_len=64, prefill_chunk=8, kv_cache=KV4)
    ids = _ids(30)
    assert list(dec.stream(ids, 20)) == dec.generate(ids, 20).tokens and dec.packed is not None
    assert dec.packed.packed_host == packed_count(30 + 18, KV4)
    short = _ids(5)
    got = dec.generate(short, 10)
    assert dec.packed.packed_host == 0 == packed_count(5 + 8, KV4)
    assert got.tokens == LeanDecoder(model, max_len=64, prefill_chunk=8).generate(short, 10).tokens


def test_compressed_sliding_layers_are_refused() -> None:
    model = _tiny_model(window=16)
    with pytest.raises(RuntimeBackendError, match=r"sliding='bf16'"):
        LeanDecoder(model, max_len=64, kv_cache=KVCacheConfig(bits=4))  # sliding="compressed" is the default


def test_keys_from_values_is_said_and_stores_keys(caplog) -> None:
    """keys_from_values=True (the default) on Gemma-4's k_eq_v layers: the lean cache stores keys anyway, says so,
    and decodes as with keys_from_values=False."""
    torch.manual_seed(0)
    model = _tiny_model(window=16)
    ids = _ids(30)
    with caplog.at_level(logging.WARNING, logger="pipeline.runtime.lean_kv"):
        dec = LeanDecoder(model, max_len=50, prefill_chunk=8, kv_cache=KVCacheConfig(bits=4, sliding="bf16",
                                                                                      residual=8, block=8))  # fmt: skip
    assert "store their keys too" in caplog.text
    got = dec.generate(ids, 12).tokens
    assert got == LeanDecoder(model, max_len=50, prefill_chunk=8, kv_cache=KV4).generate(ids, 12).tokens


def test_kv_bytes_are_the_compressed_size() -> None:
    """DecodeResult.kv_bytes: the BF16-cache decoder's sliding rings + the full layer's codes and scales for max_len
    positions (keys and values) + its ring of residual + block exact tokens."""
    torch.manual_seed(0)
    model = _tiny_model(window=16)
    ids, max_len = _ids(20), 512
    plain = LeanDecoder(model, max_len=max_len, prefill_chunk=8).generate(ids, 4)
    res = LeanDecoder(model, max_len=max_len, prefill_chunk=8, kv_cache=KV4).generate(ids, 4)
    d, heads, f32 = 128, 1, 4  # the tiny model's global layer; float32 model
    full_bf16 = 2 * heads * max_len * d * f32
    packed = 2 * heads * (max_len * (d * 4 // 8) + max_len * 2) + 2 * heads * ring_slots(KV4) * d * f32
    assert res.kv_bytes == plain.kv_bytes - full_bf16 + packed
    assert res.kv_bytes < plain.kv_bytes


def test_31b_bench_lean_decoder_runs_on_the_tiny_shape(tmp_path) -> None:
    """bench.kv_cache_31b --decoder lean, CPU-sized: the lean speed keys and the ratio, a refused kind noted."""
    import json

    from bench import kv_cache_31b

    out = tmp_path / "kv.json"
    args = ["--tiny", "--out", str(out), "--decoder", "lean", "--skip-memory", "--check-context", "0", "--kinds",
            "bf16,q4_sliding_bf16,q4", "--speed-contexts", "1024,2048", "--lean-steps", "8"]  # fmt: skip
    assert kv_cache_31b.main(args) == 0
    run = json.loads(out.read_text())["gpu_31b_tiny"]
    assert run["last_step"] == "done" and "memory" in run and not run["memory"]
    for tag in ("1k", "2k"):
        assert run[f"decode_tok_s_lean_bf16_{tag}"] > 0 and run[f"decode_tok_s_lean_q4_sliding_bf16_{tag}"] > 0
        assert run[f"decode_speed_ratio_lean_q4_sliding_bf16_{tag}_vs_bf16"] > 0
        lean = run["lean"]["q4_sliding_bf16"][tag]
        assert lean["kv_cache_gb"] < run["lean"]["bf16"][tag]["kv_cache_gb"] and lean["steps"] == 8
    assert "decode_tok_s_1k_bf16" not in run  # transformers' path not asked for
    assert sum("lean decode q4:" in s and "sliding='bf16'" in s for s in run["skipped"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_graphed_steps_are_the_eager_steps_on_the_gpu(compiled: bool) -> None:
    """The captured step, replayed with the flushes between replays, makes the tokens of the same step run eagerly
    (same kernels): each graphed token is the eager step's argmax when fed the graphed tokens before it, up to
    near-ties (graph capture and eager may pick other GEMM kernels; on a random tiny model a 1e-7 difference can flip
    a near-tie, and free-running sequences then part); its teacher-forced logits stay near the streaming cache's
    (float32 model; see below why only near)."""
    torch.manual_seed(0)
    model = _tiny_model(window=16).cuda()
    ids = _ids(40)
    want, ref = _hf_chunked(model, ids, 32, KV4, 8)
    eager = LeanDecoder(model, max_len=80, prefill_chunk=8, kv_cache=KV4, graph=False, compile_layers=compiled)
    dec = LeanDecoder(model, max_len=80, prefill_chunk=8, kv_cache=KV4, compile_layers=compiled)
    got = dec.generate(ids, 32)
    assert got.graphed and dec.packed is not None and dec.packed.packed_host > 40
    assert got.tokens[0] == eager.generate(ids, 1).tokens[0]
    forced = _teacher_forced(eager, ids, got.tokens[:-1])  # eager steps fed the graphed tokens
    picked = forced.gather(1, torch.tensor(got.tokens[1:]).view(-1, 1)).squeeze(1)
    assert float((forced.max(-1).values - picked).max()) <= 1e-4 * float(forced.abs().max())
    # Against transformers' layers (other GEMM and SDPA kernels) a 1e-7 difference in a key before quantizing can
    # move one code to the next level, and the rest of the sequence attends it: the GPU run of session 6 measured
    # 5.5 % of the logits' scale so. The tight cross-check is the CPU one (1e-4); here, a coarse one.
    logits = _teacher_forced(dec, ids, want[:-1])
    rel = (logits - ref[1:]).abs().amax(-1) / ref[1:].abs().amax(-1)
    agree = float((logits.argmax(-1) == ref[1:].argmax(-1)).float().mean())
    assert float(rel.max()) < 0.2 and float(rel.median()) < 0.05 and agree >= 0.9, (rel.tolist(), agree)


def _chunk_peak(context: int, chunk: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, torch.Tensor]:
    """Peak tensor bytes of one global layer's prefill chunk after `context` tokens (update + its attention), and
    the attention's output."""
    from pipeline.runtime.lean_kv import PackedStaticKV
    from pipeline.runtime.measure import TensorPeak

    hkv, hq, d = 2, 8, 64
    monkeypatch.setattr("pipeline.runtime.kv_cache._SCORE_BUDGET", hq * chunk * 128)  # 128-token slices
    monkeypatch.setattr("pipeline.runtime.kv_cache._KV_BUDGET", hkv * d * 128)
    kv = KVCacheConfig(bits=3, residual=16, block=16, sliding="bf16", keys_from_values=False)
    cache = PackedStaticKV(["full_attention"], context + chunk, None, kv, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, hkv, context + chunk, d, generator=gen) for _ in range(2))
    with torch.inference_mode():
        cache.start = 0
        cache.update(k[:, :, :context], v[:, :, :context], 0)
        cache.commit(context)
        cache.start = context
        q = torch.randn(1, hq, chunk, d, generator=gen)
        mask = (torch.arange(context + chunk) <= torch.arange(context, context + chunk).view(-1, 1)).view(
            1, 1, chunk, -1
        )
        with TensorPeak() as tp:
            keys, _ = cache.update(k[:, :, context:], v[:, :, context:], 0)
            out = keys._hlwq_kv.attend(q, mask, 0.125, None)
    return tp.peak, out


def test_prefill_chunk_transient_does_not_grow_with_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill chunk reads the packed prefix through the streaming attention slice by slice: its peak after 2048
    tokens is within one slice of its peak after 512 (a dequantized prefix would add 1536 tokens x 2 heads x 64 x
    float32 x (keys + values) = 1.5 MiB), and its output is the dequantize-then-attend one."""
    small, _ = _chunk_peak(512, 64, monkeypatch)
    large, out = _chunk_peak(2048, 64, monkeypatch)
    one_slice = 2 * 128 * 64 * 4 * 2  # keys + values of one 128-token slice, 2 heads, float32
    assert large - small <= one_slice, (small, large)
    assert large < 1536 * 2 * 64 * 4 * 2
    torch.testing.assert_close(out, _chunk_reference(2048, 64), atol=1e-5, rtol=1e-5)


def _chunk_reference(context: int, chunk: int) -> torch.Tensor:
    """_chunk_peak's attention, the old way: the store's codes below packed_count(context) dequantized, the exact
    states above, attended in float32 (GQA by repeat)."""
    from pipeline.runtime.lean_kv import PackedStaticKV

    hkv, hq, d = 2, 8, 64
    kv = KVCacheConfig(bits=3, residual=16, block=16, sliding="bf16", keys_from_values=False)
    cache = PackedStaticKV(["full_attention"], context + chunk, None, kv, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, hkv, context + chunk, d, generator=gen) for _ in range(2))
    cache.start = 0
    cache.update(k[:, :, :context], v[:, :, :context], 0)
    a = packed_count(context, kv)
    old_k, old_v = cache.layers[0].dequantized(0, a, torch.float32, torch.float32)
    keys, values = torch.cat([old_k, k[:, :, a:]], dim=2), torch.cat([old_v, v[:, :, a:]], dim=2)
    q = torch.randn(1, hq, chunk, d, generator=gen)
    keys, values = keys.repeat_interleave(hq // hkv, 1), values.repeat_interleave(hq // hkv, 1)
    s = (q @ keys.transpose(-1, -2)) * 0.125
    allowed = torch.arange(context + chunk) <= torch.arange(context, context + chunk).view(-1, 1)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return (p @ values).transpose(1, 2)


def test_lean_decoder_refuses_a_model_that_keeps_its_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model class transformers cannot switch to the streaming attention (it only warns) would get the store's
    zero-length stand-ins in sdpa: the decoder says so in one line instead (the engine then falls back)."""
    model = _tiny_model(window=16)
    monkeypatch.setattr(model, "set_attn_implementation", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeBackendError, match="needs the streaming attention"):
        LeanDecoder(model, max_len=64, kv_cache=KV4)
