"""The embedded default: a tiny Gemma-4-architecture checkpoint (text + vision), seeded, split into shards.

It has the real model's tensor names, kinds and dtype (BF16), a text width that is not a multiple of 128 (to
exercise padding) and a vision tower, so `make convert` walks the same code paths as the 31B model in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipeline.shards import INDEX_NAME, atomic_write_json

TEXT = dict(
    vocab_size=512, hidden_size=320, intermediate_size=640, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1, attention_k_eq_v=True,
    layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=64, max_position_embeddings=4096,
    final_logit_softcapping=30.0, vocab_size_per_layer_input=512, hidden_size_per_layer_input=0,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip
VISION = dict(
    hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    head_dim=32, patch_size=16, pooling_kernel_size=3, position_embedding_size=1024, standardize=True,
)  # fmt: skip
SPECIAL: dict[str, Any] = dict(
    boi_token_id=500, eoi_token_id=501, image_token_id=502, video_token_id=503, boa_token_id=504,
    eoa_token_index=505, audio_token_id=506,
)  # fmt: skip


def tiny_config(layers: int = 6) -> Any:
    from transformers import Gemma4Config

    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    text = {**TEXT, "num_hidden_layers": layers, "layer_types": [pattern[i % 6] for i in range(layers)]}
    return Gemma4Config(text_config=text, vision_config=VISION, audio_config=None, **SPECIAL)


def tiny_state_dict(seed: int = 0, layers: int = 6) -> dict[str, torch.Tensor]:
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(tiny_config(layers))
    out = {}
    for name, t in model.state_dict().items():
        # Norm gains start at 0 or 1 in the module init; random gains make per-channel scales matter, as in real models.
        if t.dim() == 1 and "norm" in name:
            t = 1.0 + 0.1 * torch.randn_like(t)
        out[name] = t.to(torch.bfloat16) if t.dim() > 1 or "norm" in name else t
    return out


def write_tiny_checkpoint(folder: Path, shards: int = 3, seed: int = 0, layers: int = 6) -> Path:
    """Write config.json, tokenizer files, N safetensors shards and the index; idempotent for the same args."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = {"shards": shards, "seed": seed, "layers": layers}
    marker = folder / ".hlwq-tiny.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return folder
    cfg = tiny_config(layers)
    cfg.save_pretrained(folder)  # type: ignore[attr-defined]
    _write_tokenizer(folder)
    tensors = tiny_state_dict(seed, layers)
    names = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for name in names:  # contiguous runs of names with about equal bytes per shard
        groups[min(shards - 1, acc * shards // total)].append(name)
        acc += tensors[name].numel() * tensors[name].element_size()
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    atomic_write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(marker, stamp)
    return folder


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), int(TEXT["vocab_size"])):  # type: ignore[call-overload]
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
