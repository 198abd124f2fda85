"""The stats stage and what uses it, end to end on the tiny Gemma 4: smoothing (format v2), allocation to a target
bpw, resume and fingerprints, --until, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.format import ShardReader, read_quantization_config
from pipeline.manifest import load_manifest
from pipeline.quant import allocate, metrics
from pipeline.runner import convert, open_run
from stages import stats
from tests.conftest import run_cli, write_manifest

pytestmark = pytest.mark.slow  # each conversion runs the float model's stats pass (~10 s on a free 2-core CPU)

SMOOTH = {"sequences": 3, "length": 24, "probe_sequences": 1}


def _ctx(tmp: Path, src: Path, **quantize: object):  # type: ignore[no-untyped-def]
    # allocation puts some tensors at 3-4 bits: cos-sim near 0.98 there (the bench judges by output KL)
    m = write_manifest(tmp / "m.yaml", src, tmp / "pub", quantize=quantize, load_check={"enabled": False},
                       verify={"min_cos_sim": 0.95})  # fmt: skip
    return open_run(load_manifest(m), tmp / "work")


@pytest.fixture(scope="module")
def smoothed(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("smooth")
    ctx = _ctx(tmp, tiny_src, smooth=SMOOTH, target_bpw=5.3)
    convert(ctx)
    return ctx


def test_stats_file_covers_the_text_linears(smoothed):  # type: ignore[no-untyped-def]
    st = stats.load(smoothed.workdir / stats.FILE)
    names = set(st.records)
    # 6 layers x q/k/v/o/gate/up/down, minus v_proj of the full-attention layer (Gemma 4 computes its values with k)
    assert len(names) == 41 and all(".language_model.layers." in n for n in names)
    groups: dict[int, list[str]] = {}
    for n, r in st.records.items():
        groups.setdefault(r["group"], []).append(n.rsplit(".", 2)[-2])
        assert r["tokens"] == SMOOTH["sequences"] * SMOOTH["length"] and r["sensitivity"] > 0
        assert torch.isfinite(st.act_sq[n]).all() and float(st.act_sq[n].min()) >= 0
    kinds = sorted(tuple(sorted(g)) for g in groups.values())
    assert kinds.count(("k_proj", "q_proj", "v_proj")) == 5 and kinds.count(("k_proj", "q_proj")) == 1
    assert kinds.count(("gate_proj", "up_proj")) == 6 and kinds.count(("o_proj",)) == 6
    # q/k/v share one input: one E[x²] and one column energy (their sum), so one s (foldable into the norm gain)
    q, k = (
        n
        for n in names
        if n.endswith("layers.0.self_attn.q_proj.weight") or n.endswith("layers.0.self_attn.k_proj.weight")
    )
    assert torch.equal(st.act_sq[q], st.act_sq[k]) and torch.equal(st.col_sq[q], st.col_sq[k])


def test_smoothed_artifact_is_v2_and_decodes(smoothed, tiny_src: Path):  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    art = smoothed.artifact
    qc = read_quantization_config(art / "config.json")
    assert qc["format_version"] == 2 and qc["smooth"]["alpha"] == 0.25 and qc["target_bpw"] == 5.3
    report = json.loads((art / "hlwq_report.json").read_text())
    assert report["format_version"] == 2
    n_smooth = 0
    cands, bits = [], {}
    for shard in sorted(art.glob("model-*.safetensors")):
        reader = ShardReader(shard)
        src = load_file(str(tiny_src / shard.name))
        for name, rec in reader.quantized.items():
            got = reader.get(name)
            assert metrics.cos_sim(src[name], got) > 0.97  # 3-bit tensors of the allocation sit near 0.98
            if rec.get("smooth"):
                n_smooth += 1
                s = reader.get_quantized(name).smooth
                assert s is not None and s.shape == (rec["shape"][1],)
                assert abs(float(s.double().log().mean())) < 1e-3  # geometric mean 1
                cands.append(allocate.Candidate(name, rec["shape"][0], rec["shape"][1], 0.0, smoothed=True))
                bits[name] = rec["bits"]
    assert n_smooth == 41
    avg = allocate.average_bpw(cands, bits, 128)
    assert 5.0 < avg <= 5.3 and len(set(bits.values())) > 1  # allocated: mixed widths, at most the target


def test_rerun_skips_and_a_new_seed_redoes_stats_and_quantize(smoothed, tiny_src: Path):  # type: ignore[no-untyped-def]
    before = smoothed.state.read("stats", stats.UNIT)
    q_before = smoothed.state.read("quantize", smoothed.units[0])
    convert(smoothed)
    assert smoothed.state.read("stats", stats.UNIT) == before
    assert smoothed.state.read("quantize", smoothed.units[0]) == q_before
    tmp = smoothed.workdir.parent
    ctx2 = _ctx(tmp, tiny_src, smooth={**SMOOTH, "seed": 1}, target_bpw=5.3)
    assert not ctx2.state.is_done("stats", stats.UNIT, stats.fingerprint(ctx2))
    convert(ctx2, build=False)
    after = ctx2.state.read("stats", stats.UNIT)
    assert after is not None and after["fingerprint"] != before["fingerprint"]
    assert ctx2.state.read("quantize", ctx2.units[0])["fingerprint"] != q_before["fingerprint"]


def test_cli_until_stats_stops_before_quantize(tiny_src: Path, tmp_path: Path):
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub", quantize={"smooth": SMOOTH},
                       load_check={"enabled": False})  # fmt: skip
    wd = tmp_path / "work"
    r = run_cli("convert", str(m), "--workdir", str(wd), "--until", "stats")
    assert r.returncode == 0, r.stderr
    rec = json.loads((wd / "state" / "stats" / "stats.json").read_text())
    assert rec["status"] == "done" and (wd / stats.FILE).exists() and not (wd / "state" / "quantize").exists()
    assert all((wd / "state" / "download" / f"{u}.json").exists() for u in ("model-00001-of-00003",))


def test_bad_target_is_one_clear_line(smoothed, tiny_src: Path):  # type: ignore[no-untyped-def]
    from pipeline.errors import PipelineError

    ctx = _ctx(smoothed.workdir.parent, tiny_src, smooth={**SMOOTH, "seed": 1}, target_bpw=2.5)
    with pytest.raises(PipelineError, match=r"target_bpw 2\.5 is below"):
        convert(ctx, build=False)


def test_slurm_plan_puts_a_stats_job_between_downloads_and_quantize(tiny_src: Path, tmp_path: Path):
    from stages import slurm as hs

    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub", quantize={"smooth": SMOOTH})
    plan = hs.make_plan(m, tmp_path / "w")
    text, sub = hs.submit(plan, dry_run=True)
    assert sub is None and not (tmp_path / "w" / "slurm").exists()
    d = tmp_path / "w" / "slurm"
    for name in (hs.DOWNLOAD_SCRIPT, hs.STATS_SCRIPT, hs.ARRAY_SCRIPT, hs.FINALIZE_SCRIPT):
        assert f"==> {d / name} <==" in text
    assert '--shard "$SLURM_ARRAY_TASK_ID" --until download\n' in text and " --until stats\n" in text
    lines = text.split("==> submitted with <==\n")[1].splitlines()
    assert [ln.split(" --dependency=")[-1].split()[0] if "--dependency" in ln else "" for ln in lines] == [
        "", "afterok:<download", "afterok:<stats", "afterok:<array"]  # fmt: skip


def test_smoothed_artifact_runs_the_same_in_every_runtime(smoothed):  # type: ignore[no-untyped-def]
    """A v2 artifact through the runtime: HLWQLinear (reference; the native kernels take the same smooth buffer)
    and the plain dequantized model give the same logits, and both differ from ignoring the smoothing vectors."""
    from pipeline.runtime import load
    from pipeline.runtime.linear import HLWQLinear

    ids = torch.tensor([[2, 10, 11, 12, 13, 40, 41]])
    hlwq = load(smoothed.artifact, "reference", "cpu", dtype=torch.float32)
    dense = load(smoothed.artifact, "dequantize", "cpu", dtype=torch.float32)
    smoothed_layers = [m for m in hlwq.modules() if isinstance(m, HLWQLinear) and m.smooth is not None]
    assert smoothed_layers
    with torch.inference_mode():
        a, b = hlwq(input_ids=ids).logits, dense(input_ids=ids).logits
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        for m in smoothed_layers:
            m.smooth = None  # what a runtime that dropped the vectors would compute
        assert not torch.allclose(hlwq(input_ids=ids).logits, b, rtol=1e-3, atol=1e-3)


def test_31b_bench_reports_each_layer_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench.stats_31b (here on the tiny shape) prints one flushed stderr line per finished layer, so a run killed
    by a timeout shows how far it got."""
    from bench import stats_31b

    out = tmp_path / "stats.json"
    assert stats_31b.main(["--tiny", "--device", "cpu", "--sequences", "2", "--length", "16", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "] layer " in line]
    assert [line.split("] layer ")[1].split()[0] for line in lines] == [f"{i}/6" for i in range(1, 7)]
    assert json.loads(out.read_text())["layers"] == 6


def test_probe_runs_only_for_target_bpw(tiny_src: Path, tmp_path: Path) -> None:
    """Sensitivities serve only the allocation: a smoothing-only manifest skips the probe (and its fingerprint says
    so, so adding target_bpw later re-runs the pass)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    smooth_only = _ctx(tmp_path / "a", tiny_src, smooth=SMOOTH)
    allocating = _ctx(tmp_path / "b", tiny_src, smooth=SMOOTH, target_bpw=5.3)
    assert stats.settings(smooth_only.manifest).probe is False
    assert stats.settings(allocating.manifest).probe is True
    assert stats.fingerprint(smooth_only)["params"] != stats.fingerprint(allocating)["params"]
