"""`hlwq convert` from a Hub repo to a Hub repo, against the stdlib test Hub (tests/hubserver.py), token required.

One chain of runs on one workdir carries most checks (each conversion costs seconds on this machine):
  1. killed (SIGKILL) 1 MiB into the second shard's download
  2. upstream pushes a new commit; faults armed (500 then 503+Retry-After on shard 2, 429 then a dropped connection
     on shard 3); killed after the first group of LFS objects is uploaded
  3. resumed: finishes and commits once
  4. rerun with the upload record forgotten: nothing fetched, and the Hub side alone sends and commits nothing
Then the published repo is downloaded with the plain client and decoded. Separate short runs cover the refusals.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_fixtures import (  # noqa: F401 - fixtures, used by name
    REPO_ROOT,
    Run,
    hub_env,
    publish_folder,
    run_hlwq,
    tiny_checkpoint_fixture,
    token_hub_fixture,
    write_manifest,
)
from hubserver import HubServer, is_lfs

SRC = "google/tiny-gemma4"
DEST = "hlwq-test/tiny-gemma4-HLWQ-Q5"
SHARDS = [f"model-{i:05d}-of-00003" for i in (1, 2, 3)]
MIB = 1 << 20


def _gets(run: Run, shard: str) -> list[dict[str, str]]:
    return [h for m, p, h in run.requests if m == "GET" and "/resolve/" in p and p.endswith(f"/{shard}.safetensors")]


def _puts(run: Run) -> list[str]:
    return [p.split("?")[0].rsplit("/", 1)[1] for m, p, _ in run.requests if m == "PUT"]


@pytest.fixture(scope="module")
def source(token_hub: tuple[HubServer, str], tiny_checkpoint: Path) -> str:
    server, _ = token_hub
    return publish_folder(server, SRC, tiny_checkpoint)


@pytest.fixture(scope="module")
def chain(token_hub: tuple[HubServer, str], source: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    server, token = token_hub
    root = tmp_path_factory.mktemp("chain")
    src = {"repo": SRC, "revision": "main", "delete_after_verify": True}
    manifest = write_manifest(root / "m.yaml", src, {"repo": DEST, "private": True})
    work = root / "work"
    args = ["convert", str(manifest), "--workdir", str(work)]
    env = hub_env(server, root / "home", token)
    runs: dict[str, Run] = {}
    runs["kill_download"] = run_hlwq(server, args, env | {"HLWQ_KILL_AT": f"hub:download:{SHARDS[1]}:mid"})
    parts = {p.name: p.stat().st_size for p in (work / "source").glob(".*.part")}
    moved = server.commit(SRC, {"config.json": b'{"moved": true}'}, message="upstream moved on")
    server.fail_next("GET", rf"/resolve/.*/{SHARDS[1]}\.safetensors$", 500)
    server.fail_next("GET", rf"/resolve/.*/{SHARDS[1]}\.safetensors$", 503, retry_after=1)
    server.fail_next("GET", rf"/resolve/.*/{SHARDS[2]}\.safetensors$", 429, retry_after=1)
    server.drop_after(rf"/resolve/.*/{SHARDS[2]}\.safetensors$", 300_000)
    runs["kill_upload"] = run_hlwq(server, args, env | {"HLWQ_KILL_AT": "hub:upload:mid"})
    commits_after_kill = server.commits(DEST)
    runs["resume"] = run_hlwq(server, args, env)
    runs["rerun"] = run_hlwq(server, [*args, "--redo", "upload"], env)
    return {"server": server, "token": token, "root": root, "work": work, "runs": runs, "parts": parts,
            "sha0": source, "moved": moved, "commits_after_kill": commits_after_kill}  # fmt: skip


@pytest.fixture(scope="module")
def published(chain: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DEST as a user gets it: snapshot_download with the plain client (endpoint and token passed explicitly)."""
    from huggingface_hub import snapshot_download

    cache = tmp_path_factory.mktemp("client")
    url = chain["server"].url
    return Path(snapshot_download(DEST, endpoint=url, token=chain["token"], cache_dir=str(cache)))


def test_every_run_ended_as_planned(chain: dict[str, Any]) -> None:
    runs = chain["runs"]
    assert runs["kill_download"].rc == -9 and runs["kill_upload"].rc == -9
    for name in ("resume", "rerun"):
        assert runs[name].rc == 0, runs[name].stderr[-3000:]


def test_kill_mid_download_resumes_that_shard_with_range(chain: dict[str, Any]) -> None:
    (part, size), *more = chain["parts"].items()
    assert not more and part.startswith(f".{SHARDS[1]}.safetensors.") and size == MIB
    run = chain["runs"]["kill_upload"]
    assert _gets(run, SHARDS[0]) == []  # finished before the kill: not fetched again
    assert [h.get("range") for h in _gets(run, SHARDS[1])] == [f"bytes={MIB}-"] * 3  # 500, 503, then served
    assert not list((chain["work"] / "source").glob(".*.part"))


def test_transient_errors_are_retried(chain: dict[str, Any]) -> None:
    run = chain["runs"]["kill_upload"]
    assert len(_gets(run, SHARDS[2])) == 3  # 429 (client waits Retry-After), dropped mid-body, complete
    waits = re.findall(r"download google/tiny-gemma4: HfHubHTTPError: .*; retry \d/\d+ in ([\d.]+) s", run.stderr)
    assert len(waits) == 2 and float(waits[1]) == 1.0  # our loop: backoff after the 500, Retry-After after the 503


def test_revision_is_pinned_for_the_whole_run(chain: dict[str, Any], published: Path) -> None:
    sha0 = chain["sha0"]
    later = [p for name in ("kill_upload", "resume", "rerun") for m, p, _ in chain["runs"][name].requests]
    assert not [p for p in later if f"/{SRC}/resolve/" in p and f"/resolve/{sha0}/" not in p]
    assert json.loads((published / "hlwq_report.json").read_text())["source"]["revision"] == sha0
    assert "moved" not in json.loads((published / "config.json").read_text())
    head = chain["server"].commits(DEST)[0]
    assert SRC in head["message"] and sha0 in head["message"]


def test_kill_mid_upload_resumes_without_resending(chain: dict[str, Any]) -> None:
    runs, server = chain["runs"], chain["server"]
    assert len(chain["commits_after_kill"]) == 1  # only the repo's initial commit: nothing half-published
    first, second = _puts(runs["kill_upload"]), _puts(runs["resume"])
    lfs = {hashlib.sha256(data).hexdigest() for p, data in server.files(DEST).items() if is_lfs(p, len(data), data)}
    # The object store is content-addressed, as the Hub's: files identical to the source's (tokenizer) are not sent.
    had = {hashlib.sha256(data).hexdigest() for data in server.files(SRC, chain["sha0"]).values()}
    assert 0 < len(first) < len(lfs - had)
    assert not set(first) & set(second)  # nothing the server had was sent again
    assert sorted(first + second) == sorted(lfs - had)
    assert [c["message"] for c in server.commits(DEST)].count(server.commits(DEST)[0]["message"]) == 1


def test_rerun_after_success_sends_nothing(chain: dict[str, Any]) -> None:
    """Rerun with the upload record forgotten (--redo upload): the Hub side alone must send and commit nothing."""
    rerun, server = chain["runs"]["rerun"], chain["server"]
    assert not [r for r in rerun.requests if "/resolve/" in r[1] or r[0] == "PUT" or "/commit/" in r[1]]
    assert [r for r in rerun.requests if "/preupload/" in r[1]]  # the upload stage did run
    assert len(server.commits(DEST)) == 2
    # source.delete_after_verify: the BF16 shards are gone and were not fetched back
    assert not list((chain["work"] / "source").glob("*.safetensors"))


def test_published_repo_decodes_close_to_the_source(published: Path, tiny_checkpoint: Path) -> None:
    from pipeline.format import ShardReader
    from pipeline.quant.metrics import cos_sim

    n_quantized = 0
    for shard in SHARDS:
        reader = ShardReader(published / f"{shard}.safetensors")
        with safe_open(str(tiny_checkpoint / f"{shard}.safetensors"), framework="pt") as ref:
            assert reader.names() == sorted(ref.keys())
            for name in reader.names():
                want, got = ref.get_tensor(name), reader.get(name)
                if name in reader.quantized:
                    n_quantized += 1
                    assert cos_sim(want, got) >= 0.998, name
                else:
                    assert torch.equal(want, got), name
    assert n_quantized > 0


def test_card_parses_and_carries_the_source_license(published: Path) -> None:
    from huggingface_hub import ModelCard, metadata_load

    card = ModelCard((published / "README.md").read_text())
    assert card.data.base_model == SRC and card.data.license == "apache-2.0"
    assert metadata_load(published / "README.md")["base_model_relation"] == "quantized"
    assert card.data.pipeline_tag == "image-text-to-text" and "hlwq" in card.data.tags
    assert "hlwq_cos_sim.png" in card.text and (published / "hlwq_cos_sim.png").read_bytes()[:4] == b"\x89PNG"
    assert f'.from_pretrained("{DEST}"' in card.text


def test_card_usage_snippet_runs(chain: dict[str, Any], tmp_path: Path) -> None:
    """The card's code block, verbatim, in a fresh process pointed at the test Hub (the client reads HF_ENDPOINT at
    import): it must start with `import hlwq` and load, by repo id, the model our own loader builds, logit for logit."""
    server = chain["server"]
    text = server.files(DEST)["README.md"].decode()
    [code] = re.findall(r"```python\n(.*?)```", text, re.S)
    assert code.startswith("import hlwq")
    code += (
        "import torch\n"
        "from pipeline.runtime import load_dequantized\n"
        "ids = torch.tensor([[2, 10, 11, 12, 13, 40, 41]])\n"
        f"ref = load_dequantized({DEST!r})\n"
        "with torch.inference_mode():\n"
        "    print('SAME', torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=hub_env(server, tmp_path, chain["token"]),
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SAME True" in proc.stdout


def test_token_never_printed_or_stored(chain: dict[str, Any], published: Path) -> None:
    token, server = chain["token"], chain["server"]
    assert any(h.get("authorization") == f"Bearer {token}" for _, _, h in server.requests)  # it was really used
    for name, run in chain["runs"].items():
        assert token not in run.stdout and token not in run.stderr, name
    stored = [p for p in chain["root"].rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert stored == []
    assert not [p for p, data in server.files(DEST).items() if token.encode() in data]


def test_redact_masks_the_active_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.hub import redact

    monkeypatch.setenv("HF_TOKEN", "abc123-not-shaped-like-a-token")
    line = redact("GET failed: Authorization: Bearer hf_abcdefghijklmnop\nsecond line abc123-not-shaped-like-a-token")
    assert line == "GET failed: Authorization: ***"
    assert redact("x abc123-not-shaped-like-a-token y") == "x *** y"


REFUSALS = {  # case -> (source, token, what the one error line must say)
    "missing repo": ({"repo": "google/no-such-model"}, "good", "repository not found"),
    "missing revision": ({"repo": SRC, "revision": "no-such-branch"}, "good", "revision 'no-such-branch' not found"),
    "gated repo": ({"repo": "google/tiny-gated"}, "good", "is a gated repo"),
    "bad token": ({"repo": SRC}, "hf_" + "0" * 34, "refused the token"),
    "no token": ({"repo": SRC}, None, "repository not found, or private"),
    "wrong sha256": ({"repo": "google/tiny-badsha"}, "good", "refused (file removed, nothing published)"),
}


@pytest.fixture(scope="module")
def refusals(token_hub: tuple[HubServer, str], source: str, tiny_checkpoint: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, Path]]:  # fmt: skip
    """Every refusal case run at once (each is a process start and a few requests; in parallel they cost one)."""
    from concurrent.futures import ThreadPoolExecutor

    server, token = token_hub
    publish_folder(server, "google/tiny-gated", tiny_checkpoint, gated=True)
    publish_folder(server, "google/tiny-badsha", tiny_checkpoint)
    server.set_lfs_sha256("google/tiny-badsha", f"{SHARDS[0]}.safetensors", "0" * 64)

    def one(case: str) -> tuple[Run, Path]:
        src, tok, _ = REFUSALS[case]
        root = tmp_path_factory.mktemp("refusal")
        dest = {"repo": f"hlwq-test/never-{case.replace(' ', '-')}"}
        manifest = write_manifest(root / "m.yaml", src, dest)
        env = hub_env(server, root / "home", token if tok == "good" else tok)
        return run_hlwq(server, ["convert", str(manifest), "--workdir", str(root / "work")], env), root / "work"

    with ThreadPoolExecutor(len(REFUSALS)) as pool:
        return dict(zip(REFUSALS, pool.map(one, REFUSALS), strict=True))


@pytest.mark.parametrize("case", list(REFUSALS))
def test_hub_refusals_are_one_line(case: str, refusals: dict[str, tuple[Run, Path]],
                                   token_hub: tuple[HubServer, str]) -> None:  # fmt: skip
    run, _ = refusals[case]
    assert run.rc == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    [line] = run.error_lines()
    assert line.startswith("hlwq: error: ") and REFUSALS[case][2] in line
    for secret in (token_hub[1], REFUSALS["bad token"][1]):
        assert secret not in run.stderr and secret not in run.stdout


def test_wrong_sha256_leaves_nothing_behind(refusals: dict[str, tuple[Run, Path]],
                                            token_hub: tuple[HubServer, str]) -> None:  # fmt: skip
    run, work = refusals["wrong sha256"]
    assert SHARDS[0] in run.error_lines()[0]
    assert not [p for p in (work / "source").iterdir() if p.name.endswith((".part", ".safetensors"))]
    assert not (work / "artifact").exists()
    with pytest.raises(Exception, match="not found"):  # the destination repo was never even created
        token_hub[0].commits("hlwq-test/never-wrong-sha256")
