"""`hlwq slurm nightly` against a Hub destination: it asks the Hub which source revision is published."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_fixtures import hub_env, publish_folder, run_hlwq, tiny_checkpoint_fixture, write_manifest
from hubserver import HubServer

__all__ = ["tiny_checkpoint_fixture"]  # the module-scoped fixture, re-exported for pytest


def test_nightly_skips_a_published_revision(tiny_checkpoint: Path, tmp_path: Path):
    with HubServer() as server:
        sha = publish_folder(server, "org/src", tiny_checkpoint)
        m = write_manifest(tmp_path / "m.yaml", {"repo": "org/src"}, {"repo": "org/dst"})
        env = hub_env(server, tmp_path / "home", None)
        args = ["slurm", "nightly", str(m), "--workdir", str(tmp_path / "work"), "--dry-run"]

        nothing = run_hlwq(server, args, env)  # no destination repo yet: a run is due
        assert nothing.rc == 0 and "#SBATCH --array=0-2" in nothing.stdout, nothing.stderr

        server.create_repo("org/dst")
        server.commit("org/dst", {"hlwq_report.json": json.dumps({"source": {"revision": "0" * 40}}).encode()})
        older = run_hlwq(server, args, env)  # an older revision is published: due again
        assert older.rc == 0 and "#SBATCH --array=0-2" in older.stdout, older.stderr

        server.commit("org/dst", {"hlwq_report.json": json.dumps({"source": {"revision": sha}}).encode()})
        same = run_hlwq(server, args, env)
        assert same.rc == 0 and "already published" in same.stdout and "#SBATCH" not in same.stdout, same.stderr
