"""`meta.json`: what a processed dataset folder holds, read back as a `Manifest`.

The manifest is written last, atomically, so its presence means every file it names is
complete. It records what training needs (vocabulary, dtype, special ids, layout, default
seq_len and batch_size), what evaluation needs (token, document and word counts per split),
and what reproducibility needs (sha256 of every output, of the tokenizer and of the sources).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from palm.errors import DataError

FORMAT_VERSION = 1
META_NAME = "meta.json"


@dataclass(frozen=True)
class Manifest:
    dataset: str  # the --dataset this folder was built from
    vocab_size: int  # tokenizer pieces; the model's vocabulary must be at least this
    dtype: str  # numpy dtype of every split file: "uint16" or "uint32"
    eod_id: int  # end-of-document id between packed documents (PaLM §5)
    pad_id: int  # padding id (padded layout only); the loader maps it to -100 in targets
    seq_len: int  # default training sequence length (the row length - 1 when padded)
    batch_size: int  # default global batch size, in sequences
    layout: str  # "combined" (one stream, PaLM) or "padded" (rows of seq_len + 1)
    # split name -> {path, n_tokens, n_documents, n_words, n_bytes, sha256}
    splits: dict[str, dict]
    tokenizer_sha256: str  # sha256 of tokenizer.model
    tokenizer: dict = field(default_factory=dict)  # file name, how it was made
    sources: list[dict] = field(default_factory=list)  # raw files: path, bytes, sha256
    corpus: dict = field(default_factory=dict)  # facts about the corpus (python version ...)
    fingerprint: str = ""  # hash of everything the token files depend on (skip on rerun)
    versions: dict = field(default_factory=dict)  # palm, python, sentencepiece, numpy
    format_version: int = FORMAT_VERSION

    def split_path(self, folder: Path, split: str) -> Path:
        if split not in self.splits:
            raise DataError(
                f"{Path(folder) / META_NAME}: no split {split!r}; it has "
                f"{', '.join(self.splits) or 'none'} (validation/test need "
                "official splits or download.py --split True)"
            )
        return Path(folder) / self.splits[split]["path"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


def load_manifest(dataset_dir: str | Path) -> Manifest:
    """Read `<dataset_dir>/meta.json`; one clear line of error when it is missing or bad."""
    path = Path(dataset_dir) / META_NAME
    fix = (
        f"run `python3 download.py --path {Path(dataset_dir).parent}/ --dataset "
        f"{Path(dataset_dir).name}` to (re)build it"
    )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path}: not found (dataset not prepared, or interrupted); {fix}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: unreadable or corrupt ({error}); {fix}") from None
    return parse_manifest(raw, path, fix)


def parse_manifest(raw: object, path: str | Path, fix: str) -> Manifest:
    """A Manifest from decoded meta.json contents; `path` and `fix` go into the error."""
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a JSON object; {fix}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {raw.get('format_version')!r}, this palm "
            f"reads {FORMAT_VERSION}; {fix}"
        )
    names = {f.name for f in fields(Manifest)}
    required = [
        f.name for f in fields(Manifest) if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [name for name in required if name not in raw]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; {fix}")
    return Manifest(**{k: v for k, v in raw.items() if k in names})
