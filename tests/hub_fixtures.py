"""Helpers for the Hub pipeline tests: a test Hub holding a tiny checkpoint, and `hlwq` run in a subprocess against
it. The fixtures are imported by the test module under their *_fixture names (no conftest.py of our own).

The client reads HF_ENDPOINT (and HF_HUB_DISABLE_XET) at import time, so the pipeline always runs in a subprocess
whose environment points at the test server, with its own HF_HOME.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hubserver import HubServer, client_env

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_README = "---\nlicense: apache-2.0\npipeline_tag: image-text-to-text\n---\n# tiny Gemma-4\n\nSeeded weights.\n"


def hub_env(server: HubServer, home: Path, token: str | None, **extra: str) -> dict[str, str]:
    """The environment of an `hlwq` subprocess: the test Hub, a private HF_HOME, no Xet, quick backoff."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "HLWQ_"))}
    env |= client_env(server, home, token) | {"HLWQ_HUB_BACKOFF_S": "0.05", "TQDM_DISABLE": "1"}
    return env | extra


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    requests: list[tuple[str, str, dict[str, str]]]  # what the server saw during this run
    lfs_puts: int

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("hlwq: ")]


def run_hlwq(server: HubServer, args: list[str], env: dict[str, str], timeout: float = 120) -> Run:
    n0, puts0 = len(server.requests), server.lfs_puts
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip
    return Run(proc.returncode, proc.stdout, proc.stderr, server.requests[n0:], server.lfs_puts - puts0)


def write_manifest(path: Path, source: dict[str, Any], destination: dict[str, Any], name: str = "tiny-hub") -> Path:
    data = {"name": name, "source": source, "destination": destination, "load_check": {"enabled": False}}
    path.write_text(yaml.safe_dump(data))
    return path


def publish_folder(server: HubServer, repo_id: str, folder: Path, *, gated: bool = False) -> str:
    """Create `repo_id` on the test Hub and commit the checkpoint in `folder` plus a README with a license."""
    server.create_repo(repo_id, gated=gated)
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    return server.commit(repo_id, files | {"README.md": SOURCE_README.encode()}, message="upload tiny checkpoint")


@pytest.fixture(scope="module", name="tiny_checkpoint")
def tiny_checkpoint_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tiny import write_tiny_checkpoint

    # Two layers keep each conversion a few seconds; three shards exercise the shard-by-shard path.
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "bf16", shards=3, layers=2)


@pytest.fixture(scope="module", name="token_hub")
def token_hub_fixture() -> Iterator[tuple[HubServer, str]]:
    import secrets

    token = "hf_" + secrets.token_hex(17)
    with HubServer(token=token) as server:
        yield server, token
