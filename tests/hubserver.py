"""Stdlib-only Hugging Face Hub-protocol test server for the huggingface_hub 2.x client, on 127.0.0.1.

It serves what hf_hub_download, snapshot_download, HfApi.create_repo/upload_folder/create_commit/
list_repo_commits/list_repo_files/model_info ask of the Hub (see shared/notes/hub-protocol.md), plus fault
injection (fail_next, drop_after, set_lfs_sha256). Repos and blobs live under `root`, so a server restarted
on the same root keeps them. Xet is never offered: uploading clients must run with HF_HUB_DISABLE_XET=1.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 1024  # bytes; at or above this a file is stored (and asked to be uploaded) as LFS
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npy", ".npz", ".onnx", ".h5")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
_TYPES = r"(?:models|datasets|spaces)"
_API = rf"^/api/{_TYPES}/([^/]+/[^/]+)"
_R_INFO = re.compile(rf"{_API}(?:/revision/([^/]+))?$")
_R_TREE = re.compile(rf"{_API}/tree/([^/]+)(?:/(.*))?$")
_R_COMMITS = re.compile(rf"{_API}/commits/([^/]+)$")
_R_PREUPLOAD = re.compile(rf"{_API}/preupload/([^/]+)$")
_R_COMMIT = re.compile(rf"{_API}/commit/([^/]+)$")
_R_BATCH = re.compile(rf"^/(?:{_TYPES}/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_R_RESOLVE = re.compile(rf"^/(?:{_TYPES}/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_R_UPLOAD = re.compile(r"^/lfs-upload/([^/]+/[^/]+)/([0-9a-f]{64})$")
_R_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as ETag/oid of regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int, sample: bytes = b"") -> bool:
    """Rule shared by commit() and the preupload endpoint, so both sides agree on a file's storage."""
    return path.endswith(LFS_SUFFIXES) or size >= LFS_THRESHOLD or b"\0" in sample


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class HubError(Exception):
    """An error answer: status, X-Error-Code (what the client maps to its exception classes) and message."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    file: tuple[Path, int, int] | None = None  # (path, start, length): streamed instead of `body`, for big blobs


def _json(obj: Any, status: int = 200, content_type: str = "application/json") -> _Response:
    return _Response(status, json.dumps(obj).encode(), content_type=content_type)


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    status: int = 0
    retry_after: int | None = None
    nbytes: int = 0
    count: int = 1


class HubServer:
    """A Hub on 127.0.0.1:<free port>; use as a context manager or start()/stop().

    `requests` logs every request as (method, raw path with query, headers with lower-cased names);
    `lfs_puts` counts LFS object bodies accepted by the upload endpoint.
    """

    def __init__(self, root: Path | None = None, token: str | None = None) -> None:
        self._tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="hubserver-")
        self.root = Path(root) if root is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.token = token
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lfs_puts = 0
        self._lock = threading.RLock()
        self._repos: dict[str, dict[str, Any]] = {}
        self._fails: list[_Fault] = []
        self._drops: list[_Fault] = []
        self._wrong_sha: dict[tuple[str, str], str] = {}
        self._secret = secrets.token_bytes(16)  # signs LFS upload URLs, which the client PUTs without auth
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> Self:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- test-side API ---------------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> None:
        """Create an empty repo whose main holds one empty 'initial commit' (so main always resolves)."""
        with self._lock:
            if self._load(repo_id) is not None:
                raise ValueError(f"repo {repo_id} exists")
            ns, name = repo_id.split("/")
            if not (_NAME.match(ns) and _NAME.match(name)):
                raise ValueError(f"bad repo id {repo_id!r}")
            now = _now_iso()
            self._repos[repo_id] = {"private": private, "gated": gated, "created": now, "refs": {}, "commits": {}}
            self._new_commit(repo_id, "main", {}, "initial commit", "", None)

    def commit(self, repo_id: str, files: dict[str, bytes], *, revision: str = "main", message: str = "") -> str:
        """Add/overwrite files on a branch (created from main if missing); returns the new commit sha."""
        with self._lock:
            repo = self._require(repo_id)
            base = repo["refs"].get(revision) or repo["refs"]["main"]
            tree = dict(repo["commits"][base]["tree"])
            for path, data in files.items():
                tree[path] = self._entry(self._put_object(data), data, is_lfs(path, len(data), data[:512]))
            return self._new_commit(repo_id, revision, tree, message or f"add {len(files)} file(s)", "", base)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            tree = self._tree(self._require(repo_id), revision)
        return {p: self._read_object(e["sha256"]) for p, e in tree.items()}

    def commits(self, repo_id: str) -> list[dict[str, Any]]:
        """History of main, newest first: {"oid", "message", "parent", "date", "files"}."""
        with self._lock:
            repo = self._require(repo_id)
            return [
                {
                    "oid": sha,
                    "message": c["message"],
                    "parent": c["parent"],
                    "date": c["date"],
                    "files": sorted(c["tree"]),
                }
                for sha, c in self._history(repo, repo["refs"]["main"])
            ]

    def set_lfs_sha256(self, repo_id: str, path: str, wrong_sha: str) -> None:
        """Fault: advertise `wrong_sha` as the file's sha256 (ETag, X-Linked-Etag, tree and siblings lfs oid)."""
        with self._lock:
            self._wrong_sha[(repo_id, path)] = wrong_sha

    def fail_next(
        self, method: str, path_regex: str, status: int, *, retry_after: int | None = None, count: int = 1
    ) -> None:
        """Answer the next `count` requests matching (method or '*', regex searched in the path) with `status`."""
        with self._lock:
            self._fails.append(_Fault(method.upper(), re.compile(path_regex), status, retry_after, count=count))

    def drop_after(self, path_regex: str, nbytes: int, count: int = 1) -> None:
        """For the next `count` matching GETs: send headers + `nbytes` of body, then close the socket."""
        with self._lock:
            self._drops.append(_Fault("GET", re.compile(path_regex), nbytes=nbytes, count=count))

    # ---- storage ---------------------------------------------------------------------------------------------
    def _object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def _put_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        dest = self._object_path(sha)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{sha}.{secrets.token_hex(4)}.tmp")  # atomic: concurrent PUTs of one object
            tmp.write_bytes(data)
            tmp.replace(dest)
        return sha

    def _read_object(self, sha256: str) -> bytes:
        return self._object_path(sha256).read_bytes()

    @staticmethod
    def _entry(sha256: str, data: bytes, lfs: bool) -> dict[str, Any]:
        # git_oid is what the Hub reports as a file's blob id: of the pointer for LFS files, of the content otherwise
        git_oid = git_blob_sha1(lfs_pointer(sha256, len(data))) if lfs else git_blob_sha1(data)
        return {"sha256": sha256, "size": len(data), "lfs": lfs, "git_oid": git_oid}

    def _repo_file(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id / "repo.json"

    def _load(self, repo_id: str) -> dict[str, Any] | None:
        if repo_id not in self._repos:
            f = self._repo_file(repo_id)
            if repo_id.count("/") != 1 or not f.is_file():
                return None
            self._repos[repo_id] = json.loads(f.read_text())
        return self._repos[repo_id]

    def _save(self, repo_id: str) -> None:
        f = self._repo_file(repo_id)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._repos[repo_id]))
        tmp.replace(f)

    def _require(self, repo_id: str) -> dict[str, Any]:
        repo = self._load(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _new_commit(
        self, repo_id: str, branch: str, tree: dict[str, Any], message: str, description: str, parent: str | None
    ) -> str:
        repo = self._repos[repo_id]
        seed = json.dumps([parent, tree, message, time.time_ns(), secrets.token_hex(4)], sort_keys=True)
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo["commits"][sha] = {
            "parent": parent,
            "message": message,
            "description": description,
            "date": _now_iso(),
            "tree": tree,
        }
        repo["refs"][branch] = sha
        self._save(repo_id)
        return sha

    @staticmethod
    def _resolve(repo: dict[str, Any], revision: str) -> str:
        if revision in repo["refs"]:
            return str(repo["refs"][revision])
        if revision in repo["commits"]:
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _tree(self, repo: dict[str, Any], revision: str) -> dict[str, Any]:
        return dict(repo["commits"][self._resolve(repo, revision)]["tree"])

    @staticmethod
    def _history(repo: dict[str, Any], sha: str | None) -> list[tuple[str, dict[str, Any]]]:
        out = []
        while sha is not None:
            out.append((sha, repo["commits"][sha]))
            sha = repo["commits"][sha]["parent"]
        return out

    def _sha256_of(self, repo_id: str, path: str, entry: dict[str, Any]) -> str:
        return self._wrong_sha.get((repo_id, path), entry["sha256"])

    # ---- request plumbing ------------------------------------------------------------------------------------
    def _take(self, faults: list[_Fault], method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in faults:
                if fault.method in (method, "*") and fault.pattern.search(path):
                    fault.count -= 1
                    if fault.count <= 0:
                        faults.remove(fault)
                    return fault
        return None

    def _sign(self, repo_id: str, oid: str) -> str:
        return hmac.new(self._secret, f"{repo_id}/{oid}".encode(), hashlib.sha256).hexdigest()

    def _check_auth(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]) -> None:
        upload = _R_UPLOAD.match(path)
        if method == "PUT" and upload:  # signed URL stands in for auth, as for the Hub's S3 URLs
            if hmac.compare_digest(query.get("sig", [""])[0], self._sign(unquote(upload[1]), upload[2])):
                return
            raise HubError(403, None, "Bad upload signature")
        if self.token is None:
            return
        auth = headers.get("authorization")
        if auth is None:  # the Hub hides what an anonymous caller may not see behind RepoNotFound
            raise HubError(401, "RepoNotFound", "Invalid username or password.")
        if auth != f"Bearer {self.token}":
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _visible(self, repo_id: str, headers: dict[str, str], *, download: bool = False) -> dict[str, Any]:
        repo = self._require(repo_id)
        if repo["private"] and "authorization" not in headers:
            raise HubError(401, "RepoNotFound", f"Repository {repo_id} not found")
        if download and repo["gated"]:
            raise HubError(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the list")
        return repo

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> _Response:
        if method in ("GET", "HEAD") and (m := _R_RESOLVE.match(path)):
            return self._serve_resolve(method, unquote(m[1]), unquote(m[2]), unquote(m[3]), headers)
        if method == "GET" and (m := _R_INFO.match(path)):
            return self._serve_info(unquote(m[1]), unquote(m[2] or "main"), headers, "true" in query.get("blobs", []))
        if method == "GET" and (m := _R_TREE.match(path)):
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            return self._serve_tree(unquote(m[1]), unquote(m[2]), unquote(m[3] or "").strip("/"), headers, recursive)
        if method == "GET" and (m := _R_COMMITS.match(path)):
            return self._serve_commit_list(unquote(m[1]), unquote(m[2]), headers)
        if method == "POST" and path == "/api/repos/create":
            return self._serve_create(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return _json({"errors": [], "warnings": []})
        if method == "POST" and (m := _R_PREUPLOAD.match(path)):
            return self._serve_preupload(unquote(m[1]), unquote(m[2]), headers, json.loads(body))
        if method == "POST" and (m := _R_BATCH.match(path)):
            return self._serve_batch(unquote(m[1]), headers, json.loads(body))
        if method == "PUT" and (m := _R_UPLOAD.match(path)):
            return self._serve_upload(m[2], body)
        if method == "POST" and (m := _R_COMMIT.match(path)):
            return self._serve_commit(unquote(m[1]), unquote(m[2]), headers, body)
        raise HubError(404, None, f"Sorry, we can't find the page you are looking for: {method} {path}")

    # ---- endpoints -------------------------------------------------------------------------------------------
    def _serve_resolve(self, method: str, repo_id: str, revision: str, path: str, headers: dict[str, str]) -> _Response:
        with self._lock:
            repo = self._visible(repo_id, headers, download=True)
            sha = self._resolve(repo, revision)
            entry = repo["commits"][sha]["tree"].get(path)
        if entry is None:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", {"X-Repo-Commit": sha})
        size = entry["size"]
        hdrs = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Content-Disposition": f'inline; filename="{path}"'}
        if entry["lfs"]:
            sha256 = self._sha256_of(repo_id, path, entry)
            hdrs |= {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(size)}
        else:
            hdrs["ETag"] = f'"{entry["git_oid"]}"'
        start, end = self._parse_range(headers.get("range"), size)
        status = 206 if (start, end) != (0, size - 1) or headers.get("range") else 200
        if status == 206:
            hdrs["Content-Range"] = f"bytes {start}-{end}/{size}"
        # HEAD gets the same Content-Length as GET: the client takes the file size from it
        hdrs["Content-Length"] = str(end - start + 1)
        stream = (self._object_path(entry["sha256"]), start, end - start + 1)
        return _Response(status, b"", hdrs, "application/octet-stream", stream if method == "GET" else None)

    @staticmethod
    def _parse_range(header: str | None, size: int) -> tuple[int, int]:
        m = _R_RANGE.match(header.strip()) if header else None
        if m is None or (not m[1] and not m[2]):
            return 0, size - 1
        if not m[1]:  # suffix range: the last N bytes
            return max(size - int(m[2]), 0), size - 1
        start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
        if start >= size or start > end:
            raise HubError(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
        return start, end

    def _serve_info(self, repo_id: str, revision: str, headers: dict[str, str], blobs: bool) -> _Response:
        with self._lock:
            repo = self._visible(repo_id, headers)
            sha = self._resolve(repo, revision)
            commit = repo["commits"][sha]
        siblings = []
        for path, e in sorted(commit["tree"].items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib |= {"size": e["size"], "blobId": e["git_oid"]}
                if e["lfs"]:
                    sha256 = self._sha256_of(repo_id, path, e)
                    sib["lfs"] = {
                        "size": e["size"],
                        "sha256": sha256,
                        "pointerSize": len(lfs_pointer(sha256, e["size"])),
                    }
            siblings.append(sib)
        return _json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": sha,
                "lastModified": commit["date"],
                "createdAt": repo["created"],
                "private": repo["private"],
                "gated": "auto" if repo["gated"] else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _tree_entry(self, repo_id: str, path: str, e: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": e["git_oid"], "size": e["size"], "path": path}
        if e["lfs"]:
            sha256 = self._sha256_of(repo_id, path, e)
            out["lfs"] = {"oid": sha256, "size": e["size"], "pointerSize": len(lfs_pointer(sha256, e["size"]))}
        return out

    def _serve_tree(self, repo_id: str, rev: str, prefix: str, headers: dict[str, str], recursive: bool) -> _Response:
        with self._lock:
            repo = self._visible(repo_id, headers)
            tree = self._tree(repo, rev)
        base = f"{prefix}/" if prefix else ""
        files, dirs = [], set()
        for path, e in sorted(tree.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            if recursive or len(parts) == 1:
                files.append(self._tree_entry(repo_id, path, e))
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add(base + "/".join(parts[:i]))
        if prefix and not files and not dirs:
            raise HubError(404, "EntryNotFound", f"{prefix} does not exist on {rev}")
        folders = [{"type": "directory", "oid": git_blob_sha1(d.encode()), "size": 0, "path": d} for d in sorted(dirs)]
        return _json(folders + files)

    def _serve_commit_list(self, repo_id: str, revision: str, headers: dict[str, str]) -> _Response:
        with self._lock:
            repo = self._visible(repo_id, headers)
            history = self._history(repo, self._resolve(repo, revision))
        return _json(
            [
                {
                    "id": sha,
                    "title": c["message"],
                    "message": c["description"],
                    "date": c["date"],
                    "authors": [{"user": "hubserver", "avatar": ""}],
                }
                for sha, c in history
            ]
        )

    def _serve_create(self, payload: dict[str, Any]) -> _Response:
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        prefix = {"dataset": "datasets/", "space": "spaces/"}.get(payload.get("type") or "model", "")
        url = f"{self.url}/{prefix}{repo_id}"
        try:
            self.create_repo(repo_id, private=bool(payload.get("private")))
        except ValueError as exc:
            if "exists" not in str(exc):
                raise HubError(400, None, str(exc)) from exc
            resp = _json({"error": "You already created this model repo", "url": url}, 409)
            resp.headers["X-Error-Message"] = "You already created this model repo"
            return resp
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _serve_preupload(self, repo_id: str, rev: str, headers: dict[str, str], payload: dict[str, Any]) -> _Response:
        with self._lock:
            repo = self._visible(repo_id, headers)
            head = self._resolve(repo, rev)
            tree = repo["commits"][head]["tree"]
        out = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = is_lfs(f["path"], int(f["size"]), sample)
            item: dict[str, Any] = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if (e := tree.get(f["path"])) is not None:  # what is there now, in the form the client compares against
                item["oid"] = e["sha256"] if lfs else e["git_oid"]
            out.append(item)
        return _json({"files": out, "commitOid": head})

    def _serve_batch(self, repo_id: str, headers: dict[str, str], payload: dict[str, Any]) -> _Response:
        with self._lock:
            self._visible(repo_id, headers)
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self._object_path(oid).exists():  # no "actions" tells the client it is already stored
                href = f"{self.url}/lfs-upload/{repo_id}/{oid}?sig={self._sign(repo_id, oid)}"
                item["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(item)
        return _json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, 200, "application/vnd.git-lfs+json"
        )

    def _serve_upload(self, oid: str, body: bytes) -> _Response:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, None, f"sha256 of the uploaded body does not match {oid}")
        self._put_object(body)
        with self._lock:
            self.lfs_puts += 1
        return _Response(200, b"", {"ETag": f'"{oid}"'})

    def _serve_commit(self, repo_id: str, rev: str, headers: dict[str, str], body: bytes) -> _Response:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "first ndjson line must be the header")
        header = lines[0]["value"]
        with self._lock:
            repo = self._visible(repo_id, headers)
            head = self._resolve(repo, rev)
            if rev not in repo["refs"]:
                raise HubError(400, None, f"Can only commit to a branch, not to {rev}")
            if header.get("parentCommit") not in (None, head):
                raise HubError(412, None, f"A commit has happened since {header['parentCommit']}. Please refresh.")
            tree = dict(repo["commits"][head]["tree"])
            for op in lines[1:]:
                self._apply_op(tree, op["key"], op["value"])
            sha = self._new_commit(repo_id, rev, tree, header.get("summary", ""), header.get("description", ""), head)
        return _json(
            {
                "commitOid": sha,
                "commitUrl": f"{self.url}/{repo_id}/commit/{sha}",
                "success": True,
                "commitMessage": header.get("summary", ""),
                "pullRequestUrl": None,
            }
        )

    def _apply_op(self, tree: dict[str, Any], key: str, value: dict[str, Any]) -> None:
        path = value["path"]
        if key == "file":
            data = (
                base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
            )
            tree[path] = self._entry(self._put_object(data), data, False)
        elif key == "lfsFile":
            oid = value["oid"]
            if not self._object_path(oid).exists():  # the Hub refuses pointers to objects it never received
                raise HubError(400, None, f"LFS object {oid} for {path} was never uploaded")
            size = self._object_path(oid).stat().st_size
            if value.get("size") not in (None, size):
                raise HubError(400, None, f"LFS object {oid} has size {size}, not {value['size']}")
            tree[path] = {"sha256": oid, "size": size, "lfs": True, "git_oid": git_blob_sha1(lfs_pointer(oid, size))}
        elif key == "deletedFile":
            if tree.pop(path, None) is None:
                raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
        elif key == "deletedFolder":
            for p in [p for p in tree if p.startswith(path.rstrip("/") + "/")]:
                del tree[p]
        else:
            raise HubError(400, None, f"unsupported commit operation {key}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # stop() must not wait for idle keep-alive connections

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up mid-body is routine here
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; hence every request body is read in full
    hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # keeps test output quiet
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        hub = self.hub
        with hub._lock:
            hub.requests.append((self.command, self.path, headers))
        drop: _Fault | None = None
        try:
            if (fault := hub._take(hub._fails, self.command, split.path)) is not None:
                retry = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                raise HubError(fault.status, None, "injected fault", retry)
            query = parse_qs(split.query)
            hub._check_auth(self.command, split.path, query, headers)
            resp = hub._route(self.command, split.path, query, headers, body)
            if self.command == "GET":
                drop = hub._take(hub._drops, "GET", split.path)
        except HubError as exc:
            resp = _json({"error": exc.message}, exc.status)
            resp.headers = {"X-Error-Message": exc.message, **({"X-Error-Code": exc.code} if exc.code else {})}
            resp.headers |= exc.headers
        except (ValueError, KeyError, TypeError) as exc:  # malformed request bodies
            resp = _json({"error": f"bad request: {exc!r}"}, 400)
        except Exception as exc:
            traceback.print_exc()
            resp = _json({"error": repr(exc)}, 500)
            resp.headers["X-Error-Message"] = f"hubserver bug: {exc!r}"
        self._send(resp, drop.nbytes if drop is not None else None)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _send(self, resp: _Response, drop_after: int | None) -> None:
        self.send_response(resp.status)
        headers = {"Content-Type": resp.content_type, "Content-Length": str(len(resp.body)), **resp.headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = drop_after if drop_after is not None else -1
        if resp.file is None:
            self.wfile.write(resp.body[:limit] if limit >= 0 else resp.body)
        else:
            self._send_file(*resp.file, limit)
        if drop_after is None:
            return
        # the fault: a truncated body, then an abrupt close, as a dropped connection mid-download looks
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_file(self, path: Path, start: int, length: int, limit: int) -> None:
        """Stream a byte range of a blob in 1 MiB pieces, stopping after `limit` bytes when limit >= 0."""
        todo = length if limit < 0 else min(length, limit)
        with path.open("rb") as f:
            f.seek(start)
            while todo > 0 and (piece := f.read(min(todo, 1 << 20))):
                self.wfile.write(piece)
                todo -= len(piece)


def client_env(server: HubServer, home: Path, token: str | None = None) -> dict[str, str]:
    """Environment variables that point a huggingface_hub client at `server`: private HOME/HF_HOME, no Xet."""
    env = {
        "HOME": str(home),
        "HF_HOME": str(home / "hf"),
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "*",  # no proxy variables are passed; this only guards against inherited defaults
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env
