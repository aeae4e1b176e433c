"""Published PaLM-architecture weights: where they are, fetching them, turning them into ours.

The only public PaLM-architecture checkpoints are conceptofmind's (github.com/conceptofmind/PaLM):
plain `torch.save(state_dict)` files of lucidrains' `palm_rlhf_pytorch.PaLM`, trained on C4 with
8192-token sequences and the GPT-NeoX-20B tokenizer (vocabulary padded to 50304), with xPos
rotary embeddings (scale base 512) and multi-query attention. `palm.interop` converts them.

Hub access follows the Hugging Face conventions without needing `huggingface_hub`:
- `HF_ENDPOINT` replaces https://huggingface.co (a mirror, or a test server);
- files live in the Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME`/hub, else
  ~/.cache/huggingface/hub) in its own layout (models--owner--name/blobs/<etag>, snapshots/
  <commit>/<file>, refs/<revision>), so files `huggingface-cli download` fetched are reused and
  the other way round;
- `HF_HUB_OFFLINE=1`: only cached files are used; a missing one is an error naming it.
Large files go through palm.data.download.fetch (resumable, sha256-verified, atomic), with the
sha256 the hub publishes for LFS files (X-Linked-Etag). Small non-LFS files (tokenizer.json) are
checked against the hub's git blob sha1 (ETag) and written atomically.
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

from palm.data.download import USER_AGENT, FetchConfig, RemoteFile, fetch, sha256_file
from palm.data.errors import DataError

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_PRETRAINED = "palm-410m"  # the publisher's default (inference.py --model)


@dataclass(frozen=True)
class HubFile:
    repo: str  # "owner/name" on the hub
    filename: str
    revision: str = "main"
    sha256: str = ""  # pinned when published; otherwise the hub's LFS sha256 is used


@dataclass(frozen=True)
class Pretrained:
    """One published checkpoint and what it needs."""

    weights: HubFile
    d_model: int
    n_layers: int
    n_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 50_304  # GPT-NeoX's 50277 ids padded to a multiple of 128
    max_seq_len: int = 8192  # the training context
    xpos_scale_base: float = 512.0  # palm_rlhf_pytorch's default; the training scripts keep it
    licence: str = "MIT (github.com/conceptofmind/PaLM); see the model card on the hub"


# GPT-NeoX-20B tokenizer (Black et al. 2022), Apache-2.0, used to tokenize the training data.
NEOX_TOKENIZER = HubFile("EleutherAI/gpt-neox-20b", "tokenizer.json")

# conceptofmind/PaLM README and hubconf.py (torch.hub entries palm_{150m,410m,1b}_8k_v0). A 2B
# model was announced as "currently being trained"; no file has been published for it.
PRETRAINED: dict[str, Pretrained] = {
    "palm-150m": Pretrained(HubFile("conceptofmind/palm-150m", "palm_150m_8k_v0.pt"), 768, 12),
    "palm-410m": Pretrained(HubFile("conceptofmind/palm-410m", "palm_410m_8k_v0.pt"), 1024, 24),
    "palm-1b": Pretrained(HubFile("conceptofmind/palm-1b", "palm_1b_8k_v0.pt"), 2048, 16),
}


class PretrainedError(DataError):
    """A pretrained file that cannot be fetched or converted; one line naming it and the fix."""


def lookup(name: str) -> Pretrained:
    if name not in PRETRAINED:
        raise PretrainedError(
            f"unknown --pretrained {name!r}; choose one of: {', '.join(PRETRAINED)}"
        )
    return PRETRAINED[name]


# ---------------------------------------------------------------------------------------------
# The Hugging Face cache and endpoint, read from an explicit environment mapping
# ---------------------------------------------------------------------------------------------


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
    tmp = link.with_name(link.name + f".tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:  # no symlinks (some Windows set-ups): huggingface_hub copies too
        tmp.write_bytes(blob.read_bytes())
    os.replace(tmp, link)
    if commit != file.revision:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        _write_atomic(repo / "refs" / file.revision, commit.encode())
    return link


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as error:
        raise PretrainedError(
            f"{url}: {getattr(error, 'reason', error)}; retry, or place the file at {blob}"
        ) from None
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
    _write_atomic(blob, data)
    return blob, digest


def progress_config(retries: int = 5) -> FetchConfig:
    return FetchConfig(retries=max(1, retries), progress=sys.stderr.isatty())


# ---------------------------------------------------------------------------------------------
# Loading, converting, writing a checkpoint folder
# ---------------------------------------------------------------------------------------------

FINAL_NORM_CHOICES = ("auto", "true", "false")


def load_peer_state_dict(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and containers only, never arbitrary objects."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - pickle/zip errors, or a non-weights object refused
        raise PretrainedError(
            f"{path}: not a loadable PyTorch state dict "
            f"({str(error).splitlines()[0][:160]}); delete it and download "
            "it again"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint {"model": ..., "optimizer": ...}
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise PretrainedError(f"{path}: holds no flat state dict of tensors")
    return state


def convert_file(
    path: Path,
    spec: Pretrained | None = None,
    final_norm: str = "auto",
    peer_version: str = "0.2.1",
):
    """Our PaLM (float32) from a peer checkpoint file, and the conversion choices made."""
    import torch

    from palm.interop import convert_state_dict, final_norm_was_trained

    if final_norm not in FINAL_NORM_CHOICES:
        raise PretrainedError(f"final_norm must be one of {FINAL_NORM_CHOICES}, got {final_norm!r}")
    state = load_peer_state_dict(path)
    choices: dict = {"peer": "palm_pytorch"}
    options: dict = {"max_seq_len": spec.max_seq_len if spec else 8192}
    if "token_emb.weight" in {k.removeprefix("module.").removeprefix("_orig_mod.") for k in state}:
        trained = final_norm_was_trained(state)
        use = trained if final_norm == "auto" else final_norm == "true"
        choices = {
            "peer": "palm_rlhf_pytorch",
            "peer_version": peer_version,
            "final_norm": use,
            "final_norm_gain_trained": trained,
        }
        options.update(
            final_norm=use,
            peer_version=peer_version,
            xpos_scale_base=spec.xpos_scale_base if spec else 512.0,
        )
        if not use:
            print(
                f"convert: {path.name}: the final LayerNorm gain was never trained (exactly 1), "
                "so this model was trained without it (palm-rlhf-pytorch <= 0.2.0); "
                "model.final_norm=False",
                file=sys.stderr,
            )
    try:
        model = convert_state_dict({k: v.float() for k, v in state.items()}, **options)
    except ValueError as error:
        raise PretrainedError(f"{path}: {error}") from None
    c = model.config
    if spec and (c.d_model, c.n_layers, c.n_heads, c.head_dim, c.vocab_size) != (
        spec.d_model,
        spec.n_layers,
        spec.n_heads,
        spec.head_dim,
        spec.vocab_size,
    ):
        raise PretrainedError(
            f"{path}: shape d_model={c.d_model} n_layers={c.n_layers} "
            f"n_heads={c.n_heads} head_dim={c.head_dim} vocab={c.vocab_size} "
            "is not the published one; delete it and download it again"
        )
    with torch.no_grad():
        model = model.float().eval()
    return model, choices


def write_pretrained(run_dir: Path, model, tokenizer_bytes: bytes | None, provenance: dict) -> Path:
    """A run folder like train.py's: checkpoints/step_00000000/ (+ tokenizer, provenance)."""
    import json

    from palm.checkpoint import TrainingState, save_checkpoint
    from palm.config import Config, TrainConfig

    config = Config(model=model.config, train=TrainConfig(name=run_dir.name))
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_bytes is not None:
        # The project's tokenizer file name; its content (JSON here) selects the backend.
        _write_atomic(run_dir / "tokenizer.model", tokenizer_bytes)
    path = save_checkpoint(
        run_dir / "checkpoints",
        model.state_dict(),
        {"state": {}, "param_groups": []},
        TrainingState(step=0),
        config.to_dict(),
    )
    _write_atomic(run_dir / "pretrained.json", json.dumps(provenance, indent=2).encode())
    return path


def install(
    name: str,
    root: Path,
    environ: dict[str, str],
    fetch_config: FetchConfig,
    final_norm: str = "auto",
) -> Path:
    """Download `name` and its tokenizer, convert, write root/pretrained/<name>/; its checkpoint."""
    from palm.tokenizer import Tokenizer

    spec = lookup(name)
    weights, weights_sha = hub_download(spec.weights, environ, fetch_config)
    tok_path, tok_sha = hub_download(NEOX_TOKENIZER, environ, fetch_config)
    tokenizer = Tokenizer(tok_path.read_bytes(), str(tok_path))
    model, choices = convert_file(weights, spec, final_norm)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise PretrainedError(
            f"{tok_path}: {tokenizer.vocab_size} tokens, more than the model's "
            f"{model.config.vocab_size}; not the GPT-NeoX tokenizer"
        )
    provenance = {
        "name": name,
        "licence": spec.licence,
        "conversion": choices,
        "weights": {
            "url": file_url(spec.weights, environ),
            "sha256": weights_sha,
            "verified": "pinned sha256" if spec.weights.sha256 else "hub LFS sha256",
        },
        "tokenizer": {"url": file_url(NEOX_TOKENIZER, environ), "sha256": tok_sha},
    }
    path = write_pretrained(root / "pretrained" / name, model, tokenizer.model_bytes, provenance)
    print(f"pretrained: {name} ({model.num_parameters() / 1e6:.0f}M parameters) -> {path}")
    return path
