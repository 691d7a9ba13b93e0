"""What every sentencepiece tokenizer here shares (ChatGLM-6B v1's ice_text.model, ChatGLM2-6B's
and LLaMA/Vicuna's tokenizer.model): loading the file with clear errors, text <-> ids, and
Hugging Face-style batches.

A subclass declares its model file (`required_pieces`, the `special_pieces` that decode drops,
`expected_file` for error messages), how special tokens wrap a prompt
(`build_inputs_with_special_tokens`), its `pad_token_id`, and may rewrite text before
sentencepiece sees it (`_preprocess` / `_postprocess`). Special ids are read from the model
file, never fixed numbers, so tiny test models and the real files go through the same code.
Batches are left-padded by default because generation appends on the right.
"""
import abc
import os

import numpy as np
import sentencepiece as spm

from research.common.config import check_int
from research.common.errors import UserInputError

_PADDING_MODES = {False: None, "do_not_pad": None, True: "longest", "longest": "longest",
                  "max_length": "max_length"}


def load_sentencepiece(vocab_file, expected="a sentencepiece model file"):
    """Load the model from bytes so that I/O and parse failures become clear user errors."""
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


class SentencePieceTokenizer(abc.ABC):
    """Sentencepiece text <-> ids, with HF-style `__call__` batches.

    `id_offset` (an int >= 0) ids come before the sentencepiece pieces (ChatGLM-6B v1 reserves
    20000 for image tokens); they carry no text. `max_length` bounds `encode` unless told otherwise.
    """

    expected_file = "a sentencepiece model file"
    # Pieces the model file must have.
    required_pieces = ()
    # Pieces decode(skip_special_tokens=True) drops, where the model file has them.
    special_pieces = ()
    # What `__call__` returns; position_ids are each token's index among the row's real tokens
    # (0 on padding), as ChatGLM2's tokenizer pads them.
    model_input_names = ("input_ids", "attention_mask", "position_ids")

    def __init__(self, vocab_file, max_length=2048, padding_side="left", id_offset=0):
        name = type(self).__name__
        self.max_length = check_int(f"{name} max_length", max_length, 2)
        if padding_side not in ("left", "right"):
            raise UserInputError(f"{name} padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.id_offset = id_offset
        self.vocab_file = vocab_file
        self.sp_model = load_sentencepiece(vocab_file, self.expected_file)
        missing = [piece for piece in self.required_pieces if self._sp_id(piece) is None]
        if missing:
            raise UserInputError(f"tokenizer vocab_file {vocab_file!r} lacks the special pieces "
                                 f"{', '.join(missing)} that {name} needs; expected {self.expected_file}")
        self._special_ids = {self.piece_id(p) for p in self.special_pieces if self._sp_id(p) is not None}

    # ---- the model file's pieces ------------------------------------------------------------

    def _sp_id(self, piece):
        """Sentencepiece id of `piece`, or None: piece_to_id answers unk for unknown pieces."""
        sp_id = self.sp_model.piece_to_id(piece)
        if sp_id == self.sp_model.unk_id() and piece != self.sp_model.id_to_piece(sp_id):
            return None
        return sp_id

    def piece_id(self, piece):
        """Model id of a piece of the model file (sentencepiece id + id_offset), or None."""
        sp_id = self._sp_id(piece)
        return None if sp_id is None else sp_id + self.id_offset

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size() + self.id_offset

    @property
    def unk_token_id(self):
        return self.sp_model.unk_id() + self.id_offset

    @property
    @abc.abstractmethod
    def pad_token_id(self):
        """The id padding uses (masked out, so any valid id serves)."""

    @abc.abstractmethod
    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """A prompt's ids wrapped in the model's special tokens (and, for training pairs, the answer's)."""

    # ---- text <-> pieces --------------------------------------------------------------------

    def _preprocess(self, text):
        """Text as sentencepiece should see it (a subclass rewrites layout here)."""
        return text

    def _postprocess(self, text):
        """Undo _preprocess on decoded text."""
        return text

    def tokenize(self, text):
        """Sentencepiece pieces of `text` (after _preprocess)."""
        return self.sp_model.encode(self._preprocess(text), out_type=str)

    def convert_tokens_to_ids(self, tokens):
        """Piece(s) to id(s); unknown pieces map to unk."""
        if isinstance(tokens, str):
            return self.sp_model.piece_to_id(tokens) + self.id_offset
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids):
        """Id(s) to piece(s)."""
        if isinstance(ids, (int, np.integer)):
            return self.sp_model.id_to_piece(self._checked_ids([ids])[0] - self.id_offset)
        return [self.convert_ids_to_tokens(token_id) for token_id in ids]

    def _checked_ids(self, ids):
        """Plain ints in range, so sentencepiece never sees a bad id (e.g. a -100 label)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserInputError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return ids

    # ---- ids ----------------------------------------------------------------------------------

    def _limit(self, max_length):
        return self.max_length if max_length is None else check_int("max_length", max_length, 2)

    def encode(self, text, add_special_tokens=True, truncation=False, max_length=None):
        """Ids of `text`, wrapped by build_inputs_with_special_tokens when `add_special_tokens`.

        Longer than `max_length` (default: the tokenizer's) is an error unless `truncation`,
        which keeps the start of the text and still adds the special tokens.
        """
        if not isinstance(text, str):
            raise UserInputError(f"{type(self).__name__} expects text as str, got {type(text).__name__}")
        ids = self._text_ids(text)
        limit = self._limit(max_length)
        specials = len(self.build_inputs_with_special_tokens([])) if add_special_tokens else 0
        if len(ids) > limit - specials:
            if not truncation:
                extra = f" plus {specials} special tokens" if specials else ""
                raise UserInputError(f"text encodes to {len(ids)} tokens{extra}, more than max_length {limit}; "
                                     f"shorten it, raise max_length or pass truncation=True")
            ids = ids[:limit - specials]
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def _text_ids(self, text):
        """The sentencepiece ids of `text` (after _preprocess), shifted by id_offset."""
        return [i + self.id_offset for i in self.sp_model.encode(self._preprocess(text))]

    def decode(self, token_ids, skip_special_tokens=True):
        """Text of `token_ids`; the offset's ids never produce text, special ids only when not skipped."""
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [token_ids]
        dropped = self._special_ids if skip_special_tokens else set()
        sp_ids = [i - self.id_offset for i in self._checked_ids(token_ids)
                  if i >= self.id_offset and i not in dropped]
        return self._postprocess(self.sp_model.decode(sp_ids))

    def _pad(self, row, length, value):
        pad = [value] * (length - len(row))
        return pad + row if self.padding_side == "left" else row + pad

    def __call__(self, text, padding=False, max_length=None, add_special_tokens=True, truncation=False,
                 return_tensors=None):
        """HF-style encoding of one text or a list of texts (a batch): the `model_input_names`.

        padding: False / "do_not_pad", True / "longest", or "max_length" (pads to max_length or
        the tokenizer's max_length) on `padding_side`. return_tensors: None (lists) or "np" (int32).
        """
        if padding not in _PADDING_MODES:
            raise UserInputError(f"padding must be one of False, True, 'longest', 'max_length', "
                                 f"'do_not_pad', got {padding!r}")
        if return_tensors not in (None, "np"):
            raise UserInputError(f"return_tensors must be None or 'np', got {return_tensors!r}")
        batched = isinstance(text, (list, tuple))
        input_ids = [self.encode(t, add_special_tokens, truncation, max_length)
                     for t in (text if batched else [text])]
        columns = {"input_ids": input_ids,
                   "attention_mask": [[1] * len(ids) for ids in input_ids],
                   "position_ids": [list(range(len(ids))) for ids in input_ids]}
        mode = _PADDING_MODES[padding]
        if mode is not None:
            length = self._limit(max_length) if mode == "max_length" else max(map(len, input_ids), default=0)
            pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "position_ids": 0}
            columns = {name: [self._pad(row, length, pad_values[name]) for row in rows]
                       for name, rows in columns.items()}
        if return_tensors == "np":
            if len(set(map(len, columns["input_ids"]))) > 1:
                raise UserInputError("return_tensors='np' needs equal lengths; pass padding=True or 'max_length'")
            columns = {name: np.array(rows, dtype=np.int32) for name, rows in columns.items()}
        return {name: columns[name] if batched else columns[name][0] for name in self.model_input_names}
