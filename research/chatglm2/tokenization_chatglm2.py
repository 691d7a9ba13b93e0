"""Tokenizer of ChatGLM2-6B over its tokenizer.model (HF THUDM/chatglm2-6b tokenization_chatglm.py).

Unlike ChatGLM-6B v1's ice_text.model, the sentencepiece file holds plain text pieces only
(<unk> <s> </s> first, no layout pieces, raw text goes in as is); the five special tokens
`[MASK] [gMASK] [sMASK] sop eop` are not pieces of the file but ids appended after them (64789..
64793 for the real file). Prompts start with `[gMASK] sop`; answers end at sentencepiece's eos
`</s>` (2); padding uses unk (0), on the left, with position ids 0 over it. Decoding drops the
appended specials, bos, eos and pad, as HF's `_convert_id_to_token` returns "" for them.
Loading, encoding and batches are the shared research.common.tokenization base.

Registered in MindFormers as `ResearchChatGLM2Tokenizer` (MindFormers' own `ChatGLM2Tokenizer`
stays as it is).
"""
import numpy as np
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.chatglm2.configuration_chatglm2 import REGISTRY_PREFIX
from research.common.errors import UserInputError
from research.common.prompts import ChatGLM2Prompt
from research.common.tokenization import SentencePieceTokenizer

# Appended after the file's pieces in this order (HF SPTokenizer.special_tokens).
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
# The pieces that say a file is ChatGLM-6B v1's ice_text.model, not ChatGLM2's tokenizer.model.
_ICE_TEXT_PIECES = ("[gMASK]", "<sop>", "<n>")
_KNOWN_FIELDS = ("vocab_file", "max_length", "padding_side")


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER, alias=REGISTRY_PREFIX + "ChatGLM2Tokenizer")
class ChatGLM2Tokenizer(SentencePieceTokenizer):
    """ChatGLM2-6B tokenizer: `[gMASK] sop` + prompt, left padding with position ids."""

    expected_file = "ChatGLM2-6B's tokenizer.model (a sentencepiece model with <unk> <s> </s>)"
    special_pieces = ("<unk>", "<s>", "</s>")
    # MindFormers' ChatGLM2Tokenizer YAML node names its tokens; the file fixes them here, so
    # only MindFormers' values are accepted.
    MINDFORMERS_TOKENS = {"bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
                          "mask_token": "[MASK]", "gmask_token": "[gMASK]", "pad_token": "<pad>",
                          "unk_token": "<unk>"}

    def __init__(self, vocab_file, max_length=2048, padding_side="left", **kwargs):
        kwargs.pop("type", None)  # YAML nodes carry their registry name
        for field, value in self.MINDFORMERS_TOKENS.items():
            given = kwargs.pop(field, value)
            if given != value:
                raise UserInputError(f"ChatGLM2Tokenizer {field}: {given!r} cannot be chosen (the "
                                     f"tokenizer file fixes it; MindFormers' value is {value!r})")
        if kwargs:
            raise UserInputError(f"ChatGLM2Tokenizer got unknown fields {sorted(kwargs)}; known: "
                                 f"{', '.join(_KNOWN_FIELDS + tuple(self.MINDFORMERS_TOKENS))}")
        super().__init__(vocab_file, max_length, padding_side)
        if all(self._sp_id(piece) is not None for piece in _ICE_TEXT_PIECES):
            raise UserInputError(f"tokenizer vocab_file {vocab_file!r} is ChatGLM-6B v1's ice_text.model "
                                 f"(it has [gMASK] <sop> <n> pieces); expected {self.expected_file}")
        if self.sp_model.bos_id() < 0 or self.sp_model.eos_id() < 0:
            raise UserInputError(f"tokenizer vocab_file {vocab_file!r} has no <s>/</s> pieces; "
                                 f"expected {self.expected_file}")
        self.num_pieces = self.sp_model.get_piece_size()
        self.special_tokens = {token: self.num_pieces + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.prompt_style = ChatGLM2Prompt()

    @property
    def vocab_size(self):
        return self.num_pieces + len(SPECIAL_TOKENS)

    @property
    def gmask_token_id(self):
        return self.special_tokens["[gMASK]"]

    @property
    def sop_token_id(self):
        return self.special_tokens["sop"]

    @property
    def bos_token_id(self):
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self):
        return self.sp_model.eos_id()

    @property
    def pad_token_id(self):
        return self.sp_model.unk_id()

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """[gMASK] sop + prompt, then, for training pairs, answer + eos."""
        ids = [self.gmask_token_id, self.sop_token_id] + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def build_prompt(self, query, history=None):
        """"[Round i]\\n\\n问：...\\n\\n答：..." text of the turns and the query (upstream's method)."""
        return self.prompt_style.build_prompt(query, history or ())

    def encode_chat(self, query, history=None):
        """Ids of `build_prompt(query, history)` with the `[gMASK] sop` prefix, of any length
        (the caller fits the history into the model's length)."""
        return self.build_inputs_with_special_tokens(self.sp_model.encode(self.build_prompt(query, history)))

    def encode_continuation(self, text):
        """Ids of `text` to append after earlier ids (a next round on the KV cache): without the
        specials and without the lone "▁" sentencepiece puts before every encoded text, as
        upstream's build_stream_inputs drops it."""
        ids = self.sp_model.encode(text)
        return ids[1:] if ids and self.sp_model.id_to_piece(ids[0]) == "▁" else ids

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str) and tokens in self.special_tokens:
            return self.special_tokens[tokens]
        return super().convert_tokens_to_ids(tokens)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, (int, np.integer)) and ids >= self.num_pieces:
            return SPECIAL_TOKENS[self._checked_ids([ids])[0] - self.num_pieces]
        return super().convert_ids_to_tokens(ids)

    def decode(self, token_ids, skip_special_tokens=True):
        """Text of `token_ids`; the appended specials give no text when skipped, their names otherwise."""
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [token_ids]
        text, piece_ids = [], []
        for token_id in self._checked_ids(token_ids):
            if token_id < self.num_pieces:
                piece_ids.append(token_id)
            elif not skip_special_tokens:
                text.append(super().decode(piece_ids, skip_special_tokens) + SPECIAL_TOKENS[token_id - self.num_pieces])
                piece_ids = []
        return "".join(text) + super().decode(piece_ids, skip_special_tokens)
