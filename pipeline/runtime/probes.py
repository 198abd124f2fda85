"""What a loaded model answers: a text prompt, an image + text prompt, and synthetic token prompts for the
memory and speed figures. Works for every runtime (the output layer may be int8, the embedding in host RAM)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from pipeline.runtime.embedding import Int8Head

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TEST_IMAGE = ASSETS / "test_image.png"
TEXT_PROMPT = "Describe the Eiffel Tower in one sentence."
IMAGE_PROMPT = "Describe this image."


def device_of(model: Any) -> torch.device:
    """Where the model computes: the output layer's device (the embedding may live in host RAM)."""
    head = model.get_output_embeddings()
    ref = next(iter(head.buffers()), None) if isinstance(head, Int8Head) else None
    return ref.device if ref is not None else next(p.device for p in model.parameters())


def text_config(model: Any) -> Any:
    return model.config.get_text_config(decoder=True)


def _safe_token_range(model: Any) -> tuple[int, int]:
    """Token ids for synthetic prompts: below every special multimodal id that sits inside the vocabulary."""
    vocab = text_config(model).vocab_size
    keys = ("boi_token_id", "image_token_id", "eoi_token_id", "video_token_id", "audio_token_id", "boa_token_id")
    specials = [getattr(model.config, k, None) for k in keys]
    high = min([vocab, *[s for s in specials if isinstance(s, int) and 16 < s < vocab]])
    return 16, high


def synthetic_ids(model: Any, n: int, seed: int = 0) -> torch.Tensor:
    lo, hi = _safe_token_range(model)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (1, n), generator=g)


def greedy(model: Any, new_tokens: int, **inputs: Any) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          top_p=None, top_k=None, temperature=None)  # fmt: skip


def _tokenizer(folder: Path) -> Any | None:
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def text_answer(model: Any, folder: Path, new_tokens: int = 16) -> dict[str, Any]:
    dev = device_of(model)
    tok = _tokenizer(folder)
    if tok is not None:
        ids = tok(TEXT_PROMPT, return_tensors="pt").input_ids
    else:  # no tokenizer shipped (a synthetic artifact): a fixed token prompt
        ids = synthetic_ids(model, 16, seed=1)
    out = greedy(model, new_tokens, input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev))
    new = out[0, ids.shape[1] :].tolist()
    return {"prompt": TEXT_PROMPT if tok is not None else None, "ids": new,
            "text": tok.decode(new, skip_special_tokens=True) if tok is not None else None}  # fmt: skip


def image_inputs(model: Any, folder: Path, image: Any) -> dict[str, torch.Tensor]:
    """Prompt + image through the artifact's processor when it ships one; else the model's own image processor
    settings and a hand-built token layout (bos, text, boi, image tokens, eoi)."""
    cfg = model.config
    if (folder / "processor_config.json").exists() or (folder / "preprocessor_config.json").exists():
        from transformers import AutoProcessor

        with contextlib.suppress(Exception):  # a processor that cannot be built falls through to the manual layout
            proc = AutoProcessor.from_pretrained(folder)
            text = f"{proc.tokenizer.bos_token or ''}{IMAGE_PROMPT} {proc.image_token}"
            return dict(proc(text=[text], images=[image], return_tensors="pt"))
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    vc = cfg.vision_config
    proc = Gemma4ImageProcessorPil(patch_size=vc.patch_size, pooling_kernel_size=vc.pooling_kernel_size,
                                   max_soft_tokens=280 if vc.hidden_size >= 512 else 70)  # fmt: skip
    px = proc(images=[image], return_tensors="pt")
    n = int(px["num_soft_tokens_per_image"][0])
    bos = text_config(model).bos_token_id
    prompt = synthetic_ids(model, 8, seed=2)[0].tolist()
    ids = torch.tensor([[bos, *prompt, cfg.boi_token_id, *[cfg.image_token_id] * n, cfg.eoi_token_id, *prompt[:3]]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": px["pixel_values"],
        "image_position_ids": px["image_position_ids"],
        "mm_token_type_ids": (ids == cfg.image_token_id).long(),
    }


def image_answer(model: Any, folder: Path, new_tokens: int = 16) -> dict[str, Any]:
    from PIL import Image

    dev = device_of(model)
    with Image.open(TEST_IMAGE) as im:
        image = im.convert("RGB")
    inputs = image_inputs(model, folder, image)
    dtype = model.get_input_embeddings().weight.dtype
    inputs = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()
              if isinstance(v, torch.Tensor)}  # fmt: skip
    inputs.pop("num_soft_tokens_per_image", None)
    out = greedy(model, new_tokens, **inputs)
    tok = _tokenizer(folder)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return {"image": TEST_IMAGE.name, "prompt_tokens": int(inputs["input_ids"].shape[1]), "ids": new,
            "text": tok.decode(new, skip_special_tokens=True) if tok is not None else None}  # fmt: skip
