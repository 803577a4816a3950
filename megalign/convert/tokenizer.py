"""A SentencePiece ``.model`` as a transformers tokenizer (``tokenizer.json``), for exports.

Why: a model trained with a SentencePiece tokenizer is exported with one ``AutoTokenizer`` (and
anything that reads ``tokenizer.json``) loads without megalign or sentencepiece. The tokenizer is
built by transformers' own SentencePiece converter from the model file's settings (normalizer,
dummy prefix, BPE merges ranked by piece score, user-defined pieces), and encodes as
``SentencePieceProcessor.encode`` does (tests/test_hf_export.py checks the bundled corpus).
"""

# Imports inside functions are deliberate here: transformers is optional (the hf extra) and
# imported only when a tokenizer is exported.

from __future__ import annotations


def sentencepiece_as_transformers(model_file: str, eod: int, pad: int, mask: int | None):
    """``model_file`` as a ``PreTrainedTokenizerFast`` with its end-of-document, padding and
    (when it has one) mask tokens set; it adds no special tokens when encoding, as SentencePiece
    does not."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    with open(model_file, "rb") as handle:
        proto.ParseFromString(handle.read())
    pieces = list(proto.pieces)
    bpe = proto.trainer_spec.model_type == proto.trainer_spec.BPE
    vocab = ({piece.piece: i for i, piece in enumerate(pieces)} if bpe
             else [(piece.piece, piece.score) for piece in pieces])
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    special = {"eos_token": pieces[eod].piece, "pad_token": pieces[pad].piece,
               "unk_token": proto.trainer_spec.unk_piece}
    if mask is not None and mask < len(pieces):
        special["mask_token"] = pieces[mask].piece
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
