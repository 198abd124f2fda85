"""The test Hub (tests/hubserver.py) driven by the real huggingface_hub 2.4 client.

The client reads HF_ENDPOINT, HF_HOME and HF_HUB_DISABLE_XET at import time, so every client call runs in a fresh
subprocess with its own environment (and its own cache under tmp_path). Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works with or without a conftest / package __init__
from hubserver import HubServer, client_env, git_blob_sha1

_PRELUDE = """\
import hashlib, json, os, time
from pathlib import Path
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
result = {}
def catch(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}:{getattr(getattr(exc, 'response', None), 'status_code', None)}"
try:
"""
_EPILOGUE = """
except Exception as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(result))
"""
MIB = 1024 * 1024


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


def run_client(server: HubServer, body: str, home: Path, *, token: str | None = None) -> dict[str, Any]:
    """Run `body` (client code filling the dict `result`) in a subprocess pointed at `server`; return `result`."""
    env = {"PATH": os.environ.get("PATH", "")} | client_env(server, home, token)
    script = _PRELUDE + textwrap.indent(textwrap.dedent(body), "    ") + _EPILOGUE
    # check=False: the RESULT line, not the exit status, says what happened; stderr is shown when it is missing
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=90
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise AssertionError(f"client gave no result (rc={proc.returncode})\n{proc.stdout}\n{proc.stderr}")


def raw_request(
    server: HubServer, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request, for protocol details the client never exercises on its own."""
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_gets(server: HubServer, filename: str) -> list[dict[str, str]]:
    return [h for m, p, h in server.requests if m == "GET" and "/resolve/" in p and p.endswith(filename)]


def test_download_regular_and_lfs_file(hub: HubServer, tmp_path: Path) -> None:
    weights, config = os.urandom(5000), b'{"hidden_size": 8}'
    hub.create_repo("org/model")
    hub.commit("org/model", {"model.safetensors": weights, "config.json": config})
    res = run_client(
        hub,
        """
        for name in ("model.safetensors", "config.json"):
            result[name] = str(Path(hf_hub_download("org/model", name)).resolve())
    """,
        tmp_path,
    )
    lfs_blob, regular_blob = Path(res["model.safetensors"]), Path(res["config.json"])
    assert lfs_blob.read_bytes() == weights and regular_blob.read_bytes() == config
    # the cache names blobs after the ETag: sha256 for LFS files, git blob sha1 for regular ones
    assert lfs_blob.name == sha256(weights)
    assert regular_blob.name == git_blob_sha1(config)


def test_snapshot_download_and_revisions(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo("org/model")
    old = hub.commit("org/model", {"a.txt": b"v1", "sub/dir/b.bin": os.urandom(2048)})
    hub.commit("org/model", {"a.txt": b"v2", "c.safetensors": os.urandom(300)}, message="second")
    res = run_client(
        hub,
        f"""
        result["main"] = snapshot_download("org/model")
        result["old"] = snapshot_download("org/model", revision="{old}")
        api = HfApi()
        result["files"] = api.list_repo_files("org/model")
        result["top"] = sorted((type(e).__name__, e.path) for e in api.list_repo_tree("org/model"))
        result["sub"] = [e.path for e in api.list_repo_tree("org/model", path_in_repo="sub", recursive=True)]
        result["titles"] = [c.title for c in api.list_repo_commits("org/model")]
        info = api.model_info("org/model", files_metadata=True)
        result["info"] = [info.sha, {{s.rfilename: s.lfs.sha256 if s.lfs else None for s in info.siblings}}]
    """,
        tmp_path,
    )
    for key, rev in (("main", "main"), ("old", old)):
        got = {p.relative_to(res[key]).as_posix(): p.read_bytes() for p in Path(res[key]).rglob("*") if p.is_file()}
        assert got == hub.files("org/model", rev)
    assert res["files"] == ["a.txt", "c.safetensors", "sub/dir/b.bin"]
    assert res["top"] == [["RepoFile", "a.txt"], ["RepoFile", "c.safetensors"], ["RepoFolder", "sub"]]
    assert res["sub"] == ["sub/dir", "sub/dir/b.bin"]
    assert res["titles"] == ["second", "add 2 file(s)", "initial commit"]
    head, lfs = res["info"]
    assert head == hub.commits("org/model")[0]["oid"]
    assert lfs["a.txt"] is None and lfs["c.safetensors"] == sha256(hub.files("org/model")["c.safetensors"])


def test_range_requests(hub: HubServer) -> None:
    data = bytes(range(256)) * 8
    hub.create_repo("org/model")
    sha = hub.commit("org/model", {"w.bin": data})
    status, headers, body = raw_request(hub, "GET", f"/org/model/resolve/{sha}/w.bin", headers={"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
    assert headers["X-Repo-Commit"] == sha and headers["Accept-Ranges"] == "bytes"
    status, _, body = raw_request(hub, "GET", "/org/model/resolve/main/w.bin", headers={"Range": "bytes=-5"})
    assert (status, body) == (206, data[-5:])
    status, headers, _ = raw_request(hub, "GET", "/org/model/resolve/main/w.bin", headers={"Range": "bytes=9999-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    status, headers, body = raw_request(hub, "HEAD", "/org/model/resolve/main/w.bin")
    assert (status, body, headers["Content-Length"], headers["X-Linked-Size"]) == (200, b"", "2048", "2048")
    assert headers["ETag"] == headers["X-Linked-Etag"] == f'"{sha256(data)}"'


def test_errors_map_to_client_exceptions(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo("org/model")
    hub.create_repo("org/gated", gated=True)
    hub.commit("org/model", {"a.txt": b"x"})
    hub.commit("org/gated", {"a.txt": b"x"})
    res = run_client(
        hub,
        """
        result["repo"] = catch(hf_hub_download, "org/missing", "a.txt")
        result["revision"] = catch(hf_hub_download, "org/model", "a.txt", revision="nope")
        result["entry"] = catch(hf_hub_download, "org/model", "b.txt")
        result["gated"] = catch(hf_hub_download, "org/gated", "a.txt")
        result["info"] = catch(HfApi().model_info, "org/missing")
    """,
        tmp_path,
    )
    assert res == {
        "repo": "RepositoryNotFoundError:404",
        "revision": "RevisionNotFoundError:404",
        "entry": "RemoteEntryNotFoundError:404",
        "gated": "GatedRepoError:403",
        "info": "RepositoryNotFoundError:404",
    }


def test_token_is_required_and_never_sent_to_lfs_uploads(tmp_path: Path) -> None:
    with HubServer(token="hf_good") as hub:
        hub.create_repo("org/private", private=True)
        hub.commit("org/private", {"a.txt": b"secret"})
        code = 'result["get"] = catch(hf_hub_download, "org/private", "a.txt")'
        assert run_client(hub, code, tmp_path / "anon")["get"] == "RepositoryNotFoundError:401"
        assert run_client(hub, code, tmp_path / "bad", token="hf_bad")["get"] == "HfHubHTTPError:401"
        (tmp_path / "up").mkdir()
        (tmp_path / "up" / "w.safetensors").write_bytes(os.urandom(4096))
        before = len(hub.requests)
        res = run_client(
            hub,
            f"""
            {code}
            result["up"] = catch(HfApi().upload_folder, repo_id="org/private", folder_path="{tmp_path / "up"}")
        """,
            tmp_path / "good",
            token="hf_good",
        )
        assert res == {"get": "ok", "up": "ok"}
        puts = [h for m, _, h in hub.requests if m == "PUT"]
        assert len(puts) == hub.lfs_puts == 1 and "authorization" not in puts[0]
        # every Hub call carries the token; the registry probe is anonymous by design of the client
        hub_calls = [(p, h) for m, p, h in hub.requests[before:] if m != "PUT" and p != "/api/agent-harnesses"]
        assert len(hub_calls) >= 5 and all(h.get("authorization") == "Bearer hf_good" for _, h in hub_calls)


def test_upload_folder_roundtrip_and_dedup(hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    files = {
        "README.md": b"---\nlicense: mit\n---\n# quantized\n",
        "config.json": b'{"bits": 4}',
        "model-00001-of-00002.safetensors": os.urandom(3 * MIB),
        "model-00002-of-00002.safetensors": os.urandom(2000),
        "extra/big.txt": b"y" * 5000,
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    upload = f"""
        api = HfApi()
        result["url"] = str(api.create_repo("org/quant", exist_ok=True))
        result["commit"] = api.upload_folder(repo_id="org/quant", folder_path="{folder}", commit_message="q").oid
    """
    first = run_client(
        hub, textwrap.dedent(upload) + 'result["snap"] = snapshot_download("org/quant")\n', tmp_path / "c1"
    )
    assert first["url"] == f"{hub.url}/org/quant"
    assert hub.files("org/quant") == files and hub.lfs_puts == 3
    snap = Path(first["snap"])
    assert {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()} == files
    # identical re-upload: create_repo answers 409 (exist_ok), LFS batch has no actions, the commit is skipped
    second = run_client(hub, upload, tmp_path / "c2")
    assert second["commit"] == first["commit"] == hub.commits("org/quant")[0]["oid"]
    assert hub.lfs_puts == 3 and len(hub.commits("org/quant")) == 2
    # one changed shard: only that object travels again
    (folder / "model-00002-of-00002.safetensors").write_bytes(os.urandom(2000))
    third = run_client(hub, upload, tmp_path / "c3")
    assert third["commit"] != first["commit"] and hub.lfs_puts == 4
    assert hub.commits("org/quant")[0]["message"] == "q"


def test_commit_referencing_unuploaded_lfs_object_fails(hub: HubServer) -> None:
    hub.create_repo("org/model")
    lines = [
        {"key": "header", "value": {"summary": "bad", "description": ""}},
        {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "ab" * 32, "size": 10}},
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, headers, _ = raw_request(
        hub, "POST", "/api/models/org/model/commit/main", body, {"Content-Type": "application/x-ndjson"}
    )
    assert 400 <= status < 500 and "never uploaded" in headers["X-Error-Message"]
    assert len(hub.commits("org/model")) == 1
    # an LFS PUT whose body does not hash to the oid is refused as well
    status, _, body = raw_request(
        hub,
        "POST",
        "/org/model.git/info/lfs/objects/batch",
        json.dumps({"operation": "upload", "objects": [{"oid": "cd" * 32, "size": 3}]}).encode(),
    )
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    assert raw_request(hub, "PUT", href.removeprefix(hub.url), b"abc")[0] == 400 and hub.lfs_puts == 0


def test_500_on_head_is_retried_but_500_on_get_is_not(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo("org/model")
    hub.commit("org/model", {"a.bin": os.urandom(2000), "b.bin": os.urandom(2000)})
    hub.fail_next("HEAD", r"/resolve/main/a\.bin$", 500)
    hub.fail_next("GET", r"/resolve/main/b\.bin$", 500)
    res = run_client(
        hub,
        """
        result["a"] = catch(hf_hub_download, "org/model", "a.bin")
        result["b_first"] = catch(hf_hub_download, "org/model", "b.bin")
        result["b_again"] = catch(hf_hub_download, "org/model", "b.bin")
    """,
        tmp_path,
    )
    # a failed HEAD makes hf_hub_download re-ask with backoff; http_get retries only 408/429, so a 500 GET raises
    assert res == {"a": "ok", "b_first": "HfHubHTTPError:500", "b_again": "ok"}
    assert [m for m, p, _ in hub.requests if p.endswith("a.bin")] == ["HEAD", "HEAD", "GET"]
    assert len(resolve_gets(hub, "b.bin")) == 2


def test_dropped_download_resumes_in_process(hub: HubServer, tmp_path: Path) -> None:
    big, small = os.urandom(12 * MIB), os.urandom(5000)
    hub.create_repo("org/model")
    hub.commit("org/model", {"big.safetensors": big, "small.safetensors": small})
    hub.drop_after(r"big\.safetensors$", 11 * MIB)
    hub.drop_after(r"small\.safetensors$", 100)
    res = run_client(
        hub,
        """
        for name in ("big.safetensors", "small.safetensors"):
            result[name] = hf_hub_download("org/model", name)
    """,
        tmp_path,
    )
    assert Path(res["big.safetensors"]).read_bytes() == big
    assert Path(res["small.safetensors"]).read_bytes() == small
    # the client keeps whole 10 MiB chunks only: it resumes from 10 MiB, or restarts without Range below that
    assert [h.get("range") for h in resolve_gets(hub, "big.safetensors")] == [None, f"bytes={10 * MIB}-"]
    assert [h.get("range") for h in resolve_gets(hub, "small.safetensors")] == [None, None]


def test_429_honours_retry_after(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo("org/model")
    hub.commit("org/model", {"a.bin": os.urandom(2000)})
    hub.fail_next("GET", r"/resolve/main/a\.bin$", 429, retry_after=1)
    res = run_client(
        hub,
        """
        start = time.monotonic()
        result["get"] = catch(hf_hub_download, "org/model", "a.bin")
        result["elapsed"] = time.monotonic() - start
    """,
        tmp_path,
    )
    assert res["get"] == "ok" and len(resolve_gets(hub, "a.bin")) == 2
    assert res["elapsed"] >= 2.0  # the client sleeps Retry-After + 1 s


def test_wrong_advertised_sha256_is_not_caught_by_download(hub: HubServer, tmp_path: Path) -> None:
    data, wrong = os.urandom(3000), "0" * 64
    hub.create_repo("org/model")
    hub.commit("org/model", {"w.safetensors": data})
    hub.set_lfs_sha256("org/model", "w.safetensors", wrong)
    res = run_client(
        hub,
        """
        result["path"] = str(Path(hf_hub_download("org/model", "w.safetensors")).resolve())
        check = HfApi().verify_repo_checksums("org/model")
        result["mismatches"] = [(m["path"], m["expected"]) for m in check.mismatches]
    """,
        tmp_path,
    )
    # hf_hub_download trusts the ETag (the blob is named after it); only a checksum pass sees the lie
    assert Path(res["path"]).name == wrong and Path(res["path"]).read_bytes() == data
    assert res["mismatches"] == [["w.safetensors", wrong]]


def test_restart_on_same_root_keeps_repos(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    with HubServer(root=root) as first:
        first.create_repo("org/model")
        sha = first.commit("org/model", {"w.safetensors": b"\0" * 1500, "a.txt": b"a"})
    with HubServer(root=root) as second:
        assert second.url != "" and second.files("org/model") == {"w.safetensors": b"\0" * 1500, "a.txt": b"a"}
        assert second.commits("org/model")[0]["oid"] == sha
        res = run_client(second, 'result["p"] = hf_hub_download("org/model", "a.txt")', tmp_path)
        assert Path(res["p"]).read_bytes() == b"a"
