"""The lean decoder makes the same greedy tokens as transformers' own generate (eager, dynamic cache) on CPU."""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime.decode import LeanDecoder, StaticKV


def _tiny_model(layers: int = 6, window: int | None = None):
    from transformers import Gemma4ForConditionalGeneration

    from pipeline.tiny import tiny_config, tiny_state_dict

    config = tiny_config(layers)
    if window is not None:
        config.text_config.sliding_window = window
    model = Gemma4ForConditionalGeneration(config)
    model.load_state_dict(tiny_state_dict(layers=layers), strict=False)
    return model.to(torch.float32).eval()


def _hf_greedy(model, ids: torch.Tensor, new: int) -> list[int]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         min_new_tokens=new)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize(("prompt", "window", "chunk"), [(12, None, None), (40, 16, 8), (9, 16, 16)])
def test_same_tokens_as_generate(prompt: int, window: int | None, chunk: int | None) -> None:
    # window 16 with a 40-token prompt and 24 new tokens crosses the sliding window in prefill and in decode.
    torch.manual_seed(0)
    model = _tiny_model(window=window)
    ids = torch.randint(10, 500, (1, prompt))
    new = 24
    ref = _hf_greedy(model, ids, new)
    dec = LeanDecoder(model, max_len=prompt + new, prefill_chunk=chunk)
    got = dec.generate(ids, new)
    assert got.tokens == ref
    assert not got.graphed  # CPU: the same step, eagerly
    # A second sequence through the same decoder (its buffers reused) is not disturbed by the first.
    assert dec.generate(ids, new).tokens == ref


def test_a_sequence_shorter_than_the_window_gets_a_ring_of_its_length() -> None:
    # Sliding layers then attend only the slots the sequence can fill (decode reads no empty window), same tokens.
    torch.manual_seed(0)
    model = _tiny_model(window=64)
    ids = torch.randint(10, 500, (1, 10))
    ref = _hf_greedy(model, ids, 20)
    dec = LeanDecoder(model, max_len=30, prefill_chunk=4)
    assert dec.generate(ids, 20).tokens == ref
    sliding = [i for i, t in enumerate(dec.layer_types) if t == "sliding_attention"]
    assert sliding and all(dec.cache.keys[i].shape[2] == 30 for i in sliding)
    assert dec.slot_pos.numel() == 30


def test_ring_slots_hold_the_last_window() -> None:
    kv = StaticKV(["sliding_attention"], max_len=100, window=4)
    for t in range(7):
        kv.full_idx = torch.tensor([t])
        kv.ring_idx = torch.tensor([t % 4])
        k = torch.full((1, 1, 1, 2), float(t))
        keys, _ = kv.update(k, k, 0)
    assert sorted(keys[0, 0, :, 0].tolist()) == [3.0, 4.0, 5.0, 6.0]


def test_rejects_too_long() -> None:
    model = _tiny_model()
    with pytest.raises(ValueError, match="exceed the cache"):
        LeanDecoder(model, max_len=8).generate(torch.ones(1, 6, dtype=torch.long), 4)


@pytest.mark.parametrize("fused", [False, True])
def test_image_prompt_same_tokens_as_generate(tmp_path, fused: bool) -> None:
    from PIL import Image

    from pipeline.runtime.probes import TEST_IMAGE, greedy, image_inputs

    torch.manual_seed(0)
    model = _tiny_model(window=16)
    with Image.open(TEST_IMAGE) as im:
        inputs = image_inputs(model, tmp_path, im.convert("RGB"))  # no processor in tmp_path: the manual layout
    inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k != "num_soft_tokens_per_image"}
    inputs["pixel_values"] = inputs["pixel_values"].float()
    ids = inputs["input_ids"]
    new = 12
    ref = greedy(model, new, **inputs)[0, ids.shape[1] :].tolist()
    dec = LeanDecoder(model, max_len=ids.shape[1] + new, prefill_chunk=8, fused=fused)  # chunks cut the image
    got = dec.generate(ids, new, inputs["pixel_values"], inputs.get("image_position_ids"))
    assert got.tokens == ref
    # without the image the placeholders are pad embeddings: other tokens (the image really reached the layers)
    assert dec.generate(ids, new).tokens != ref


def test_image_prompt_with_too_few_slots_is_refused(tmp_path) -> None:
    from PIL import Image

    from pipeline.runtime.probes import TEST_IMAGE, image_inputs

    model = _tiny_model()
    with Image.open(TEST_IMAGE) as im:
        inputs = image_inputs(model, tmp_path, im.convert("RGB"))
    ids = inputs["input_ids"][:, :-6]  # drops some image placeholders (and the eoi token)
    with pytest.raises(ValueError, match="soft tokens"):
        LeanDecoder(model, max_len=ids.shape[1] + 4).generate(ids, 4, inputs["pixel_values"].float(),
                                                               inputs["image_position_ids"])  # fmt: skip


def test_stream_yields_generates_tokens_and_stops() -> None:
    torch.manual_seed(0)
    model = _tiny_model(window=16)
    ids = torch.randint(10, 500, (1, 20))
    dec = LeanDecoder(model, max_len=40, prefill_chunk=8)
    ref = dec.generate(ids, 12).tokens
    assert list(dec.stream(ids, 12)) == ref
    # a stop id ends the stream after yielding it; a stop flag ends it between tokens
    assert list(dec.stream(ids, 12, stop_ids={ref[4]})) == ref[: ref.index(ref[4]) + 1]
    seen: list[int] = []
    for tok in dec.stream(ids, 12, stop=lambda: len(seen) >= 3):
        seen.append(tok)
    assert seen == ref[:3]


def test_the_lean_decoder_runs_in_a_build_without_the_kv_cache_module() -> None:
    """pipeline.runtime.kv_cache is optional (the chat engine says so when it is missing): the fused decode step must
    not need it unless a compressed cache is asked for."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pipeline.runtime.kv_cache':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from tests.runtime.test_decode import _tiny_model\n"
        "from pipeline.runtime.decode import LeanDecoder\n"
        "dec = LeanDecoder(_tiny_model(window=16), max_len=24)\n"
        "assert dec.decode_layers is not None and dec.decode_layers.plans\n"
        "print(len(dec.generate(torch.randint(10, 500, (1, 8)), 4).tokens))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1:]
    assert out.stdout.strip() == "4"
