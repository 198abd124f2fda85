"""End to end on the embedded default: convert, skip on rerun, resume after kills, concurrency, bad inputs."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.format import ShardReader, read_quantization_config
from pipeline.quant import metrics
from tests.conftest import ROOT, artifact_bytes, run_cli, write_manifest

UNITS = [f"model-0000{i}-of-00003" for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def reference(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run: the bytes every other run must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    m = write_manifest(tmp / "m.yaml", tiny_src, tmp / "published")
    r = run_cli("convert", str(m), "--workdir", str(tmp / "work"))
    assert r.returncode == 0, r.stderr
    return tmp / "work" / "artifact"


def test_artifact_is_complete_and_decodes(reference: Path, tiny_src: Path):
    names = {p.name for p in reference.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "hlwq_report.json", "README.md", "tokenizer.json"} <= names
    assert {f"{u}.safetensors" for u in UNITS} <= names
    qc = read_quantization_config(reference / "config.json")
    assert qc["bits"] == 5 and qc["block_size"] == 128 and qc["quant_method"] == "hlwq"
    report = json.loads((reference / "hlwq_report.json").read_text())
    assert report["summary"]["min_cos_sim"] >= 0.998
    assert report["summary"]["bytes_out"] < 0.6 * report["summary"]["bytes_in"]
    index = json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"]
    seen = 0
    for unit in UNITS:
        reader = ShardReader(reference / f"{unit}.safetensors")
        src = load_file(str(tiny_src / f"{unit}.safetensors"))
        assert set(reader.names()) == set(src)
        for name in reader.names():
            got = reader.get(name)
            assert got.dtype == src[name].dtype and got.shape == src[name].shape
            if name in reader.quantized:
                assert metrics.cos_sim(src[name], got) > 0.998
                assert index[name + ".hlwq_codes"] == f"{unit}.safetensors"
                seen += 1
            else:
                assert torch.equal(got, src[name]) and index[name] == f"{unit}.safetensors"
    assert seen == report["summary"]["quantized_tensors"] > 0
    # the embedding (tied to lm_head) and the vision tower stay BF16
    assert not any(
        "embed_tokens" in n or "vision_tower" in n for n in report["tensors"] if report["tensors"][n]["bits"]
    )


def test_rerun_does_nothing(reference: Path, tiny_src: Path, tmp_path: Path):
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub")
    work = tmp_path / "work"
    assert run_cli("convert", str(m), "--workdir", str(work)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (work / "state").rglob("*.json")}
    art = artifact_bytes(work / "artifact")
    r = run_cli("convert", str(m), "--workdir", str(work))
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in (work / "state").rglob("*.json")} == before
    assert artifact_bytes(work / "artifact") == art == artifact_bytes(reference)
    s = run_cli("status", str(m), "--workdir", str(work))
    assert s.returncode == 0 and "done" in s.stdout and "pending" not in s.stdout.split("\n")[-2]


@pytest.mark.parametrize(
    "point",
    ["quantize:model-00002-of-00003:mid", "verify:model-00001-of-00003:start", "quantize:model-00003-of-00003:end",
     "card:artifact:start", "publish:artifact:end"],
)  # fmt: skip
def test_resume_after_kill_is_byte_identical(point: str, reference: Path, tiny_src: Path, tmp_path: Path):
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub")
    work = tmp_path / "work"
    killed = run_cli("convert", str(m), "--workdir", str(work), env={"HLWQ_KILL_AT": point})
    assert killed.returncode == -9, killed.stderr
    if not point.startswith("publish"):
        assert not (work / "artifact").exists()  # nothing that looks complete
    resumed = run_cli("convert", str(m), "--workdir", str(work))
    assert resumed.returncode == 0, resumed.stderr
    assert artifact_bytes(work / "artifact") == artifact_bytes(reference)
    assert not list(work.rglob("*.tmp")), "a temp file outlived the resume"
    # the shards before the kill point were not redone
    if point.startswith("quantize:model-00002"):
        assert "quantize model-00001" not in resumed.stderr


def test_manifest_change_redoes_affected_work(reference: Path, tiny_src: Path, tmp_path: Path):
    work = tmp_path / "work"
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub")
    assert run_cli("convert", str(m), "--workdir", str(work)).returncode == 0
    write_manifest(m, tiny_src, tmp_path / "pub", quantize={"overrides": {"*.mlp.down_proj.*": 6}})
    r = run_cli("convert", str(m), "--workdir", str(work))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("tensors quantized") == 3  # every shard redone under the new parameters
    report = json.loads((work / "artifact" / "hlwq_report.json").read_text())
    bits = {n: t["bits"] for n, t in report["tensors"].items() if t["bits"]}
    assert all(b == (6 if ".mlp.down_proj." in n else 5) for n, b in bits.items())
    # only verify reports can be compared: only the changed tensors changed
    assert artifact_bytes(work / "artifact") != artifact_bytes(reference)


def test_two_concurrent_runners_one_workdir(reference: Path, tiny_src: Path, tmp_path: Path):
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub")
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "pipeline.cli", "convert", str(m), "--workdir", str(work)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert artifact_bytes(work / "artifact") == artifact_bytes(reference)
    # each shard was quantized exactly once, by one of them
    assert sum(e.count("tensors quantized") for e in errs) == 3


def _write_index(folder: Path, weight_map: dict[str, str]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _index(folder: Path) -> dict[str, str]:
    return dict(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])


def _rewrite_shard(folder: Path, unit: str, change) -> None:  # type: ignore[no-untyped-def]
    path = folder / f"{unit}.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _damage(kind: str, src: Path, tmp: Path) -> tuple[Path, str]:
    """Make one kind of bad input; returns (manifest, text the error line must contain)."""
    m = write_manifest(tmp / "m.yaml", src, tmp / "pub")
    u2 = UNITS[1]
    weight = next(n for n, s in _index(src).items() if s == f"{u2}.safetensors" and n.endswith("q_proj.weight")
                  and "language_model" in n)  # fmt: skip
    if kind == "truncated":
        p = src / f"{u2}.safetensors"
        p.write_bytes(p.read_bytes()[:-1000])
        return m, "truncated"
    if kind == "shard_missing":
        (src / f"{u2}.safetensors").unlink()
        return m, "missing"
    if kind == "tensor_missing":
        _rewrite_shard(src, u2, lambda t: t.pop(weight))
        return m, weight
    if kind == "nan":
        _rewrite_shard(src, u2, lambda t: t[weight].view(-1).__setitem__(5, float("nan")))
        return m, "NaN"
    if kind == "wrong_dtype":
        _rewrite_shard(src, u2, lambda t: t.__setitem__(weight, t[weight].to(torch.int32)))
        return m, "dtype"
    if kind == "bad_yaml":
        m.write_text("name: [unclosed\n")
        return m, "YAML"
    if kind == "unknown_key":
        m.write_text(m.read_text() + "quantise: {bits: 4}\n")
        return m, "quantise"
    if kind == "traversal_shard":
        wm = _index(src)
        wm[weight] = "../../etc/passwd.safetensors"
        _write_index(src, wm)
        return m, "unsafe shard file name"
    if kind == "traversal_tensor":
        wm = _index(src)
        wm["../../evil"] = wm.pop(weight)
        _write_index(src, wm)
        return m, "unsafe tensor name"
    if kind == "corrupt_header":
        p = src / f"{u2}.safetensors"
        raw = p.read_bytes()
        p.write_bytes(struct.pack("<Q", 10) + b"{not json}" + raw[18:])
        return m, "corrupt"
    raise AssertionError(kind)


BAD = ["truncated", "shard_missing", "tensor_missing", "nan", "wrong_dtype", "bad_yaml", "unknown_key",
       "traversal_shard", "traversal_tensor", "corrupt_header"]  # fmt: skip


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_gives_one_clear_line(kind: str, tiny_copy: Path, tmp_path: Path):
    m, cause = _damage(kind, tiny_copy, tmp_path)
    work = tmp_path / "work"
    r = run_cli("convert", str(m), "--workdir", str(work))
    assert r.returncode not in (0, -9) and r.returncode < 64, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("hlwq: error:") and cause in last, r.stderr
    assert "Traceback" not in r.stderr
    assert not (work / "artifact").exists() and not (tmp_path / "pub").exists()
    for p in (work / "quantized").glob("*") if (work / "quantized").exists() else []:
        assert not p.name.endswith(".tmp")


def test_bits_per_weight_is_counted(reference: Path):
    from pipeline.shards import read_header

    s = json.loads((reference / "hlwq_report.json").read_text())["summary"]
    # Independently: every byte of the codes, scales and codebooks that the shards really store.
    stored = sum(t.nbytes for u in UNITS for n, t in read_header(reference / f"{u}.safetensors")[0].items()
                 if ".hlwq_" in n)  # fmt: skip
    assert math.isclose(s["bits_per_weight_quantized"], 8 * stored / s["quantized_params"], rel_tol=1e-12)
    # the tiny model's 320-wide rows pad to 384: more than the 5.125 of 128-divisible rows
    assert 5.125 < s["bits_per_weight_quantized"] < 5.125 * 384 / 320 + 0.01
    assert math.isclose(s["bits_per_weight_all"], 8 * s["bytes_out"] / s["total_params"])


def test_redo_stage_reruns_only_that_stage(tiny_src: Path, tmp_path: Path, reference: Path):
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub")
    work = tmp_path / "work"
    assert run_cli("convert", str(m), "--workdir", str(work)).returncode == 0
    assert run_cli("redo", str(m), "verify", "--shard", "1", "--workdir", str(work)).returncode == 0
    r = run_cli("convert", str(m), "--workdir", str(work))
    assert r.returncode == 0
    assert "verify model-00002" in r.stderr and "quantize model-" not in r.stderr
    assert artifact_bytes(work / "artifact") == artifact_bytes(reference)
    bad = run_cli("redo", str(m), "quantise", "--workdir", str(work))
    assert bad.returncode == 2 and "unknown stage" in bad.stderr
    shutil.rmtree(work)


def test_bench_results_go_into_the_card(tiny_src: Path, tmp_path: Path, reference: Path):
    m = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub")
    work = tmp_path / "work"
    assert run_cli("convert", str(m), "--workdir", str(work)).returncode == 0
    assert "Output quality" not in (work / "artifact" / "README.md").read_text()
    (work / "quality").mkdir()
    shutil.copyfile(ROOT / "bench/results/quality.json", work / "quality" / "quality.json")
    shutil.copyfile(ROOT / "bench/results/quality.png", work / "quality" / "quality.png")
    r = run_cli("convert", str(m), "--workdir", str(work))
    assert r.returncode == 0, r.stderr
    card = (work / "artifact" / "README.md").read_text()
    q = json.loads((work / "quality" / "quality.json").read_text())
    assert "## Output quality" in card and "(hlwq_quality.png)" in card
    assert all(f"| {m['name']} |" in card for m in q["methods"])
    assert (work / "artifact" / "hlwq_quality.png").read_bytes() == (work / "quality" / "quality.png").read_bytes()
    tensors = {n: b for n, b in artifact_bytes(work / "artifact").items() if n.endswith(".safetensors")}
    assert tensors == {n: b for n, b in artifact_bytes(reference).items() if n.endswith(".safetensors")}
