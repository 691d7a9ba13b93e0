"""The sentencepiece tokenizer base: a LLaMA-style subclass against transformers' LlamaTokenizer
on the same model file, and the batching, length and bad-input rules through ChatGLMTokenizer."""
import numpy as np
import pytest

from research.common.errors import UserInputError
from research.common.testing import default_sentences, train_sentencepiece_model
from research.common.tokenization import SentencePieceTokenizer
from research.visualglm.tokenization_chatglm import ChatGLMTokenizer

# No leading spaces: HF's legacy LLaMA decode drops a leading space that sentencepiece keeps.
TEXTS = ["a cat in the park", "问：图片里有什么？\n答：一只猫。", "two  spaces and a tab\there",
         "emoji 😀 goes through byte fallback"]


class LlamaStyleTokenizer(SentencePieceTokenizer):
    """<s> + text, as LLaMA's tokenizer encodes a prompt; <unk> pads (LLaMA's file has no <pad>)."""

    required_pieces = ("<s>", "</s>")
    special_pieces = ("<unk>", "<s>", "</s>")

    @property
    def pad_token_id(self):
        return self.unk_token_id

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        assert token_ids_1 is None
        return [self.piece_id("<s>")] + list(token_ids_0)


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory):
    """A tiny LLaMA-layout tokenizer.model: <unk> <s> </s>, no pad, no user-defined pieces."""
    return train_sentencepiece_model(str(tmp_path_factory.mktemp("llama") / "tokenizer.model"),
                                     default_sentences(), 600)


def hf_llama(path, padding_side="left"):
    from transformers import LlamaTokenizer
    reference = LlamaTokenizer(vocab_file=path, legacy=True, padding_side=padding_side)
    reference.pad_token = reference.unk_token
    return reference


def test_encode_and_decode_match_transformers(llama_model):
    ours, reference = LlamaStyleTokenizer(llama_model), hf_llama(llama_model)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"]
        assert ids[0] == ours.piece_id("<s>") == 1
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == text
        assert ours.tokenize(text) == reference.tokenize(text)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_matches_transformers(llama_model, padding_side):
    ours = LlamaStyleTokenizer(llama_model, padding_side=padding_side)
    reference = hf_llama(llama_model, padding_side)
    for kwargs in ({"padding": True}, {"padding": "max_length", "max_length": 40}):
        out = ours(TEXTS, return_tensors="np", **kwargs)
        expected = reference(TEXTS, return_tensors="np", **kwargs)
        np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(out["attention_mask"], expected["attention_mask"])
        # Positions count the real tokens from 0 and are 0 on padding (ChatGLM2's `_pad`).
        mask = expected["attention_mask"]
        np.testing.assert_array_equal(out["position_ids"], np.where(mask == 1, mask.cumsum(-1) - 1, 0))
    assert len(set(map(len, ours(TEXTS)["input_ids"]))) > 1  # the batch really needed padding


def test_truncation_matches_transformers(llama_model):
    ours, reference = LlamaStyleTokenizer(llama_model), hf_llama(llama_model)
    text = TEXTS[1] * 3
    assert ours.encode(text, truncation=True, max_length=8) == \
        reference(text, truncation=True, max_length=8)["input_ids"]
    with pytest.raises(UserInputError, match=r"plus 1 special tokens, more than max_length 8"):
        ours.encode(text, max_length=8)


def test_file_and_option_errors_name_the_class(llama_model):
    with pytest.raises(UserInputError, match=r"lacks the special pieces \[MASK\], \[gMASK\], <sop>, <eop> "
                                             r"that ChatGLMTokenizer needs"):
        ChatGLMTokenizer(llama_model)
    with pytest.raises(UserInputError, match="LlamaStyleTokenizer max_length must be an integer >= 2, got True"):
        LlamaStyleTokenizer(llama_model, max_length=True)
    assert LlamaStyleTokenizer(llama_model).piece_id("[gMASK]") is None


# ---- batching and padding (through ChatGLMTokenizer) -------------------------------------------

BATCH = ["a cat", "问：图片里有什么形状？\n答：", "There is a blue triangle in the picture."]


@pytest.fixture(scope="module")
def tok(tiny_ice_text_model):
    return ChatGLMTokenizer(tiny_ice_text_model)


def test_left_padding_of_a_batch(tok):
    out = tok(BATCH, padding=True)
    singles = [tok.encode(t) for t in BATCH]
    width = max(map(len, singles))
    assert len(set(map(len, singles))) == 3
    for row, mask, single in zip(out["input_ids"], out["attention_mask"], singles):
        pad = width - len(single)
        assert len(row) == len(mask) == width
        assert row[:pad] == [tok.pad_token_id] * pad
        assert mask == [0] * pad + [1] * len(single)
        assert row[pad:] == single


def test_padding_to_max_length_and_tensors(tok):
    out = tok(BATCH, padding="max_length", max_length=64)
    assert all(len(row) == 64 for row in out["input_ids"])
    arrays = tok(BATCH, padding="max_length", max_length=64, return_tensors="np")
    assert arrays["input_ids"].shape == (3, 64) and arrays["input_ids"].dtype == np.int32
    assert arrays["input_ids"].tolist() == out["input_ids"]
    assert arrays["attention_mask"].tolist() == out["attention_mask"]


def test_right_padding_and_single_text(tiny_ice_text_model):
    tok = ChatGLMTokenizer(tiny_ice_text_model, padding_side="right")
    out = tok(BATCH[:2], padding=True)
    short = tok.encode(BATCH[0])
    assert out["input_ids"][0][:len(short)] == short
    assert out["input_ids"][0][len(short):] == [tok.pad_token_id] * (len(out["input_ids"][1]) - len(short))
    single = tok(BATCH[0])
    assert single == {"input_ids": short, "attention_mask": [1] * len(short)}


def test_unpadded_batch_is_ragged(tok):
    out = tok(BATCH)
    assert out["input_ids"] == [tok.encode(t) for t in BATCH]
    with pytest.raises(UserInputError, match="equal lengths"):
        tok(BATCH, return_tensors="np")


# ---- bad input ------------------------------------------------------------------------------

def test_missing_vocab_file(tmp_path):
    path = str(tmp_path / "nope.model")
    with pytest.raises(UserInputError, match="does not exist") as err:
        ChatGLMTokenizer(path)
    assert path in str(err.value) and "sentencepiece" in str(err.value)


def test_non_sentencepiece_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("this is not a sentencepiece model\n")
    with pytest.raises(UserInputError, match="not a valid sentencepiece model") as err:
        ChatGLMTokenizer(str(path))
    assert str(path) in str(err.value)


def test_too_long_text(tiny_ice_text_model):
    tok = ChatGLMTokenizer(tiny_ice_text_model, max_length=16)
    text = "There is a red circle in the picture. " * 3
    full = tok.encode(text, add_special_tokens=False, max_length=1000)
    n = len(full)
    with pytest.raises(UserInputError, match=rf"{n} tokens plus 2 special tokens, more than max_length 16"):
        tok.encode(text)
    with pytest.raises(UserInputError, match="more than max_length 16"):
        tok([text, "a"], padding=True)
    with pytest.raises(UserInputError, match="more than max_length 40"):
        tok.encode(text, max_length=40)
    cut = tok.encode(text, truncation=True)
    assert len(cut) == 16 and cut[-2:] == [tok.gmask_token_id, tok.bos_token_id]
    assert cut[:-2] == full[:14]
    assert tok.encode(text, add_special_tokens=False, truncation=True) == full[:16]


def test_bad_ids_and_options(tok, tiny_ice_text_model):
    with pytest.raises(UserInputError, match=r"\[-100\] are outside the vocabulary"):
        tok.decode([5, -100])
    with pytest.raises(UserInputError, match="padding must be"):
        tok("a", padding="left")
    with pytest.raises(UserInputError, match="padding_side"):
        ChatGLMTokenizer(tiny_ice_text_model, padding_side="middle")
    with pytest.raises(UserInputError, match="max_blank_length"):
        ChatGLMTokenizer(tiny_ice_text_model, max_blank_length=1)
