"""The Hub side of the download and upload stages, through huggingface_hub (HF_ENDPOINT and tokens as it reads them).

Download: `source.revision` is resolved to a commit sha once per workdir and pinned, with the tree listing (size, git
oid, LFS sha256 per file), in state/resolve/source.json; later runs reuse it even if upstream moved. The index and small
files are fetched at resolve time, shards one by one by `download_shard`. Every file goes to a `.part` beside its final
name, which survives a kill and is resumed with a Range request, and is renamed into place only once its hash matches
the listing. Upload: create_repo(exist_ok) -> LFS preupload in groups (the server's LFS batch answer skips objects it
already has, so a resumed upload sends only what is missing) -> one create_commit.

Tokens are only ever read by the client (HF_TOKEN or the `hf auth login` cache); every message shown to users is
redacted first, because the CLI prints str(exception).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar, cast
from urllib.parse import urlsplit

from pipeline.context import Context, SourceInfo
from pipeline.errors import HubError, IntegrityError, LockedError, PipelineError
from pipeline.faults import maybe_die
from pipeline.manifest import Manifest
from pipeline.shards import (
    INDEX_NAME,
    SINGLE_NAME,
    check_shard_filename,
    check_shard_matches_index,
    check_tensor_name,
    is_carried,
    load_index,
    sha256_file,
)
from pipeline.state import RunState

log = logging.getLogger(__name__)
# One INFO line per HTTP request would flood cluster logs, and upload lines carry signed URLs: warnings only.
logging.getLogger("httpx2").setLevel(logging.WARNING)
T = TypeVar("T")

PIN_STAGE, PIN_UNIT = "resolve", "source"
RETRIES = int(os.environ.get("HLWQ_HUB_RETRIES", "6"))
BACKOFF_S = float(os.environ.get("HLWQ_HUB_BACKOFF_S", "2"))  # first wait; doubles per retry up to MAX_WAIT_S
MAX_WAIT_S = 300.0
# Deadlines: every request gets connect and read timeouts (the client's own default is none: a Hub that accepts and
# never answers would hang the run), and all the retries of one call together stop after DEADLINE_S.
CONNECT_TIMEOUT_S = float(os.environ.get("HLWQ_HUB_CONNECT_TIMEOUT_S", "10"))
READ_TIMEOUT_S = float(os.environ.get("HLWQ_HUB_TIMEOUT_S", "60"))
DEADLINE_S = float(os.environ.get("HLWQ_HUB_DEADLINE_S", "1800"))
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
UPLOAD_GROUP = 4  # files per LFS preupload call: the client uploads a group's objects in parallel
_TOKEN_RE = re.compile(r"(hf_[A-Za-z0-9]{8,}|api_org_[A-Za-z0-9]{8,}|Bearer\s+\S+)")


# ---- messages and retries -----------------------------------------------------------------------------------------
def redact(text: str) -> str:
    """One line, with the active token (and anything shaped like one) masked."""
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # redaction must never fail
        token = None
    if token:
        text = text.replace(token, "***")
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return _TOKEN_RE.sub("***", line)[:400]


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _retry_wait(e: BaseException, attempt: int) -> float | None:
    """Seconds to wait before retrying `e`, or None when it is not transient."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    backoff = min(MAX_WAIT_S, BACKOFF_S * 2**attempt) * (1 + 0.1 * random.random())
    if isinstance(e, HfHubHTTPError):
        if _status(e) not in _RETRY_STATUS:
            return None
        after = e.response.headers.get("Retry-After", "") if e.response is not None else ""
        return min(MAX_WAIT_S, float(after)) if after.strip().isdigit() else backoff
    if isinstance(e, httpx2.TransportError):
        return backoff
    # http_get's size check after a connection that ended early: a plain OSError without errno
    if type(e) is OSError and e.errno is None and "Consistency check failed" in str(e):
        return backoff
    return None


def user_error(e: BaseException, repo: str, revision: str, doing: str) -> PipelineError:
    """A one-line, token-free HubError for a client exception (PipelineErrors pass through)."""
    if isinstance(e, PipelineError):
        return e
    import httpx2
    from huggingface_hub import errors as he

    where = f"{repo}@{revision}" if revision else repo
    login = "set HF_TOKEN or run `hf auth login`"
    status = _status(e)
    if isinstance(e, he.GatedRepoError):
        msg = f"{repo} is a gated repo: accept its terms on the Hub with the account of your token ({login})"
    elif isinstance(e, he.RepositoryNotFoundError):
        msg = f"{repo}: repository not found, or private and your token cannot see it ({login})"
    elif isinstance(e, he.RevisionNotFoundError):
        msg = f"{repo}: revision {revision!r} not found (a branch, tag or commit sha of that repo)"
    elif isinstance(e, he.RemoteEntryNotFoundError):
        msg = f"{where}: file not found while trying to {doing}"
    elif status == 401:
        msg = f"the Hub refused the token (401 Unauthorized) while trying to {doing} {where}: {login} again"
    elif status == 403:
        msg = f"the Hub denied access (403) while trying to {doing} {where}: does your token have write access?"
    elif isinstance(e, he.HfHubHTTPError):
        msg = f"{doing} {where}: HTTP {status} from the Hub: {e}"
    elif isinstance(e, httpx2.TimeoutException):
        msg = (f"{doing} {where}: the Hub at {endpoint_of(e)} did not answer in time ({type(e).__name__}; "
               f"timeouts: connect {CONNECT_TIMEOUT_S:g} s, read {READ_TIMEOUT_S:g} s)")  # fmt: skip
    elif isinstance(e, httpx2.TransportError):
        msg = f"{doing} {where}: cannot reach the Hub at {endpoint_of(e)} ({type(e).__name__}: {e})"
    else:
        msg = f"{doing} {where}: {type(e).__name__}: {e}"
    return HubError(redact(msg))


def _fill_timeouts(request: Any) -> None:
    """Request hook: a timeout the caller left unset (None) gets ours, so no request can wait forever."""
    t = dict(request.extensions.get("timeout") or {})
    limits = {"connect": CONNECT_TIMEOUT_S, "read": READ_TIMEOUT_S, "write": READ_TIMEOUT_S, "pool": READ_TIMEOUT_S}
    request.extensions = {**request.extensions, "timeout": {k: t.get(k) or v for k, v in limits.items()}}


_deadlines_set = False


def ensure_deadlines() -> None:
    """Install the client factory that gives every huggingface_hub request connect and read timeouts (once)."""
    global _deadlines_set
    if _deadlines_set:
        return
    import httpx2
    from huggingface_hub.utils import _http

    def client() -> httpx2.Client:
        c = _http.default_client_factory()
        c.timeout = httpx2.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        c.event_hooks = {**c.event_hooks, "request": [*c.event_hooks["request"], _fill_timeouts]}
        return c

    _http.set_client_factory(client)
    _deadlines_set = True


def endpoint_of(e: BaseException) -> str:
    """scheme://host:port of the request that failed (the configured endpoint when the error does not say)."""
    try:
        url = e.request.url  # type: ignore[attr-defined]
        return f"{url.scheme}://{url.netloc.decode() if isinstance(url.netloc, bytes) else url.netloc}"
    except Exception:  # no request attached
        from huggingface_hub import constants

        return str(constants.ENDPOINT)


def with_retries(fn: Callable[[], T], repo: str, revision: str, doing: str) -> T:
    """Run a client call; retry 5xx/408/429 and dropped connections with backoff (Retry-After wins), bounded in
    count (RETRIES) and in total time (DEADLINE_S)."""
    ensure_deadlines()
    t0 = time.monotonic()
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except Exception as e:  # classified below; the user sees one line either way
            wait = _retry_wait(e, attempt)
            late = wait is not None and time.monotonic() - t0 + wait > DEADLINE_S
            if wait is None or attempt == RETRIES or late:
                raise user_error(e, repo, revision, doing) from None
            log.warning("%s %s: %s; retry %d/%d in %.1f s", doing, repo, redact(f"{type(e).__name__}: {e}"),
                        attempt + 1, RETRIES, wait)  # fmt: skip
            time.sleep(wait)
    raise AssertionError("unreachable")


# ---- resolve: pin the revision, fetch index and small files ---------------------------------------------------------
def _pin(repo: str, revision: str) -> dict[str, Any]:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi()
    info = with_retries(lambda: api.model_info(repo, revision=revision), repo, revision, "resolve")
    sha = str(info.sha)
    entries = with_retries(lambda: list(api.list_repo_tree(repo, revision=sha, recursive=True)), repo, sha, "list")
    files = {}
    for e in entries:
        if isinstance(e, RepoFile):
            files[e.path] = {"size": e.size, "oid": e.blob_id} | ({"sha256": e.lfs.sha256} if e.lfs else {})
    log.info("pinned %s@%s to commit %s (%d files)", repo, revision, sha, len(files))
    return {"repo": repo, "requested": revision, "sha": sha, "files": files}


def _small_files(listing: dict[str, Any]) -> list[str]:
    """The model files besides the weights that the artifact carries: the same allowlist as a local source's."""
    return sorted(p for p in listing if is_carried(p))


def resolve_source(manifest: Manifest, state: RunState) -> SourceInfo:
    """The pinned Hub source: its commit sha, shard list and small files, fetched into <workdir>/source/."""
    while True:  # several processes may open one workdir: one pins, the others wait and reuse its pin
        try:
            with state.lock(PIN_STAGE, PIN_UNIT):
                return _resolve_locked(manifest, state)
        except LockedError:
            time.sleep(0.5)


def _resolve_locked(manifest: Manifest, state: RunState) -> SourceInfo:
    repo, requested = str(manifest.source.repo), manifest.source.revision
    rec = state.read(PIN_STAGE, PIN_UNIT)
    if not rec or rec.get("repo") != repo or rec.get("requested") != requested:
        rec = _pin(repo, requested)
        state.write(PIN_STAGE, PIN_UNIT, rec)
    sha, listing = rec["sha"], rec["files"]
    folder = state.workdir / "source"
    wanted = _small_files(listing) + [n for n in ("README.md", INDEX_NAME) if n in listing]
    for name in wanted:
        fetch_checked(repo, sha, name, listing[name], folder / name)
    if INDEX_NAME in listing:
        shards = load_index(folder)
    elif SINGLE_NAME in listing:
        shards = {SINGLE_NAME: rec.get("single") or _single_file_names(repo, sha)}
        if "single" not in rec:
            state.write(PIN_STAGE, PIN_UNIT, {**rec, "single": shards[SINGLE_NAME]})
    else:
        raise HubError(f"{repo}@{sha}: no {INDEX_NAME} or {SINGLE_NAME}: not a safetensors checkpoint")
    missing = [s for s in shards if s not in listing or "sha256" not in listing[s]]
    if missing:
        raise IntegrityError(f"{repo}@{sha}: shard {missing[0]} is in the index but not stored in the repo as LFS")
    small = _small_files(listing)
    return SourceInfo(
        kind="hub",
        name=repo,
        revision=sha,
        folder=folder,
        shards=shards,
        files={n: listing[n].get("sha256", listing[n]["oid"]) for n in small},
        shard_sha256={s: listing[s]["sha256"] for s in shards},
    )


def _single_file_names(repo: str, sha: str) -> list[str]:
    from huggingface_hub import HfApi

    meta = with_retries(lambda: HfApi().get_safetensors_metadata(repo, revision=sha), repo, sha, "read the header of")
    return sorted(check_tensor_name(n) for n in meta.weight_map)


# ---- transfer of one file -------------------------------------------------------------------------------------------
def _git_oid(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _digest(path: Path, entry: dict[str, Any]) -> tuple[str, str]:
    """(got, expected): the LFS sha256 for LFS files, the git blob id otherwise."""
    if "sha256" in entry:
        return sha256_file(path), entry["sha256"]
    return _git_oid(path), entry["oid"]


class _KillProbe:
    """The .part file as http_get sees it; calls the fault hook once with a real prefix on disk (tests only)."""

    def __init__(self, f: IO[bytes], point: str | None):
        self._f, self._point = f, point

    def write(self, data: bytes) -> int:
        if self._point is None:
            return self._f.write(data)
        n = self._f.write(data[: 1 << 20])
        self._f.flush()
        maybe_die(self._point)
        self._point = None
        return n + self._f.write(data[1 << 20 :])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _download_attempt(repo: str, sha: str, name: str, size: int, part: Path, point: str | None) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo, name, revision=sha)
    meta = get_hf_file_metadata(url, retry_on_errors=True)
    if meta.commit_hash and meta.commit_hash != sha:
        raise HubError(f"{repo}: asked for commit {sha}, the Hub answered {meta.commit_hash} for {name}")
    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:  # a signed CDN URL: the token stays with the Hub
        headers.pop("authorization", None)
    with open(part, "ab") as f:
        have = f.tell()
        if have > size:  # never a prefix of this object: start over
            f.truncate(0)
            have = 0
        if have:
            log.info("%s: resuming at byte %d of %d", name, have, size)
        probe = cast(BinaryIO, _KillProbe(f, point))
        http_get(meta.location, probe, resume_size=have, headers=headers, expected_size=size,
                 displayed_filename=name)  # fmt: skip
        f.flush()
        os.fsync(f.fileno())


def fetch_checked(repo: str, sha: str, name: str, entry: dict[str, Any], dest: Path, point: str | None = None) -> None:
    """Make `dest` hold repo@sha:name, checked against the listing's hash; a kill leaves only a resumable .part."""
    if dest.exists():
        got, want = _digest(dest, entry)
        if got == want:
            return
        log.warning("%s: local copy does not match the pinned hash; fetching it again", dest.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    want = entry.get("sha256", entry["oid"])
    # Named by the expected hash: a .part is only ever resumed into the object it was started for.
    part = dest.with_name(f".{dest.name}.{want[:16]}.part")
    for fresh in (False, True):
        if fresh:
            part.unlink(missing_ok=True)
        resumed = part.exists() and part.stat().st_size > 0
        with_retries(lambda: _download_attempt(repo, sha, name, int(entry["size"]), part, point), repo, sha, "download")
        got, want = _digest(part, entry)
        if got == want:
            os.replace(part, dest)
            return
        if not resumed:
            break  # a fresh download with the wrong hash: the Hub's listing and its content disagree
        log.warning("%s: resumed file has the wrong hash; downloading it again from the start", name)
    part.unlink(missing_ok=True)
    kind = "sha256" if "sha256" in entry else "git blob id"
    raise HubError(f"{repo}@{sha[:12]}: {name} has {kind} {got[:16]}..., the Hub lists {want[:16]}...: "
                   "refused (file removed, nothing published)")  # fmt: skip


# ---- download stage -------------------------------------------------------------------------------------------------
def _pin_record(ctx: Context) -> dict[str, Any]:
    rec = ctx.state.read(PIN_STAGE, PIN_UNIT)
    if not rec or rec.get("sha") != ctx.source.revision:
        raise HubError(f"{ctx.source.name}: the pinned revision record is missing; rerun `hlwq convert`")
    return rec


def shard_fingerprint(ctx: Context, unit: str) -> dict[str, str]:
    """Inputs: the pinned commit and the shard's sha256. With delete_after_verify the quantize and verify parameters
    join in, so that changing them brings the deleted shard back (quantize needs it again)."""
    from stages import quantize, verify

    shard = ctx.source.shard_of(unit)
    params = ""
    if ctx.manifest.source.delete_after_verify:
        params = quantize.fingerprint(ctx, unit)["params"] + ":" + verify.fingerprint(ctx, unit)["params"]
    return {"inputs": f"{ctx.source.revision}:{unit}:{ctx.source.shard_sha256.get(shard, '')}", "params": params}


def _deleted_after_verify(ctx: Context, unit: str) -> dict[str, Any] | None:
    """The previous download record when the shard was deleted on purpose and nothing downstream needs it again."""
    from stages import quantize, verify

    prev = ctx.state.read("download", unit)
    want = ctx.source.shard_sha256.get(ctx.source.shard_of(unit))
    if not ctx.manifest.source.delete_after_verify or not prev or prev.get("status") != "done":
        return None
    if prev.get("info", {}).get("sha256") != want:
        return None
    done = ctx.state.is_done("quantize", unit, quantize.fingerprint(ctx, unit))
    return prev if done and ctx.state.is_done("verify", unit, verify.fingerprint(ctx, unit)) else None


def download_shard(ctx: Context, unit: str) -> dict[str, Any]:
    shard = check_shard_filename(ctx.source.shard_of(unit))
    dest = ctx.source_shard(unit)
    if not dest.exists() and (prev := _deleted_after_verify(ctx, unit)) is not None:
        log.info("download %s: verified and deleted earlier (source.delete_after_verify); not fetched again", unit)
        return {"outputs": {}, "info": prev["info"], "bytes_in": prev.get("bytes_in", 0)}
    rec = _pin_record(ctx)
    entry = rec["files"][shard]
    t0 = time.monotonic()
    fetch_checked(ctx.source.name, ctx.source.revision, shard, entry, dest, point=f"hub:download:{unit}:mid")
    tensors = check_shard_matches_index(dest, ctx.source.shards[shard])
    size = dest.stat().st_size
    log.info("download %s: %.1f MB, sha256 ok (%.1f s)", unit, size / 1e6, time.monotonic() - t0)
    return {
        # Recorded as an output, so a shard removed by hand is fetched again on the next run.
        "outputs": {str(dest.relative_to(ctx.workdir)): {"size": size}},
        "info": {
            "path": str(dest),
            "sha256": entry["sha256"],
            "tensors": len(tensors),
            "repo": ctx.source.name,
            "revision": ctx.source.revision,
        },
        "bytes_in": size,
    }


# ---- upload stage -------------------------------------------------------------------------------------------------
def commit_message(ctx: Context) -> str:
    return f"HLWQ Q{ctx.manifest.quantize.bits} of {ctx.source.name}@{ctx.source.revision}"


def upload_artifact(ctx: Context) -> dict[str, Any]:
    """create_repo -> LFS preupload in groups -> one commit; what the server already has is neither sent nor
    committed again."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from pipeline import __version__

    dest = ctx.manifest.destination
    repo = str(dest.repo)
    api = HfApi()
    with_retries(lambda: api.create_repo(repo, private=dest.private, exist_ok=True), repo, "", "create")
    files = sorted(p for p in ctx.artifact.rglob("*") if p.is_file())
    names = [p.relative_to(ctx.artifact).as_posix() for p in files]

    def operations() -> list[Any]:
        return [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(p)) for n, p in zip(names, files, strict=True)]

    ops = operations()
    for i in range(0, len(ops), UPLOAD_GROUP):
        group = ops[i : i + UPLOAD_GROUP]
        with_retries(partial(api.preupload_lfs_files, repo, additions=group), repo, "main", "upload to")
        log.info("upload %s: %d/%d file(s) on the server", repo, min(i + UPLOAD_GROUP, len(ops)), len(ops))
        maybe_die("hub:upload:mid")
    remote = with_retries(lambda: api.list_repo_files(repo), repo, "main", "list")
    # Shards of an earlier artifact that this one does not have would be picked up by nothing but confuse readers.
    stale = [CommitOperationDelete(path_in_repo=p) for p in remote if p.endswith(".safetensors") and p not in names]
    description = (f"Source: {ctx.source.name} at commit {ctx.source.revision}\n"
                   f"Made by hlwq {__version__} from manifest {ctx.manifest.name}.")  # fmt: skip
    attempts = [0]

    def commit() -> Any:
        attempts[0] += 1
        # A retried commit starts from fresh operations: the first one may have landed before its answer was lost,
        # and fresh operations are compared with what is on the server again (unchanged files are dropped).
        todo = ops if attempts[0] == 1 else operations()
        return api.create_commit(repo, operations=[*todo, *stale], commit_message=commit_message(ctx),
                                 commit_description=description)  # fmt: skip

    info = with_retries(commit, repo, "main", "commit to")
    log.info("upload %s: commit %s", repo, info.oid)
    deleted = [op.path_in_repo for op in stale]
    size = sum(p.stat().st_size for p in files)
    return {"info": {"repo": repo, "commit": info.oid, "files": len(files), "deleted": deleted, "bytes": size}}


# ---- what is published: lets a nightly job skip a source revision that is already converted ----------------------
def published_revision(manifest: Manifest) -> str | None:
    """The source commit of the artifact published at destination.repo (from its hlwq_report.json), or None."""
    import tempfile

    from huggingface_hub import errors as he
    from huggingface_hub import hf_hub_download

    from stages.finalize import REPORT

    repo = str(manifest.destination.repo)
    with tempfile.TemporaryDirectory(prefix="hlwq-published-") as tmp:
        try:
            path = with_retries(lambda: hf_hub_download(repo, REPORT, local_dir=tmp), repo, "main", "read")
        except HubError as e:
            cause = e.__cause__ or e.__context__
            if isinstance(cause, he.RepositoryNotFoundError | he.RemoteEntryNotFoundError | he.RevisionNotFoundError):
                return None  # nothing published yet
            raise
        try:
            rev = json.loads(Path(path).read_text())["source"]["revision"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None  # not an HLWQ artifact we can read: treat as not published
    return str(rev)
