"""Stage load_check: load the finished artifact on a GPU as torchao INT4, generate, and record peak memory and
decode speed; fails the run above load_check.max_vram_gb. Skipped, with the reason recorded, without a GPU."""

from __future__ import annotations

import logging
from typing import Any

import torch

from pipeline.context import Context
from pipeline.errors import StageError

NAME = "load_check"
log = logging.getLogger(__name__)


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.manifest.load_check
    if not cfg.enabled:
        return {"info": {"status": "skipped", "reason": "load_check.enabled is false in the manifest"}}
    if not torch.cuda.is_available():
        log.info("load_check skipped: no CUDA GPU on this host")
        return {"info": {"status": "skipped", "reason": "no CUDA GPU on the host that built this artifact"}}
    from pipeline.runtime import load_check
    from pipeline.runtime.kv_cache import config_from_manifest

    figures = load_check(ctx.staging, runtime=cfg.runtime, context_tokens=cfg.context_tokens,
                         host_embed=cfg.host_embedding, kv_cache=config_from_manifest(cfg.kv_cache))  # fmt: skip
    if figures["peak_vram_gb"] > cfg.max_vram_gb:
        raise StageError(
            f"load_check: peak GPU memory {figures['peak_vram_gb']:.2f} GB > max_vram_gb {cfg.max_vram_gb}"
        )
    return {"info": {"status": "measured", "figures": figures}}
