"""The tokenizer: a lossless SentencePiece model, as PaLM §2 ("Vocabulary") describes it.

PaLM's vocabulary is SentencePiece, lossless: whitespace is kept exactly (it matters for code),
characters outside the vocabulary fall back to their UTF-8 bytes, and numbers are always split
into single digits. We add two special ids the data pipeline needs: an end-of-document id that
separates packed examples (PaLM §5) and a padding id that never carries a loss.

Layout of every model trained here (fixed, so manifests and checkpoints can rely on it):
    0 <pad>   1 <eod>   2 <unk>   3 "\\n"   4..259 <0x00>..<0xFF>   260.. learned pieces

`Tokenizer` is the one class the rest of the project uses. It has two backends, told apart by
the file's content (never its name): a SentencePiece model (binary protobuf), or a Hugging Face
`tokenizer.json` (JSON text, through the `tokenizers` library), which the published pretrained
checkpoints use (the GPT-NeoX-20B byte-level BPE). The public surface (`load`, `encode`,
`decode`, `vocab_size`, `eod_id`, `pad_id`, `sha256`, `model_bytes`) is the same for both.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from palm.errors import TokenizerError

PAD_PIECE, EOD_PIECE, UNK_PIECE = "<pad>", "<eod>", "<unk>"
# The newline is a user-defined piece: SentencePiece trains on lines, so it would otherwise
# never learn "\n" and every newline in code would cost a byte-fallback token.
NEWLINE = "\n"
META_SYMBOL = "\u2581"  # "▁": how SentencePiece marks whitespace inside its pieces


# tokenizer.json special tokens, in order of preference: GPT-NeoX/GPT-2 style, then others.
HF_EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<eod>")
HF_PAD_TOKENS = ("<|padding|>", "<pad>", "[PAD]")


@dataclass(frozen=True)
class TokenizerTrainConfig:
    vocab_size: int  # number of pieces, specials and the 256 byte pieces included
    model_type: str = "unigram"  # "unigram" (SentencePiece default, fast to encode) or "bpe"
    n_threads: int = 1  # SentencePiece trainer threads (--n_workers)
    character_coverage: float = 0.9995  # rarer characters are left to byte fallback
    max_sentence_bytes: int = 16384  # longer training lines are cut at spaces, not dropped

    def __post_init__(self) -> None:
        if self.model_type not in ("unigram", "bpe"):
            raise TokenizerError(f"model_type must be 'unigram' or 'bpe', not {self.model_type!r}")
        if self.vocab_size < 300:
            raise TokenizerError(
                f"vocab_size {self.vocab_size} is too small: 260 ids are fixed "
                "(4 special + 256 bytes); use at least 300"
            )
        if self.n_threads < 1:
            raise TokenizerError(f"n_threads must be >= 1, not {self.n_threads}")


def split_long_line(line: str, max_bytes: int) -> list[str]:
    """Cut `line` into pieces of at most ~max_bytes UTF-8 bytes, preferring to cut before a space.

    SentencePiece silently skips training sentences longer than `max_sentence_length`; cutting
    keeps their words in the statistics instead.
    """
    if len(line.encode("utf-8")) <= max_bytes:
        return [line]
    max_chars = max(1, max_bytes // 4)  # 4 bytes per character at worst, so a cut always fits
    pieces, start = [], 0
    while start < len(line):
        end = min(len(line), start + max_chars)
        if end < len(line):
            space = line.rfind(" ", start + 1, end)
            end = space if space > start else end
        pieces.append(line[start:end])
        start = end
    return pieces


def train_sentencepiece(sentences: Iterable[str], config: TokenizerTrainConfig) -> bytes:
    """Train a lossless SentencePiece model on `sentences` (lines without "\\n"); return its bytes.

    Sampling large corpora is the caller's job (it knows the corpus size), so the trainer is
    told to keep every sentence it is given: memory is then bounded by what the caller samples.
    """

    def feed() -> Iterable[str]:
        for sentence in sentences:
            yield from split_long_line(sentence, config.max_sentence_bytes)

    model = _BytesWriter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(feed()),
            model_writer=model,
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            # PaLM §2: lossless. No NFKC, no whitespace folding, no dummy prefix space.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,  # runs of spaces (indentation) become pieces
            split_digits=True,  # "123.5" -> 1 2 3 . 5
            byte_fallback=True,  # out-of-vocabulary characters -> UTF-8 byte pieces
            character_coverage=config.character_coverage,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece=PAD_PIECE,
            eos_piece=EOD_PIECE,
            unk_piece=UNK_PIECE,
            user_defined_symbols=[NEWLINE],
            input_sentence_size=0,  # keep all: the caller already sampled
            max_sentence_length=config.max_sentence_bytes,
            num_threads=config.n_threads,
            train_extremely_large_corpus=False,
            minloglevel=2,
        )
    except RuntimeError as error:
        message = str(error)
        limit = re.search(r"Please set it to a value <= (\d+)", message)
        if limit:
            raise TokenizerError(
                f"--vocab_size {config.vocab_size} is larger than this corpus can support; "
                f"the largest size that works is {limit.group(1)}"
            ) from None
        floor = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message)
        if floor:
            raise TokenizerError(
                f"--vocab_size {config.vocab_size} is smaller than this corpus needs: its "
                f"characters and the special pieces take {floor.group(1)}; use at least "
                f"{floor.group(1)}"
            ) from None
        raise TokenizerError(f"SentencePiece training failed: {message.splitlines()[-1]}") from None
    return model.data


def line_chunks(text: str, size: int = 4096) -> list[str]:
    """Cut `text` after a newline once a chunk holds at least `size` characters.

    "\n" is a user-defined piece, which SentencePiece matches before anything else, so no
    piece crosses a newline; only ties between equally scored segmentations (e.g. of a run of
    spaces) can depend on where a chunk starts, which is why the rule is fixed here.
    """
    chunks, start = [], 0
    while start < len(text):
        newline = text.find(NEWLINE, start + size - 1)
        end = len(text) if newline < 0 else newline + 1
        chunks.append(text[start:end])
        start = end
    return chunks


class _BytesWriter:
    """The `model_writer` SentencePiece wants: an object with write(bytes)."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class Tokenizer:
    """A loaded tokenizer. Thread-safe for encode/decode; cheap to pickle (it is its bytes)."""

    def __init__(self, model_bytes: bytes, path: str | None = None) -> None:
        self._bytes = model_bytes
        self.path = path
        self.sha256: str = hashlib.sha256(model_bytes).hexdigest()
        self._hf = None
        if model_bytes.lstrip()[:1] == b"{":  # JSON: a Hugging Face tokenizer.json
            self._init_hf(model_bytes, path)
            return
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError):
            where = path or "the given bytes"
            raise TokenizerError(
                f"{where} is not a SentencePiece model (corrupt or truncated); "
                "delete it and rerun download.py with --tokenize True"
            ) from None
        self._sp = processor
        self.vocab_size: int = processor.get_piece_size()
        self.eod_id: int = processor.eos_id()
        self.pad_id: int = processor.pad_id()  # -1 when the model has none

    def _init_hf(self, model_bytes: bytes, path: str | None) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError(
                f"{path or 'this tokenizer'} is a tokenizer.json, which needs "
                "the `tokenizers` package: pip install tokenizers"
            ) from None
        try:
            self._hf = HFTokenizer.from_str(model_bytes.decode("utf-8"))
        except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exception on bad JSON
            raise TokenizerError(
                f"{path or 'the given bytes'} is not a valid tokenizer.json "
                f"({str(error).splitlines()[0][:120]}); delete it and download "
                "it again (--download_models True)"
            ) from None
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self.eod_id = self._first_id(HF_EOD_TOKENS)
        self.pad_id = self._first_id(HF_PAD_TOKENS)

    def _first_id(self, names: Sequence[str]) -> int:
        """Id of the first of `names` the vocabulary has, else -1."""
        for name in names:
            token_id = self._hf.token_to_id(name)
            if token_id is not None:
                return token_id
        return -1

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TokenizerError(
                f"{path}: no such tokenizer file; run download.py with "
                "--tokenize True (or pass --tokenizer PATH)"
            ) from None
        return cls(data, str(path))

    def __reduce__(self):  # pickle as bytes: SentencePieceProcessor itself does not pickle
        return (Tokenizer, (self._bytes, self.path))

    @property
    def model_bytes(self) -> bytes:
        return self._bytes

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no end-of-document id; the packer adds it)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], n_threads: int = 1) -> list[list[int]]:
        """Encode many texts with `n_threads` SentencePiece threads (they release the GIL).

        Each text is encoded in chunks of whole lines (`line_chunks`) and the results are
        concatenated. That is the canonical encoding here, for two reasons: a unigram model's
        Viterbi search over a megabyte-long input accumulates float error and can choose other
        pieces mid-text than it would for the lines alone, and chunks are the unit that
        parallelises across threads (a few KB amortise the per-call cost on short code lines).
        """
        if self._hf is not None:
            # Byte-level BPE: whole texts, no line chunking (a cut between two newlines would
            # change how a run of whitespace is split); tokenizers parallelises by itself.
            encoded = self._hf.encode_batch(list(texts), add_special_tokens=False)
            return [e.ids for e in encoded]
        chunks: list[str] = []
        counts: list[int] = []
        for text in texts:
            parts = line_chunks(text)
            chunks.extend(parts)
            counts.append(len(parts))
        encoded = self._sp.encode(chunks, num_threads=n_threads) if chunks else []
        for i, chunk in enumerate(chunks):
            if META_SYMBOL in chunk:  # rare: SentencePiece would read it as its whitespace mark
                encoded[i] = self._encode_meta_symbols(chunk)
        out: list[list[int]] = []
        position = 0
        for count in counts:
            ids: list[int] = []
            for chunk_ids in encoded[position : position + count]:
                ids.extend(chunk_ids)
            out.append(ids)
            position += count
        return out

    def _encode_meta_symbols(self, text: str) -> list[int]:
        """`text` with each U+2581 (SentencePiece's own mark for a space, which it would decode
        as " ") spelled as its three UTF-8 byte pieces, so that decoding gives it back."""
        meta = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in META_SYMBOL.encode("utf-8")]
        ids: list[int] = []
        for i, part in enumerate(text.split(META_SYMBOL)):
            ids.extend((meta if i else []) + (self._sp.encode(part) if part else []))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids (<pad>, <eod>) decode to nothing."""
        if self._hf is not None:
            return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        if self._hf is not None:
            return self._hf.id_to_token(token_id) or ""
        return self._sp.id_to_piece(token_id)

    def pieces(self) -> list[str]:
        """Every piece, in id order."""
        return [self.id_to_piece(i) for i in range(self.vocab_size)]


_LINE_BREAKS = {
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\x0b": "\\x0b",
    "\x0c": "\\x0c",
    "\x1c": "\\x1c",
    "\x1d": "\\x1d",
    "\x1e": "\\x1e",
    "\x85": "\\x85",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def vocab_file_text(tokenizer: Tokenizer) -> str:
    """The --vocab_file: one piece per line in id order (line i = id i).

    Characters that would break a line (the newline piece, above all) are written as backslash
    escapes and a backslash itself as two, so the file stays one piece per line and unambiguous.
    """
    table = str.maketrans(_LINE_BREAKS)
    return "".join(piece.translate(table) + "\n" for piece in tokenizer.pieces())
