import pytest
import torch
from transformers.cache_utils import DynamicLayer

from pipeline.errors import RuntimeBackendError
from pipeline.quant import kv as kvq
from pipeline.runtime.kv_cache import HLWQKVCache, HLWQKVLayer, KeyFromValue, KVCacheConfig, make_cache


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops: on a shared 2-core machine extra threads only add contention (10x here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def states(n: int, heads: int = 2, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, n, d, generator=g), torch.randn(1, heads, n, d, generator=g)


def test_appends_and_flushes_keep_exact_codes_and_residual():
    kv = KVCacheConfig(bits=3, residual=4, block=4, page_tokens=8)
    layer = HLWQKVLayer(kv, streaming=False)
    k, v = states(23)
    seen = 0
    for n in (5, 1, 1, 7, 1, 1, 1, 6):  # a prefill, decode steps, more chunks
        keys, _ = layer.update(k[..., seen : seen + n, :], v[..., seen : seen + n, :])
        seen += n
        assert keys.shape[-2] == seen and layer.get_seq_length() == seen
    # Flushing happens at the start of each update: what earlier forwards left beyond residual, in whole blocks.
    packed = sum(p.length for p in layer.pages)
    assert packed % 4 == 0 and 4 <= seen - packed - 6 < 8
    assert [(p.start, p.length) for p in layer.pages] == [(0, 8), (8, 4)]
    assert torch.equal(layer.keys, k[..., packed:seen, :])  # the residual is the newest tokens, untouched
    signs = kvq.kv_signs(32, kv.sign_seed)
    for p in layer.pages:
        ref = kvq.quantize_kv(k[..., p.start : p.end, :], 3, signs)
        assert torch.equal(p.k.codes, ref.codes) and torch.equal(p.k.scales, ref.scales)
        assert p.k.codes.shape == (1, 2, p.length, 32 * 3 // 8)
    keys, _ = layer.dequantized()
    assert torch.equal(keys[..., packed:, :], k[..., packed:seen, :])
    rel = (keys[..., :packed, :] - k[..., :packed, :]).pow(2).sum() / k[..., :packed, :].pow(2).sum()
    assert 0.01 < rel < 0.05  # 3-bit error on the packed part only
    dense = 2 * 2 * seen * 32 * 4
    assert layer.nbytes() < dense


def test_reset_empties_the_layer_like_a_new_one():
    """reset drops pages and residual (as transformers' DynamicLayer.reset does in newer releases, not zeroing them in
    place as older ones do), and the layer then fills exactly as a new one."""
    kv = KVCacheConfig(bits=3, residual=4, block=4, page_tokens=8)
    layer = HLWQKVLayer(kv, streaming=False)
    k, v = states(23)
    layer.update(k[..., :13, :], v[..., :13, :])
    layer.update(k[..., 13:14, :], v[..., 13:14, :])
    assert layer.pages and layer.nbytes() > 0
    layer.reset()
    assert not layer.pages and layer.nbytes() == 0 and layer.get_seq_length() == 0 and not layer.is_initialized
    assert layer.get_mask_sizes(5) == (5, 0)
    fresh = HLWQKVLayer(kv, streaming=False)
    for a, b in ((0, 9), (9, 10), (10, 23)):
        got, want = layer.update(k[..., a:b, :], v[..., a:b, :]), fresh.update(k[..., a:b, :], v[..., a:b, :])
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
    assert [(p.start, p.length) for p in layer.pages] == [(p.start, p.length) for p in fresh.pages]


def test_sliding_layer_drops_old_pages_and_announces_its_range():
    kv = KVCacheConfig(bits=4, residual=4, block=4)
    layer = HLWQKVLayer(kv, streaming=False, window=10)
    k, v = states(60)
    for t in range(60):
        length, offset = layer.get_mask_sizes(1)
        keys, _ = layer.update(k[..., t : t + 1, :], v[..., t : t + 1, :])
        assert keys.shape[-2] == length and t + 1 - offset == length
        assert offset <= max(0, t - 9)  # every position the window needs is still there
        assert length <= 10 + 4 + 4  # and not many more
    assert layer.get_seq_length() == 60


def held_bytes(layer: HLWQKVLayer) -> int:
    """Bytes of the distinct storages behind the layer's tensors (what an allocator keeps alive for it)."""
    tensors = [layer.keys, layer.values] + [t for p in layer.pages for x in (p.k, p.v) if x is not None
                                            for t in (x.codes, x.scales)]  # fmt: skip
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("window", [None, 24], ids=["full", "sliding"])
def test_layer_holds_no_storage_beyond_what_it_counts(window):
    """After every update the storages the layer keeps alive are exactly nbytes(): pages cut from a large flush own
    their bytes (a view would keep the whole flushed tensor, evicted or not, alive). Fill as bench.kv_cache_31b does:
    large pieces, then small chunks, then decode steps."""
    kv = KVCacheConfig(bits=3, residual=4, block=4, page_tokens=16)
    layer = HLWQKVLayer(kv, streaming=True, window=window)
    k, v = states(160)
    seen = 0
    for n in (64, 64, 13, 8, 8, 1, 1, 1):
        layer.update(k[..., seen : seen + n, :], v[..., seen : seen + n, :])
        seen += n
        assert held_bytes(layer) == layer.nbytes(), f"after {seen} tokens"


def dense_attention(q, k, v, mask, scaling):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scaling
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def synthetic_key_from_value(d: int, seed: int = 0) -> KeyFromValue:
    """A k_eq_v layer's rule with a random gain and a plain RoPE table (theta 10000)."""
    gain = 1.0 + 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(seed))
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)

    def table(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.arange(start, start + n, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat((f, f), dim=-1).unsqueeze(0)
        return emb.cos(), emb.sin()

    return KeyFromValue(gain, table)


def k_eq_v_states(n: int, kfv: KeyFromValue, heads: int = 2, d: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Values as v_norm leaves them (unit RMS) and the keys such a layer computes from them."""
    _, v = states(n, heads, d)
    v = v / v.pow(2).mean(-1, keepdim=True).sqrt()
    return kfv.keys(v, 0), v


@pytest.mark.parametrize("values_only", [False, True], ids=["keys-stored", "keys-from-values"])
def test_streaming_attention_equals_dense_attention_over_the_same_codes(monkeypatch, values_only):
    monkeypatch.setattr("pipeline.runtime.kv_cache._SCORE_BUDGET", 64)  # many slices, to test the online softmax
    kv = KVCacheConfig(bits=2, residual=8, block=8, page_tokens=16)
    stream, ref = HLWQKVLayer(kv, streaming=True), HLWQKVLayer(kv, streaming=False)
    k, v = states(70, heads=2, d=64)
    if values_only:
        stream.key_from_value = ref.key_from_value = synthetic_key_from_value(64)
        k, v = k_eq_v_states(70, stream.key_from_value)
    for a, b in ((0, 40), (40, 60), (60, 61), (61, 70)):
        length, offset = stream.get_mask_sizes(b - a)
        tk, _ = stream.update(k[..., a:b, :], v[..., a:b, :])
        assert tk.shape[-2] == 0 and tk._hlwq_kv is stream
        rk, rv = ref.update(k[..., a:b, :], v[..., a:b, :])
        q = torch.randn(1, 4, b - a, 64)
        pos_q = torch.arange(a, b).unsqueeze(-1)
        mask = (torch.arange(offset, offset + length) <= pos_q).expand(1, 1, -1, -1)
        out = stream.attend(q, mask, 0.125, None)
        assert out.shape == (1, b - a, 4, 64)
        torch.testing.assert_close(out, dense_attention(q, rk, rv, mask, 0.125), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(stream.attend(q, None, 0.125, None), out)  # no mask given: causal
    assert all((p.k is None) == values_only for p in stream.pages)


def test_values_only_pages_hold_half_the_packed_bytes_and_rebuild_the_keys():
    """A k_eq_v layer packs its values alone: half the page bytes of a layer storing both, and the keys it reads back
    are rope(dequantized value * gain), within the 3-bit error of the values themselves."""
    kv = KVCacheConfig(bits=3, residual=8, block=8, page_tokens=32)
    kfv = synthetic_key_from_value(64)
    k, v = k_eq_v_states(100, kfv)
    both, only = HLWQKVLayer(kv, streaming=False), HLWQKVLayer(kv, streaming=False)
    only.key_from_value = kfv
    for a, b in ((0, 60), (60, 90), (90, 100)):
        both.update(k[..., a:b, :], v[..., a:b, :])
        rk, rv = only.update(k[..., a:b, :], v[..., a:b, :])
    assert only.key_from_value is kfv  # the keys matched the rule at every update

    def packed(layer: HLWQKVLayer) -> int:
        return sum(p.nbytes() for p in layer.pages)

    assert packed(only) * 2 == packed(both) > 0
    n = sum(p.length for p in only.pages)
    assert torch.equal(rk[..., n:, :], k[..., n:, :])  # the residual keeps its keys
    torch.testing.assert_close(rk[..., :n, :], kfv.keys(rv[..., :n, :], 0))
    rel = (rk[..., :n, :] - k[..., :n, :]).pow(2).sum() / k[..., :n, :].pow(2).sum()
    assert 0.01 < rel < 0.06


def test_keys_that_break_the_rule_are_stored_or_refused():
    """Keys that are not rope(value * gain) at the cache positions (a left-padded batch): on the first update the
    layer stores them after all; after values-only pages exist it refuses (their keys could not be recovered)."""
    from pipeline.errors import RuntimeBackendError

    kv = KVCacheConfig(bits=3, residual=4, block=4, page_tokens=8)
    kfv = synthetic_key_from_value(64)
    k, v = k_eq_v_states(40, kfv)
    late = torch.roll(k, 1, dims=-2)  # the keys of the previous position
    first = HLWQKVLayer(kv, streaming=False)
    first.key_from_value = kfv
    first.update(late[..., :20, :], v[..., :20, :])
    first.update(late[..., 20:30, :], v[..., 20:30, :])
    assert first.key_from_value is None and first.pages and all(p.k is not None for p in first.pages)
    later = HLWQKVLayer(kv, streaming=False)
    later.key_from_value = kfv
    later.update(k[..., :20, :], v[..., :20, :])
    with pytest.raises(RuntimeBackendError, match="keys_from_values=False"):
        later.update(late[..., 20:30, :], v[..., 20:30, :])


def test_streaming_attention_transient_is_one_score_slice_plus_fixed_buffers(monkeypatch):
    """A prefill chunk's attention holds one score slice (every softmax step in place), one query and one accumulator
    (the residual is attended in the original basis, then both are rotated for the pages), and a few dequantized K/V
    slices: the bound the 31B bench's flat transient depends on (three score slices and two query/accumulator pairs
    before)."""
    from pipeline.runtime.measure import TensorPeak

    b, hq, hkv, lq, d, step = 1, 8, 2, 64, 64, 128
    monkeypatch.setattr("pipeline.runtime.kv_cache._SCORE_BUDGET", b * hq * lq * step)
    layer = HLWQKVLayer(KVCacheConfig(bits=3, residual=16, block=16, page_tokens=64), streaming=True)
    k, v = states(512 + lq, heads=hkv, d=d)
    with torch.inference_mode():
        layer.update(k[..., :512, :], v[..., :512, :])
        layer.update(k[..., 512:, :], v[..., 512:, :])
        q = torch.randn(b, hq, lq, d)
        with TensorPeak() as tp:
            out = layer.attend(q, None, 0.125, None)
    f32 = 4
    score, query, kv_slice = b * hq * lq * step * f32, b * hq * lq * d * f32, b * hkv * step * d * f32
    assert tp.peak <= score + 2 * query + 4 * kv_slice
    assert tp.live == out.numel() * out.element_size()  # nothing else outlives the call


def tiny_gemma():
    from transformers import Gemma4ForConditionalGeneration

    from pipeline.tiny import tiny_config

    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(tiny_config()).eval()


def tiny_gemma_kv_shared():
    """Gemma-4 with KV sharing: its last two layers read the states of the last full and sliding layers before them
    (transformers with DummyLayer gives those two a DummyLayer, older releases leave them out of the cache)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from pipeline.tiny import SPECIAL, TEXT, VISION

    text = {**TEXT, "num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2,
            "num_kv_shared_layers": 2, "hidden_size_per_layer_input": 16}  # fmt: skip
    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=VISION, audio_config=None,
                                                       **SPECIAL)).eval()  # fmt: skip


def test_gemma4_k_eq_v_layers_have_keys_rope_of_gained_values():
    """keys_from_values finds exactly Gemma-4's attention_k_eq_v (global) layers, and their keys as the model computes
    them are rope(value * k_norm gain) at the cache positions (float32: to rounding); other models have none."""
    from transformers import DynamicCache

    from pipeline.runtime.kv_cache import keys_from_values

    model = tiny_gemma()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))  # gains far from 1, so a missing gain would show
    rules = keys_from_values(model)
    types = model.config.get_text_config(decoder=True).layer_types
    assert sorted(rules) == [i for i, t in enumerate(types) if t == "full_attention"]
    cache = DynamicCache(config=model.config)
    ids = torch.randint(16, 200, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids[:, :60], past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, 60:], past_key_values=cache, use_cache=True)
    for i, rule in rules.items():
        k, v = cache.layers[i].keys, cache.layers[i].values
        torch.testing.assert_close(rule.keys(v, 0), k, atol=1e-5, rtol=1e-5)
        assert rule.matches(k, v, 0) and not rule.matches(k[..., 1:, :], v[..., 1:, :], 0)
    assert keys_from_values(tiny_llama()) == {}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    ("build", "sliding"),
    [
        (tiny_gemma, "compressed"),
        (tiny_gemma, "bf16"),
        (tiny_gemma_kv_shared, "compressed"),
        (tiny_llama, "compressed"),
    ],
    ids=["gemma4", "gemma4-bf16-sliding", "gemma4-kv-shared", "llama"],
)
def test_generate_matches_reference_dequantization(build, sliding):
    """generate with the streaming cache = generate with a cache that dequantizes the same codes into the model's
    own attention: the same tokens, and logits within 1e-3 (float32; only summation order differs)."""
    model = build()
    kv = KVCacheConfig(bits=3, residual=16, block=16, sliding=sliding)
    ids = torch.randint(16, 200, (1, 150), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=40, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref_cache = HLWQKVCache(model.config, kv, streaming=False, model=model)
        ref = model.generate(input_ids=ids, past_key_values=ref_cache, **gen)
        cache = make_cache(model, kv)
        out = model.generate(input_ids=ids, past_key_values=cache, **gen)
        plain = model.generate(input_ids=ids, **gen)
    assert model.config.get_text_config(decoder=True)._attn_implementation.startswith("hlwq_kv_")
    assert torch.equal(out.sequences, ref.sequences)
    diff = max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits, strict=True))
    assert diff < 1e-3
    # The cache really is quantized: packed pages exist and the logits differ from the uncompressed model's.
    text = model.config.get_text_config(decoder=True)
    owners = text.num_hidden_layers - (getattr(text, "num_kv_shared_layers", 0) or 0)
    assert sum(isinstance(layer, DynamicLayer) for layer in cache.layers) == owners  # shared layers hold nothing
    full = [layer for layer in cache.layers if isinstance(layer, HLWQKVLayer) and layer.window is None]
    assert full and all(sum(p.length for p in layer.pages) >= 150 for layer in full)
    # Gemma-4's global layers are k_eq_v: values-only pages, keys rebuilt; Llama's store both
    values_only = getattr(text, "attention_k_eq_v", False)
    assert all((p.k is None) == values_only for layer in full for p in layer.pages)
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, plain.logits, strict=True)) > 1e-3


@pytest.mark.parametrize("build", [tiny_gemma, tiny_gemma_kv_shared, tiny_llama], ids=["gemma4", "gemma4-kv-shared",
                                                                                       "llama"])  # fmt: skip
def test_a_prefill_leaves_its_states_as_codes(build):
    """After a streaming forward every layer has flushed what the next update would (its residual < residual +
    block): a chunk's new tokens do not wait in the compute dtype while the other layers run. Layers whose states
    later layers of the same forward read (Gemma-4 KV sharing) keep them until the next update, as before."""
    model = build()
    kv = KVCacheConfig(bits=3, residual=16, block=16)
    cache = make_cache(model, kv)
    ids = torch.randint(16, 200, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    attn = [layer.self_attn for layer in model.get_decoder().layers]
    read_later = {i for i, a in enumerate(attn) if getattr(a, "store_full_length_kv", False)}
    assert bool(read_later) == (build is tiny_gemma_kv_shared)
    for i, a in enumerate(attn):
        if getattr(a, "is_kv_shared_layer", False):
            continue
        held = cache.layers[i].keys.shape[-2]
        assert held == 150 if i in read_later else held < kv.residual + kv.block, i


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="bits"):
        KVCacheConfig(bits=5)
    with pytest.raises(ValueError, match="residual"):
        KVCacheConfig(residual=-1)


def test_manifest_key_becomes_the_cache_config():
    from pipeline.errors import ManifestError
    from pipeline.manifest import parse_manifest
    from pipeline.runtime.kv_cache import config_from_manifest

    base = {"name": "m", "source": {"path": "src"}, "destination": {"path": "out"}}
    m = parse_manifest({**base, "load_check": {"kv_cache": {"bits": 4, "residual": 64}}})
    assert config_from_manifest(m.load_check.kv_cache) == KVCacheConfig(bits=4, residual=64)
    assert config_from_manifest(parse_manifest(base).load_check.kv_cache) is None
    with pytest.raises(ManifestError, match=r"load_check\.kv_cache\.bits"):
        parse_manifest({**base, "load_check": {"kv_cache": {"bits": 5}}})
    with pytest.raises(ManifestError, match=r"load_check\.kv_cache\.block: unknown key"):
        parse_manifest({**base, "load_check": {"kv_cache": {"block": 5}}})


@pytest.mark.slow
def test_31b_script_runs_on_the_tiny_shape(tmp_path):
    """The H200 script's whole code path on the CPU (its memory figures there are stand-ins, not checked)."""
    import json

    from bench import kv_cache_31b

    out = tmp_path / "kv.json"
    out.write_text(json.dumps({"kl_q3": 0.01}))  # a quality figure already there is kept (merge, not overwrite)
    args = ["--tiny", "--out", str(out), "--kinds", "bf16,q3", "--probes", "3", "--speed-contexts", "1024",
            "--steps", "2", "--check-context", "1024"]  # fmt: skip
    assert kv_cache_31b.main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["kl_q3"] == 0.01
    run = doc["gpu_31b_tiny"]
    assert run["last_step"] == "done" and run["max_context_tokens_22gb_int4_bf16"] is not None
    assert run["decode_tok_s_1k_q3"] > 0 and "max_context_tokens_22gb_int4_q3" not in doc  # headline keys: GPU only


def test_load_check_fills_the_compressed_cache(tiny_artifact) -> None:  # type: ignore[no-untyped-def]
    """manifest load_check.kv_cache reaches the measurement: the context is filled through the compressed cache."""
    from pipeline.runtime import load
    from pipeline.runtime.kv_cache import KVCacheConfig
    from pipeline.runtime.measure import fill_context

    model = load(tiny_artifact, "reference", "cpu")
    fig = fill_context(model, 300, new_tokens=4, chunk=64, kv_cache=KVCacheConfig(bits=3, residual=128))
    assert fig["context_tokens"] == 300 and fig["kv_cache"] == {"bits": 3, "residual": 128}


def test_plain_causal_masks_are_left_to_the_streaming_attention():
    """A causal mask without padding is not materialized (the streaming attention masks each slice itself: a whole
    one is Lq x context bytes); padding, a non-causal pattern or a refused skip still get a boolean mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    from pipeline.runtime.kv_cache import use_streaming_attention

    model = tiny_llama()
    use_streaming_attention(model)
    fn = ALL_MASK_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    base = dict(batch_size=1, q_length=4, kv_length=10, q_offset=6, kv_offset=0, allow_is_causal_skip=True)
    assert fn(**base, mask_function=causal_mask_function, attention_mask=None) is None
    assert fn(**base, mask_function=causal_mask_function, attention_mask=torch.ones(1, 10, dtype=torch.bool)) is None
    padded = torch.ones(1, 10, dtype=torch.bool)
    padded[0, 0] = False
    want = torch.arange(10) <= torch.arange(6, 10)[:, None]
    assert torch.equal(fn(**base, mask_function=causal_mask_function, attention_mask=padded)[0, 0], want & padded)
    refused = {**base, "allow_is_causal_skip": False}
    assert torch.equal(fn(**refused, mask_function=causal_mask_function, attention_mask=None)[0, 0], want)
    assert fn(**base, mask_function=lambda b, h, q, k: k <= q, attention_mask=None) is not None


@pytest.mark.parametrize("stock", ["sdpa", "eager"])
def test_the_fallback_masks_a_plain_cache_causally(stock):
    """With the streaming attention registered but transformers' own cache (nothing tagged), a chunked prefill gives
    the stock model's logits: the fallback turns a skipped (None) causal mask into the bottom-right one."""
    from transformers import DynamicCache

    from pipeline.runtime.kv_cache import use_streaming_attention

    model = tiny_llama()
    model.set_attn_implementation(stock)
    ids = torch.randint(16, 200, (1, 150), generator=torch.Generator().manual_seed(1))

    def chunked() -> torch.Tensor:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :100], past_key_values=cache, use_cache=True)
            return model(input_ids=ids[:, 100:], past_key_values=cache, use_cache=True).logits

    want = chunked()
    use_streaming_attention(model)
    torch.testing.assert_close(chunked(), want, atol=1e-5, rtol=1e-5)


def test_a_vector_too_large_for_a_float16_scale_is_one_runtime_error() -> None:
    """A key/value whose norm passes float16's 65504 cannot be stored: the streaming cache and the lean decoder's
    store both refuse it with the runtime's one-line error (the CLI prints it), not quant's bare OverflowError."""
    from pipeline.runtime.lean_kv import PackedStaticKV

    kv = KVCacheConfig(bits=3, residual=0, block=4, sliding="bf16", keys_from_values=False)
    k, v = states(8, heads=1, d=64)
    k[..., 2, :] = 1e5
    layer = HLWQKVLayer(kv, streaming=True)
    with pytest.raises(RuntimeBackendError, match=r"compressed KV cache: .*float16.*BF16 cache"):
        layer.update(k, v)
        layer.settle()  # a streaming layer flushes once its forward has attended
    cache = PackedStaticKV(["full_attention"], 16, None, kv, torch.device("cpu"))
    cache.start = 0
    with pytest.raises(RuntimeBackendError, match=r"compressed KV cache: .*float16.*BF16 cache"):
        cache.update(k, v, 0)
