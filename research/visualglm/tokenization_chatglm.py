"""Tokenizer of ChatGLM-6B v1 and VisualGLM-6B over an ice_text.model sentencepiece file.

ChatGLM v1 does not feed raw text to sentencepiece: newlines, tabs and runs of spaces are
first rewritten to dedicated pieces (`<n>`, `<|tab|>`, `<|blank_N|>`) so that code and
layout survive, and prompts end with `[gMASK] <sop>`, which the GLM's 2D positions key on.
Old checkpoints (150528 vocab) put 20000 image tokens before the text pieces, hence the
optional id offset. Loading, encoding, decoding and batches are the shared
research.common.tokenization base.
"""
import re

import numpy as np
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import check_int
from research.common.errors import UserInputError
from research.common.tokenization import SentencePieceTokenizer

_BLANK_PIECE = re.compile(r"<\|blank_(\d+)\|>")
_IMAGE_TOKEN = re.compile(r"<image_(\d+)>")


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class ChatGLMTokenizer(SentencePieceTokenizer):
    """ChatGLM-6B v1 tokenizer: sentencepiece plus whitespace pieces, an image-id offset and
    `[gMASK] <sop>` prompts, with left padding by default (generation appends on the right)."""

    expected_file = "a sentencepiece model file such as ChatGLM-6B's ice_text.model"
    required_pieces = ("[MASK]", "[gMASK]", "<sop>", "<eop>")
    special_pieces = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<pad>", "</s>", "<unk>")
    # GLM v1's 2D positions are built from the ids by the model (modeling_glm.glm_positions_and_mask).
    model_input_names = ("input_ids", "attention_mask")

    def __init__(self, vocab_file, num_image_tokens=0, max_blank_length=80, max_length=2048,
                 padding_side="left", **kwargs):
        kwargs.pop("type", None)  # YAML nodes carry their registry name
        if kwargs:
            raise UserInputError(f"ChatGLMTokenizer got unknown fields {sorted(kwargs)}; known: vocab_file, "
                                 f"num_image_tokens, max_blank_length, max_length, padding_side")
        self.num_image_tokens = check_int("ChatGLMTokenizer num_image_tokens", num_image_tokens, 0)
        self.max_blank_length = check_int("ChatGLMTokenizer max_blank_length", max_blank_length, 2)
        super().__init__(vocab_file, max_length, padding_side, id_offset=num_image_tokens)
        self._blank_run = re.compile(" {2,%d}" % self.max_blank_length)

    # ---- special ids -------------------------------------------------------------------

    @property
    def mask_token_id(self):
        return self.piece_id("[MASK]")

    @property
    def gmask_token_id(self):
        return self.piece_id("[gMASK]")

    @property
    def bos_token_id(self):
        return self.piece_id("<sop>")

    @property
    def eos_token_id(self):
        return self.piece_id("<eop>")

    @property
    def pad_token_id(self):
        """<pad> if the file has it, else <eop>: padding is masked out, any valid id serves."""
        pad_id = self.piece_id("<pad>")
        return self.eos_token_id if pad_id is None else pad_id

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """Prompt + [gMASK] <sop>, then, for training pairs, answer + <eop>."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    # ---- text <-> pieces ---------------------------------------------------------------

    def _preprocess(self, text):
        """Rewrite layout to the pieces ice_text.model has for it (longest blank runs first)."""
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        return self._blank_run.sub(lambda m: f"<|blank_{len(m.group())}|>", text)

    def _postprocess(self, text):
        """Undo _preprocess on decoded text."""
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return _BLANK_PIECE.sub(lambda m: " " * int(m.group(1)), text)

    def convert_tokens_to_ids(self, tokens):
        """Piece(s) to id(s); `<image_N>` below the offset maps to N, unknown pieces to unk."""
        image = _IMAGE_TOKEN.fullmatch(tokens) if isinstance(tokens, str) else None
        if image and int(image.group(1)) < self.num_image_tokens:
            return int(image.group(1))
        return super().convert_tokens_to_ids(tokens)

    def convert_ids_to_tokens(self, ids):
        """Id(s) to piece(s); ids below the offset become `<image_N>`."""
        if isinstance(ids, (int, np.integer)) and 0 <= ids < self.num_image_tokens:
            return f"<image_{ids}>"
        return super().convert_ids_to_tokens(ids)
