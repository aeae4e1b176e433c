"""The Hugging Face hub, spoken without `huggingface_hub`: endpoint, cache and offline mode.

Conventions followed:
- `HF_ENDPOINT` replaces https://huggingface.co (a mirror, or a test server);
- files live in the Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME`/hub, else
  ~/.cache/huggingface/hub) in its own layout (models--owner--name/blobs/<etag>, snapshots/
  <commit>/<file>, refs/<revision>), so files `huggingface-cli download` fetched are reused and
  the other way round;
- `HF_HUB_OFFLINE=1`: only cached files are used; a missing one is an error naming it.
Large files go through `palm.fetch.fetch` (resumable, sha256-verified, atomic), with the sha256
the hub publishes for LFS files (X-Linked-Etag). Small non-LFS files (tokenizer.json) are checked
against the hub's git blob sha1 (ETag) and written atomically.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from palm.errors import DataError, PretrainedError
from palm.fetch import USER_AGENT, FetchConfig, RemoteFile, fetch, fetch_small
from palm.files import publish, sha256_file, temporary_path, write_atomic

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubFile:
    repo: str  # "owner/name" on the hub
    filename: str
    revision: str = "main"
    sha256: str = ""  # pinned when published; otherwise the hub's LFS sha256 is used


def hub_endpoint(environ: dict[str, str]) -> str:
    return (environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache(environ: dict[str, str]) -> Path:
    """The cache folder, resolved as huggingface_hub does."""
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    xdg = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline(environ: dict[str, str]) -> bool:
    return environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def file_url(file: HubFile, environ: dict[str, str]) -> str:
    return f"{hub_endpoint(environ)}/{file.repo}/resolve/{file.revision}/{file.filename}"


def _repo_dir(file: HubFile, cache: Path) -> Path:
    return cache / ("models--" + file.repo.replace("/", "--"))


def cached_path(file: HubFile, cache: Path) -> Path | None:
    """The cached copy of `file` at its revision, if there is one."""
    repo = _repo_dir(file, cache)
    commit = file.revision
    ref = repo / "refs" / file.revision
    if ref.is_file():
        commit = ref.read_text().strip()
    path = repo / "snapshots" / commit / file.filename
    return path if path.is_file() else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # keep the hub's own headers, not the CDN's
        return None


@dataclass(frozen=True)
class HubMetadata:
    etag: str  # LFS: sha256 of the file; otherwise the git blob sha1
    size: int
    commit: str
    lfs: bool


def head(url: str, timeout: float = 30.0) -> HubMetadata:
    """What the hub says about a file: size, etag (sha256 for LFS files), commit."""
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(
        url, method="HEAD", headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    )
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:  # the redirect itself carries the metadata
            response = error
        else:
            raise PretrainedError(
                f"{url}: HTTP {error.code}; check the name, HF_ENDPOINT, or "
                "place the file in the Hugging Face cache and set "
                "HF_HUB_OFFLINE=1"
            ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise PretrainedError(
            f"{url}: {reason}; check the network or HF_ENDPOINT, or use a "
            "cached copy with HF_HUB_OFFLINE=1"
        ) from None
    headers = response.headers
    linked = headers.get("X-Linked-Etag")
    etag = (linked or headers.get("ETag") or "").strip().removeprefix("W/").strip('"')
    size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    if not etag or size is None:
        raise PretrainedError(
            f"{url}: the server sent no ETag/size, so the download cannot be "
            "verified; is HF_ENDPOINT a Hugging Face hub?"
        )
    return HubMetadata(etag, int(size), headers.get("X-Repo-Commit") or "", bool(linked))


def _link_snapshot(file: HubFile, cache: Path, blob: Path, commit: str) -> Path:
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, and refs/<revision> = commit."""
    repo = _repo_dir(file, cache)
    commit = commit or file.revision
    link = repo / "snapshots" / commit / file.filename
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(link)
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:  # no symlinks (some Windows set-ups): huggingface_hub copies too
        tmp.write_bytes(blob.read_bytes())
    publish(tmp, link)
    if commit != file.revision:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        write_atomic(repo / "refs" / file.revision, commit.encode())
    return link


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the hub's ETag for non-LFS files) gives this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_download(
    file: HubFile, environ: dict[str, str], fetch_config: FetchConfig | None = None
) -> tuple[Path, str]:
    """Path of `file` in the Hugging Face cache, fetched if needed, and its sha256."""
    fetch_config = fetch_config or FetchConfig()
    cache = hub_cache(environ)
    url = file_url(file, environ)
    if hub_offline(environ):
        found = cached_path(file, cache)
        if found is None:
            raise PretrainedError(
                f"HF_HUB_OFFLINE=1 and {file.repo}/{file.filename} is not in the cache {cache}; "
                f"fetch it once online (or: huggingface-cli download {file.repo} "
                f"{file.filename}), or unset HF_HUB_OFFLINE"
            )
        digest = sha256_file(found)
        if file.sha256 and digest != file.sha256:
            raise PretrainedError(
                f"{found}: sha256 {digest[:16]}... is not the published "
                f"{file.sha256[:16]}...; delete it and fetch it again"
            )
        return found, digest
    meta = head(url, fetch_config.timeout_s)
    blobs = _repo_dir(file, cache) / "blobs"
    if meta.lfs:
        if not re.fullmatch(r"[0-9a-f]{64}", meta.etag):
            raise PretrainedError(f"{url}: X-Linked-Etag {meta.etag!r} is not a sha256")
        if file.sha256 and file.sha256 != meta.etag:
            raise PretrainedError(
                f"{url}: the hub now serves sha256 {meta.etag[:16]}..., not "
                f"the published {file.sha256[:16]}...; refusing a changed file"
            )
        blob = fetch(RemoteFile(meta.etag, meta.size, meta.etag), blobs, [url], fetch_config)
        digest = meta.etag
    else:
        blob, digest = _fetch_small(url, meta, blobs, file, fetch_config)
    return _link_snapshot(file, cache, blob, meta.commit), digest


def _fetch_small(
    url: str, meta: HubMetadata, blobs: Path, file: HubFile, config: FetchConfig
) -> tuple[Path, str]:
    """A non-LFS file (the hub keeps them under 10 MB): one GET, checked against its git sha1."""
    blob = blobs / meta.etag
    if blob.is_file() and git_blob_sha1(blob.read_bytes()) == meta.etag:
        return blob, sha256_file(blob)
    try:
        data = fetch_small([url], config)
    except DataError as error:
        raise PretrainedError(f"{error}; retry, or place the file at {blob}") from None
    checks = [len(data) == meta.size]
    if re.fullmatch(r"[0-9a-f]{40}", meta.etag):
        checks.append(git_blob_sha1(data) == meta.etag)
    digest = hashlib.sha256(data).hexdigest()
    if file.sha256:
        checks.append(digest == file.sha256)
    if not all(checks):
        raise PretrainedError(
            f"{url}: downloaded {len(data):,} bytes that do not match the hub's "
            "size/ETag (or the pinned sha256); retry"
        )
    blobs.mkdir(parents=True, exist_ok=True)
    write_atomic(blob, data)
    return blob, digest


def progress_config(retries: int = 5) -> FetchConfig:
    return FetchConfig(retries=max(1, retries), progress=sys.stderr.isatty())
