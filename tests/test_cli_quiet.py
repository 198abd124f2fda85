"""A quiet start: `hlwq` commands print nothing on stderr but their own lines (torchao/torch import chatter is
silenced; `hlwq -v` shows it)."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli, write_manifest


def test_help_and_status_print_nothing_on_stderr(tiny_src: Path, tmp_path: Path) -> None:
    help_ = run_cli("--help")
    assert help_.returncode == 0 and "convert" in help_.stdout
    assert help_.stderr == ""
    manifest = write_manifest(tmp_path / "m.yaml", tiny_src, tmp_path / "pub")
    status = run_cli("status", str(manifest), "--workdir", str(tmp_path / "work"))
    assert status.returncode == 0 and "pending" in status.stdout
    assert status.stderr == ""


def test_a_command_that_imports_torchao_stays_quiet(tmp_path: Path) -> None:
    """`hlwq tiny` builds a transformers model, which imports torchao (it logs kernels it could not load)."""
    run = run_cli("tiny", str(tmp_path / "tiny"), "--layers", "6", "--shards", "1")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
