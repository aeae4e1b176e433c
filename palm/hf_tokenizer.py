"""Tokenizer files of a transformers folder, so `AutoTokenizer.from_pretrained` gives palm's ids.

- A `tokenizer.json` (the GPT-NeoX tokenizer of the pretrained checkpoints) is what palm itself
  encodes with: copied byte for byte.
- A SentencePiece model trained by palm (PaLM §2: lossless, no normalisation, no dummy prefix,
  whitespace kept, digits split, byte fallback, "\\n" a user piece) is rebuilt as a `tokenizers`
  pipeline doing what SentencePiece does when it encodes: spaces become "▁" and nothing else is
  normalised; user pieces ("\\n") are cut out first, since SentencePiece always emits them whole;
  then the same model: Unigram with the same piece scores, or BPE with merges ranked by the
  merged piece's score; unknown characters fall back to their UTF-8 byte pieces. The
  SentencePiece file itself is kept beside it as tokenizer.model (as Llama folders do), so palm
  (`train.init_from=`) reads the original.

SentencePiece never matches its reserved pieces (<pad>, <eod>, <unk>, <0x..>) in text; here they
are special tokens that `split_special_tokens` keeps out of the text too, and in a Unigram model
they score far below any real segmentation. What cannot be reproduced (unigram models only, so
it is said here rather than refused): a literal reserved name whose characters are not all in
the vocabulary, text holding "▁" (U+2581) itself, and ties between segmentations of equal score
(two orders of the same whitespace pieces), which SentencePiece breaks by float32 rounding.
"""

from __future__ import annotations

import json
import re

from palm.errors import ConversionError
from palm.tokenizer import Tokenizer

# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
UNIGRAM, BPE = 1, 2
META_SYMBOL = "\u2581"


def _proto(model_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2  # protobuf comes with tensorboardX

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def _check_lossless(proto, where: str) -> None:
    """The settings the pipeline below reproduces; anything else is refused with its name."""
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if norm.precompiled_charsmap:
        problems.append(f"normalization {norm.name!r} (palm trains with 'identity')")
    if norm.add_dummy_prefix:
        problems.append("add_dummy_prefix")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces")
    if not norm.escape_whitespaces or trainer.treat_whitespace_as_suffix:
        problems.append("whitespace not escaped as a '▁' prefix")
    if trainer.model_type not in (UNIGRAM, BPE):
        problems.append("a model type other than unigram or bpe")
    if problems:
        raise ConversionError(
            f"{where}: a SentencePiece model with {', '.join(problems)}; only the lossless "
            "models palm trains (download.py --tokenize True) convert to tokenizer.json"
        )


def sentencepiece_json(model_bytes: bytes, where: str = "tokenizer.model") -> str:
    """tokenizer.json text encoding like this SentencePiece model (see the module docstring)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    proto = _proto(model_bytes)
    _check_lossless(proto, where)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    byte_fallback = proto.trainer_spec.byte_fallback
    unk_id = next((i for i, (_, _, kind) in enumerate(pieces) if kind == UNKNOWN), None)
    if unk_id is None:
        raise ConversionError(f"{where}: a SentencePiece model without an <unk> piece")
    reserved = {UNKNOWN, CONTROL, BYTE}
    if proto.trainer_spec.model_type == UNIGRAM:
        # Reserved pieces never enter SentencePiece's lattice; here they must lose to any real
        # segmentation of their literal name: each character costs at least the lowest score.
        lowest = min((s for _, s, kind in pieces if kind == NORMAL), default=-10.0)
        longest = max((len(p) for p, _, kind in pieces if kind in reserved), default=1)
        floor = (longest + 1) * min(lowest, -1.0) - 10.0
        vocab = [(p, floor if kind in reserved else s) for p, s, kind in pieces]
        model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        # SentencePiece's BPE merges the adjacent pair whose merged piece scores highest, so
        # every split of a normal piece into two normal pieces is a merge of that rank.
        normal = {p: (s, i) for i, (p, s, kind) in enumerate(pieces) if kind == NORMAL}
        ranked = sorted(
            (-score, index, piece[:cut], piece[cut:])
            for piece, (score, index) in normal.items()
            for cut in range(1, len(piece))
            if piece[:cut] in normal and piece[cut:] in normal
        )
        model = models.BPE(
            {p: i for i, (p, _, _) in enumerate(pieces)},
            [(left, right) for _, _, left, right in ranked],
            unk_token=pieces[unk_id][0],
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.Replace(" ", META_SYMBOL)  # SentencePiece's only rewrite here
    user = sorted((p for p, _, kind in pieces if kind == USER_DEFINED), key=len, reverse=True)
    if user:
        pattern = "|".join(re.escape(p) for p in user)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    steps = [decoders.Replace(META_SYMBOL, " ")]
    steps += [decoders.ByteFallback()] if byte_fallback else []
    tok.decoder = decoders.Sequence([*steps, decoders.Fuse()])
    specials = [p for p, _, kind in pieces if kind in (UNKNOWN, CONTROL)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    return tok.to_str(pretty=True)


def tokenizer_files(tokenizer: Tokenizer, max_len: int) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json (and for SentencePiece tokenizer.model) for a
    transformers folder; eos is palm's end-of-document id, pad its padding id, no bos."""
    where = tokenizer.path or "the tokenizer"
    is_json = tokenizer.model_bytes.lstrip()[:1] == b"{"
    if is_json:
        files = {"tokenizer.json": tokenizer.model_bytes}
    else:
        files = {
            "tokenizer.json": sentencepiece_json(tokenizer.model_bytes, where).encode(),
            "tokenizer.model": tokenizer.model_bytes,
        }

    def name(token_id: int) -> str | None:
        return tokenizer.id_to_piece(token_id) if token_id >= 0 else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,  # PaLM prepends nothing; lm-eval then starts contexts with eos
        "eos_token": name(tokenizer.eod_id),
        "pad_token": name(tokenizer.pad_id),
        "add_bos_token": False,
        "add_eos_token": False,
        # SentencePiece reads "<eod>" in text as characters; tokenizers would take it for the
        # special token unless told not to. A tokenizer.json is used as palm uses it.
        "split_special_tokens": not is_json,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    if not is_json:
        config["unk_token"] = name(_proto(tokenizer.model_bytes).trainer_spec.unk_id)
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    return files
