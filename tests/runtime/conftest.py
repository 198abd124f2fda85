"""The tiny artifact every runtime test loads: the embedded tiny Gemma-4 converted once through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source BF16 checkpoint, converted artifact)."""
    from pipeline.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("runtime")
    src = write_tiny_checkpoint(root / "src")
    manifest = root / "m.yaml"
    manifest.write_text(
        f"name: tiny-runtime\nsource: {{path: {src}}}\ndestination: {{path: {root / 'pub'}}}\n"
        "quantize: {bits: 5, block_size: 128}\nload_check: {enabled: false}\n"
    )
    cli = [sys.executable, "-m", "pipeline.cli", "convert", str(manifest), "--workdir", str(root / "work")]
    subprocess.run(cli, check=True, capture_output=True, cwd=ROOT)
    return src, root / "work" / "artifact"
