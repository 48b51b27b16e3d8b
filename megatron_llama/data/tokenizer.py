"""Tokenizers behind one interface: SentencePiece models and Hugging Face `tokenizer.json` files.

    tokenizer = build_tokenizer("SentencePieceTokenizer", "out/tokenizer.model")
    tokenizer = build_tokenizer("HuggingFaceTokenizer", "path/to/folder_or_tokenizer.json")
    ids = tokenizer.tokenize("床前明月光 and moonlight")       # no BOS/EOS added
    text = tokenizer.detokenize(ids)
    tokenizer.save_hf_files("export/")                       # for transformers.AutoTokenizer
    tokenizer_hash(tokenizer)                                # sha256 of its files: its identity

Every tokenizer has `vocab_size`, `eod` (the end-of-document id written between documents: the model's
end-of-sequence token), `bos` and `pad` (None when the model has none).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
# Names that mark the end of a document in common Hugging Face tokenizers, tried when no config names one.
END_OF_TEXT_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")


class TokenizerError(ValueError):
    """A tokenizer file that is missing or unusable; the message says which file and what to change."""


def _as_id_list(ids) -> list[int]:
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64).tolist()
    return [int(token_id) for token_id in ids]


def _write_json(path: str, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as output:
        json.dump(content, output, ensure_ascii=False, indent=2)
        output.write("\n")


class SentencePieceTokenizer:
    """A SentencePiece .model file (as written by tools/train_tokenizer.py or shipped with Llama 1/2)."""

    def __init__(self, model_path: str):
        import sentencepiece

        if not os.path.isfile(model_path):
            raise TokenizerError(f"SentencePiece model {model_path} does not exist; pass the .model file to --tokenizer-model")
        self.model_path = model_path
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{model_path} is not a SentencePiece model ({error})") from None
        self.vocab_size = self._processor.get_piece_size()
        if self._processor.eos_id() < 0:
            raise TokenizerError(f"{model_path} has no end-of-sequence piece; retrain it with an eos id (train_tokenizer.py uses 2)")
        self.eod = self._processor.eos_id()
        self.bos = self._processor.bos_id() if self._processor.bos_id() >= 0 else None
        self.pad = self._processor.pad_id() if self._processor.pad_id() >= 0 else None
        self.unk = self._processor.unk_id() if self._processor.unk_id() >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._processor.encode(texts, num_threads=1)

    def detokenize(self, ids) -> str:
        return self._processor.decode(_as_id_list(ids))

    def _piece(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._processor.id_to_piece(token_id)

    def save_hf_files(self, folder: str) -> None:
        """tokenizer.json (+ the .model, tokenizer_config.json, special_tokens_map.json) for transformers.

        For BPE models the tokenizer.json gives SentencePiece's ids exactly, dummy prefix and user-defined
        pieces included (transformers' own Llama conversion does not prepend "▁" to a text that starts with a
        space, so its ids differ there); for unigram models, segmentations that tie in score may be broken
        differently. Only text that spells a control piece ("<s>", "</s>") differs by design: transformers
        reads it as that special token, SentencePiece as plain characters. Loaded as PreTrainedTokenizerFast by
        transformers 4.x and 5.x alike. Needs the `tokenizers` and `protobuf` packages.
        """
        os.makedirs(folder, exist_ok=True)
        with open(self.model_path, "rb") as model_file:
            model_bytes = model_file.read()
        sentencepiece_as_hf_tokenizer(model_bytes).save(os.path.join(folder, "tokenizer.json"))
        shutil.copyfile(self.model_path, os.path.join(folder, "tokenizer.model"))
        special_tokens = {
            "bos_token": self._piece(self.bos),
            "eos_token": self._piece(self.eod),
            "unk_token": self._piece(self.unk),
            "pad_token": self._piece(self.pad),
        }
        special_tokens = {name: piece for name, piece in special_tokens.items() if piece is not None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_tokens,
            "add_bos_token": self.bos is not None,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        _write_json(os.path.join(folder, "tokenizer_config.json"), config)
        _write_json(os.path.join(folder, "special_tokens_map.json"), special_tokens)


def _bpe_merges(pieces: list[tuple[str, float]], mergeable: list[bool]) -> list[tuple[str, str]]:
    """The merges that make Hugging Face BPE act like SentencePiece BPE.

    SentencePiece repeatedly joins the adjacent pair whose concatenation is the highest-scoring piece;
    listing, for every piece, each split into two mergeable pieces, ordered by the joined piece's score,
    gives Hugging Face's merge ranks the same order.
    """
    piece_ids = {piece: piece_id for piece_id, (piece, _) in enumerate(pieces) if mergeable[piece_id]}
    ranked = []
    for piece_id, (piece, score) in enumerate(pieces):
        if not mergeable[piece_id]:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in piece_ids and right in piece_ids:
                ranked.append((-score, piece_id, piece_ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_as_hf_tokenizer(model_bytes: bytes):
    """A `tokenizers.Tokenizer` giving the ids of the SentencePiece model `model_bytes` (BPE or unigram)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    pieces = [(piece.piece, piece.score) for piece in proto.pieces]
    # Pieces SentencePiece never produces by segmenting: control, unknown, unused, bytes, user-defined.
    mergeable = [piece.type == piece_type.NORMAL for piece in proto.pieces]
    unk_id = proto.trainer_spec.unk_id
    byte_fallback = proto.trainer_spec.byte_fallback
    model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    user_defined = sorted((piece.piece for piece in proto.pieces if piece.type == piece_type.USER_DEFINED), key=len, reverse=True)
    if model_type == "BPE":
        vocab = {piece: piece_id for piece_id, (piece, _) in enumerate(pieces)}
        model = models.BPE(
            vocab,
            _bpe_merges(pieces, mergeable),
            unk_token=pieces[unk_id][0],
            fuse_unk=True,
            byte_fallback=byte_fallback,
            ignore_merges=bool(user_defined),
        )
    elif model_type == "UNIGRAM":
        model = models.Unigram([(piece, score if mergeable[i] else 0.0) for i, (piece, score) in enumerate(pieces)], unk_id, byte_fallback)
    else:
        raise TokenizerError(f"SentencePiece model type {model_type} cannot be exported; only BPE and UNIGRAM models can")
    tokenizer = Tokenizer(model)

    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decoder_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decoder_steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decoder_steps)

    tokenizer.add_special_tokens(
        [AddedToken(piece.piece, special=True, normalized=False) for piece in proto.pieces if piece.type in (piece_type.CONTROL, piece_type.UNKNOWN)]
    )
    if user_defined:
        # SentencePiece cuts user-defined pieces out of the normalised text, longest match first, and never
        # merges them; an isolating split does the same, and ignore_merges lets a whole-piece split map to its id.
        pattern = "|".join(re.escape(piece) for piece in user_defined)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    bos_id = proto.trainer_spec.bos_id
    if bos_id >= 0:
        bos = pieces[bos_id][0]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizers` file (tokenizer.json), given directly or as the folder that holds it.

    Special tokens come from tokenizer_config.json beside it when present (eos_token, bos_token,
    pad_token), otherwise from the first of END_OF_TEXT_TOKENS found among the added tokens.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        tokenizer_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(tokenizer_file):
            raise TokenizerError(f"{tokenizer_file} does not exist; pass a tokenizer.json file or its folder to --tokenizer-model")
        self.tokenizer_file = tokenizer_file
        self.folder = os.path.dirname(os.path.abspath(tokenizer_file))
        try:
            self._tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as error:  # noqa: BLE001 - the tokenizers library raises its own Exception type
            raise TokenizerError(f"{tokenizer_file} is not a Hugging Face tokenizer.json ({error})") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        config = self._read_config()
        eod_token = self._config_token(config, "eos_token") or next(
            (token for token in END_OF_TEXT_TOKENS if self._tokenizer.token_to_id(token) is not None), None
        )
        if eod_token is None or self._tokenizer.token_to_id(eod_token) is None:
            raise TokenizerError(
                f"{tokenizer_file}: cannot tell the end-of-document token; put a tokenizer_config.json with "
                f'"eos_token" beside it (none of {", ".join(END_OF_TEXT_TOKENS)} is in the vocabulary)'
            )
        self.eod = self._tokenizer.token_to_id(eod_token)
        self.bos = self._token_id(self._config_token(config, "bos_token"))
        self.pad = self._token_id(self._config_token(config, "pad_token"))

    def _read_config(self) -> dict:
        config_path = os.path.join(self.folder, "tokenizer_config.json")
        if not os.path.isfile(config_path):
            return {}
        with open(config_path, encoding="utf-8") as config_file:
            return json.load(config_file)

    @staticmethod
    def _config_token(config: dict, name: str) -> str | None:
        token = config.get(name)
        return token.get("content") if isinstance(token, dict) else token

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode(_as_id_list(ids), skip_special_tokens=False)

    def save_hf_files(self, folder: str) -> None:
        """tokenizer.json plus the config files beside the source (a minimal tokenizer_config.json if none)."""
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(self.tokenizer_file, os.path.join(folder, "tokenizer.json"))
        copied = []
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            source = os.path.join(self.folder, name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(folder, name))
                copied.append(name)
        if "tokenizer_config.json" not in copied:
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self._tokenizer.id_to_token(self.eod)}
            if self.bos is not None:
                config["bos_token"] = self._tokenizer.id_to_token(self.bos)
            if self.pad is not None:
                config["pad_token"] = self._tokenizer.id_to_token(self.pad)
            _write_json(os.path.join(folder, "tokenizer_config.json"), config)


def tokenizer_hash(tokenizer) -> str:
    """The sha256 of the files `tokenizer` was read from: its identity, recorded in checkpoints
    (DataConfig.tokenizer_hash) and beside token files (data/dataset_tokenizer.py). A SentencePiece .model; a Hugging
    Face tokenizer.json and the tokenizer_config.json beside it (which names the special tokens)."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        paths = [tokenizer.model_path]
    else:
        config = os.path.join(tokenizer.folder, "tokenizer_config.json")
        paths = [tokenizer.tokenizer_file] + ([config] if os.path.isfile(config) else [])
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            content = handle.read()
        digest.update(f"{os.path.basename(path)}:{len(content)}:".encode())
        digest.update(content)
    return digest.hexdigest()


def build_tokenizer(tokenizer_type: str, tokenizer_model: str):
    """The tokenizer of `tokenizer_type` ("SentencePieceTokenizer" | "HuggingFaceTokenizer") loaded from `tokenizer_model`."""
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise TokenizerError(f"unknown --tokenizer-type {tokenizer_type!r}; use one of {', '.join(TOKENIZER_TYPES)}")
