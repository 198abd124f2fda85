"""Nothing lost, nothing leaked (issue 10): destination safety, the source allowlist, one manifest per workdir,
full disks, bounded YAML and the small crashes. Most cases run `hlwq` in this process on a two-tensor model, so
each costs well under a second; the ones that need a real process (a hung Hub, a FIFO) run it."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from pipeline.cli import main
from tests.conftest import run_cli

W = "model.layers.0.mlp.down_proj.weight"


def mini_source(folder: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A one-shard checkpoint: one quantizable weight, one norm, config and tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    norm = torch.ones(256, dtype=torch.bfloat16)
    tensors = {W: torch.randn(32, 256, generator=g).to(torch.bfloat16), "model.layers.0.input_layernorm.weight": norm}
    tensors |= extra or {}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "mini"}) + "\n")
    (folder / "tokenizer.json").write_text("{}\n")
    return folder


def manifest(path: Path, src: Path, dest: Path | str, name: str = "mini", **quantize: object) -> Path:
    data = {"name": name, "source": {"path": str(src)}, "destination": {"path": str(dest)},
            "quantize": {"min_elements": 256, **quantize}, "load_check": {"enabled": False}}  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return path


def hlwq(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`hlwq ARGS` in this process: (exit code, its `hlwq:` lines on stderr)."""
    rc = main([*map(str, args)])
    err = capsys.readouterr().err
    return rc, "\n".join(line for line in err.splitlines() if line.startswith("hlwq:"))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return mini_source(tmp_path / "src")


# ---- 1. a local destination is replaced only when hlwq made it ------------------------------------------------------
def test_existing_user_folder_is_refused_untouched(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "thesis.tex").write_text("years of work")
    rc, err = hlwq(capsys, "convert", manifest(tmp_path / "m.yaml", src, dest), "--workdir", tmp_path / "w")
    assert rc == 2 and err.startswith("hlwq: error: ") and "not made by hlwq" in err and "\n" not in err
    assert [p.name for p in dest.iterdir()] == ["thesis.tex"] and (dest / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / "w" / "quantized").exists()  # refused up front, before any work


@pytest.mark.parametrize("where", ["same", "inside source", "source inside"])
def test_destination_overlapping_the_source_is_refused(where: str, src: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]):  # fmt: skip
    dest = {"same": src, "inside source": src / "out", "source inside": tmp_path}[where]
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    rc, err = hlwq(capsys, "convert", manifest(tmp_path / "m.yaml", src, dest), "--workdir", tmp_path / "w")
    assert rc == 2 and "destination.path" in err and "source.path" in err, err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_own_destination_is_replaced_and_restored_when_deleted(src: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]):  # fmt: skip
    import shutil

    from stages.upload import MARKER

    dest, work = tmp_path / "pub", tmp_path / "w"
    m = manifest(tmp_path / "m.yaml", src, dest)
    assert hlwq(capsys, "convert", m, "--workdir", work)[0] == 0
    assert (dest / MARKER).read_text().strip() == "mini" and (dest / "model.safetensors").exists()
    shutil.rmtree(dest)
    rc = main(["status", str(m), "--workdir", str(work)])
    status = capsys.readouterr().out
    assert rc == 0 and not [line for line in status.splitlines() if line.startswith("upload") and " done " in line]
    assert hlwq(capsys, "convert", m, "--workdir", work)[0] == 0
    assert (dest / "model.safetensors").exists()  # the rerun published it again
    manifest(m, src, dest, bits=6)
    rc, err = hlwq(capsys, "convert", m, "--workdir", work)
    assert rc == 0, err  # our own artifact: replaced
    assert json.loads((dest / "config.json").read_text())["quantization_config"]["bits"] == 6
    other = manifest(tmp_path / "o.yaml", src, dest, name="other")
    rc, err = hlwq(capsys, "convert", other, "--workdir", tmp_path / "w2")
    assert rc == 2 and "artifact of manifest 'mini'" in err


# ---- 2. only allowlisted files leave the source folder ---------------------------------------------------------------
def test_local_source_carries_only_the_allowlist(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("PRIVATE KEY")
    (src / "LICENSE").symlink_to(outside / "id_rsa")  # a link out of the source folder
    (src / "secrets.env").write_text("HF_TOKEN=hf_secret")
    (src / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    (src / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (src / "tokenizer.pkl").write_bytes(b"\x80\x04pickle")  # matches tokenizer*, still a pickle
    (src / "NOTICE").write_text("attribution")
    (src / "USE_POLICY.md").symlink_to("NOTICE")  # a link that stays inside: followed
    dest = tmp_path / "pub"
    assert hlwq(capsys, "convert", manifest(tmp_path / "m.yaml", src, dest), "--workdir", tmp_path / "w")[0] == 0
    for folder in (tmp_path / "w" / "artifact", dest):
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "tokenizer.json", "NOTICE", "USE_POLICY.md"} <= names
        assert not names & {"LICENSE", "secrets.env", "optimizer.pt", "training_args.bin", "tokenizer.pkl"}
        assert not [p for p in folder.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


def test_hub_source_uses_the_same_allowlist():
    from stages.hub import _small_files

    names = [
        "config.json",
        "tokenizer.json",
        "tokenizer.pkl",
        "secrets.env",
        "optimizer.pt",
        "pytorch_model.bin",
        "LICENSE",
        "sub/tokenizer.json",
        "chat_template.jinja",
        "tokenizer_config.py",
        "preprocessor_config.json",
    ]
    listing = {n: {} for n in names}
    assert _small_files(listing) == ["LICENSE", "chat_template.jinja", "config.json", "preprocessor_config.json",
                                     "tokenizer.json"]  # fmt: skip


# ---- 3. one manifest per workdir ----------------------------------------------------------------------------------
def test_a_different_manifest_is_refused_while_one_holds_the_workdir(src: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]):  # fmt: skip
    from pipeline.manifest import load_manifest
    from pipeline.runner import run_identity
    from pipeline.state import RunState

    work = tmp_path / "w"
    m5 = manifest(tmp_path / "m5.yaml", src, tmp_path / "pub")
    m6 = manifest(tmp_path / "m6.yaml", src, tmp_path / "pub", bits=6)
    with RunState(work).claim(run_identity(load_manifest(m5)), "manifest 'mini' (test holder)"):
        rc, err = hlwq(capsys, "convert", m6, "--workdir", work)
        assert rc == 3 and "in use by manifest 'mini' (test holder)" in err and "\n" not in err
        assert not (work / "quantized").exists()
        with RunState(work).claim(run_identity(load_manifest(m5)), "same manifest, another task"):
            pass  # the same manifest shares the workdir (Slurm array tasks)
    assert hlwq(capsys, "convert", m6, "--workdir", work)[0] == 0  # once it is free, the change is redone
    assert not list((work / "locks" / "workdir").iterdir())


def test_finalize_refuses_shards_made_with_other_parameters(src: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]):  # fmt: skip
    from pipeline.errors import IntegrityError
    from pipeline.manifest import load_manifest
    from pipeline.runner import open_run
    from stages import finalize, quantize

    work = tmp_path / "w"
    m5 = manifest(tmp_path / "m5.yaml", src, tmp_path / "pub")
    assert hlwq(capsys, "convert", m5, "--workdir", work, "--no-finalize")[0] == 0
    ctx6 = open_run(load_manifest(manifest(tmp_path / "m6.yaml", src, tmp_path / "pub", bits=6)), work)
    with pytest.raises(IntegrityError, match="quantized with other parameters"):
        finalize.run(ctx6)
    # Even when the record was rewritten by a racing 6-bit run, the shard's own metadata says 5 bits.
    rec = ctx6.state.read("quantize", "model")
    assert rec is not None
    ctx6.state.write("quantize", "model", {**rec, "fingerprint": quantize.fingerprint(ctx6, "model")})
    with pytest.raises(IntegrityError, match=rf"{W}: 5 bits, expected 6"):
        finalize.run(ctx6)
    assert not ctx6.staging.exists()


# ---- 6. bounded YAML -------------------------------------------------------------------------------------------------
def test_alias_bomb_in_source_readme_is_not_expanded(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    bomb = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"]
                     + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)},"
                        f" *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)},"
                        f" *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(6)])  # fmt: skip
    (src / "README.md").write_text(f"---\nlicense: mit\n{bomb}\npipeline_tag: *g\n---\n# model\n")
    dest = tmp_path / "pub"
    assert hlwq(capsys, "convert", manifest(tmp_path / "m.yaml", src, dest), "--workdir", tmp_path / "w")[0] == 0
    card = (dest / "README.md").read_text()
    assert len(card) < 20_000 and "license: other" in card  # the front matter was refused as a whole


def test_manifest_alias_and_huge_values_give_short_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    m = tmp_path / "m.yaml"
    m.write_text("name: x\nsource: &s {path: a}\ndestination: *s\n")
    rc, err = hlwq(capsys, "convert", m)
    assert rc == 2 and "alias" in err
    m.write_text(f"name: x\nsource: {{path: a}}\ndestination: {{path: b}}\nquantize: {{bits: '{'9' * 8_000_000}'}}\n")
    rc, err = hlwq(capsys, "convert", m)
    assert rc == 2 and "quantize.bits" in err and len(err) < 400


# ---- 7. nothing to quantize ---------------------------------------------------------------------------------------
def test_keep_everything_builds_a_card(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    dest = tmp_path / "pub"
    m = manifest(tmp_path / "m.yaml", src, dest, keep_bf16=["*"])
    rc, err = hlwq(capsys, "convert", m, "--workdir", tmp_path / "w")
    assert rc == 0, err
    assert "No tensor was quantized" in (dest / "README.md").read_text()


# ---- 8. a full disk ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["finalize:model", "upload:copy"])
def test_full_disk_names_the_cause_and_cleans_up(point: str, src: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    dest, work = tmp_path / "pub", tmp_path / "w"
    m = manifest(tmp_path / "m.yaml", src, dest)
    monkeypatch.setenv("HLWQ_ENOSPC_AT", point)
    rc, err = hlwq(capsys, "convert", m, "--workdir", work)
    assert rc == 2 and "No space left on device (ENOSPC)" in err, err
    assert not (work / "staging").exists() and not list(tmp_path.glob(".pub.*")) and not dest.exists()
    main(["status", str(m), "--workdir", str(work)])
    failed = [line for line in capsys.readouterr().out.splitlines()[2:-1] if line.split()[2] == "failed"]
    assert len(failed) == 1 and "ENOSPC" in failed[0] and failed[0].startswith(point.split(":")[0])
    monkeypatch.delenv("HLWQ_ENOSPC_AT")
    # A temp folder left by a killed upload (ours: marked) goes on the rerun; a look-alike of the user's stays.
    (tmp_path / ".pub.tmp-0badf00d").mkdir()
    (tmp_path / ".pub.tmp-0badf00d" / ".hlwq-artifact").write_text("mini\n")
    (tmp_path / ".pub.tmp-userfile").mkdir()
    (tmp_path / ".pub.tmp-userfile" / "keep.txt").write_text("mine")
    assert hlwq(capsys, "convert", m, "--workdir", work)[0] == 0
    assert sorted(p.name for p in tmp_path.glob(".pub.*")) == [".pub.tmp-userfile"]


def test_failure_record_that_cannot_be_written_keeps_the_real_cause(src: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    import errno

    from pipeline.errors import StageError
    from pipeline.manifest import load_manifest
    from pipeline.runner import open_run, run_unit
    from pipeline.state import RunState

    ctx = open_run(load_manifest(manifest(tmp_path / "m.yaml", src, tmp_path / "pub")), tmp_path / "w")

    def full(*_: object) -> dict[str, object]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "w" / "staging" / "x"))

    monkeypatch.setattr(RunState, "write", full)
    with pytest.raises(StageError, match=r"finalize artifact failed: No space left on device \(ENOSPC\)"):
        run_unit(ctx, "finalize", "artifact", {"inputs": "", "params": ""}, full)


# ---- 5. deadlines on every network call ------------------------------------------------------------------------
def test_a_hub_that_never_answers_fails_within_the_deadline(tmp_path: Path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:  # accept every connection and never send a byte
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    port = silent.getsockname()[1]
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"name": "hub", "source": {"repo": "google/tiny"}, "destination": {"path": "x"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HLWQ_"))}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
            "HLWQ_HUB_TIMEOUT_S": "1", "HLWQ_HUB_CONNECT_TIMEOUT_S": "1", "HLWQ_HUB_DEADLINE_S": "3",
            "HLWQ_HUB_BACKOFF_S": "0.2", "HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1"}  # fmt: skip
    t0 = time.monotonic()
    try:
        r = run_cli("convert", str(m), "--workdir", str(tmp_path / "w"), env=env, timeout=60)
    finally:
        stop.set()
        for c in held:
            c.close()
        silent.close()
    took = time.monotonic() - t0
    lines = [line for line in r.stderr.splitlines() if line.startswith("hlwq:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert f"127.0.0.1:{port}" in lines[0] and "did not answer in time" in lines[0]
    assert took < 30, took  # 1 s per attempt, retries stop at the 3 s deadline, plus the process start


# ---- Low ------------------------------------------------------------------------------------------------------------
def test_all_zero_weight_gives_strict_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    src = mini_source(
        tmp_path / "src", {"model.layers.0.mlp.up_proj.weight": torch.zeros(32, 256, dtype=torch.bfloat16)}
    )
    dest = tmp_path / "pub"
    assert hlwq(capsys, "convert", manifest(tmp_path / "m.yaml", src, dest), "--workdir", tmp_path / "w")[0] == 0

    def refuse(token: str) -> None:
        raise ValueError(token)

    report = json.loads((dest / "hlwq_report.json").read_text(), parse_constant=refuse)
    zero = report["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert zero["bits"] == 5 and zero["cos_sim"] == 1.0 and zero["sqnr_db"] is None


def test_fp8_tensors_are_kept_when_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    fp8 = torch.randn(32, 256).to(torch.float8_e4m3fn)
    src = mini_source(tmp_path / "src", {"model.layers.0.mlp.gate_proj.weight": fp8})
    dest = tmp_path / "pub"
    m = manifest(tmp_path / "m.yaml", src, dest)
    rc, err = hlwq(capsys, "convert", m, "--workdir", tmp_path / "w")
    assert rc == 2 and "gate_proj.weight has dtype F8_E4M3" in err  # not listed: refused in one line
    m = manifest(tmp_path / "m.yaml", src, dest, keep_bf16=["*gate_proj*", "*norm*"])
    assert hlwq(capsys, "convert", m, "--workdir", tmp_path / "w")[0] == 0
    from safetensors.torch import load_file

    kept = load_file(str(dest / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    assert kept.dtype == torch.float8_e4m3fn and torch.equal(kept.view(torch.uint8), fp8.view(torch.uint8))


def test_override_matching_nothing_is_refused(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    m = manifest(tmp_path / "m.yaml", src, tmp_path / "pub", overrides={"*.mlp.down_proj": 6})  # no trailing *
    rc, err = hlwq(capsys, "convert", m, "--workdir", tmp_path / "w")
    assert rc == 2 and "quantize.overrides['*.mlp.down_proj']: matches no tensor" in err


def test_unwritable_workdir_is_one_line(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    if os.geteuid() == 0:  # root writes through permissions: sysfs refuses new folders even to root
        work = Path("/sys/hlwq-test-workdir")
        try:
            work.mkdir()
            work.rmdir()
            pytest.skip("no unwritable folder on this host")
        except OSError:
            pass
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        work = ro / "w"
    rc, err = hlwq(capsys, "convert", manifest(tmp_path / "m.yaml", src, tmp_path / "pub"), "--workdir", work)
    assert rc == 2 and err.startswith(f"hlwq: error: workdir {work} is not writable"), err


def test_fifo_as_a_shard_is_refused_quickly(tmp_path: Path):
    src = mini_source(tmp_path / "src")
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    r = run_cli("convert", str(manifest(tmp_path / "m.yaml", src, tmp_path / "pub")), "--workdir",
                str(tmp_path / "w"), timeout=60)  # fmt: skip
    assert r.returncode == 2 and "model.safetensors: not a regular file" in r.stderr.splitlines()[-1]


def test_min_elements_zero_with_an_empty_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    src = mini_source(tmp_path / "src", {"model.layers.0.mlp.empty.weight": torch.zeros(0, 256, dtype=torch.bfloat16)})
    dest = tmp_path / "pub"
    rc, err = hlwq(
        capsys, "convert", manifest(tmp_path / "m.yaml", src, dest, min_elements=0), "--workdir", tmp_path / "w"
    )
    assert rc == 0, err
    report = json.loads((dest / "hlwq_report.json").read_text())["tensors"]
    assert report["model.layers.0.mlp.empty.weight"]["bits"] is None and report[W]["bits"] == 5


def test_report_says_which_codebooks_were_fitted(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from safetensors import safe_open

    from pipeline.quant.lloyd_max import gaussian_codebook

    for fit in (False, True):
        dest = tmp_path / f"pub-{fit}"
        m = manifest(tmp_path / "m.yaml", src, dest, fit_codebook=fit)
        assert hlwq(capsys, "convert", m, "--workdir", tmp_path / f"w-{fit}")[0] == 0
        with safe_open(str(dest / "model.safetensors"), "pt") as f:
            stored = f.get_tensor(W + ".hlwq_codebook")
        kind = json.loads((dest / "hlwq_report.json").read_text())["tensors"][W]["codebook"]
        assert kind == ("gaussian" if torch.equal(stored, gaussian_codebook(5)) else "fitted")
        assert fit or kind == "gaussian"


def test_scale_beyond_float16_names_the_tensor(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    huge = torch.full((32, 256), 30000.0, dtype=torch.bfloat16)  # block norm ~ 3.4e5 > 65504
    src = mini_source(tmp_path / "src", {"model.layers.0.mlp.up_proj.weight": huge})
    rc, err = hlwq(capsys, "convert", manifest(tmp_path / "m.yaml", src, tmp_path / "pub"), "--workdir", tmp_path / "w")
    assert rc == 2 and "tensor model.layers.0.mlp.up_proj.weight: a block scale does not fit in float16" in err
