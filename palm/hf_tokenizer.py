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
  (`train.init_from=`) reads the original. <eod> is the end-of-sequence token and, prepended by
  the tokenizer as transformers' BOS, the start every palm prompt has (`with_eod_prefix`).

SentencePiece never matches its reserved pieces (<pad>, <eod>, <unk>, <0x..>) in text; here they
are special tokens that `split_special_tokens` keeps out of the text too, and in a Unigram model
they score far below any real segmentation. What cannot be reproduced (unigram models only, so
it is said here rather than refused): a literal reserved name whose characters are not all in
the vocabulary, text holding "▁" (U+2581) itself, and ties between segmentations of equal score
(two orders of the same whitespace pieces), which SentencePiece breaks by float32 rounding.
"""

from __future__ import annotations

import json

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


def _literal(text: str) -> str:
    """`text` as an Oniguruma pattern (tokenizers' regex engine), every character escaped."""
    return "".join(f"\\x{{{ord(c):X}}}" for c in text)


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
    # Cut out what SentencePiece never segments across: user pieces ("\n"), and for Unigram
    # each character outside the vocabulary (it becomes <unk>, then bytes), so that no reserved
    # piece's literal name can match around it.
    user = sorted((p for p, _, kind in pieces if kind == USER_DEFINED), key=len, reverse=True)
    cuts = [_literal(p) for p in user]
    if proto.trainer_spec.model_type == UNIGRAM:
        known = {p for p, _, kind in pieces if kind in (NORMAL, USER_DEFINED) and len(p) == 1}
        cuts.append(f"[^{_literal(''.join(sorted(known)))}]")
    if cuts:
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(cuts)), behavior="isolated")
    steps = [decoders.Replace(META_SYMBOL, " ")]
    steps += [decoders.ByteFallback()] if byte_fallback else []
    tok.decoder = decoders.Sequence([*steps, decoders.Fuse()])
    specials = [p for p, _, kind in pieces if kind in (UNKNOWN, CONTROL)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    return tok.to_str(pretty=True)


def with_eod_prefix(tokenizer_json: str, eod: str, eod_id: int) -> str:
    """The same tokenizer, prepending <eod> when asked for special tokens (transformers' default):
    PaLM reads every document after an <eod> (§5 packing), so generate.py and the lm-eval adapter
    condition on it first; here it plays the part of a BOS token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    tok = HFTokenizer.from_str(tokenizer_json)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{eod}:0 $A:0", pair=f"{eod}:0 $A:0 {eod}:1 $B:1", special_tokens=[(eod, eod_id)]
    )
    return tok.to_str(pretty=True)


def tokenizer_files(tokenizer: Tokenizer, max_len: int) -> tuple[dict[str, bytes], dict]:
    """The tokenizer files of a transformers folder, and its special ids (bos, eos, pad).

    SentencePiece: tokenizer.json, tokenizer_config.json and the original as tokenizer.model;
    eos is <eod>, which is also prepended as bos. A tokenizer.json (GPT-NeoX) is copied as it
    is, with eos its end of text and no bos, as GPT-NeoX models are used in transformers."""
    where = tokenizer.path or "the tokenizer"

    def name(token_id: int) -> str | None:
        return tokenizer.id_to_piece(token_id) if token_id >= 0 else None

    eod, pad = name(tokenizer.eod_id), name(tokenizer.pad_id)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eod,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    ids = {
        "bos": None,
        "eos": tokenizer.eod_id if eod else None,
        "pad": tokenizer.pad_id if pad else None,
    }
    if tokenizer.model_bytes.lstrip()[:1] == b"{":  # a tokenizer.json, used as palm uses it
        files = {"tokenizer.json": tokenizer.model_bytes}
    else:
        if eod is None:
            raise ConversionError(f"{where}: a SentencePiece model without an <eod> (eos) piece")
        converted = with_eod_prefix(
            sentencepiece_json(tokenizer.model_bytes, where), eod, ids["eos"]
        )
        files = {"tokenizer.json": converted.encode(), "tokenizer.model": tokenizer.model_bytes}
        ids["bos"] = ids["eos"]
        config.update(
            bos_token=eod,
            unk_token=name(_proto(tokenizer.model_bytes).trainer_spec.unk_id),
            add_bos_token=True,  # transformers 5 rebuilds the template from these two
            add_eos_token=False,
            # SentencePiece reads "<eod>" in text as characters; tokenizers would take it
            # for the special token unless told not to.
            split_special_tokens=True,
        )
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    return files, ids
