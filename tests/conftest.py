"""Shared fixtures: the tiny checkpoint (written once per session), manifests, and running the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "bf16", shards=3)


@pytest.fixture
def tiny_copy(tiny_src: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    dst = tmp_path / "src"
    shutil.copytree(tiny_src, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_artifact(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint converted once (5-bit, no load check): an artifact folder to load, chat with, serve."""
    root = tmp_path_factory.mktemp("tiny-artifact")
    manifest = write_manifest(root / "m.yaml", tiny_src, root / "pub", load_check={"enabled": False})
    r = run_cli("convert", str(manifest), "--workdir", str(root / "work"))
    assert r.returncode == 0, r.stderr
    return root / "work" / "artifact"


def write_manifest(path: Path, src: Path, dest: Path, **sections: object) -> Path:
    data = {"name": "tiny", "source": {"path": str(src)}, "destination": {"path": str(dest)}, **sections}
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real `hlwq` entry point in a fresh process (the way users and Slurm run it)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=timeout)  # fmt: skip


def artifact_bytes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip}
