"""LLaMA/Vicuna's tokenizer (the `tokenizer.model` next to the Vicuna weights) for MiniGPT-4, on
the shared research.common.tokenization base.

The file is a plain sentencepiece model: <unk> 0, <s> 1, </s> 2 (read from the file, never fixed
here, so tiny test models go through the same code), byte fallback, a dummy "▁" prefix. As Hugging
Face's slow `LlamaTokenizer` (add_bos_token True, add_eos_token False) a prompt is `<s>` + text;
a training pair is `<s> a <s> b`. The literal texts "<s>" and "</s>" inside a text become bos/eos
ids, as HF splits on its special tokens before sentencepiece sees the text (MiniGPT-4's Llama-2
template writes "<s>[INST] " into the prompt); each text chunk between them is encoded on its own,
with the dummy prefix (HF's legacy behaviour, the one MiniGPT-4 ran with).

MiniGPT-4 embeds a prompt in segments split at "<ImageHere>": the first segment with bos, later
ones without (upstream `Chat.get_context_emb`: `add_special_tokens=i == 0`). `encode_segments`
does exactly that. Decoding drops <unk> <s> </s>. Padding uses eos, as upstream v1 sets
`pad_token = eos_token`; the padded positions are masked, so the value only has to be valid.

Registered in MindFormers' registry as `ResearchLlamaTokenizer` (MindFormers has its own LlamaTokenizer).
"""
import re

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import REGISTRY_PREFIX
from research.common.errors import UserInputError
from research.common.tokenization import SentencePieceTokenizer

_KNOWN_FIELDS = ("vocab_file", "max_length", "padding_side", "add_bos_token", "add_eos_token")


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER, alias=REGISTRY_PREFIX + "LlamaTokenizer")
class LlamaTokenizer(SentencePieceTokenizer):
    """LLaMA's sentencepiece tokenizer: `<s>` + prompt, left padding with eos."""

    expected_file = "LLaMA/Vicuna's tokenizer.model (a sentencepiece model with <unk> <s> </s>)"
    required_pieces = ("<unk>", "<s>", "</s>")
    special_pieces = ("<unk>", "<s>", "</s>")
    # Hugging Face's `__call__` returns no position ids for LLaMA.
    model_input_names = ("input_ids", "attention_mask")

    def __init__(self, vocab_file, max_length=2048, padding_side="left", add_bos_token=True,
                 add_eos_token=False, **kwargs):
        kwargs.pop("type", None)  # YAML nodes carry their registry name
        if kwargs:
            raise UserInputError(f"LlamaTokenizer got unknown fields {sorted(kwargs)}; known: "
                                 f"{', '.join(_KNOWN_FIELDS)}")
        for name, value in (("add_bos_token", add_bos_token), ("add_eos_token", add_eos_token)):
            if not isinstance(value, bool):
                raise UserInputError(f"LlamaTokenizer {name} must be true or false, got {value!r}")
        super().__init__(vocab_file, max_length, padding_side)
        sp = self.sp_model
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise UserInputError(f"tokenizer vocab_file {vocab_file!r} declares no bos/eos ids; "
                                 f"expected {self.expected_file}")
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._special_text = {sp.id_to_piece(sp.bos_id()): sp.bos_id(), sp.id_to_piece(sp.eos_id()): sp.eos_id()}
        self._special_split = re.compile("(" + "|".join(re.escape(p) for p in self._special_text) + ")")

    @property
    def bos_token_id(self):
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self):
        return self.sp_model.eos_id()

    @property
    def pad_token_id(self):
        return self.sp_model.eos_id()

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """HF LlamaTokenizer: [bos] a [eos], then for pairs [bos] b [eos] (bos/eos as configured)."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            ids += bos + list(token_ids_1) + eos
        return ids

    # ---- text -> ids, with "<s>" / "</s>" written in the text ------------------------------------

    def _chunks(self, text):
        """(is_special, chunk) parts of `text` split at literal "<s>" / "</s>"."""
        return [(part in self._special_text, part) for part in self._special_split.split(text) if part]

    def _text_ids(self, text):
        """The ids of `text`, with a literal `<s>` / `</s>` as its special id (the Llama-2 template
        writes "<s>[INST] " into the prompt)."""
        ids = []
        for special, chunk in self._chunks(text):
            ids += [self._special_text[chunk]] if special else self.sp_model.encode(self._preprocess(chunk))
        return ids

    def tokenize(self, text):
        pieces = []
        for special, chunk in self._chunks(text):
            pieces += [chunk] if special else self.sp_model.encode(self._preprocess(chunk), out_type=str)
        return pieces

    def encode_segments(self, segments):
        """Ids of each prompt segment (the text between image placeholders): the first with bos,
        the others without, as upstream's get_context_emb. No length limit: the caller budgets
        the whole context (conversation_minigpt4.fit_history)."""
        if isinstance(segments, str) or not isinstance(segments, (list, tuple)) or not segments:
            raise UserInputError(f"encode_segments expects a non-empty list of text segments, got {segments!r}")
        result = []
        for index, segment in enumerate(segments):
            if not isinstance(segment, str):
                raise UserInputError(f"prompt segment {index} must be a string, got {type(segment).__name__}")
            ids = self._text_ids(segment)
            result.append(self.build_inputs_with_special_tokens(ids) if index == 0 else ids)
        return result
