"""`hlwq bench` / `make bench-quality`: output quality of HLWQ and its peers against the float model, one model+text.

For each method: mean KL(float || method) of the next-token distribution (primary), top-1 agreement and token-weighted
perplexity over non-overlapping windows of a fixed text, and the bits per weight a real format stores (codes + scales
+ zeros/codebooks, over the quantized tensors; and over all tensors with the kept ones in BF16). HLWQ's default
points go through a real `hlwq convert` artifact read back with the reference dequantization; its variants run the
same pipeline.quant functions in-process. Every method quantizes the same tensors (the default keep list applies).
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import lm_source, peers
from bench.metrics_lm import (
    Totals,
    frontier_gap,
    kl_per_position,
    nll_per_position,
    pareto_front,
    top1_matches,
    windows,
)
from pipeline.errors import PipelineError
from pipeline.shards import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
Weights = dict[str, torch.Tensor]
DEFAULT_OUT = Path("bench/results/quality.json")
DEFAULT_CHART = Path("bench/results/quality.png")
BPW_NOTE = ("bits_per_weight: stored bits (codes incl. block padding + scales + zeros/codebooks) over the quantized "
            "tensors; bits_per_weight_all: over all tensors, the kept ones (embedding, norms) in BF16")  # fmt: skip


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "float" | "hlwq" | "peer"
    bits: int | None
    note: str = ""
    artifact: dict[str, Any] | None = None  # HLWQ through `hlwq convert`: the manifest's quantize section
    variant: dict[str, Any] | None = None  # HLWQ in-process: QuantParams kwargs (+ "overrides": glob -> bits)
    peer: Callable[[torch.Tensor], peers.Dequantized] | None = None
    base: str | None = None  # a peer applied to this method's weights instead of the float ones
    artifact_path: str | None = None  # an existing HLWQ artifact, read as it is
    smooth: dict[str, Any] | None = None  # a peer quantizes W·diag(s) with HLWQ's random-token s (AWQ-style)


SMOOTH: dict[str, Any] = {"alpha": 0.25, "sequences": 16, "length": 256}
VKD6 = {"*v_proj*": 6, "*k_proj*": 6, "*down_proj*": 6}


def method_list() -> list[Method]:
    ms = [Method("float", "float", None, "BF16 weights, fp32 compute")]
    ms += [Method(f"hlwq-q{b}", "hlwq", b, "artifact, defaults", artifact={"bits": b}) for b in (3, 4, 5, 6)]
    ms += [Method(f"hlwq-q{b}-sm-art", "hlwq", b, "artifact, smoothing (stats stage)",
                  artifact={"bits": b, "smooth": SMOOTH}) for b in (4, 5)]  # fmt: skip
    v = [
        ("q4-l2", 4, {"scale": "l2"}, "L2-norm block scale (the reference's)"),
        ("q5-l2", 5, {"scale": "l2"}, "L2-norm block scale"),
        ("q4-nosigns", 4, {"sign_seed": None}, "no random sign diagonal"),
        ("q4-fit", 4, {"fit_codebook": True}, "codebook fitted per tensor"),
        ("q4-b256", 4, {"block_size": 256}, "block 256"),
        ("q4-b32", 4, {"block_size": 32}, "block 32"),
        ("q5-b32", 5, {"block_size": 32}, "block 32"),
        ("q4-b64-norm", 4, {"block_size": 64, "norm_scale": 0.5}, "block 64; columns x (RMSNorm gain)^0.5"),
        ("q5-b64-norm", 5, {"block_size": 64, "norm_scale": 0.5}, "block 64; columns x (RMSNorm gain)^0.5"),
        *((f"q{b}-b64", b, {"block_size": 64}, "block 64 (576 = 9 x 64: no padding)") for b in (3, 4, 5, 6)),
        (
            "q4-b64-alloc",
            4,
            {"block_size": 64, "overrides": {"*down_proj*": 5, "*gate_proj*": 3}},
            "block 64; down_proj 5 bits, gate_proj 3 bits (same average)",
        ),
        (
            "q5-b64-alloc",
            5,
            {"block_size": 64, "overrides": {"*down_proj*": 6, "*gate_proj*": 4}},
            "block 64; down_proj 6 bits, gate_proj 4 bits (same average)",
        ),
        # Column smoothing from the stats stage's random-token pass (issue 14), and allocation by its sensitivities.
        *((f"q{b}-b64-sm", b, {"block_size": 64, "smooth": SMOOTH}, "block 64; smoothing") for b in (3, 4, 5, 6)),
        *((f"q{b}-sm", b, {"smooth": SMOOTH}, "block 128; smoothing") for b in (4, 5)),
        *(
            (
                f"q5-b64-sm-a{a}",
                5,
                {"block_size": 64, "smooth": {**SMOOTH, "alpha": a}},
                f"block 64; smoothing alpha {a}",
            )
            for a in (0.125, 0.5)
        ),
        *(
            (
                f"q5-b64-sm-n{n}x{ln}",
                5,
                {"block_size": 64, "smooth": {**SMOOTH, "sequences": n, "length": ln}},
                f"block 64; smoothing from {n} x {ln} random tokens",
            )
            for n, ln in ((2, 64), (4, 128), (64, 256))
        ),
        (
            "q5-b64-sm-vkd6",
            5,
            {"block_size": 64, "smooth": SMOOTH, "overrides": VKD6},
            "block 64; smoothing; v/k/down_proj 6 bits",
        ),
        (
            "q4-b64-sm-vkd5",
            4,
            {"block_size": 64, "smooth": SMOOTH, "overrides": {k: 5 for k in VKD6}},
            "block 64; smoothing; v/k/down_proj 5 bits",
        ),
        *(
            (
                f"b64-sm-t{t}",
                round(t),
                {"bits": round(t), "block_size": 64, "smooth": SMOOTH, "target_bpw": t},
                f"block 64; smoothing; bits allocated to {t} bpw",
            )
            for t in (4.1, 4.25, 4.5, 5.25, 5.5)
        ),
        *(
            (
                f"b64-t{t}",
                round(t),
                {"bits": round(t), "block_size": 64, "target_bpw": t},
                f"block 64; bits allocated to {t} bpw (no smoothing)",
            )
            for t in (4.5, 5.5)
        ),
    ]
    ms += [
        Method("rtn-sym-4-g128", "peer", 4, "absmax RTN, fp16 scale", peer=lambda w: peers.rtn_symmetric(w, 4)),
        Method("rtn-sym-5-g128", "peer", 5, "absmax RTN, fp16 scale", peer=lambda w: peers.rtn_symmetric(w, 5)),
        Method("torchao-int4-g128", "peer", 4, "asymmetric min-max (torchao Int4WeightOnly math)",
               peer=peers.asym_minmax_int4),
        Method("hlwq-q5>torchao-int4", "peer", 4, "torchao int4 of the hlwq-q5 artifact (the seed's runtime path)",
               peer=peers.asym_minmax_int4, base="hlwq-q5"),
        Method("hlwq-q5>int4-rotated", "peer", 4, "torchao int4 of the hlwq-q5 artifact in its rotated basis "
               "(runtime int4-rotated)", peer=peers.rotated_int4, base="hlwq-q5"),
        Method("hqq-4-g128", "peer", 4, "HQQ 0.2.8, axis 1, fp16 scale/zero", peer=lambda w: peers.hqq(w, 4)),
        Method("hqq-5-g128", "peer", 5, "HQQ 0.2.8, axis 1, fp16 scale/zero", peer=lambda w: peers.hqq(w, 5)),
        Method("gguf-Q4_0", "peer", 4, "llama.cpp Q4_0 (gguf numpy)", peer=lambda w: peers.gguf_quant(w, "Q4_0")),
        Method("gguf-Q5_0", "peer", 5, "llama.cpp Q5_0 (gguf numpy)", peer=lambda w: peers.gguf_quant(w, "Q5_0")),
        Method("gguf-Q5_1", "peer", 5, "llama.cpp Q5_1 (gguf numpy)", peer=lambda w: peers.gguf_quant(w, "Q5_1")),
    ]  # fmt: skip
    # The same random-token smoothing (AWQ-style, vectors counted as stored F32) given to every peer.
    ms += [Method(f"{m.name}+sm", "peer", m.bits, f"{m.note}; HLWQ's smoothing", peer=m.peer, smooth=SMOOTH)
           for m in list(ms) if m.family == "peer" and m.base is None]  # fmt: skip
    ms += [Method(f"hlwq-{n}", "hlwq", b, note, variant={"bits": b, **kw}) for n, b, kw, note in v]
    return sorted(ms, key=lambda m: m.name.startswith("hqq"))  # HQQ last: the slowest to quantize


# ---------------------------------------------------------------------------------------------------- evaluation


@dataclass
class Result:
    method: Method
    totals: Totals
    stored_bits: int  # over the quantized tensors
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def float_totals(ids: torch.Tensor, spans: list[tuple[int, int]], log_probs: list[torch.Tensor]) -> Totals:
    """The float model's own row: KL 0 and top-1 100 % by definition, its NLL over each window's next tokens."""
    t = Totals()
    for (a, b), lp in zip(spans, log_probs, strict=True):
        t.add(torch.zeros(b - a - 1), nll_per_position(lp, ids[a + 1 : b]), torch.ones(b - a - 1, dtype=torch.bool))
    return t


class Evaluator:
    """The float model plus its reference log-probs on every window; evaluates a method's replacement weights."""

    def __init__(self, folder: Path, token_ids: torch.Tensor, window: int):
        from transformers import AutoModelForCausalLM

        # eager attention: on this CPU it ran faster than sdpa, and the float reference uses the same kernels
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                          attn_implementation="eager").eval()  # fmt: skip
        self.params = dict(self.model.named_parameters())
        self.ids = token_ids
        self.spans = windows(token_ids.numel(), window)
        self.float_weights: Weights = {}
        self.ref: list[
            torch.Tensor
        ] = []  # fp32 log-probs per window (log_softmax is idempotent, so they pass as logits)

    def set_targets(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.params]
        if missing:
            raise PipelineError(
                f"bench: model has no parameter {missing[0]} (only Llama-style causal LMs are supported)"
            )
        self.float_weights = {n: self.params[n].detach().clone() for n in names}

    def _logits(self, a: int, b: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(input_ids=self.ids[a:b][None], use_cache=False).logits[0, :-1].float()

    def reference(self) -> Totals:
        self.ref = [torch.log_softmax(self._logits(a, b), -1) for a, b in self.spans]
        return float_totals(self.ids, self.spans, self.ref)

    def evaluate(self, weights: Weights) -> Totals:
        with torch.no_grad():
            for n, w in weights.items():
                self.params[n].copy_(w)
        t = Totals()
        for (a, b), ref in zip(self.spans, self.ref, strict=True):
            lg = self._logits(a, b)
            t.add(kl_per_position(ref, lg), nll_per_position(lg, self.ids[a + 1 : b]), top1_matches(ref, lg))
        with torch.no_grad():
            for n, w in self.float_weights.items():
                self.params[n].copy_(w)
        return t


def quantized_names(folder: Path, manifest_quantize: dict[str, Any] | None = None) -> tuple[list[str], int, int]:
    """Tensors the default manifest quantizes (names, their params, all params), from the safetensors headers."""
    from pipeline.manifest import parse_manifest
    from pipeline.shards import load_index, read_header
    from stages.quantize import bits_for

    # Only the quantize rules are used; the destination is never written (it must not be the source, though).
    m = parse_manifest({"name": "bench", "source": {"path": str(folder)},
                        "destination": {"path": str(folder.parent / "unused-destination")},
                        "quantize": manifest_quantize or {}})  # fmt: skip
    names, n_q, n_all = [], 0, 0
    for shard in load_index(folder):
        infos, _ = read_header(folder / shard)
        for name, info in infos.items():
            n = math.prod(info.shape)
            n_all += n
            if bits_for(m, info) is not None:
                names.append(name)
                n_q += n
    return sorted(names), n_q, n_all


# ---------------------------------------------------------------------------------------------------- HLWQ runs


def convert_artifact(source: Path, workdir: Path, name: str, quantize: dict[str, Any]) -> Path:
    """Write a manifest for `source` and run the real pipeline on it; returns the artifact folder."""
    from pipeline.manifest import load_manifest
    from pipeline.runner import convert, open_run

    workdir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": name,
        "source": {"path": str(source.resolve())},
        "destination": {"path": str((workdir.parent / f"{workdir.name}-published").resolve())},
        "quantize": quantize,
        "load_check": {"enabled": False},
        "verify": {"min_cos_sim": 0.95},  # 3-bit tensors sit near 0.98; the bench judges by output KL
    }
    path = workdir / "manifest.yaml"
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")  # JSON is YAML
    ctx = open_run(load_manifest(path), workdir)
    convert(ctx)
    return ctx.artifact


def read_artifact(folder: Path, names: list[str]) -> tuple[Weights, int]:
    """Dequantize every quantized tensor of an artifact with the reference decoder; returns (weights, stored bits)."""
    from pipeline import format as fmt
    from pipeline.shards import load_index

    out: Weights = {}
    bits = 0
    for shard in load_index(folder):
        reader = fmt.ShardReader(folder / shard)
        for name in reader.quantized:
            bits += stored_bits(reader.get_quantized(name))
            out[name] = dequantize_f32(reader, name)
    if sorted(out) != sorted(names):
        raise PipelineError(f"bench: artifact {folder} quantized other tensors than expected")
    return out, bits


def stored_bits(q: Any) -> int:
    """What one quantized tensor stores: U8 codes, F16 scales, F32 codebook, and FORMAT v2's F32 smoothing vector."""
    bits = 8 * (q.codes.numel() + 2 * q.scales.numel() + 4 * q.codebook.numel())
    return bits + (32 * q.smooth.numel() if q.smooth is not None else 0)


def artifact_names(folder: Path) -> tuple[list[str], int]:
    from pipeline import format as fmt
    from pipeline.shards import load_index

    recs = {n: r for shard in load_index(folder) for n, r in fmt.ShardReader(folder / shard).quantized.items()}
    return sorted(recs), sum(math.prod(r["shape"]) for r in recs.values())


def dequantize_f32(reader: Any, name: str) -> torch.Tensor:
    return reader.get(name).float()


_NORM_OF = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
            "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
            "mlp.up_proj": "post_attention_layernorm"}  # fmt: skip


def norm_column_scale(name: str, params: dict[str, torch.Tensor], alpha: float) -> torch.Tensor | None:
    """Data-free per-input-channel importance: (|RMSNorm gain| / its mean)^alpha for the weights a norm feeds."""
    head, _, tail = name.rpartition(".layers.")
    idx, _, rest = tail.partition(".")
    norm = _NORM_OF.get(rest.removesuffix(".weight"))
    if norm is None:
        return None
    g = params[f"{head}.layers.{idx}.{norm}.weight"].detach().float().abs()
    return (g / g.mean()).clamp_min(1e-3) ** alpha


class StatsCache:
    """The stats stage's random-token pass over the bench model, once per setting (kept in the bench cache)."""

    def __init__(self, folder: Path, names: list[str], cache: Path):
        self.folder, self.names, self.cache = folder, set(names), cache
        self._loaded: dict[str, Any] = {}

    def get(self, smooth: dict[str, Any]) -> Any:
        from pipeline.manifest import Smooth, params_hash
        from pipeline.shards import load_index
        from stages import stats

        cfg = Smooth(**smooth)
        pass_cfg = {k: v for k, v in vars(cfg).items() if k not in ("alpha", "max_ratio")}  # s is made at quantize
        key = params_hash({"pass": pass_cfg, "probe_alpha": cfg.alpha, "probe_max": cfg.max_ratio,
                           "v": stats.STATS_VERSION})  # fmt: skip
        if key not in self._loaded:
            path = self.cache / f"stats-{self.folder.name}-{key}.safetensors"
            if not path.exists():
                t0 = time.monotonic()
                src = stats.ShardSource(self.folder, load_index(self.folder))
                st = stats.collect(stats.load_config(self.folder), src, lambda n, _s: n in self.names, cfg,
                                   torch.device("cpu"))  # fmt: skip
                stats.save(st, path)
                log.info("stats pass (%d x %d tokens): %.1f s", cfg.sequences, cfg.length, time.monotonic() - t0)
            self._loaded[key] = stats.load(path)
        return self._loaded[key], cfg


def hlwq_variant(weights: Weights, spec: dict[str, Any], params: dict[str, torch.Tensor],
                 stats_cache: StatsCache | None = None) -> tuple[Weights, int]:  # fmt: skip
    """HLWQ in-process with the pipeline's quant functions (what the quantize stage calls, minus the file I/O).

    "norm_scale": alpha simulates the exact re-parametrization W' = W * s (columns), g' = g / s of the feeding
    RMSNorm gain with s = norm_column_scale: important input channels get a larger share of each block's codes.
    "smooth": Smooth kwargs: column smoothing from the stats stage's random-token pass (stored F32 vectors counted).
    "target_bpw": bit allocation by the stats pass's sensitivities ("widths": the allowed bit widths).
    """
    from pipeline.quant import QuantParams, allocate, dequantize, quantize

    spec = dict(spec)
    overrides: dict[str, int] = spec.pop("overrides", {})
    alpha: float | None = spec.pop("norm_scale", None)
    smooth: dict[str, Any] | None = spec.pop("smooth", None)
    target: float | None = spec.pop("target_bpw", None)
    widths: tuple[int, ...] = tuple(spec.pop("widths", allocate.WIDTHS))
    st, cfg = (None, None)
    if smooth is not None or target is not None:
        assert stats_cache is not None
        st, cfg = stats_cache.get(smooth if smooth is not None else {"alpha": 0.0})
    allocated: dict[str, int] = {}
    if target is not None:
        cands = [allocate.Candidate(n, *w.shape, st.records[n]["sensitivity"],
                                    next((v for p, v in overrides.items() if fnmatch.fnmatchcase(n, p)), None),
                                    smooth is not None) for n, w in weights.items()]  # fmt: skip
        allocated = allocate.allocate(cands, target, spec.get("block_size", 128), widths)
    out: Weights = {}
    bits = 0
    for name, w in weights.items():
        b = next((v for p, v in overrides.items() if fnmatch.fnmatchcase(name, p)), allocated.get(name, spec["bits"]))
        qp = QuantParams(**{**spec, "bits": b})
        s = norm_column_scale(name, params, alpha) if alpha is not None else None
        src = w if s is None else w * s  # (s is applied in fp32; the stored gain g/s would be BF16-rounded)
        sv = st.smoothing_vector(name, cfg) if smooth is not None else None
        q = quantize(src.to(torch.bfloat16), qp, sv)  # the pipeline quantizes the BF16 checkpoint tensor
        bits += 8 * (q.codes.numel() + 2 * q.scales.numel() + 4 * q.codebook.numel())
        bits += 32 * sv.numel() if sv is not None else 0
        deq = dequantize(q, qp.sign_bits(), torch.float32)
        out[name] = deq if s is None else deq / s
    return out, bits


def peer_weights(weights: Weights, fn: Callable[[torch.Tensor], peers.Dequantized],
                 smooth: tuple[Any, Any] | None = None) -> tuple[Weights, int]:  # fmt: skip
    """A peer on every target weight; with `smooth` (stats, Smooth) on W·diag(s), divided back, s counted as F32."""
    out: Weights = {}
    bits = 0
    for name, w in weights.items():
        sv = smooth[0].smoothing_vector(name, smooth[1]) if smooth else None
        if sv is None:
            out[name], b = fn(w)
        else:
            deq, b = fn((w.float() * sv).to(w.dtype))
            out[name], b = deq / sv, b + 32 * sv.numel()
        bits += b
    return out, bits


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class Setup:
    folder: Path
    model_label: str
    text_label: str
    token_ids: torch.Tensor
    artifact: Path | None = None  # MODEL_OR_ARTIFACT was an HLWQ artifact of `folder`


def prepare(target: str, cache: Path, tokens: int, text_file: Path | None = None, gguf: Path | None = None) -> Setup:
    """Resolve MODEL_OR_ARTIFACT to a float safetensors folder and tokenize the text (`text_file`, `gguf`: the
    packaged text and model given as plain files, see lm_source)."""
    from transformers import AutoTokenizer

    text = lm_source.load_text(cache, text_file)
    if target == lm_source.SMOLLM2:
        folder = lm_source.prepare_smollm2(cache, text, gguf)
        info = lm_source.source_info(folder)
        change = info.get("perm_max_logit_change", 0.0)
        label = (
            f"SmolLM2-135M-Instruct from {info.get('source')} (dequantized Q4_1, function-preserving "
            f"permutation seed {info.get('perm_seed')}, max |logit change| {change:.1e}; stored BF16)"
        )
    else:
        folder = Path(target)
        if not (folder / "config.json").is_file():
            raise PipelineError(f"bench: {target} is neither '{lm_source.SMOLLM2}' nor a model folder with config.json")
        artifact = None
        if "quantization_config" in json.loads((folder / "config.json").read_text()):
            artifact, folder = folder, artifact_source(folder)
        label = str(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < tokens:
        raise PipelineError(f"bench: the text has {ids.numel()} tokens, fewer than --tokens {tokens}")
    return Setup(
        folder, label, lm_source.TEXT_NAME, ids[:tokens].clone(), artifact if target != lm_source.SMOLLM2 else None
    )


def artifact_source(artifact: Path) -> Path:
    """The local float folder an HLWQ artifact was converted from (its hlwq_report.json names it)."""
    from pipeline.format import read_quantization_config

    read_quantization_config(artifact / "config.json")  # an HLWQ artifact of a version this reader reads
    try:
        src = json.loads((artifact / "hlwq_report.json").read_text())["source"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise PipelineError(f"bench: {artifact} has no readable hlwq_report.json naming its source") from None
    if src.get("kind") != "path" or not (Path(src["name"]) / "config.json").is_file():
        raise PipelineError(f"bench: the float source of {artifact} ({src.get('name')}) is not a local model folder")
    return Path(src["name"])


def run_methods(
    setup: Setup,
    methods: list[Method],
    window: int,
    workdir: Path,
    progress: Callable[[Totals, list[Result], list[str], int, int], None] | None = None,
) -> tuple[Totals, list[Result], list[str], int, int]:
    names, n_q, n_all = quantized_names(setup.folder)
    if setup.artifact is not None:  # the artifact's own choice of quantized tensors
        names, n_q = artifact_names(setup.artifact)
    ev = Evaluator(setup.folder, setup.token_ids, window)
    ev.set_targets(names)
    stats_cache = StatsCache(setup.folder, names, setup.folder.parent)
    t0 = time.monotonic()
    float_totals = ev.reference()
    log.info("float: ppl %.3f over %d tokens (%.1f s)", float_totals.ppl, float_totals.tokens, time.monotonic() - t0)
    results: list[Result] = []
    skipped: list[str] = []
    cache: dict[str, Weights] = {}
    needed = {m.base for m in methods if m.base}
    for m in methods:
        if m.family == "float":
            continue
        t0 = time.monotonic()
        if m.artifact_path is not None:
            w, bits = read_artifact(Path(m.artifact_path), names)
        elif m.artifact is not None:
            art = convert_artifact(setup.folder, workdir / m.name, f"bench-{m.name}", m.artifact)
            w, bits = read_artifact(art, names)
        elif m.variant is not None:
            w, bits = hlwq_variant(ev.float_weights, m.variant, ev.params, stats_cache)
        else:
            assert m.peer is not None
            if m.base and m.base not in cache:
                raise PipelineError(f"bench: method {m.name} needs {m.base}; select it too")
            try:
                sm = stats_cache.get(m.smooth) if m.smooth is not None else None
                w, bits = peer_weights(cache[m.base] if m.base else ev.float_weights, m.peer, sm)
            except ImportError as e:  # a peer package that is not installed here: say so, run the rest
                log.warning("%s not run: %s", m.name, e)
                skipped.append(f"{m.name}: not run ({e})")
                continue
        q_s = time.monotonic() - t0
        if m.name in needed:
            cache[m.name] = w
        totals = ev.evaluate(w)
        r = Result(m, totals, bits, time.monotonic() - t0, {"quantize_s": round(q_s, 1)})
        results.append(r)
        if progress is not None:  # a long run leaves its finished methods behind if it is stopped
            progress(float_totals, results, skipped, n_q, n_all)
        log.info("%-22s bpw %.3f  KL %.5f  top-1 %.4f  ppl %.3f  (%.0f s)", m.name, bits / n_q, totals.mean_kl,
                 totals.top1, totals.ppl, r.seconds)  # fmt: skip
    return float_totals, results, skipped, n_q, n_all


def rows(float_totals: Totals, results: list[Result], n_q: int, n_all: int) -> list[dict[str, Any]]:
    kept_bits = 16 * (n_all - n_q)
    out = [{"name": "float", "family": "float", "bits": 16, "bits_per_weight": 16.0, "bits_per_weight_all": 16.0,
            "ppl": float_totals.ppl, "kld": 0.0, "top1": 1.0, "note": "reference"}]  # fmt: skip
    for r in results:
        out.append({
            "name": r.method.name, "family": r.method.family, "bits": r.method.bits,
            "bits_per_weight": r.stored_bits / n_q, "bits_per_weight_all": (r.stored_bits + kept_bits) / n_all,
            "ppl": r.totals.ppl, "kld": r.totals.mean_kl, "top1": r.totals.top1, "note": r.method.note,
            "seconds": round(r.seconds, 1),
        })  # fmt: skip
    return out


def markdown_table(table: list[dict[str, Any]], float_ppl: float) -> str:
    lines = [
        "| method | family | bits | bpw (quantized) | bpw (all, kept BF16) | mean KL | top-1 | PPL | ΔPPL | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        dppl = 100 * (r["ppl"] / float_ppl - 1)
        lines.append(f"| {r['name']} | {r['family']} | {r['bits']} | {r['bits_per_weight']:.3f} | "
                     f"{r['bits_per_weight_all']:.3f} | {r['kld']:.5f} | {100 * r['top1']:.2f} % | {r['ppl']:.3f} | "
                     f"{dppl:+.2f} % | {r['note']} |")  # fmt: skip
    return "\n".join(lines)


def frontier_report(table: list[dict[str, Any]]) -> list[str]:
    """Per peer: matched (some HLWQ point at <= its bpw and <= its KL), or the nearest misses on each axis."""
    lines = []
    for label, pts in (
        ("any HLWQ point", [r for r in table if r["family"] == "hlwq"]),
        ("HLWQ defaults", [r for r in table if r["family"] == "hlwq" and r["note"].startswith("artifact")]),
    ):
        for r in (r for r in table if r["family"] == "peer"):
            bpw, kl = r["bits_per_weight"], r["kld"]
            g = frontier_gap((bpw, kl), [(p["bits_per_weight"], p["kld"]) for p in pts])
            if g["matched"]:
                lines.append(f"{r['name']} ({bpw:.3f} bpw, KL {kl:.4f}): matched or beaten by {label}")
                continue
            cheaper = min((p for p in pts if p["bits_per_weight"] <= bpw), key=lambda p: p["kld"], default=None)
            better = min((p for p in pts if p["kld"] <= kl), key=lambda p: p["bits_per_weight"], default=None)
            a = (
                f"best of ours at <= its bpw: {cheaper['name']} KL {cheaper['kld']:.4f} ({g['kl_ratio']:.2f}x)"
                if cheaper
                else "none of ours at <= its bpw"
            )
            b = (f"cheapest of ours at <= its KL: {better['name']} {better['bits_per_weight']:.3f} bpw "
                 f"({g['extra_bpw']:+.3f})" if better else "none of ours reaches its KL")  # fmt: skip
            lines.append(f"{r['name']} ({bpw:.3f} bpw, KL {kl:.4f}): NOT matched by {label}: {a}; {b}")
    return lines


def _labelled(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points worth a label: every peer, HLWQ's artifacts and every point on HLWQ's frontier. An artifact measured
    through the GPU runtime ('-native') sits on its CPU-reference point, so only the table names it."""
    ours = [r for r in table if r["family"] == "hlwq"]
    front = {id(ours[i]) for i in pareto_front([(r["bits_per_weight"], r["kld"]) for r in ours])}
    return [r for r in table if r["family"] == "peer" or (r["family"] == "hlwq" and (
        id(r) in front or (r["note"].startswith("artifact") and not r["name"].endswith("-native"))))]  # fmt: skip


def _place_labels(ax: Any, fig: Any, points: list[tuple[str, float, float]]) -> None:
    """Annotate each point at the first of a few offsets whose text box overlaps no label placed before it."""
    offsets = [(4, 3), (4, -10), (-4, 3), (-4, -10), (6, 10), (6, -16), (-6, 10), (-6, -16), (10, 18), (10, -24)]
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for text, x, y in sorted(points, key=lambda p: (p[1], p[2])):
        for i, (dx, dy) in enumerate(offsets):
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=6.5,
                              ha="left" if dx > 0 else "right", arrowprops=None if i < 4 else {
                                  "arrowstyle": "-", "lw": 0.4, "color": "0.5"})  # fmt: skip
            box = ann.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(b) for b in placed) or i == len(offsets) - 1:
                placed.append(box)
                break
            ann.remove()


def write_chart(path: Path, table: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 7.5), dpi=110)
    peers_ = [r for r in table if r["family"] == "peer"]
    ours = [r for r in table if r["family"] == "hlwq"]
    groups = [
        ("peers", [r for r in peers_ if "+sm" not in r["name"]], {"c": "tab:red", "marker": "s", "s": 40}),
        ("peers + HLWQ's smoothing", [r for r in peers_ if "+sm" in r["name"]],
         {"facecolors": "none", "edgecolors": "tab:red", "marker": "s", "s": 40}),
        ("HLWQ artifacts (hlwq convert)", [r for r in ours if r["note"].startswith("artifact")],
         {"c": "tab:blue", "marker": "o", "s": 45}),
        ("HLWQ variants (in-process)", [r for r in ours if not r["note"].startswith("artifact")],
         {"facecolors": "none", "edgecolors": "tab:blue", "marker": "o", "s": 28}),
    ]  # fmt: skip
    for label, pts, style in groups:
        if pts:
            ax.scatter([r["bits_per_weight"] for r in pts], [r["kld"] for r in pts], label=label, zorder=3, **style)
    for pts, color, label in ((peers_, "tab:red", "peer frontier"), (ours, "tab:blue", "HLWQ frontier")):
        front = pareto_front([(r["bits_per_weight"], r["kld"]) for r in pts])
        ax.step([pts[i]["bits_per_weight"] for i in front], [pts[i]["kld"] for i in front], where="post", c=color,
                alpha=0.6, label=label)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized tensors: codes + scales + zeros/codebooks + smoothing vectors)")
    ax.set_ylabel("mean KL(float || method), nats per token (log)")
    ax.set_title(title + " · labels: peers, HLWQ artifacts and HLWQ's frontier", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.canvas.draw()
    _place_labels(
        ax, fig, [(r["name"].removeprefix("hlwq-"), r["bits_per_weight"], r["kld"]) for r in _labelled(table)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)


def select(methods: list[Method], patterns: str | None) -> list[Method]:
    if not patterns:
        return methods
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [m for m in methods if m.family == "float" or any(fnmatch.fnmatchcase(m.name, g) for g in globs)]
    bases = {m.base for m in chosen if m.base}
    return [m for m in methods if m in chosen or m.name in bases]


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    setup = prepare(args.model, cache, args.tokens)
    methods = select(method_list(), args.methods)
    if setup.artifact is not None:  # the given artifact, plus whatever --methods asks for
        given = Method(f"artifact:{setup.artifact.name}", "hlwq", None, "the given artifact",
                       artifact_path=str(setup.artifact))  # fmt: skip
        methods = [methods[0], given, *(methods[1:] if args.methods else [])]
    tmp = None
    workdir = Path(args.workdir) if args.workdir else Path(tmp := tempfile.mkdtemp(prefix="hlwq-bench-"))
    t0 = time.monotonic()

    def document(float_totals: Totals, results: list[Result], skipped: list[str], n_q: int, n_all: int) -> dict:
        return {
            "model": setup.model_label, "text": setup.text_label, "tokens": float_totals.tokens,
            "window": args.window, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
            "float_ppl": float_totals.ppl, "quantized_params": n_q, "total_params": n_all,
            "bits_per_weight_note": BPW_NOTE, "methods": rows(float_totals, results, n_q, n_all),
            "not_run": skipped, "seconds": round(time.monotonic() - t0, 1),
        }  # fmt: skip

    partial = Path(args.out).with_suffix(".partial.json")

    def progress(*state: Any) -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(partial, document(*state))

    try:
        state = run_methods(setup, methods, args.window, workdir, progress)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    code = report(document(*state), Path(args.out), Path(args.chart))
    partial.unlink(missing_ok=True)
    return code


def merge(paths: list[str]) -> dict[str, Any]:
    """Combine runs of the same model, text and tokens (e.g. method subsets run side by side) into one document."""
    try:
        docs = [json.loads(Path(p).read_text()) for p in paths]
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"bench --merge: cannot read a results file ({e})") from None
    key = [(d["model"], d["text"], d["tokens"], d.get("window")) for d in docs]
    if len(set(key)) != 1:
        raise PipelineError("bench --merge: the runs differ in model, text, tokens or window")
    doc = dict(docs[0])
    seen = {"float"}
    doc["methods"] = [docs[0]["methods"][0]]
    for d in docs:
        doc["methods"] += [m for m in d["methods"] if m["name"] not in seen and not seen.add(m["name"])]
    doc["not_run"] = [x for d in docs for x in d.get("not_run", [])]
    doc["seconds"] = round(sum(d.get("seconds", 0) for d in docs), 1)
    doc["date"] = max(d["date"] for d in docs)
    return doc


def report(doc: dict[str, Any], out: Path, chart: Path) -> int:
    """Write the JSON and the chart, print the table and the frontier verdicts."""
    order = {"float": 0, "hlwq": 1, "peer": 2}
    table = doc["methods"] = sorted(doc["methods"], key=lambda r: (order[r["family"]], r["bits_per_weight"], r["kld"]))
    doc["frontier"] = frontier_report(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    write_chart(chart, table, f"SmolLM2-135M (permuted) · {doc['tokens']} tokens · {doc['date']}")
    print(f"model: {doc['model']}\ntext: {doc['text']}, {doc['tokens']} predicted tokens in windows of "
          f"{doc.get('window')}; float PPL {doc['float_ppl']:.3f}; {doc['date']}\n")  # fmt: skip
    print(markdown_table(table, doc["float_ppl"]))
    print("\nfrontier (a peer is matched when some HLWQ point has <= its bpw and <= its KL):")
    for line in doc["frontier"]:
        print("  " + line)
    for line in doc.get("not_run", []):
        print("  " + line)
    print(f"\nwrote {out} and {chart} ({doc['seconds']:.0f} s of runs, summed over merged runs)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=lm_source.SMOLLM2,
        metavar="MODEL_OR_ARTIFACT",
        help=f"'{lm_source.SMOLLM2}' (default: the offline SmolLM2, permuted) or a float model folder",
    )
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens from the start of the text (4096)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (512)")
    p.add_argument("--chart", default=str(DEFAULT_CHART), help=f"PNG chart path ({DEFAULT_CHART})")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON results path ({DEFAULT_OUT})")
    p.add_argument("--methods", help="comma-separated globs of method names to run (default: all)")
    p.add_argument("--workdir", help="keep the HLWQ conversions here (resumable); default: a temp dir, removed")
    p.add_argument("--cache", default=str(lm_source.default_cache()), help="model/text cache (work/bench)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a loaded 2-core host 2 threads ran ~10x slower)")  # fmt: skip
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only combine earlier runs' JSON files (no model run)")


def _check(args: argparse.Namespace) -> None:
    if args.tokens < 2 or args.window < 2 or args.threads < 1:
        raise PipelineError("bench: --tokens and --window must be >= 2, --threads >= 1")


def cmd_bench(args: argparse.Namespace) -> int:
    _check(args)
    if args.merge:
        return report(merge(args.merge), Path(args.out), Path(args.chart))
    return run(args)


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="KL / top-1 / perplexity of HLWQ and peers vs the float model")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def exit_code(run: Callable[[], int]) -> int:
    """A bench's main around `run`: a PipelineError becomes one line on stderr and its exit code, not a traceback."""
    try:
        return run()
    except PipelineError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return exit_code(lambda: cmd_bench(args))


if __name__ == "__main__":
    sys.exit(main())
