"""What `hlwq chat` and `hlwq demo` run at: decode tok/s, time to first token and peak memory of the engine's
answers on an artifact, for a text prompt and an image prompt, with the BF16 KV cache and, when this build has
pipeline.runtime.kv_cache, the compressed one. The figures are the engine's own Stats (what the status line shows).

Run (the GPU machine; on the CPU it runs the reference path):
    .venv/bin/python -m bench.chat ARTIFACT_OR_REPO --tokens 256 --kv-bits 3 --out bench/results/chat.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEXT_PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
IMAGE_PROMPT = "Describe this image in detail."


def run(artifact: str, tokens: int, kv_bits: int | None, device: str | None) -> dict[str, Any]:
    import torch

    try:
        from pipeline.runtime import versions
    except ImportError:  # before the runtime package
        from pipeline.loader import versions
    from pipeline.runtime.engine import Chat, Engine, Settings, kv_support, open_image

    engine = Engine.open(artifact, device)
    image = open_image(ROOT / "pipeline" / "assets" / "test_image.png")
    "".join(Chat(engine, Settings(max_new_tokens=16)).send("Hello"))  # warm-up: first-call allocations, kernels
    kv_options: list[int | None] = [None]
    if kv_bits is not None and kv_support(kv_bits) is None:
        kv_options.append(kv_bits)
    runs = []
    for kv in kv_options:
        for case in ("text", "image"):
            chat = Chat(engine, Settings(max_new_tokens=tokens, kv_bits=kv))
            if case == "image":
                chat.pending.append(image)
            gen = chat.send(IMAGE_PROMPT if case == "image" else TEXT_PROMPT)
            text = "".join(gen)
            assert gen.stats is not None
            row = {"case": case, **dataclasses.asdict(gen.stats), "answer_head": text[:200]}
            runs.append(row)
            print(f"chat  {case:<5} {gen.stats.line()}", flush=True)
    dev = engine.device
    return {
        "artifact": artifact,
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "runtime": engine.runtime,
        "max_new_tokens": tokens,
        "kv_bits_asked": kv_bits,
        "kv_note": kv_support(kv_bits),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", metavar="ARTIFACT_OR_REPO")
    p.add_argument("--tokens", type=int, default=256, help="max new tokens per answer (256)")
    p.add_argument("--kv-bits", type=int, help="also measure the compressed KV cache with this many bits")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--out", default="bench/results/chat.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from pipeline.shards import atomic_write_json

    result = run(args.artifact, args.tokens, args.kv_bits, args.device)
    atomic_write_json(Path(args.out), result)
    print(f"chat  wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
