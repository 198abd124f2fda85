"""bench/native_quality.py offline on a tiny Llama (no bench cache, no GPU): one point through the real pipeline and
both runtimes on the CPU (native falls back to the reference path, so the exactness is exact), the merge into a
quality.json document, and the sha256 check on a text file given instead of the gensim package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import lm_source, native_quality, quality
from bench.metrics_lm import windows
from pipeline.errors import PipelineError


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama") / "bf16"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_one_point_on_the_cpu(tiny_llama: Path, tmp_path: Path) -> None:
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(1))
    setup = quality.Setup(tiny_llama, "tiny", "random ids", ids)
    names, n_q, n_all = quality.quantized_names(tiny_llama)
    spans = windows(ids.numel(), 16)
    float_lp, float_totals = native_quality.float_reference(tiny_llama, ids, spans, torch.device("cpu"))
    ctx = native_quality.Context(setup, spans, float_lp, float_totals, names, n_q, n_all, torch.device("cpu"), "CPU",
                                 decode_tokens=6, chunks=(1, 4))  # fmt: skip
    m = next(m for m in quality.method_list() if m.name == "hlwq-q5")
    row, exact = native_quality.run_point(ctx, m, tmp_path / "work")
    assert row["name"] == "hlwq-q5-native" and row["family"] == "hlwq" and row["bits"] == 5
    assert row["note"].startswith("artifact, defaults; native runtime on CPU")
    _, bits = quality.read_artifact(tmp_path / "work/hlwq-q5/artifact", names)
    assert row["bits_per_weight"] == bits / n_q
    assert exact["hlwq_linears"] == len(names) and exact["tiled"] == 0  # no tensor-core layout off the GPU
    assert exact["windows"]["mean_kl"] == 0.0 and exact["windows"]["top1"] == 1.0
    assert exact["windows"]["tokens"] == float_totals.tokens == 37
    for d in exact["decode"].values():  # cached vs uncached forwards: float32 rounding only
        assert d["tokens"] == 6 and d["mean_kl"] < 1e-8 and d["targets_met"]
    # the exact path is the reference: the same KL against float from both
    assert row["kld"] == pytest.approx(exact["reference_vs_float"]["kld"], abs=1e-12) and row["kld"] > 0


def _doc(model: str, tokens: int, rows: list[dict]) -> dict:
    return {"model": model, "text": "t", "tokens": tokens, "window": 512, "quantized_params": 10, "total_params": 20,
            "date": "2026-11-30", "seconds": 5.0, "methods": [{"name": "float", "family": "float"}, *rows]}  # fmt: skip


def test_merge_rows_replaces_by_name_and_checks_the_run() -> None:
    q5, q5n, q4n = "hlwq-q5", "hlwq-q5-native", "hlwq-q4-native"
    base = _doc("M (a, max |logit change| 7.8e-05; stored BF16)", 4088,
                [{"name": q5, "family": "hlwq"}, {"name": q5n, "family": "hlwq", "kld": 1.0}])  # fmt: skip
    new = _doc("M (a, max |logit change| 7.6e-05; stored BF16)", 4088,
               [{"name": q5n, "family": "hlwq", "kld": 0.1}, {"name": q4n, "family": "hlwq"}])  # fmt: skip
    out = native_quality.merge_rows(base, new)
    assert [r["name"] for r in out["methods"]] == ["float", q5, q5n, q4n]
    assert out["methods"][2]["kld"] == 0.1 and out["seconds"] == 10.0 and out["model"] == base["model"]
    with pytest.raises(PipelineError, match="tokens"):
        native_quality.merge_rows(base, _doc(new["model"], 254, []))
    with pytest.raises(PipelineError, match="model"):
        native_quality.merge_rows(base, _doc("other", 4088, []))


def test_text_file_must_be_the_packaged_one(tmp_path: Path) -> None:
    p = tmp_path / "lee_background.cor"
    p.write_text("not the Lee corpus\n")
    with pytest.raises(PipelineError, match="sha256"):
        lm_source.load_text(tmp_path, p)
    with pytest.raises(PipelineError, match="not a file"):
        lm_source.prepare_smollm2(tmp_path, "", tmp_path / "missing.gguf")


def test_gpu_figures_name_their_kernel_library() -> None:
    from pipeline.runtime.kernels import build

    assert native_quality.kernel_library(torch.device("cpu")) == {}
    assert native_quality.kernel_library(torch.device("cuda"))["kernels"] == build.library_name()
