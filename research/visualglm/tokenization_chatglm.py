"""Tokenizer of ChatGLM-6B v1 and VisualGLM-6B over an ice_text.model sentencepiece file.

ChatGLM v1 does not feed raw text to sentencepiece: newlines, tabs and runs of spaces are
first rewritten to dedicated pieces (`<n>`, `<|tab|>`, `<|blank_N|>`) so that code and
layout survive, and prompts end with `[gMASK] <sop>`, which the GLM's 2D positions key on.
Old checkpoints (150528 vocab) put 20000 image tokens before the text pieces, hence the
optional id offset. Special ids are always read from the model file, so the tiny test model
and the real ice_text.model go through the same code.
"""
import os
import re

import numpy as np
import sentencepiece as spm
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.errors import UserInputError

REQUIRED_PIECES = ("[MASK]", "[gMASK]", "<sop>", "<eop>")
# Dropped by decode(skip_special_tokens=True) when the model file has them.
SKIPPED_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<pad>", "</s>", "<unk>")
_BLANK_PIECE = re.compile(r"<\|blank_(\d+)\|>")
_IMAGE_TOKEN = re.compile(r"<image_(\d+)>")
_PADDING_MODES = {False: None, "do_not_pad": None, True: "longest", "longest": "longest",
                  "max_length": "max_length"}


def _load_sentencepiece(vocab_file):
    """Load the model from bytes so that I/O and parse failures become clear user errors."""
    expected = "a sentencepiece model file such as ChatGLM-6B's ice_text.model"
    if not isinstance(vocab_file, (str, os.PathLike)) or not os.path.isfile(vocab_file):
        raise UserInputError(f"tokenizer vocab_file {vocab_file!r} does not exist or is not a file; "
                             f"expected {expected}")
    try:
        with open(vocab_file, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UserInputError(f"cannot read tokenizer vocab_file {vocab_file!r} ({err}); "
                             f"expected {expected}") from err
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except RuntimeError as err:
        raise UserInputError(f"tokenizer vocab_file {vocab_file!r} is not a valid sentencepiece model "
                             f"({str(err).strip()}); expected {expected}") from err
    return processor


def _check_int(name, value, minimum):
    """Config values come from YAML, so reject wrong types early and by name."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserInputError(f"ChatGLMTokenizer {name} must be an integer >= {minimum}, got {value!r}")
    return value


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class ChatGLMTokenizer:
    """ChatGLM-6B v1 tokenizer: sentencepiece plus whitespace pieces, an image-id offset and
    `[gMASK] <sop>` prompts, with left padding by default (generation appends on the right)."""

    def __init__(self, vocab_file, num_image_tokens=0, max_blank_length=80, max_length=2048,
                 padding_side="left", **kwargs):
        del kwargs  # YAML configs carry keys such as `type`; the model file fixes everything else.
        self.num_image_tokens = _check_int("num_image_tokens", num_image_tokens, 0)
        self.max_blank_length = _check_int("max_blank_length", max_blank_length, 2)
        self.max_length = _check_int("max_length", max_length, 2)
        if padding_side not in ("left", "right"):
            raise UserInputError(f"ChatGLMTokenizer padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.vocab_file = vocab_file
        self.sp_model = _load_sentencepiece(vocab_file)
        missing = [piece for piece in REQUIRED_PIECES if self._sp_id(piece) is None]
        if missing:
            raise UserInputError(f"tokenizer vocab_file {vocab_file!r} lacks the special pieces "
                                 f"{', '.join(missing)} that ChatGLM needs; expected an ice_text.model-style "
                                 f"sentencepiece model")
        self._blank_run = re.compile(" {2,%d}" % self.max_blank_length)
        self._skipped_ids = {self._piece_id(p) for p in SKIPPED_PIECES if self._sp_id(p) is not None}

    # ---- special ids -------------------------------------------------------------------

    def _sp_id(self, piece):
        """Sentencepiece id of `piece`, or None: piece_to_id answers unk for unknown pieces."""
        sp_id = self.sp_model.piece_to_id(piece)
        if sp_id == self.sp_model.unk_id() and piece != self.sp_model.id_to_piece(sp_id):
            return None
        return sp_id

    def _piece_id(self, piece):
        """Model id of a piece present in the file (sentencepiece id + image offset)."""
        sp_id = self._sp_id(piece)
        return None if sp_id is None else sp_id + self.num_image_tokens

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size() + self.num_image_tokens

    @property
    def mask_token_id(self):
        return self._piece_id("[MASK]")

    @property
    def gmask_token_id(self):
        return self._piece_id("[gMASK]")

    @property
    def smask_token_id(self):
        """None when the model file has no [sMASK] (it is optional)."""
        return self._piece_id("[sMASK]")

    @property
    def bos_token_id(self):
        return self._piece_id("<sop>")

    @property
    def eos_token_id(self):
        return self._piece_id("<eop>")

    @property
    def pad_token_id(self):
        """<pad> if the file has it, else <eop>: padding is masked out, any valid id serves."""
        pad_id = self._piece_id("<pad>")
        return self.eos_token_id if pad_id is None else pad_id

    @property
    def unk_token_id(self):
        return self.sp_model.unk_id() + self.num_image_tokens

    # ---- text <-> pieces ---------------------------------------------------------------

    def _preprocess(self, text):
        """Rewrite layout to the pieces ice_text.model has for it (longest blank runs first)."""
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        return self._blank_run.sub(lambda m: f"<|blank_{len(m.group())}|>", text)

    @staticmethod
    def _postprocess(text):
        """Undo _preprocess on decoded text."""
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return _BLANK_PIECE.sub(lambda m: " " * int(m.group(1)), text)

    def tokenize(self, text):
        """Sentencepiece pieces of `text` after the whitespace rewriting."""
        return self.sp_model.encode(self._preprocess(text), out_type=str)

    def convert_tokens_to_ids(self, tokens):
        """Piece(s) to id(s); `<image_N>` below the offset maps to N, unknown pieces to unk."""
        if isinstance(tokens, str):
            image = _IMAGE_TOKEN.fullmatch(tokens)
            if image and int(image.group(1)) < self.num_image_tokens:
                return int(image.group(1))
            return self.sp_model.piece_to_id(tokens) + self.num_image_tokens
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids):
        """Id(s) to piece(s); ids below the offset become `<image_N>`."""
        if isinstance(ids, (int, np.integer)):
            token_id = self._checked_ids([ids])[0]
            if token_id < self.num_image_tokens:
                return f"<image_{token_id}>"
            return self.sp_model.id_to_piece(token_id - self.num_image_tokens)
        return [self.convert_ids_to_tokens(token_id) for token_id in ids]

    def _checked_ids(self, ids):
        """Plain ints in range, so sentencepiece never sees a bad id (e.g. a -100 label)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserInputError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return ids

    # ---- ids -----------------------------------------------------------------------------

    def _limit(self, max_length):
        return self.max_length if max_length is None else _check_int("max_length", max_length, 2)

    def encode(self, text, add_special_tokens=True, truncation=False, max_length=None):
        """Ids of `text`, ending with [gMASK] <sop> when `add_special_tokens`.

        Longer than `max_length` (default: the tokenizer's) is an error unless `truncation`,
        which keeps the start of the text and still ends with the special tokens.
        """
        if not isinstance(text, str):
            raise UserInputError(f"ChatGLMTokenizer expects text as str, got {type(text).__name__}")
        ids = [i + self.num_image_tokens for i in self.sp_model.encode(self._preprocess(text))]
        limit = self._limit(max_length)
        budget = limit - 2 if add_special_tokens else limit
        if len(ids) > budget:
            if not truncation:
                extra = " plus 2 special tokens" if add_special_tokens else ""
                raise UserInputError(f"text encodes to {len(ids)} tokens{extra}, more than max_length {limit}; "
                                     f"shorten it, raise max_length or pass truncation=True")
            ids = ids[:budget]
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """Prompt + [gMASK] <sop>, then, for training pairs, answer + <eop>."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def decode(self, token_ids, skip_special_tokens=True):
        """Text of `token_ids`; image ids never produce text, special ids only when not skipped."""
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [token_ids]
        dropped = self._skipped_ids if skip_special_tokens else set()
        sp_ids = [i - self.num_image_tokens for i in self._checked_ids(token_ids)
                  if i >= self.num_image_tokens and i not in dropped]
        return self._postprocess(self.sp_model.decode(sp_ids))

    def _pad(self, ids, length, value):
        pad = [value] * (length - len(ids))
        return pad + ids if self.padding_side == "left" else ids + pad

    def __call__(self, text, padding=False, max_length=None, add_special_tokens=True, truncation=False,
                 return_tensors=None):
        """HF-style encoding: {"input_ids", "attention_mask"}; a list of texts gives a batch.

        padding: False / "do_not_pad", True / "longest", or "max_length" (pads to max_length or
        the tokenizer's max_length) on `padding_side`. return_tensors: None (lists) or "np" (int32).
        """
        if padding not in _PADDING_MODES:
            raise UserInputError(f"padding must be one of False, True, 'longest', 'max_length', "
                                 f"'do_not_pad', got {padding!r}")
        if return_tensors not in (None, "np"):
            raise UserInputError(f"return_tensors must be None or 'np', got {return_tensors!r}")
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        input_ids = [self.encode(t, add_special_tokens, truncation, max_length) for t in texts]
        attention_mask = [[1] * len(ids) for ids in input_ids]
        mode = _PADDING_MODES[padding]
        if mode is not None:
            length = self._limit(max_length) if mode == "max_length" else max(map(len, input_ids), default=0)
            input_ids = [self._pad(ids, length, self.pad_token_id) for ids in input_ids]
            attention_mask = [self._pad(mask, length, 0) for mask in attention_mask]
        if return_tensors == "np":
            if len(set(map(len, input_ids))) > 1:
                raise UserInputError("return_tensors='np' needs equal lengths; pass padding=True or 'max_length'")
            input_ids = np.array(input_ids, dtype=np.int32)
            attention_mask = np.array(attention_mask, dtype=np.int32)
        if not batched:
            input_ids, attention_mask = input_ids[0], attention_mask[0]
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def batch_encode(self, texts, max_length=None):
        """Left-pad (per padding_side) a batch to its longest text, or to `max_length` if given."""
        return self(list(texts), padding="max_length" if max_length is not None else True, max_length=max_length)
